"""Every refusal of ``HybridSGDStrategy``, each naming its fix.

A setting the hybrid cannot honour fails before training starts, with the same error on every rank (so no rank
waits for another that already stopped), instead of training differently from what the user asked.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, get_args

import torch
from torch import Tensor
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_hybrid import shards
from lightning_hybrid.group_scaling import check_group_scaling, check_rule_name
from lightning_hybrid.server import check_max_staleness, steps_exactly
from lightning_hybrid.shards import ELEMENTWISE_OPTIMIZERS
from lightning_hybrid.thresholds import ThresholdSpec, check_threshold_spec

from .lightning_api import MisconfigurationException, is_overridden, pl, rank_zero_warn
from .lockstep import saves_by_steps_or_time

DDP_FIX = "use strategy='ddp' for it"
STATIC_FIX = "or use HybridSGDStrategy(pull_work=False)"
UNSHARDED_FIX = "or use HybridSGDStrategy(shard_server=False)"
RECOVERY_FIX = "or use HybridSGDStrategy(recovery_dir=None)"


StartMethod = Literal["popen", "spawn", "fork", "forkserver"]
START_METHODS = get_args(StartMethod)


def check_start_method(start_method: str) -> None:
    """Lightning checks it only when a fit launches its processes; a typo fails where it was written."""
    if start_method not in START_METHODS:
        raise ValueError(
            f"start_method={start_method!r} is not one of {', '.join(map(repr, START_METHODS))}: 'popen' (the "
            "default) runs the script once per process, like DDP; the others start processes from this one"
        )


def check_recovery(recovery_every: float) -> None:
    """Recovery checkpoints' arguments, when the strategy is built."""
    if isinstance(recovery_every, bool) or not isinstance(recovery_every, (int, float)) or not recovery_every > 0:
        raise ValueError(f"recovery_every must be a positive number of seconds, got {recovery_every!r}")


def check_recovery_fit(accumulate_grad_batches: int) -> None:
    """Recovery knows which batch each gradient came from: one batch per step."""
    if accumulate_grad_batches > 1:
        raise MisconfigurationException(
            f"hybrid_sgd: recovery_dir records the batch of every pushed gradient, but with accumulate_grad_batches="
            f"{accumulate_grad_batches} a gradient sums several batches: use accumulate_grad_batches=1 (a larger "
            "batch_size is the same update) or recovery_dir=None"
        )


def check_shard_weights(
    weights: Optional[Sequence[float]], shard_server: bool, world_size: Optional[int] = None
) -> None:
    """Shares of a sharded server's ranks: when the strategy is built, and for the fit's world size at setup."""
    if weights is None:
        return
    if not shard_server:
        raise ValueError("shard_weights sizes the slices of a sharded server: set shard_server=True, or remove it")
    shards.check_shard_weights(weights, world_size)


def check_options(
    threshold: ThresholdSpec,
    pull_work: Optional[bool],
    group_scaling: str,
    max_staleness: Optional[int],
    overlap_push: bool,
    nonfinite: str,
    peer_timeout: float,
    pipeline_pushes: bool = False,
) -> None:
    """The strategy's own arguments, when it is built."""
    check_threshold_spec(threshold)
    if not peer_timeout > 0:
        raise ValueError(f"peer_timeout must be a positive number of seconds, got {peer_timeout!r}")
    if pull_work not in (None, True, False):
        raise ValueError(f"pull_work must be True, False or None (automatic), got {pull_work!r}")
    check_rule_name(group_scaling)
    check_max_staleness(max_staleness)
    if max_staleness is not None and overlap_push:
        raise ValueError(
            "max_staleness computes a dropped gradient's batch again, but overlap_push has sent it during "
            "backward already: remove one of them"
        )
    if max_staleness is not None and pipeline_pushes:
        raise ValueError(
            "max_staleness computes a dropped gradient's batch again, but with pipeline_pushes the answer that "
            "drops it comes one step later, when that batch is gone: remove one of them"
        )
    if overlap_push and pipeline_pushes:
        raise ValueError(
            "pipeline_pushes and overlap_push cannot be combined (a pipelined worker sends its gradient while its "
            "last answer comes in; overlap_push streams it during backward): choose one"
        )
    if nonfinite not in ("skip", "stop"):
        raise ValueError(f"nonfinite must be 'skip' or 'stop', got {nonfinite!r}")


