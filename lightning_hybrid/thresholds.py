"""The threshold K: how many gradients the parameter server waits for before one update.

``K = 1`` is asynchronous SGD, ``K = N`` (all workers) is synchronous SGD. A threshold is
given as one of, without ambiguity:

* an ``int`` count in ``[1, N]``;
* ``"sync"`` (K = N) or ``"async"`` (K = 1);
* a percentage string such as ``"50%"``: ``K = ceil(p / 100 * N)``, at least 1.

A float is refused on purpose: ``1`` and ``1.0`` would otherwise mean 1 worker and all workers.
"""

from __future__ import annotations

import math
from typing import Union

ThresholdSpec = Union[int, str]


def check_threshold_spec(spec: ThresholdSpec) -> None:
    """Refuse a malformed threshold before the number of workers is known."""
    if isinstance(spec, int) and not isinstance(spec, bool) and spec < 1:
        raise ValueError(f"threshold={spec} must be at least 1 (K=1 is asynchronous SGD)")
    resolve_threshold(spec, num_workers=spec if isinstance(spec, int) and not isinstance(spec, bool) else 1)


def resolve_threshold(spec: ThresholdSpec, num_workers: int) -> int:
    """Turn a threshold spec into a count K in ``[1, num_workers]``, or raise ``ValueError`` naming the fix."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise ValueError(
            f"threshold={spec!r} is not understood: give an int count in [1, {num_workers}], "
            "'sync', 'async' or a percentage of the workers such as '50%'"
        )
    if isinstance(spec, int):
        if not 1 <= spec <= num_workers:
            raise ValueError(
                f"threshold={spec} is outside [1, {num_workers}] for {num_workers} workers: "
                f"give a count between 1 and {num_workers}, or 'sync', 'async', or a percentage such as '50%'"
            )
        return spec
    text = spec.strip().lower()
    if text == "sync":
        return num_workers
    if text == "async":
        return 1
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = math.nan
        if 0 < percent <= 100:
            return max(1, min(num_workers, math.ceil(percent / 100 * num_workers - 1e-9)))
    raise ValueError(
        f"threshold={spec!r} is not understood: give an int count in [1, {num_workers}], "
        "'sync', 'async' or a percentage in (0%, 100%] such as '50%'"
    )
