"""Bad configuration is refused at setup with a message that names the fix (one process, in pytest)."""

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException

import lightning_hybrid
from lightning_hybrid import HybridSGDStrategy, checks
from lightning_hybrid.app.data import DigitsDataModule
from lightning_hybrid.app.models import MLPClassifier


def fit(model: pl.LightningModule, strategy="hybrid_sgd", **kwargs) -> pl.Trainer:
    options = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{**options, **kwargs},
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    return trainer


def test_registered_name_builds_the_strategy_and_trains() -> None:
    trainer = fit(MLPClassifier())
    assert isinstance(trainer.strategy, HybridSGDStrategy)
    assert trainer.strategy.threshold == 1 and trainer.strategy.version == 3
    assert pl.strategies.StrategyRegistry.get("hybrid_sgd").__class__ is HybridSGDStrategy


@pytest.mark.parametrize(
    "name, threshold, sharded",
    [
        ("hybrid_sgd", "50%", False),
        ("hybrid_sgd_async", "async", False),
        ("hybrid_sgd_sync", "sync", False),
        ("hybrid_sgd_sharded", "50%", True),
    ],
)
def test_named_variants_build_their_strategy(name, threshold, sharded) -> None:
    trainer = pl.Trainer(strategy=name, accelerator="cpu", devices=1, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, HybridSGDStrategy)
    assert (strategy._threshold_spec, strategy._shard_server) == (threshold, sharded)


def test_threshold_above_n_is_refused() -> None:
    with pytest.raises(ValueError, match=r"threshold=2 is outside \[1, 1\]"):
        fit(MLPClassifier(), strategy=HybridSGDStrategy(threshold=2))


@pytest.mark.parametrize("threshold", [0, -1, 0.5, "most"])
def test_malformed_threshold_is_refused_at_construction(threshold) -> None:
    with pytest.raises(ValueError, match="threshold"):
        HybridSGDStrategy(threshold=threshold)


def test_bad_peer_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="peer_timeout"):
        HybridSGDStrategy(peer_timeout=0)


def test_an_unknown_start_method_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="start_method='thread' is not one of 'popen', 'spawn'"):
        HybridSGDStrategy(start_method="thread")


class Manual(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(MLPClassifier):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[1].parameters(), lr=0.1), torch.optim.SGD(self.net[3].parameters(), lr=0.1)]


class Lazy(MLPClassifier):
    def __init__(self, buffers_only: bool = False) -> None:
        super().__init__()
        if buffers_only:  # no affine parameters: its running statistics alone are lazy
            self.net.insert(1, torch.nn.LazyBatchNorm1d(affine=False))
        else:
            self.net[1] = torch.nn.LazyLinear(128)


class Embedded(MLPClassifier):
    """The digits' pixel values through an embedding, stepped by ``optimizer``."""

    def __init__(self, optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, sparse: bool = False) -> None:
        super().__init__()
        self.embedding, self.kind = torch.nn.Embedding(17, 1, sparse=sparse), optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.embedding(x.long().clamp(0, 16)).squeeze(-1))

    def configure_optimizers(self):
        return self.kind(self.parameters(), lr=0.01)


class CustomClipping(MLPClassifier):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        pass


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (Manual(), "automatic optimization only"),
        (CustomClipping(), "gradient_clip_val"),
        (Embedded(sparse=True), r"'embedding' makes sparse gradients \(sparse=True\).*build it with sparse=False"),
        (Embedded(torch.optim.SparseAdam), "SparseAdam steps sparse gradients only.*use Adam"),
        (Embedded(torch.optim.LBFGS), "LBFGS.step needs a closure that computes the loss again"),
        (Lazy(buffers_only=True), r"buffer 'net.1.running_mean' is not initialized yet"),
        (Lazy(), r"parameter 'net.1.weight' is not initialized yet \(a torch.nn.Lazy\* module\).*Run one forward"),
    ],
)
def test_unsupported_modules_are_refused_with_the_fix(model, message) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        fit(model)


