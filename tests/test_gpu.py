"""GPU workers: Lightning's collectives on NCCL, parameter-server traffic on its own gloo groups, staged
through pinned host memory. Skipped where CUDA is absent."""

import pytest
import torch
from conftest import launch, results
from test_equivalence import max_difference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multiprocess,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("sharded", ["", "--shard-server"])
def test_sync_on_gpu_matches_ddp_on_nccl(tmp_path, sharded: str) -> None:
    devices = min(torch.cuda.device_count(), 2)
    launch(
        "ddp_equivalence",
        tmp_path,
        "--accelerator gpu --devices",
        devices,
        "--epochs 2 --batches 6 --batch-norm",
        sharded,
    )
    for rank in results(tmp_path, devices):
        assert max_difference(rank["ddp"], rank["hybrid_sgd"]) <= 1e-4
        assert rank["version"] == 6


def test_async_on_gpu_trains_and_evaluates_one_model(tmp_path) -> None:
    devices = min(torch.cuda.device_count(), 2)
    launch("straggler", tmp_path, "--accelerator gpu --devices", devices, "--threshold 1 --epochs 2 --batches 8")
    ranks = results(tmp_path, devices)
    assert ranks[0]["update_sizes"] == {1: 16 * devices}
    for other in ranks[1:]:
        assert all(torch.equal(ranks[0]["weights"][k], other["weights"][k]) for k in ranks[0]["weights"])
