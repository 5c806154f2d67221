"""Staleness statistics: how many updates happened between a gradient's parameters and its own update."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StalenessStats:
    """Counts of applied gradients per staleness value, overall and per worker."""

    counts: Counter = field(default_factory=Counter)
    per_worker: dict[int, Counter] = field(default_factory=dict)

    def record(self, worker: int, staleness: int) -> None:
        if staleness < 0:
            raise ValueError(f"staleness cannot be negative, got {staleness} for worker {worker}")
        self.counts[staleness] += 1
        self.per_worker.setdefault(worker, Counter())[staleness] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def mean(self) -> float:
        total = self.total
        return sum(s * n for s, n in self.counts.items()) / total if total else 0.0

    @property
    def max(self) -> int:
        return max(self.counts, default=0)

    def quantile(self, q: float) -> int:
        """The smallest staleness value with at least a fraction ``q`` of gradients at or below it."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must lie in [0, 1], got {q}")
        total, seen = self.total, 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= q * total:
                return value
        return 0

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "per_worker": {w: dict(c) for w, c in self.per_worker.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter({int(k): v for k, v in state["counts"].items()})
        self.per_worker = {int(w): Counter({int(k): v for k, v in c.items()}) for w, c in state["per_worker"].items()}
