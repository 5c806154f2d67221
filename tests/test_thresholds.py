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


# --------------------------------------------------------------------------- schedules
from lightning_hybrid.thresholds import (  # noqa: E402
    AdaSyncSchedule,
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    StepSchedule,
    SwitchSchedule,
    make_schedule,
)

RAMPS = [LinearSchedule, ExponentialSchedule, CosineSchedule, StepSchedule]
specs = st.one_of(st.sampled_from(["sync", "async", "25%", "50%", "100%"]), st.integers(1, 4))


@given(
    ramp=st.sampled_from(RAMPS),
    start=specs,
    end=specs,
    length=st.integers(1, 50),
    workers=st.integers(4, 64),
    progress=st.lists(st.integers(0, 200), min_size=2, max_size=20),
)
def test_ramps_stay_in_range_are_monotone_and_reach_their_end(ramp, start, end, length, workers, progress) -> None:
    schedule = ramp(start=start, end=end, length=length)
    first, last = resolve_threshold(start, workers), resolve_threshold(end, workers)
    values = [schedule(p, workers) for p in sorted(progress)]
    assert all(1 <= k <= workers for k in values)
    assert (
        all(b >= a for a, b in zip(values, values[1:]))
        if last >= first
        else all(b <= a for a, b in zip(values, values[1:]))
    )
    assert schedule(0, workers) == first
    assert schedule(length, workers) == last and schedule(length + 7, workers) == last


def test_shapes_differ_as_documented() -> None:
    n = 8
    assert [LinearSchedule(1, "sync", 4)(e, n) for e in range(5)] == [1, 3, 4, 6, 8]
    assert [ExponentialSchedule(1, "sync", 4)(e, n) for e in range(5)] == [1, 2, 3, 5, 8]
    assert [CosineSchedule(1, "sync", 4)(e, n) for e in range(5)] == [1, 2, 4, 7, 8]
    assert [StepSchedule(1, "sync", 4, steps=2)(e, n) for e in range(5)] == [1, 1, 4, 4, 8]
    assert [SwitchSchedule(at=2)(e, n) for e in range(4)] == [8, 8, 1, 1]  # Sync-Switch: sync first
    assert ConstantSchedule("50%")(3, n) == 4


@given(losses=st.lists(st.floats(0.01, 10), min_size=1, max_size=30), workers=st.integers(1, 64))
def test_adasync_follows_the_loss_ratio_and_never_lowers_k(losses, workers) -> None:
    schedule = AdaSyncSchedule(start="async", end="sync")
    values = [schedule(epoch, workers, loss=loss) for epoch, loss in enumerate(losses)]
    assert all(1 <= k <= workers for k in values)
    assert all(b >= a for a, b in zip(values, values[1:]))
    import math

    assert values[-1] == max(min(workers, math.ceil(math.sqrt(losses[0] / min(losses)) - 1e-9)), 1)


def test_schedules_by_name_and_their_errors() -> None:
    assert make_schedule("linear", start=1, end="sync", length=3)(3, 5) == 5
    with pytest.raises(ValueError, match="unknown threshold schedule 'liner': choose one of constant, linear"):
        make_schedule("liner")
    with pytest.raises(ValueError, match="bad options for the 'step' schedule"):
        make_schedule("step", stairs=3)
    with pytest.raises(ValueError, match="length must be a positive int"):
        LinearSchedule(length=0)
    with pytest.raises(ValueError, match=r"outside \[1, 4\]"):
        LinearSchedule(end=8)(0, 4)