def check_overlap_answers(
    overlap_answers: bool, shard_server: bool, overlap_push: bool, answer_dtype: Any, push_dtype: Any
) -> None:
    """Answers chunk by chunk need chunks that stream in (``overlap_push``) to shards (``shard_server``), and the
    parameters' own precision on the wire (a stripe's answer lands in the model as it comes)."""
    if not overlap_answers:
        return
    if not (shard_server and overlap_push):
        raise ValueError(
            "overlap_answers steps each shard's stripes as the streamed gradients complete: set shard_server=True "
            "and overlap_push=True with it, or remove it"
        )
    if answer_dtype is not None or push_dtype is not None:
        raise ValueError(
            "overlap_answers sends the parameters and gradients at their own precision: remove answer_dtype and "
            "push_dtype, or overlap_answers"
        )


def wire_dtype_of(
    option: str, dtype: str | torch.dtype | None, *, float32_range: bool = False
) -> Optional[torch.dtype]:
    """The strategy's ``answer_dtype`` or ``push_dtype`` (named by ``option``) as a torch dtype: a floating one,
    by name (``"bfloat16"``) or itself. ``float32_range``: it must hold float32's range, as gradients must (a float16
    gradient above 65504 turns Inf, and a shard that finds Inf in its slice would reject what the others apply)."""
    if dtype is None:
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"{option} must be a floating-point dtype, e.g. 'bfloat16' or torch.bfloat16 (None: the parameters' "
            f"own), got {dtype!r}"
        )
    if float32_range and torch.finfo(resolved).max < 2.0**127:
        raise ValueError(
            f"{option}={dtype!r} cannot hold gradients of float32's range (its largest value is "
            f"{torch.finfo(resolved).max:g}; larger ones would arrive as Inf and be rejected): use 'bfloat16'"
        )
    return resolved


def check_trainer(trainer: pl.Trainer, sync_batchnorm: bool, gradient_scaler: Any) -> None:
    """What the LightningModule and the Trainer ask for, at the start of fit."""
    module = trainer.lightning_module
    if not module.automatic_optimization:
        raise MisconfigurationException(
            "hybrid_sgd applies every update on the parameter server and supports automatic optimization only: "
            f"remove `self.automatic_optimization = False`, or {DDP_FIX}."
        )
    if is_overridden("configure_gradient_clipping", module):
        raise MisconfigurationException(
            "hybrid_sgd clips the aggregated gradient on the parameter server, so a custom "
            "`configure_gradient_clipping` cannot run: remove it and set `Trainer(gradient_clip_val=..., "
            f"gradient_clip_algorithm=...)`, or {DDP_FIX}."
        )
    if sync_batchnorm:
        raise MisconfigurationException(
            "SyncBatchNorm synchronises every forward pass and would chain asynchronous workers together: "
            "remove `Trainer(sync_batchnorm=True)` (hybrid_sgd shares rank 0's BatchNorm statistics at every drain)."
        )
    if gradient_scaler is not None:
        raise MisconfigurationException(
            "precision='16-mixed' uses a GradScaler that steps the local optimizer, which hybrid_sgd never does: "
            "use precision='bf16-mixed' or '32-true'."
        )


def check_initialized(module: torch.nn.Module) -> None:
    """A lazy module's parameters and buffers have no shape until its first forward, and the server lays out every
    one when fit starts (as DDP does)."""
    tensors = [("parameter", module.named_parameters()), ("buffer", module.named_buffers())]
    lazy = [(kind, name) for kind, named in tensors for name, tensor in named if is_lazy(tensor)]
    if lazy:
        kind, name = lazy[0]
        raise MisconfigurationException(
            f"{kind} {name!r} is not initialized yet (a torch.nn.Lazy* module): hybrid_sgd lays out every parameter "
            "and buffer when fit starts, as DDP does. Run one forward pass on an example batch before fit (e.g. in "
            "your LightningModule's setup() or __init__) to initialize it."
        )


