"""Delay distributions and the delay callback's validation (the callback itself runs in the scenarios)."""

import random
import statistics

import pytest

from lightning_hybrid.app.delays import DelayDistribution, InjectDelays


def test_distributions_have_the_documented_scale() -> None:
    generator = random.Random(0)
    assert DelayDistribution("fixed", 0.02).sample(generator) == 0.02
    uniform = [DelayDistribution("uniform", 0.02).sample(generator) for _ in range(4000)]
    assert 0 <= min(uniform) and max(uniform) <= 0.04 and statistics.mean(uniform) == pytest.approx(0.02, rel=0.05)
    pareto = [DelayDistribution("pareto", 0.01, shape=1.5).sample(generator) for _ in range(4000)]
    assert min(pareto) >= 0.01 and max(pareto) > 10 * statistics.median(pareto), "heavy tail"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"kind": "gamma"}, "fixed', 'uniform' or 'pareto'"), ({"scale": -1.0}, "scale must be >= 0")],
)
def test_bad_distributions_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        DelayDistribution(**kwargs)


def test_slowdown_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="slowdown must be at least 1"):
        InjectDelays(ranks=[1], slowdown=0.5)
