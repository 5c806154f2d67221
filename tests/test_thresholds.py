"""Threshold specs: counts, 'sync'/'async' and percentages of N, refused without ambiguity."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_hybrid.thresholds import check_threshold_spec, resolve_threshold


@pytest.mark.parametrize(
    ("spec", "workers", "expected"),
    [(1, 4, 1), (4, 4, 4), ("sync", 4, 4), ("async", 4, 1), ("50%", 4, 2), ("50%", 3, 2), ("1%", 8, 1), ("100%", 5, 5)],
)
def test_resolves(spec, workers, expected) -> None:
    assert resolve_threshold(spec, workers) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (0, r"outside \[1, 4\]"),
        (5, r"outside \[1, 4\]"),
        (0.5, "float|not understood"),
        ("half", "not understood"),
        ("0%", "not understood"),
        ("150%", "not understood"),
        (True, "not understood"),
    ],
)
def test_refuses_with_a_fix(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_threshold(spec, 4)


def test_spec_checked_before_workers_are_known() -> None:
    check_threshold_spec(8)
    check_threshold_spec("25%")
    with pytest.raises(ValueError, match="at least 1"):
        check_threshold_spec(0)
    with pytest.raises(ValueError, match="not understood"):
        check_threshold_spec("most")


@given(percent=st.floats(min_value=0.01, max_value=100), workers=st.integers(1, 512))
def test_percentages_always_land_in_range(percent: float, workers: int) -> None:
    k = resolve_threshold(f"{percent}%", workers)
    assert 1 <= k <= workers
    assert k >= percent / 100 * workers - 1e-6
