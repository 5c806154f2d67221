"""What recovery costs: the periodic recovery checkpoint's stall and write, and the time a lost worker costs.

    python benchmarks/recovery.py                      # both tables
    python benchmarks/recovery.py --part checkpoint --sizes 1m 10m 100m
    python benchmarks/recovery.py --part fault --models 1m 10m --repeats 2

``checkpoint``: in one process, a parameter server over a model of each size with SGD and momentum (the state a
recovery checkpoint holds: weights and one momentum buffer). The stall is ``ParameterServer.snapshot()``, the
copy taken under the server's lock, during which no update is applied (what every worker can wait for); the write
is the file written by ``RecoveryDir.save`` (in a thread while training goes on). The overhead column is the
stall as a share of training time at the default interval (``recovery_every`` = 60 s).

``fault``: ``torchrun --standalone --nproc-per-node 3 --max-restarts 1`` runs ``tests/scenarios.py recover``
(digits, K = 1, 2 epochs) on an MLP of each size, once undisturbed and once with rank 1 SIGKILLed at its step 4;
time lost = wall time with the fault minus without (torchrun's restart, the processes' start, Lightning's set-up,
the resume and the work redone), measured side by side; redone = batches round 0 trained that the recovery
checkpoint did not hold.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning_fabric.plugins import TorchCheckpointIO

from lightning_hybrid.recovery import RecoveryDir
from lightning_hybrid.server import ParameterServer

SIZES = {"1m": 1_000_000, "10m": 10_000_000, "100m": 100_000_000}
# the recover scenario's MLP on 64 inputs: (hidden, depth) -> 1,076,010 and 9,845,810 parameters
MODELS = {"1m": (1000, 2), "10m": (2200, 3)}
SCENARIOS = Path(__file__).resolve().parent.parent / "tests" / "scenarios.py"
DEFAULT_EVERY = 60.0


def checkpoint_costs(size: str, repeats: int) -> dict[str, float]:
    numel = SIZES[size]
    params = [torch.randn(numel // 4) for _ in range(4)]
    server = ParameterServer(
        params, lambda master: torch.optim.SGD(master, lr=0.1, momentum=0.9), num_workers=3, threshold=1
    )
    server.push(0, [g.clone() for g in server.layout.allocate("cpu")], version=0)  # a step: momentum exists
    stalls, writes = [], []
    with tempfile.TemporaryDirectory() as folder:
        directory = RecoveryDir(folder, keep=1)
        for _ in range(repeats):
            started = time.perf_counter()
            snapshot = server.snapshot()
            stalls.append(time.perf_counter() - started)
            checkpoint = {
                "state_dict": dict(enumerate(snapshot.master)),
                "optimizer_states": [snapshot.optimizer_state],
            }
            started = time.perf_counter()
            path = directory.save(checkpoint, TorchCheckpointIO(), version=1)
            writes.append(time.perf_counter() - started)
            megabytes = path.stat().st_size / 2**20
    stall = statistics.median(stalls)
    return {"stall": stall, "write": statistics.median(writes), "mb": megabytes, "overhead": stall / DEFAULT_EVERY}


def run_recover(model: str, out: Path, kill: bool) -> float:
    hidden, depth = MODELS[model]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    command += ["--max-restarts", "1", str(SCENARIOS), "recover", "--out", str(out), "--devices", "3"]
    command += ["--threshold", "async", "--hidden", str(hidden), "--depth", str(depth)]
    command += ["--die-in-first-round", "1:4"] if kill else []
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def redone_batches(out: Path) -> int:
    epoch = torch.load(out / "rank0.pt", weights_only=False)["resumed"]["epoch"]
    resumed = torch.load(out / f"resumed-epoch{epoch}.pt", weights_only=False)
    trained = set()
    for path in out.glob("trained-round0-of-*-rank*.txt"):
        for line in path.read_text().splitlines():
            started, _, first, *_ = line.split()
            if int(started) == epoch:
                trained.add(int(first))
    held = set(resumed["samples"])
    return len(trained - held)  # batches started in round 0 and not held, each counted by its first sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["checkpoint", "fault", "both"], default="both")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("checkpoint", "both"):
        print(f"{'model':>6} {'stall (s)':>10} {'write (s)':>10} {'file (MB)':>10} {'overhead at 60 s':>17}")
        for size in args.sizes:
            cost = checkpoint_costs(size, args.repeats)
            print(
                f"{size:>6} {cost['stall']:>10.3f} {cost['write']:>10.3f} {cost['mb']:>10.0f} {cost['overhead']:>16.2%}"
            )
    if args.part in ("fault", "both"):
        print(f"\n{'model':>6} {'undisturbed (s)':>16} {'with a fault (s)':>17} {'time lost (s)':>14} {'redone':>7}")
        for model in args.models:
            clean, faulty, redone = [], [], []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
                    clean.append(run_recover(model, Path(a), kill=False))
                    faulty.append(run_recover(model, Path(b), kill=True))
                    redone.append(redone_batches(Path(b)))
            lost = [f - c for f, c in zip(faulty, clean)]
            print(
                f"{model:>6} {statistics.mean(clean):>16.1f} {statistics.mean(faulty):>17.1f} "
                f"{statistics.mean(lost):>8.1f} ± {statistics.pstdev(lost):<4.1f} {statistics.mean(redone):>7.1f}"
            )


if __name__ == "__main__":
    main()
