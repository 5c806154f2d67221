"""``answer_dtype`` and ``push_dtype``: the server sends parameters to remote workers, and they send gradients, in a
narrower dtype (half the bytes in bfloat16), while answers to drains carry the exact master weights, so that
validation, checkpoints and the end of fit see them. Over real gloo between processes: what each side receives, a
rank that expects another format, and whole fits with one server and with a sharded one."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import launch, results
from test_asynchrony import assert_every_rank_evaluates_the_same_model
from test_wire import run_two_ranks

from lightning_hybrid.checks import wire_dtype_of
from lightning_hybrid.endpoint import ServerEndpoint
from lightning_hybrid.errors import ProtocolError
from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.links import RemoteServerLink
from lightning_hybrid.server import ParameterServer
from lightning_hybrid.wire import Flag, WireFormat

# not representable in bfloat16: rounding them shows
MASTER = torch.linspace(0.1, 1.0, 12) / 3
GRADIENT = torch.linspace(1.0, 2.0, 12) / 7
LR = 0.1


def test_wire_dtypes_are_floating_dtypes_by_name_or_themselves() -> None:
    # bad ones: tests/test_config_errors.py
    assert wire_dtype_of("answer_dtype", "bfloat16") is torch.bfloat16
    assert wire_dtype_of("answer_dtype", torch.float16) is torch.float16
    assert wire_dtype_of("push_dtype", torch.bfloat16, float32_range=True) is torch.bfloat16
    assert wire_dtype_of("push_dtype", None) is None


def test_only_buffers_wider_than_the_wire_dtype_are_narrowed() -> None:
    layout = FlatLayout.of([torch.zeros(3), torch.zeros(2, dtype=torch.float16), torch.zeros(4, dtype=torch.int64)])
    answer = WireFormat.of(layout, torch.bfloat16)
    assert answer.dtypes == (torch.bfloat16, torch.float16, torch.int64)
    assert WireFormat.of(layout).signature == layout.signature != answer.signature


def exchange_main(rank: int, port: int, answer_dtypes: tuple, push_dtypes: tuple, results: mp.Queue) -> None:
    """Rank 0 serves MASTER (K = 1, SGD; its own worker leaves at once); rank 1 pushes GRADIENT, then drains.
    ``answer_dtypes``/``push_dtypes``: (the server's, the worker's) ``answer_dtype``/``push_dtype``."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        group = dist.new_group([0, 1], backend="gloo")
        layout = FlatLayout.of([MASTER])
        side = 0 if rank == 0 else 1
        dtypes = dict(
            answer_dtype=wire_dtype_of("answer_dtype", answer_dtypes[side]),
            push_dtype=wire_dtype_of("push_dtype", push_dtypes[side], float32_range=True),
        )
        if rank == 0:
            server = ParameterServer([MASTER.clone()], lambda p: torch.optim.SGD(p, lr=LR), 2, threshold=1)
            endpoint = ServerEndpoint(server, {1: group}, FlatLayout.of([]), lambda out: None, 30, **dtypes)
            endpoint.start()
            endpoint.leave_local()
            endpoint.close(timeout=30)
            results.put(("server", str(endpoint._failure)))
        else:
            link = RemoteServerLink(1, group, layout, FlatLayout.of([]), 30, server_rank=0, **dtypes)
            try:
                pushed = link.push([GRADIENT.clone()], 0, Flag.NONE)
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


def stepped(gradient: torch.Tensor) -> torch.Tensor:
    """MASTER after the server's SGD step on ``gradient``."""
    return MASTER.clone().add_(gradient, alpha=-LR)


@pytest.mark.multiprocess
def test_bfloat16_both_ways_the_server_steps_on_the_rounded_gradient_and_drains_get_the_exact_master() -> None:
    reports = run_two_ranks(exchange_main, ("bfloat16", "bfloat16"), ("bfloat16", "bfloat16"))
    pushed, drained, drained_dtype, pushed_dtype = reports["worker"]
    master = stepped(GRADIENT.bfloat16().float())
    assert master.tolist() != stepped(GRADIENT).tolist()
    assert pushed_dtype == "torch.bfloat16" and pushed == master.bfloat16().float().tolist() != master.tolist()
    assert drained_dtype == "torch.float32" and drained == master.tolist()
    assert reports["server"] == ("None",)


@pytest.mark.multiprocess
def test_a_worker_that_expects_another_answer_dtype_stops_with_the_reason() -> None:
    (error,) = run_two_ranks(exchange_main, ("bfloat16", "float32"), (None, None))["worker"]
    assert "rank 1 expected the parameters from rank 0 as float32" in error
    assert "give every rank the same `answer_dtype`" in error


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "options, narrowing",
    [
        ("--overlap-push", "--push-dtype bfloat16"),
        ("--shard-server --pipeline-pushes", "--answer-dtype bfloat16 --push-dtype bfloat16"),
    ],
    ids=["one-server-overlapped-gradients", "sharded-pipelined-both-ways"],
)
def test_a_fit_in_bfloat16_trains_and_ends_on_the_exact_master(tmp_path, options: str, narrowing: str) -> None:
    # K = N = 3: at full precision every step is DDP's (pipelined: one step staler); in bfloat16 the server steps on
    # rounded gradients (streamed during backward with overlap_push) and workers compute on rounded weights, so the
    # fit ends elsewhere, but near, and every rank ends on the same exact master weights (the last drain's)
    common = f"--devices 3 --threshold sync --epochs 2 --batches 6 {options}"
    launch("straggler", tmp_path / "exact", common)
    launch("straggler", tmp_path / "bf16", f"{common} {narrowing}")
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
