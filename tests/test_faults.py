"""Lost and hung peers and bad models stop every rank with a clear message within a bounded time."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import SCENARIOS, clean_env, launch

pytestmark = pytest.mark.multiprocess


def run_failing(scenario: str, out, arguments: str, bound: float) -> str:
    """Run a scenario that must fail; every rank must be gone within ``bound`` seconds of the injected fault (the
    moment the faulty rank wrote to ``out/fault_at``), or of the launch where the fault is a refusal at setup."""
    launched = time.time()
    result = launch(scenario, out, arguments, check=False, timeout=bound + 120)
    ended = time.time()
    assert result.returncode != 0, result.stdout[-2000:]
    stamp = out / "fault_at"
    since = float(stamp.read_text()) if stamp.exists() else launched
    assert ended - since < bound, (
        f"every rank ended {ended - since:.1f} s after the {'fault' if stamp.exists() else 'launch'}"
    )
    output = result.stdout + result.stderr
    # no rank aborts at exit on a server thread still blocked in gloo (see ServerEndpoint.end_blocked_threads)
    assert "terminate called" not in output, output[-3000:]
    return output


@pytest.mark.parametrize("threshold", ["sync", "1"])
def test_killed_worker_stops_every_rank_naming_it(tmp_path, threshold) -> None:
    output = run_failing(
        "lost_worker", tmp_path, f"--devices 3 --threshold {threshold} --lost-rank 1 --peer-timeout 60", bound=30
    )
    # every survivor names the lost rank as soon as it raises PeerLostError (its traceback may not get out:
    # Lightning's launcher, in rank 0's process, SIGKILLs every rank within 5 s of a child's death)
    for survivor in (0, 2):
        assert f"[rank {survivor}] hybrid_sgd: worker rank 1 was lost" in output


def test_killed_server_rank_stops_every_worker(tmp_path) -> None:
    output = run_failing("lost_worker", tmp_path, "--devices 2 --lost-rank 0 --peer-timeout 60", bound=30)
    assert "lost the parameter server (rank 0)" in output


def test_hung_worker_fails_the_others_after_peer_timeout(tmp_path) -> None:
    # rank 1 hangs for 300 s; the others give up after peer_timeout = 5 s and the hung process is killed
    output = run_failing("lost_worker", tmp_path, "--devices 2 --lost-rank 1 --hang 300 --peer-timeout 5", bound=30)
    assert "no answer from the parameter server within 5 s" in output


def test_model_that_differs_across_ranks_is_refused_at_setup(tmp_path) -> None:
    output = run_failing("mismatched_model", tmp_path, "--devices 2", bound=90)
    assert "build the same model on every rank" in output
    assert "rank 1 built a model with 4 parameter tensors" in output


def test_options_that_differ_across_ranks_are_refused_at_setup(tmp_path) -> None:
    output = run_failing("mismatched_options", tmp_path, "--devices 2", bound=90)
    assert "rank 1 runs hybrid_sgd with another push_dtype than rank 0" in output


def test_sigterm_on_one_rank_stops_every_rank_cleanly(tmp_path) -> None:
    # K = 1 with a slow rank 1; SIGTERM reaches rank 1 only. Lightning would broadcast the flag from rank 0
    # on every step; here it travels through the server, and every rank stops with SIGTERMException.
    command = [
        sys.executable,
        str(SCENARIOS),
        "straggler",
        "--out",
        str(tmp_path),
        "--devices",
        "3",
        "--threshold",
        "1",
        "--epochs",
        "1000",
        "--slow-rank",
        "1",
        "--delay",
        "0.05",
    ]
    process = subprocess.Popen(command, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid_file = tmp_path / "pid1"
        deadline = time.monotonic() + 90
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        signalled = time.monotonic()
        output = process.communicate(timeout=60)[0]
    finally:
        process.kill()
    assert time.monotonic() - signalled < 30
    # SIGTERMException is Lightning's graceful exit (a SystemExit): status 0, on every rank
    assert process.returncode == 0, output[-3000:]
    for rank in range(3):
        assert (tmp_path / f"exception{rank}").read_text() == "SIGTERMException"
    assert "Error" not in output and "Timed out" not in output


@pytest.mark.parametrize("option", ["", "--pipeline-pushes", "--shard-server"], ids=["waiting", "pipelined", "sharded"])
def test_nonfinite_stop_policy_ends_the_run_on_every_rank_naming_rank_and_step(tmp_path, option: str) -> None:
    # pipelined: the rejection comes with the answer rank 2 collects at its next step; the error still names step 3.
    # Sharded: every rank serves, and each one's server threads still wait on the others when it exits
    args = f"--devices 3 --threshold 1 --nan-rank 2 --nan-step 3 --nonfinite stop {option}"
    output = run_failing("straggler", tmp_path, args, bound=30)
    assert "NonFiniteGradientError: hybrid_sgd: rank 2's gradient at step 3 held NaN or Inf" in output
    # the others stop too, with the same error, told by the server why rank 2 stopped (their log lines: see the
    # killed-worker test)
    for survivor in (0, 1):
        assert (
            f"[rank {survivor}] hybrid_sgd: rank 2's gradient held NaN or Inf and nonfinite='stop' ends the run"
            in output
        )
