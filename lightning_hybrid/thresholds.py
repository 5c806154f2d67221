"""The threshold K (how many gradients the server waits for before one update) and its schedules.

``K = 1`` is asynchronous SGD, ``K = N`` (all workers) is synchronous SGD. A threshold is
given as one of, without ambiguity:

* an ``int`` count in ``[1, N]``;
* ``"sync"`` (K = N) or ``"async"`` (K = 1);
* a percentage string such as ``"50%"``: ``K = ceil(p / 100 * N)``, at least 1.

A float is refused on purpose: ``1`` and ``1.0`` would otherwise mean 1 worker and all workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

ThresholdSpec = Union[int, str]


def check_threshold_spec(spec: ThresholdSpec) -> None:
    """Refuse a malformed threshold before the number of workers is known."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"threshold={spec} must be at least 1 (K=1 is asynchronous SGD)")
        return
    _resolve_name(spec, num_workers=None)


def resolve_threshold(spec: ThresholdSpec, num_workers: int) -> int:
    """Turn a threshold spec into a count K in ``[1, num_workers]``, or raise ``ValueError`` naming the fix."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 1 <= spec <= num_workers:
            raise ValueError(
                f"threshold={spec} is outside [1, {num_workers}] for {num_workers} workers: "
                f"give a count between 1 and {num_workers}, or 'sync', 'async', or a percentage such as '50%'"
            )
        return spec
    resolved = _resolve_name(spec, num_workers)
    assert resolved is not None
    return resolved


def _resolve_name(spec: Any, num_workers: Optional[int]) -> Optional[int]:
    """K for ``"sync"``, ``"async"`` or ``"p%"`` of ``num_workers`` (``None``: only check the spec)."""
    text = spec.strip().lower() if isinstance(spec, str) else None
    if text == "sync":
        return num_workers
    if text == "async":
        return 1
    if text is not None and text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = math.nan
        if 0 < percent <= 100:
            return (
                None if num_workers is None else max(1, min(num_workers, math.ceil(percent / 100 * num_workers - 1e-9)))
            )
    count = "an int count of workers" if num_workers is None else f"an int count in [1, {num_workers}]"
    why = " (floats are refused: 1.0 could mean one worker or all of them)" if isinstance(spec, float) else ""
    raise ValueError(
        f"threshold={spec!r} is not understood{why}: give {count}, 'sync', 'async' or a percentage of the workers "
        "in (0%, 100%] such as '50%'"
    )


# --------------------------------------------------------------------------- schedules
# A schedule maps training progress (epochs, steps, or percent of a time budget) to K in [1, N]. `start` and `end` are
# threshold specs as above, resolved against N when the schedule is evaluated, so one schedule serves any N.


def _check_length(length: int) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(
            f"schedule length must be a positive int (epochs, steps or percent of the time budget), got {length!r}"
        )


def _fraction(progress: float, length: int) -> float:
    if progress < 0:
        raise ValueError(f"progress cannot be negative, got {progress}")
    return min(progress / length, 1.0)


def _clamp(value: float, num_workers: int) -> int:
    return max(1, min(num_workers, int(round(value))))


@dataclass(frozen=True)
class ConstantSchedule:
    """K stays at ``value``."""

    value: ThresholdSpec = "50%"

    def __post_init__(self) -> None:
        check_threshold_spec(self.value)

    def __call__(self, progress: float, num_workers: int, loss: Optional[float] = None) -> int:
        _fraction(progress, 1)
        return resolve_threshold(self.value, num_workers)


@dataclass(frozen=True)
class _Ramp:
    """From ``start`` at progress 0 to ``end`` at progress ``length`` (and after); monotone between."""

    start: ThresholdSpec = "async"
    end: ThresholdSpec = "sync"
    length: int = 10

    def __post_init__(self) -> None:
        check_threshold_spec(self.start)
        check_threshold_spec(self.end)
        _check_length(self.length)

    def __call__(self, progress: float, num_workers: int, loss: Optional[float] = None) -> int:
        start, end = resolve_threshold(self.start, num_workers), resolve_threshold(self.end, num_workers)
        return _clamp(self.shape(start, end, _fraction(progress, self.length)), num_workers)

    def shape(self, start: int, end: int, fraction: float) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class LinearSchedule(_Ramp):
    """K moves from ``start`` to ``end`` in equal steps over ``length``: the paper's smooth switch."""

    def shape(self, start: int, end: int, fraction: float) -> float:
        return start + (end - start) * fraction


