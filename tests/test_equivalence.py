"""K = N is synchronous SGD: the weights equal Lightning DDP's on the same seeds and data."""

import pytest
from conftest import launch, max_difference, results

pytestmark = pytest.mark.multiprocess


def test_sgd_momentum_weight_decay_steplr_clipping_accumulation_batchnorm_match_ddp(tmp_path) -> None:
    # 3 epochs of 8 batches, accumulate 2 -> 12 updates; StepLR halves lr every epoch. Gradients stream out
    # during backward (overlap_push): only the backward before each optimizer step sends. The default update
    # rule (group_scaling="step") leaves a full group untouched. The first layer is frozen but in the optimizer:
    # DDP's weight decay leaves it alone, and so must the server's.
    launch(
        "ddp_equivalence",
        tmp_path,
        "--devices 2 --epochs 3 --batches 8 --batch-norm --overlap-push --weight-decay 0.01 --frozen-first-layer",
    )
    for rank in results(tmp_path, 2):
        assert max_difference(rank["ddp"], rank["hybrid_sgd"]) <= 1e-4
        assert rank["version"] == 12 and rank["update_sizes"] in ({2: 12}, {})
        assert rank["ddp_lr"] == rank["hybrid_sgd_lr"] == pytest.approx(0.05 / 8)
    rank0, rank1 = results(tmp_path, 2)
    assert rank0["update_sizes"] == {2: 12}
    # every rank ends with the same, latest model
    assert max_difference(rank0["hybrid_sgd"], rank1["hybrid_sgd"]) == 0.0


def test_adam_with_weight_decay_matches_ddp_with_three_workers(tmp_path) -> None:
    launch(
        "ddp_equivalence", tmp_path, "--devices 3 --epochs 2 --batches 6 --optimizer adam --lr 0.01 --weight-decay 0.01"
    )
    for rank in results(tmp_path, 3):
        assert max_difference(rank["ddp"], rank["hybrid_sgd"]) <= 1e-4
        assert rank["version"] == 12
