"""Lost and hung peers and bad models stop every rank with a clear message within a bounded time."""

import time

import pytest

from conftest import launch

pytestmark = pytest.mark.multiprocess


def run_failing(tmp_path, *args, bound: float):
    started = time.monotonic()
    result = launch(*args, check=False, timeout=bound + 60)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout[-2000:]
    assert elapsed < bound, f"took {elapsed:.1f} s"
    return result.stdout + result.stderr


@pytest.mark.parametrize("threshold", ["sync", "1"])
def test_killed_worker_stops_every_rank_naming_it(tmp_path, threshold) -> None:
    output = run_failing(
        tmp_path, "lost_worker", tmp_path, "--devices", 3, "--threshold", threshold, "--slow-rank", 1,
        "--peer-timeout", 60, bound=40,
    )
    assert "[rank2]: lightning_hybrid.errors.PeerLostError: hybrid_sgd: worker rank 1 was lost" in output
    assert "[rank0]: lightning_hybrid.errors.PeerLostError: hybrid_sgd: worker rank 1 was lost" in output


def test_killed_server_rank_stops_every_worker(tmp_path) -> None:
    output = run_failing(
        tmp_path, "lost_worker", tmp_path, "--devices", 2, "--slow-rank", 0, "--peer-timeout", 60, bound=40,
    )
    assert "lost the parameter server (rank 0)" in output


def test_hung_worker_fails_the_others_after_peer_timeout(tmp_path) -> None:
    # rank 1 hangs for 300 s; the others give up after peer_timeout = 5 s and the hung process is killed
    output = run_failing(
        tmp_path, "lost_worker", tmp_path, "--devices", 2, "--slow-rank", 1, "--delay", 300,
        "--peer-timeout", 5, bound=45,
    )
    assert "no answer from the parameter server within 5 s" in output


def test_model_that_differs_across_ranks_is_refused_at_setup(tmp_path) -> None:
    output = run_failing(tmp_path, "mismatched_model", tmp_path, "--devices", 2, bound=60)
    assert "build the same model on every rank" in output
    assert "rank 1 built a model with 4 parameter tensors" in output