def check_dense_gradients(module: torch.nn.Module) -> None:
    """The server receives and steps dense flat gradients; a sparse one (an embedding with ``sparse=True``) cannot be
    packed into them, and its rows would travel in full anyway."""
    sparse = [
        name
        for name, child in module.named_modules()
        if isinstance(child, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and child.sparse
    ]
    if sparse:
        raise MisconfigurationException(
            f"{sparse[0]!r} makes sparse gradients (sparse=True), but hybrid_sgd's server moves and steps dense "
            "ones: build it with sparse=False (every row travels with each push either way), or use DDP, which "
            "all-reduces sparse gradients."
        )


def model_signature(params: Sequence[Tensor], device: torch.device) -> Tensor:
    """Count, size and a checksum of the shapes and dtypes of a model's parameters, to compare across ranks."""
    signature = repr([(tuple(p.shape), str(p.dtype)) for p in params]).encode()
    return torch.tensor([len(params), sum(p.numel() for p in params), zlib.crc32(signature)], device=device)


def check_same_model_everywhere(signatures: Tensor) -> None:
    """``signatures``: every rank's :func:`model_signature`, one row per rank."""
    everyone = signatures.reshape(-1, 3).cpu()
    for rank, theirs in enumerate(everyone.tolist()):
        if theirs != everyone[0].tolist():
            raise MisconfigurationException(
                f"rank {rank} built a model with {theirs[0]} parameter tensors ({theirs[1]} elements) but rank 0 "
                f"built {int(everyone[0, 0])} ({int(everyone[0, 1])} elements), or their shapes or dtypes differ: "
                "build the same model on every rank (no rank-dependent layers; call seed_everything first)."
            )


def options_signature(options: Mapping[str, Any], device: torch.device) -> Tensor:
    """A checksum of each of the strategy's ``options`` that every rank must share, to compare across ranks."""
    return torch.tensor([zlib.crc32(repr(value).encode()) for value in options.values()], device=device)


def check_same_options_everywhere(names: Sequence[str], signatures: Tensor) -> None:
    """``signatures``: every rank's :func:`options_signature` of the options ``names``, one row per rank. Ranks
    that disagree on the protocol (a sharded server, answers' dtype) would otherwise hang or fail mid-run."""
    everyone = signatures.reshape(-1, len(names)).cpu().tolist()
    for rank, theirs in enumerate(everyone):
        differ = [name for name, value, rank0s in zip(names, theirs, everyone[0]) if value != rank0s]
        if differ:
            raise MisconfigurationException(
                f"rank {rank} runs hybrid_sgd with another {', '.join(differ)} than rank 0: give every rank the same "
                "HybridSGDStrategy(...) arguments (the same config on every node)."
            )


def check_one_optimizer(optimizers: Sequence[Optimizer]) -> Optimizer:
    """The server steps one optimizer, which must hold parameters."""
    if len(optimizers) != 1:
        raise MisconfigurationException(
            f"hybrid_sgd serves exactly one optimizer, but configure_optimizers returned {len(optimizers)}: "
            "return a single optimizer (use parameter groups for different settings)."
        )
    if not any(group["params"] for group in optimizers[0].param_groups):
        raise MisconfigurationException("the optimizer holds no parameters: nothing for hybrid_sgd to train.")
    closure = inspect.signature(type(optimizers[0]).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise MisconfigurationException(
            f"{type(optimizers[0]).__name__}.step needs a closure that computes the loss again, which hybrid_sgd's "
            "server cannot run (it holds no data, only gradients): use an optimizer that steps on a gradient (SGD, "
            f"Adam...), or {DDP_FIX}."
        )
    if isinstance(optimizers[0], torch.optim.SparseAdam):
        raise MisconfigurationException(
            "SparseAdam steps sparse gradients only, but hybrid_sgd's server steps dense ones: use Adam or AdamW."
        )
    return optimizers[0]


def check_parameters_unchanged(optimizer: Optimizer, served: Sequence[Sequence[Tensor]]) -> None:
    """At every step: the server steps a copy of the optimizer made when fit started, group by group (``served``).
    A parameter added later (Lightning's ``BaseFinetuning.unfreeze_and_add_param_group``) would never train, and
    one moved to another group would take that group's hyperparameters on the worker only."""
    if not steps_exactly(optimizer, served):

        def sizes(groups: Sequence[Sequence[Tensor]]) -> list[int]:
            return [len(group) for group in groups]

        now = sizes([group["params"] for group in optimizer.param_groups])
        raise MisconfigurationException(
            f"the optimizer's parameters or param groups changed during fit (parameters per group: {sizes(served)} "
            f"when fit started, {now} now), e.g. by BaseFinetuning.unfreeze_and_add_param_group: hybrid_sgd's server "
            "steps a copy of the optimizer made when fit started. Put every parameter in configure_optimizers from "
            "the start (a frozen backbone too, in a param group of its own if it needs its own lr) and freeze or "
            "unfreeze it with requires_grad: a parameter trains from the first step at which it has a gradient."
        )


def check_update_rules(
    group_scaling: str,
    max_staleness: Optional[int],
    optimizer: Optimizer,
    accumulate_grad_batches: int,
    world_size: int,
) -> None:
    """On every rank, before any server starts: a rule the optimizer cannot take stops every rank alike."""
    try:
        check_group_scaling(group_scaling, optimizer)
    except ValueError as err:
        raise MisconfigurationException(f"hybrid_sgd: {err}.") from err
    if max_staleness is None:
        return
    if accumulate_grad_batches > 1:
        raise MisconfigurationException(
            "max_staleness computes a dropped gradient's batch again, but with accumulate_grad_batches="
            f"{accumulate_grad_batches} the earlier accumulated batches are gone: remove max_staleness "
            "or accumulate_grad_batches."
        )
    if max_staleness < world_size - 1:
        rank_zero_warn(
            f"hybrid_sgd: max_staleness={max_staleness} is below N - 1 = {world_size - 1}, the "
            "staleness even equal workers see at K = 1: most asynchronous gradients will be dropped and "
            "computed again. Raise it to at least a few times N - 1.",
            category=UserWarning,
        )


def check_pulled_work(trainer: pl.Trainer, pulled: bool) -> None:
    """With pulled work ranks train different numbers of batches per epoch (with recovery's static batches, by one),
    so nothing may be triggered by a rank's batch or step count (per-step LR schedules are paced instead:
    :mod:`lightning_hybrid.pacing`)."""
    fix = STATIC_FIX if pulled else RECOVERY_FIX
    if trainer.val_check_interval != 1.0:
        raise MisconfigurationException(
            f"val_check_interval={trainer.val_check_interval!r} validates after a number of batches, but with "
            "pulled work (or recovery's numbered batches) ranks train different numbers of batches per epoch: "
            f"validate at epoch ends (val_check_interval=1.0), {fix}."
        )
    limit = trainer.limit_train_batches
    if isinstance(limit, float) and limit != 1.0:
        raise MisconfigurationException(
            f"limit_train_batches={limit!r} is a share of each rank's batches per epoch, which pulled work (or "
            "recovery's numbered batches) does not know in advance: give a number of batches per rank instead "
            f"(an int), {fix}."
        )
    for callback in trainer.checkpoint_callbacks:
        if saves_by_steps_or_time(callback):
            raise MisconfigurationException(
                "ModelCheckpoint(every_n_train_steps=... or train_time_interval=...) would save at different "
                "moments on ranks that train different numbers of batches (pulled work, or recovery's numbered "
                f"batches): save at epoch ends (every_n_epochs), {fix}."
            )


def check_pulled_dataloader(dataloader: object, pulled: bool) -> DataLoader:
    if not isinstance(dataloader, DataLoader):
        what, fix = ("pulled work", STATIC_FIX) if pulled else ("recovery_dir", RECOVERY_FIX)
        raise MisconfigurationException(f"{what} needs a torch DataLoader, got {type(dataloader).__name__}: {fix}.")
    return dataloader


def check_shardable(optimizer: Optimizer, gradient_clip_val: Any, gradient_clip_algorithm: Any) -> None:
    """A sharded server steps slices of the parameters: exact only for element-wise rules."""
    if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
        names = ", ".join(o.__name__ for o in ELEMENTWISE_OPTIMIZERS)
        raise MisconfigurationException(
            f"shard_server=True steps slices of parameters, which is exact for element-wise optimizers only; "
            f"{type(optimizer).__name__} is not one of {names}: use one of them, {UNSHARDED_FIX}."
        )
    if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
        raise MisconfigurationException(
            "clipping by norm needs the norm of the whole aggregated gradient, which no shard of a sharded "
            f"server holds: use Trainer(gradient_clip_algorithm='value'), {UNSHARDED_FIX}."
        )