def test_several_optimizers_are_refused() -> None:
    # Lightning refuses them under automatic optimization, and hybrid_sgd refuses manual optimization
    # Lightning's own message advises manual optimization, which hybrid_sgd refuses: its message says what works
    with pytest.raises(MisconfigurationException, match="return a single optimizer from `configure_optimizers`"):
        fit(TwoOptimizers())


def test_sync_batchnorm_is_refused() -> None:
    with pytest.raises(MisconfigurationException, match="sync_batchnorm"):
        fit(MLPClassifier(batch_norm=True), sync_batchnorm=True)


def test_threshold_can_be_read_and_set_while_training() -> None:
    seen = []

    class Raise(pl.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            seen.append((trainer.strategy.threshold, trainer.strategy.version))
            trainer.strategy.threshold = "sync"

    fit(MLPClassifier(), callbacks=[Raise()])
    assert seen == [(1, 0), (1, 1), (1, 2)]
    assert lightning_hybrid.__version__


def test_a_threshold_set_before_the_trainer_is_resolved_for_the_fits_workers() -> None:
    # set before the Trainer gave the strategy its N: kept as given, not resolved against one worker
    strategy = HybridSGDStrategy()
    strategy.threshold = "sync"
    pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False)
    assert strategy.threshold == 2
    strategy.threshold = "async"
    assert strategy.threshold == 1
    with pytest.raises(ValueError, match="threshold=0 must be at least 1"):
        strategy.threshold = 0
    early = HybridSGDStrategy()
    early.threshold = 2  # a count above the one worker known before a Trainer: checked when the fit knows N


def test_a_second_fit_starts_a_new_server() -> None:
    trainer = fit(MLPClassifier())
    trainer.fit_loop.max_epochs = 2
    trainer.fit(trainer.lightning_module, datamodule=DigitsDataModule())
    # Lightning built a fresh optimizer for the second fit; the server starts again at version 0
    assert trainer.global_step == 6 and trainer.strategy.version == 3
    assert trainer.optimizers[0].state  # the server optimizer's final state came back to rank 0


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        for _ in range(8):
            yield torch.randn(64), torch.tensor(1)


@pytest.mark.parametrize(
    ("trainer_kwargs", "dataloader", "message"),
    [
        ({}, torch.utils.data.DataLoader(Stream(), batch_size=4), "IterableDataset.*pull_work=False"),
        ({"val_check_interval": 0.5}, None, "val_check_interval=0.5.*pull_work=False"),
        ({"limit_train_batches": 0.25}, None, "limit_train_batches=0.25 is a share.*an int.*pull_work=False"),
        (
            {"callbacks": [pl.callbacks.ModelCheckpoint(every_n_train_steps=2)], "enable_checkpointing": True},
            None,
            "every_n_train_steps.*pull_work=False",
        ),
    ],
)
def test_what_pulled_work_cannot_support_is_refused(trainer_kwargs, dataloader, message) -> None:
    trainer = pl.Trainer(
        strategy=HybridSGDStrategy(pull_work=True),
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"enable_checkpointing": False, **trainer_kwargs},
    )
    with pytest.raises(MisconfigurationException, match=message):
        if dataloader is None:
            trainer.fit(MLPClassifier(), datamodule=DigitsDataModule())
        else:
            trainer.fit(MLPClassifier(), train_dataloaders=dataloader)


def test_pull_work_must_be_a_bool_or_none() -> None:
    with pytest.raises(ValueError, match="pull_work"):
        HybridSGDStrategy(pull_work="yes")


def test_threshold_scheduler_needs_hybrid_sgd() -> None:
    callback = lightning_hybrid.ThresholdScheduler(lightning_hybrid.LinearSchedule())
    with pytest.raises(
        ValueError, match="ThresholdScheduler sets the threshold of strategy='hybrid_sgd'.*SingleDevice"
    ):
        fit(MLPClassifier(), strategy="auto", callbacks=[callback])


