"""Checkpoints restore master weights, optimizer state (with the scheduled lr), version and threshold."""

import pytest
import torch
from conftest import launch, results

pytestmark = pytest.mark.multiprocess


def test_sync_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path) -> None:
    common = "--devices 2 --batches 6 --threshold sync"
    launch("resume", tmp_path, "--phase full --epochs 2", common)
    launch("resume", tmp_path, "--phase first --epochs 1", common)
    launch("resume", tmp_path, "--phase second --epochs 2", common)
    full, first, second = (results(tmp_path / phase, 2) for phase in ("full", "first", "second"))
    checkpoint = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    assert checkpoint["hybrid_sgd"]["version"] == 6 and checkpoint["hybrid_sgd"]["threshold"] == 2
    # the lr the StepLR had set after epoch 1 is in the optimizer state, with the momentum buffers
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.025)
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(list(first[0]["weights"])) - 3  # minus BN buffers
    for name, value in first[0]["weights"].items():
        assert torch.equal(checkpoint["state_dict"][name], value)
    for rank in range(2):
        assert first[rank]["version"] == 6 and second[rank]["version"] == full[rank]["version"] == 12
        assert second[rank]["lr"] == full[rank]["lr"] == pytest.approx(0.0125)
        for name, value in full[rank]["weights"].items():
            assert torch.allclose(second[rank]["weights"][name].double(), value.double(), atol=1e-6), name
    assert_same_optimizer_state(second[0]["optimizer"], full[0]["optimizer"])


def test_async_restore_reproduces_the_saved_state(tmp_path) -> None:
    common = "--devices 2 --batches 6 --threshold 1 --epochs 1"
    launch("resume", tmp_path, "--phase first", common)
    launch("resume", tmp_path, "--phase restore", common)
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    restored = torch.load(tmp_path / "restored.ckpt", weights_only=False)
    assert saved["hybrid_sgd"]["threshold"] == restored["hybrid_sgd"]["threshold"] == 1
    assert saved["hybrid_sgd"] == restored["hybrid_sgd"]
    assert saved["hybrid_sgd"]["version"] == 12  # K = 1: one update per gradient, 2 ranks x 6 batches
    # every update held 1 of 2 gradients: half a sync step (group_scaling="step"), weighed by 1 / (1 + staleness)
    # (staleness 0 or 1 here); SGD's momentum 0.9 unchanged
    assert 12 * 0.5 * 0.5 <= saved["hybrid_sgd"]["step_scale_total"] <= 12 * 0.5
    assert saved["hybrid_sgd"]["momentum_total"] == pytest.approx(12 * 0.9)
    for name, value in saved["state_dict"].items():
        assert torch.equal(restored["state_dict"][name], value), name
    assert_same_optimizer_state(restored["optimizer_states"][0], saved["optimizer_states"][0])
    for rank in results(tmp_path / "restore", 2):
        assert rank["version"] == 12 and rank["threshold"] == 1


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.allclose(
                torch.as_tensor(value).double(), torch.as_tensor(b["state"][index][key]).double(), atol=1e-6
            )
