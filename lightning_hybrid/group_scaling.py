"""How far one update of k of the N workers' gradients moves the model: scaled to its group.

A synchronous update averages N gradients, a batch of N·B samples. An update of k < N gradients is a batch of
k·B samples; taken with the same step it moves the model N/k times as far per sample, which is why an
asynchronous phase diverges at a learning rate tuned for sync (and asynchrony itself acts like extra momentum:
Mitliagkas et al. 2016, arXiv 1605.09774). The rules (``HybridSGDStrategy(group_scaling=...)``):

``"step"``: the linear scaling rule (Goyal et al. 2017, arXiv 1706.02677) applied per update: an update of k
    gradients moves the model k/N as far as a sync update, so the step per sample equals sync's at every K,
    K = N is untouched (exactly DDP) and a schedule rising from 1 to N becomes a warm-up. Where the factor goes:

    * ``torch.optim.SGD`` (plain, momentum, Nesterov): on the averaged gradient, after clipping (clipping keeps
      DDP's meaning: it clips the mean of the update's gradients), and on ``weight_decay`` for that update, so the
      decay per sample is sync's too. On the gradient rather than on ``lr``: SGD's momentum buffer keeps earlier
      updates' gradients, and an ``lr`` factor would rescale those as well; a gradient factor sizes exactly this
      update's contribution (for plain SGD both are the same).
    * every other optimizer (Adam, AdamW, RMSprop, Adagrad, ..., a user's own): on ``lr`` for that update.
      Adaptive optimizers divide a gradient by its running size, so a gradient factor would be normalised away;
      the learning rate carries it (AdamW's decoupled decay ``lr * weight_decay`` scales with it). A user's own
      optimizer needs an ``lr`` in its parameter groups.
``"sqrt_step"``: the same places, factor ``sqrt(k/N)`` (square-root scaling, Krizhevsky 2014, arXiv 1404.5997;
    Hoffer et al. 2017): a larger step for small groups than ``"step"``.
``"momentum"``: momentum scaled to the group (Smith et al. 2018, arXiv 1711.00489), SGD with momentum only:
    ``m_k = 1 - (N/k)(1 - m)`` with the user's ``lr`` keeps the noise scale ``lr / (1 - m)`` per sample, with a
    shorter memory for small groups (less momentum piled on stale gradients). ``m`` is rank 0's current momentum
    (a scheduled one, e.g. OneCycleLR's, is the base). Where ``m_k`` would fall below 0 (k = 1 once
    ``N >= 1/(1-m)``) it stays at 0 and the rest of the factor, ``(k/N) / (1 - m)``, goes on the gradient, so
    the noise scale still holds. Adam's ``beta1`` is not changed per update (its bias correction
    ``1 - beta1^t`` assumes one constant ``beta1``): the rule is refused there, use ``"step"``.
``"auto"``: ``"momentum"`` for ``torch.optim.SGD`` (with momentum 0, as it falls to, that is ``"step"``),
    ``"step"`` for every other optimizer: the noise scale per sample is sync's for every optimizer, and SGD's
    momentum gets the shorter memory that stale gradients call for.
``"none"``: the plain mean with the user's step, as before this option existed.

The factor is relative to N, the workers of the run, not to the workers still active: a sample counts the same
wherever it was computed, and workers leave only as fit ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

GROUP_SCALING_RULES = ("auto", "step", "sqrt_step", "momentum", "none")


@dataclass(frozen=True)
class GroupScale:
    """What one update of a parameter group was given: the factor on its averaged gradient, on its ``lr`` and on
    its ``weight_decay``, the momentum it stepped with (``None`` where the group has none), and ``step``: how far
    the update moves the model relative to a sync update with the same gradients (for the momentum rule, the ratio
    of the noise scales ``lr_k / (1 - m_k)`` and ``lr / (1 - m)``)."""

    gradient: float = 1.0
    lr: float = 1.0
    weight_decay: float = 1.0
    momentum: float | None = None
    step: float = 1.0


def check_rule_name(rule: str) -> None:
    if rule not in GROUP_SCALING_RULES:
        raise ValueError(f"unknown group_scaling {rule!r}: choose one of {', '.join(map(repr, GROUP_SCALING_RULES))}")


def check_group_scaling(rule: str, optimizer: Optimizer) -> None:
    """Refuse a rule that cannot apply to ``optimizer``, naming the fix."""
    check_rule_name(rule)
    name = type(optimizer).__name__
    if rule == "momentum":
        if not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(
                f"group_scaling='momentum' changes SGD's momentum per update, but the optimizer is {name}"
                + (
                    " (its beta1 cannot change per update: the bias correction 1 - beta1^t assumes one beta1)"
                    if "betas" in optimizer.defaults
                    else ""
                )
                + ": use group_scaling='step', which puts the factor on its learning rate"
            )
        if not any(group.get("momentum", 0) > 0 for group in optimizer.param_groups):
            raise ValueError(
                "group_scaling='momentum' scales SGD's momentum, but the optimizer has momentum=0, so it would do "
                "nothing: use group_scaling='step', or give SGD a momentum (e.g. 0.9)"
            )
    elif rule != "none" and not isinstance(optimizer, torch.optim.SGD):
        if any("lr" not in group for group in optimizer.param_groups):
            raise ValueError(
                f"group_scaling={rule!r} puts the factor on the learning rate of {name}, but its parameter groups "
                "have no 'lr': give the optimizer an 'lr', or use group_scaling='none'"
            )


class GroupScaling:
    """Sizes each update to its group of k gradients, by one of :data:`GROUP_SCALING_RULES` (module docstring)."""

    def __init__(self, rule: str, optimizer: Optimizer, num_workers: int) -> None:
        check_group_scaling(rule, optimizer)
        self._on_gradient = isinstance(optimizer, torch.optim.SGD)
        self.rule = ("momentum" if self._on_gradient else "step") if rule == "auto" else rule
        self.num_workers = num_workers

    def scales(self, groups: Sequence[dict[str, Any]], count: int) -> list[GroupScale]:
        """Each group's scale for an update of ``count`` gradients (the identity for ``count = N``)."""
        return [self._scale(group, count) for group in groups]

    def _scale(self, group: dict[str, Any], count: int) -> GroupScale:
        momentum = group.get("momentum") if self._on_gradient else None
        if self.rule == "none" or count >= self.num_workers:
            return GroupScale(momentum=momentum)
        ratio = count / self.num_workers
        if self.rule == "momentum":
            assert momentum is not None
            scaled = 1 - (1 - momentum) / ratio
            if scaled >= 0:
                return GroupScale(momentum=scaled, step=ratio)
            rest = ratio / (1 - momentum)  # m_k = 0: the rest of the noise scale goes on the gradient
            return GroupScale(gradient=rest, weight_decay=rest, momentum=0.0, step=ratio)
        factor = ratio if self.rule == "step" else math.sqrt(ratio)
        if self._on_gradient:
            return GroupScale(gradient=factor, weight_decay=factor, momentum=momentum, step=factor)
        return GroupScale(lr=factor, step=factor)


def apply_scales(groups: Sequence[dict[str, Any]], scales: Sequence[GroupScale]) -> Callable[[], None]:
    """Set each group's ``lr``, ``weight_decay`` and ``momentum`` for one update and scale its parameters'
    gradients; returns what puts the hyperparameters back after the step (checkpoints hold the user's values)."""
    saved = []
    for group, scale in zip(groups, scales):
        before = {key: group[key] for key in ("lr", "weight_decay", "momentum") if key in group}
        if scale.gradient != 1.0:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale.gradient)
        if scale.lr != 1.0:
            group["lr"] = before["lr"] * scale.lr
        if scale.weight_decay != 1.0 and before.get("weight_decay"):
            group["weight_decay"] = before["weight_decay"] * scale.weight_decay
        if scale.momentum is not None and "momentum" in group:
            group["momentum"] = scale.momentum
        saved.append((group, before))

    def restore() -> None:
        for group, before in saved:
            group.update(before)

    return restore
