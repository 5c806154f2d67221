"""``answer_dtype``: the server sends parameters to remote workers in a narrower dtype (half the bytes in bfloat16),
while answers to drains carry the exact master weights, so that validation, checkpoints and the end of fit see
them. Over real gloo between processes: what a worker receives, a worker that expects another format, and whole
fits with one server and with a sharded one."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import launch, results
from test_asynchrony import assert_every_rank_evaluates_the_same_model
from test_wire import run_two_ranks

from lightning_hybrid.checks import answer_dtype_of
from lightning_hybrid.endpoint import ServerEndpoint
from lightning_hybrid.errors import ProtocolError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.links import RemoteServerLink
from lightning_hybrid.server import ParameterServer
from lightning_hybrid.wire import AnswerFormat, Flag

# not representable in bfloat16: rounding them shows
MASTER = torch.linspace(0.1, 1.0, 12) / 3


def test_answer_dtype_is_a_floating_dtype_by_name_or_itself() -> None:
    # bad ones: tests/test_config_errors.py
    assert answer_dtype_of("bfloat16") is torch.bfloat16 and answer_dtype_of(torch.float16) is torch.float16
    assert answer_dtype_of(None) is None


def test_only_buffers_wider_than_the_answer_dtype_are_narrowed() -> None:
    layout = FlatLayout.of([torch.zeros(3), torch.zeros(2, dtype=torch.float16), torch.zeros(4, dtype=torch.int64)])
    answer = AnswerFormat.of(layout, torch.bfloat16)
    assert answer.dtypes == (torch.bfloat16, torch.float16, torch.int64)
    assert AnswerFormat.of(layout).signature == layout.signature != answer.signature


def exchange_main(rank: int, port: int, server_dtype: str, worker_dtype: str, results: mp.Queue) -> None:
    """Rank 0 serves MASTER (K = 1; its own worker leaves at once), answering in ``server_dtype``; rank 1 expects
    ``worker_dtype``, pushes a zero gradient, then drains."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        group = dist.new_group([0, 1], backend="gloo")
        layout = FlatLayout.of([MASTER])
        if rank == 0:
            server = ParameterServer([MASTER.clone()], lambda p: torch.optim.SGD(p, lr=0.1), 2, threshold=1)
            endpoint = ServerEndpoint(
                server, {1: group}, FlatLayout.of([]), lambda out: None, 30, answer_dtype=answer_dtype_of(server_dtype)
            )
            endpoint.start()
            endpoint.leave_local()
            endpoint.close(timeout=30)
            results.put(("server", str(endpoint._failure)))
        else:
            link = RemoteServerLink(
                1, group, layout, FlatLayout.of([]), 30, server_rank=0, answer_dtype=answer_dtype_of(worker_dtype)
            )
            try:
                pushed = link.push(layout.allocate("cpu"), 0, Flag.NONE)
                pushed_params = pushed.params[0].float().tolist()
                drained = link.drain()
                link.leave()
                # plain values: a tensor in a queue dies with its process
                results.put(
                    (
                        "worker",
                        pushed_params,
                        drained.params[0].tolist(),
                        str(drained.params[0].dtype),
                        str(pushed.params[0].dtype),
                    )
                )
            except ProtocolError as err:
                results.put(("worker", str(err)))
    except BaseException:
        results.put(("error", traceback.format_exc()))


@pytest.mark.multiprocess
def test_a_worker_gets_bfloat16_answers_and_the_exact_master_when_it_drains() -> None:
    reports = run_two_ranks(exchange_main, "bfloat16", "bfloat16")
    pushed, drained, drained_dtype, pushed_dtype = reports["worker"]
    assert pushed_dtype == "torch.bfloat16" and pushed == MASTER.bfloat16().float().tolist() != MASTER.tolist()
    assert drained_dtype == "torch.float32" and drained == MASTER.tolist()
    assert reports["server"] == ("None",)


@pytest.mark.multiprocess
def test_a_worker_that_expects_another_answer_dtype_stops_with_the_reason() -> None:
    (error,) = run_two_ranks(exchange_main, "bfloat16", "float32")["worker"]
    assert "rank 1 expected the parameters from rank 0 as float32" in error
    assert "give every rank the same `answer_dtype`" in error


@pytest.mark.multiprocess
@pytest.mark.parametrize("options", ["", "--shard-server --pipeline-pushes"], ids=["one-server", "sharded-pipelined"])
def test_a_fit_with_bfloat16_answers_trains_and_ends_on_the_exact_master(tmp_path, options: str) -> None:
    # K = N = 3: with exact answers every step is DDP's; in bfloat16 each worker computes on rounded weights, so the
    # fit ends elsewhere, but near, and every rank ends on the same exact master weights (the last drain's)
    common = f"--devices 3 --threshold sync --epochs 2 --batches 6 {options}"
    launch("straggler", tmp_path / "exact", common)
    launch("straggler", tmp_path / "bf16", common + " --answer-dtype bfloat16")
    exact, narrowed = results(tmp_path / "exact", 3), results(tmp_path / "bf16", 3)
    assert narrowed[0]["version"] == exact[0]["version"] == 12
    for other in narrowed[1:]:
        assert all(torch.equal(other["weights"][k], narrowed[0]["weights"][k]) for k in other["weights"])
    assert_every_rank_evaluates_the_same_model(narrowed)
    final = torch.cat([w.flatten() for w in narrowed[0]["weights"].values()])
    reference = torch.cat([w.flatten() for w in exact[0]["weights"].values()])
    assert not torch.equal(final, final.bfloat16().float()), "the final weights are the master's, not rounded"
    distance = ((final - reference).norm() / reference.norm()).item()
    assert 0 < distance < 0.01, distance