def test_threshold_scheduler_end_above_n_is_refused() -> None:
    callback = lightning_hybrid.ThresholdScheduler(lightning_hybrid.LinearSchedule(start=1, end=4))
    with pytest.raises(ValueError, match=r"does not fit 1 workers.*outside \[1, 1\]"):
        fit(MLPClassifier(), callbacks=[callback])


def test_threshold_scheduler_shows_k_and_staleness_in_the_progress_bar() -> None:
    callback = lightning_hybrid.ThresholdScheduler(lightning_hybrid.ConstantSchedule("sync"))
    trainer = fit(MLPClassifier(), callbacks=[callback])
    assert trainer.progress_bar_metrics["K"] == 1.0 and trainer.progress_bar_metrics["stale"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(group_scaling="linear"), "unknown group_scaling 'linear'"),
        (dict(max_staleness=0), "max_staleness=0 must be a positive int"),
        (dict(max_staleness=4, overlap_push=True), "overlap_push has sent it during backward"),
        (dict(max_staleness=4, pipeline_pushes=True), "with pipeline_pushes the answer that drops it"),
        (dict(overlap_push=True, pipeline_pushes=True), "pipeline_pushes and overlap_push cannot be combined"),
        (dict(overlap_answers=True, overlap_push=True), "set shard_server=True and overlap_push=True with it"),
        (dict(overlap_answers=True, shard_server=True), "set shard_server=True and overlap_push=True with it"),
        (
            dict(overlap_answers=True, shard_server=True, overlap_push=True, answer_dtype="bfloat16"),
            "remove answer_dtype and push_dtype, or overlap_answers",
        ),
        (dict(answer_dtype="int8"), "answer_dtype must be a floating-point dtype, e.g. 'bfloat16'"),
        (dict(answer_dtype="bf16x"), "answer_dtype must be a floating-point dtype, e.g. 'bfloat16'"),
        (dict(push_dtype="int8"), "push_dtype must be a floating-point dtype, e.g. 'bfloat16'"),
        (dict(push_dtype="float16"), "push_dtype='float16' cannot hold gradients of float32's range"),
    ],
)
def test_bad_update_rules_are_refused_at_construction(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        HybridSGDStrategy(**kwargs)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (MLPClassifier(optimizer="adam"), "Adam.*bias correction.*group_scaling='step'"),
        (MLPClassifier(momentum=0.0), "momentum=0.*group_scaling='step'"),
    ],
)
def test_a_momentum_rule_without_an_sgd_momentum_is_refused_at_setup(model, message) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        fit(model, strategy=HybridSGDStrategy(group_scaling="momentum"))


def test_a_staleness_bound_with_accumulated_batches_is_refused() -> None:
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=2.*remove max_staleness"):
        fit(MLPClassifier(), strategy=HybridSGDStrategy(max_staleness=2), accumulate_grad_batches=2)


def test_a_schedule_over_time_needs_a_time_budget() -> None:
    scheduler = lightning_hybrid.ThresholdScheduler(lightning_hybrid.LinearSchedule(length=100), progress="time")
    with pytest.raises(ValueError, match="Trainer\\(max_time=...\\)"):
        fit(MLPClassifier(), callbacks=[scheduler])
    with pytest.raises(ValueError, match="give every_n_steps"):
        lightning_hybrid.ThresholdScheduler(lightning_hybrid.LinearSchedule(), progress="steps")


