"""GPU workers, two ranks on whatever GPUs there are (one is enough): two torchrun "nodes" of one process each on
127.0.0.1 (``devices=1, num_nodes=2``; Lightning refuses ``devices=2`` on one GPU), Lightning's default group on
gloo (NCCL refuses two ranks on one device), the parameter server's traffic on its own gloo groups, staged
through pinned host memory. Random data of the digits' shapes: the GPU machines have no scikit-learn.
Skipped where CUDA is absent.

Runs under pytest, or as a plain script that needs no pytest (``benchmarks/gpu_check.sh`` runs it so):

    PYTHONPATH=$PWD python tests/test_gpu.py            # skips (exit 0) without CUDA
    PYTHONPATH=$PWD python tests/test_gpu.py --cpu      # the same launches on CPU: a check of the launch path
"""

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from conftest import launch_nodes, max_difference, results

try:
    import pytest

    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.multiprocess,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ]
except ImportError:  # run as a script (below)
    pass

RANKS = 2
ACCELERATOR = "gpu"  # the script's --cpu sets "cpu"
TIMEOUT = 240.0  # seconds per launch; the script's --timeout sets it
ON_ONE_DEVICE = "--process-group-backend gloo --random-data"


def check_sync_matches_ddp(out: Path, sharded: str) -> None:
    launch_nodes(
        "ddp_equivalence",
        out,
        "--accelerator",
        ACCELERATOR,
        ON_ONE_DEVICE,
        "--epochs 2 --batches 6 --batch-norm",
        sharded,
        nodes=RANKS,
        timeout=TIMEOUT,
    )
    for rank in results(out, RANKS):
        assert max_difference(rank["ddp"], rank["hybrid_sgd"]) <= 1e-4
        assert rank["version"] == 6


def test_sync_on_gpu_matches_ddp(tmp_path) -> None:
    check_sync_matches_ddp(tmp_path, "")


def test_sync_on_gpu_matches_ddp_sharded(tmp_path) -> None:
    check_sync_matches_ddp(tmp_path, "--shard-server")


def test_async_on_gpu_trains_and_evaluates_one_model(tmp_path) -> None:
    launch_nodes(
        "straggler",
        tmp_path,
        "--accelerator",
        ACCELERATOR,
        ON_ONE_DEVICE,
        "--threshold 1 --epochs 2 --batches 8",
        nodes=RANKS,
        timeout=TIMEOUT,
    )
    ranks = results(tmp_path, RANKS)
    assert ranks[0]["update_sizes"] == {1: 16 * RANKS}
    for other in ranks[1:]:
        assert all(torch.equal(ranks[0]["weights"][k], other["weights"][k]) for k in ranks[0]["weights"])


def main() -> int:
    """Each test in a fresh folder; one line per test; exit 1 if any failed."""
    global ACCELERATOR, TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the same launches on CPU")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per launch (default: %(default)s)")
    args = parser.parse_args()
    TIMEOUT = args.timeout
    if args.cpu:
        ACCELERATOR = "cpu"
    elif not torch.cuda.is_available():
        print("tests/test_gpu.py: skipped, CUDA is absent (--cpu runs the same launches on CPU)")
        return 0
    tests = [(name, test) for name, test in globals().items() if name.startswith("test_") and callable(test)]
    failed = 0
    for name, test in tests:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            try:
                test(Path(folder))
                verdict = "passed"
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # pytest.fail's Failed too, where pytest is present
                failed += 1
                verdict = "FAILED (above)"
                traceback.print_exc(file=sys.stdout)
        print(f"{name} [{ACCELERATOR}] {verdict} ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"tests/test_gpu.py [{ACCELERATOR}]: {len(tests) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