@dataclass(frozen=True)
class ExponentialSchedule(_Ramp):
    """K moves geometrically from ``start`` to ``end``: slowly first when rising (long asynchronous phase)."""

    def shape(self, start: int, end: int, fraction: float) -> float:
        return start * (end / start) ** fraction


@dataclass(frozen=True)
class CosineSchedule(_Ramp):
    """K follows half a cosine from ``start`` to ``end``: flat at both ends, fastest change in the middle."""

    def shape(self, start: int, end: int, fraction: float) -> float:
        return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2


@dataclass(frozen=True)
class StepSchedule(_Ramp):
    """K jumps from ``start`` towards ``end`` in ``steps`` equal stairs spread over ``length``."""

    steps: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")

    def shape(self, start: int, end: int, fraction: float) -> float:
        return start + (end - start) * math.floor(fraction * self.steps + 1e-9) / self.steps


@dataclass(frozen=True)
class SwitchSchedule:
    """One switch at ``at``: K is ``before``, then ``after``. The default, sync first then async, is
    Sync-Switch (Li et al., ICDCS 2021), which reports that this order trains better; swap the two
    values for the paper's async-first hard switch."""

    before: ThresholdSpec = "sync"
    after: ThresholdSpec = "async"
    at: int = 5

    def __post_init__(self) -> None:
        check_threshold_spec(self.before)
        check_threshold_spec(self.after)
        _check_length(self.at)

    def __call__(self, progress: float, num_workers: int, loss: Optional[float] = None) -> int:
        return resolve_threshold(self.before if _fraction(progress, self.at) < 1 else self.after, num_workers)


@dataclass
class AdaSyncSchedule:
    """AdaSync's rule (Dutta et al., arXiv 2003.10579): the number of gradients to wait for grows as the
    training loss falls, ``K = ceil(sqrt(F(w_0) / F(w_t)) * K_0)`` with ``K_0 = start``, capped at
    ``end``; it never lowers K. The loss must be the same on every rank (the callback averages it over
    ranks). The form is the one this project's issue quotes; it was not re-checked against the paper."""

    start: ThresholdSpec = "async"
    end: ThresholdSpec = "sync"
    initial_loss: Optional[float] = None
    _highest: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        check_threshold_spec(self.start)
        check_threshold_spec(self.end)

    def __call__(self, progress: float, num_workers: int, loss: Optional[float] = None) -> int:
        _fraction(progress, 1)
        start, end = resolve_threshold(self.start, num_workers), resolve_threshold(self.end, num_workers)
        if loss is not None and math.isfinite(loss) and loss > 0:
            if self.initial_loss is None:
                self.initial_loss = loss
            k = math.ceil(math.sqrt(self.initial_loss / loss) * start - 1e-9)
            self._highest = max(self._highest, min(max(k, start), end))
        return max(self._highest, start)


Schedule = Union[
    ConstantSchedule, LinearSchedule, ExponentialSchedule, CosineSchedule, StepSchedule, SwitchSchedule, AdaSyncSchedule
]

SCHEDULES: dict[str, type] = {
    "constant": ConstantSchedule,
    "linear": LinearSchedule,
    "exponential": ExponentialSchedule,
    "cosine": CosineSchedule,
    "step": StepSchedule,
    "switch": SwitchSchedule,
    "adasync": AdaSyncSchedule,
}


def check_schedule_name(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown threshold schedule {name!r}: choose one of {', '.join(SCHEDULES)}")


def has_length(name: str) -> bool:
    """The schedule moves K over a ``length`` (of epochs, steps or percent of a time budget)."""
    check_schedule_name(name)
    return issubclass(SCHEDULES[name], _Ramp)


def make_schedule(name: str, **options: Any) -> Schedule:
    """A schedule by name (as configs give it), e.g. ``make_schedule("linear", start=1, end="sync", length=8)``."""
    check_schedule_name(name)
    try:
        return SCHEDULES[name](**options)
    except TypeError as err:
        raise ValueError(f"bad options for the {name!r} schedule: {err}") from err