def test_a_schedule_over_time_reaches_its_end_as_the_budget_ends() -> None:
    # K = 1 of 1 either way here: what is checked is the progress the schedule was given, in percent of max_time
    class Recorded(lightning_hybrid.LinearSchedule):
        def __call__(self, progress, num_workers, loss=None):
            seen.append(progress)
            return super().__call__(progress, num_workers, loss)

    seen: list[float] = []
    scheduler = lightning_hybrid.ThresholdScheduler(Recorded(length=100), progress="time", every_n_steps=1)
    fit(MLPClassifier(), callbacks=[scheduler], max_time={"seconds": 2}, max_epochs=1000, limit_train_batches=None)
    seen = seen[2:]  # setup tries both ends of the schedule first
    assert seen[0] < 10 and seen == sorted(seen) and 50 < seen[-1] <= 100, seen[:3] + seen[-3:]


@pytest.mark.parametrize(
    ("bounds", "progress", "length"),
    [
        (dict(max_epochs=5), "epochs", 4),  # reaches its end in the last epoch (index 4)
        (dict(max_epochs=1), "epochs", 1),  # one epoch: stays at the start
        (dict(max_epochs=-1, max_steps=6), "steps", 6),  # the server rank's own steps
        (dict(max_epochs=2, max_time={"seconds": 30}), "time", 100),  # percent of the budget
    ],
)
def test_a_named_schedule_spans_the_run(bounds, progress, length) -> None:
    scheduler = lightning_hybrid.ThresholdScheduler("cosine", start="50%")
    fit(MLPClassifier(), callbacks=[scheduler], limit_train_batches=1, **bounds)
    assert scheduler.schedule == lightning_hybrid.CosineSchedule(start="50%", end="sync", length=length)
    assert scheduler.progress == progress


def test_named_schedules_are_checked_by_name_and_need_a_bound_or_a_length() -> None:
    with pytest.raises(ValueError, match="unknown threshold schedule 'warp': choose one of constant, linear"):
        lightning_hybrid.ThresholdScheduler("warp")
    with pytest.raises(ValueError, match="set them on LinearSchedule"):
        lightning_hybrid.ThresholdScheduler(lightning_hybrid.LinearSchedule(), length=3)
    assert lightning_hybrid.ThresholdScheduler("linear", length=3).schedule == lightning_hybrid.LinearSchedule(length=3)
    scheduler = lightning_hybrid.ThresholdScheduler("linear", progress="epochs")
    with pytest.raises(ValueError, match="no max_time, max_epochs or max_steps to span: give the schedule a length"):
        fit(MLPClassifier(), callbacks=[scheduler], max_epochs=-1, max_steps=3)


@pytest.mark.parametrize(("override", "length"), [([], None), (["threshold.length=3"], 3)])
def test_the_apps_ramp_takes_its_length_from_the_config_or_spans_the_run(override, length) -> None:
    # `threshold.length` is a typed key of every threshold config (no `+` needed); null leaves the span to setup
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_hybrid.app.config import register_configs
    from lightning_hybrid.app.train import CONFIG_PATH, build_threshold_scheduler

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        config = compose(config_name="train", overrides=["strategy.scheduled=true", "threshold=linear", *override])
    scheduler = build_threshold_scheduler(OmegaConf.to_object(config))
    spans_at_setup = lightning_hybrid.LinearSchedule(length=5 - 1)  # max_epochs=5: ends in the last epoch
    expected = spans_at_setup if length is None else lightning_hybrid.LinearSchedule(length=length)
    fit(MLPClassifier(), callbacks=[scheduler], limit_train_batches=1, max_epochs=5)
    assert scheduler.schedule == expected


def test_a_parameter_moved_to_another_param_group_during_fit_is_refused() -> None:
    # the flat order stays the same, but the server would step it with its old group's hyperparameters
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([{"params": [first]}, {"params": [second], "lr": 0.01}], lr=0.1)
    served = [list(group["params"]) for group in optimizer.param_groups]
    checks.check_parameters_unchanged(optimizer, served)
    optimizer.param_groups[0]["params"].append(optimizer.param_groups[1]["params"].pop())
    with pytest.raises(MisconfigurationException, match=r"per group: \[1, 1\] when fit started, \[2, 0\] now"):
        checks.check_parameters_unchanged(optimizer, served)
