"""GradientStream: chunks leave during backward, in wire order, header first; the rest and a trailer (the unused
parameters) at the step. ShardedGradientStream: each remote shard's slice leaves once complete, a trailer (a verdict
on the whole gradient, the unused parameters' pieces) at the step.

The links here record what they are asked to send (the real ones are exercised by the multi-process tests with
overlap_push, where K = N still equals DDP exactly: test_equivalence.py and test_sharded.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.overlap import GradientStream, ShardedGradientStream
from lightning_hybrid.shards import ShardPlan
from lightning_hybrid.wire import Flag, Trailer


class RecordingLink:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def start_push(self, version: int, flags: Flag, threshold: int = 0, work: int | None = None) -> None:
        self.sent.append(("header", version, flags, threshold))

    def send_chunk(self, chunk: torch.Tensor) -> None:
        self.sent.append(chunk.clone())

    def send_trailer(self, trailer: Trailer) -> None:
        self.sent.append(trailer)

    def await_reply(self) -> str:
        return "reply"


def make(unused: bool = False):
    torch.manual_seed(0)
    # 3 layers of 1.05 MB weights: every layer's weight closes a chunk of its own
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, 512))
    if unused:
        model.append(nn.Linear(3, 3))  # never called: its gradient stays None
    params = list(model.parameters())
    layout = FlatLayout.of(params)
    link = RecordingLink()
    stream = GradientStream(params, layout, layout.allocate(), link)
    return model, params, layout, link, stream


def test_chunks_leave_during_backward_and_carry_the_gradient() -> None:
    model, params, layout, link, stream = make()
    during: list[int] = []
    # the first layer's weight is the last gradient backward produces: when it arrives, earlier chunks are out
    params[0].register_post_accumulate_grad_hook(lambda p: during.append(len(link.sent)))
    stream.arm(version=5, flags=Flag.DRAIN, threshold=2)
    model(torch.randn(8, 512)).square().sum().backward()
    assert len(layout.chunks) == 3
    assert during[0] >= 3, "the header and the last layers' chunks left before backward reached the first layer"
    assert link.sent[0] == ("header", 5, Flag.DRAIN | Flag.VERDICT, 2)
    stream.finish()
    assert len(link.sent) == 1 + len(layout.chunks) + 1
    expected = layout.allocate()
    layout.pack([p.grad for p in params], expected)
    for sent, chunk in zip(link.sent[1:-1], layout.chunk_views(expected)):
        assert torch.equal(sent, chunk)
    assert link.sent[-1] == Trailer(nonfinite=False, unused=frozenset())
    assert not stream.incomplete


def test_unused_parameters_are_sent_as_zeros_at_the_step_and_named_in_the_trailer() -> None:
    model, params, layout, link, stream = make(unused=True)
    stream.arm(version=0, flags=Flag.NONE, threshold=0)
    model[:3](torch.randn(4, 512)).sum().backward()
    assert link.sent == [], "the unused layer's chunk (the first in wire order) holds everything back"
    stream.finish()
    assert len(link.sent) == 1 + len(layout.chunks) + 1
    assert torch.equal(link.sent[1][-(3 * 3 + 3) :], torch.zeros(12))  # the unused layer ends the first chunk
    assert link.sent[-1] == Trailer(unused=frozenset({6, 7})), "the server leaves the 4th layer alone in this step"


def test_a_layer_frozen_and_unfrozen_between_steps_is_named_unused_then_streamed() -> None:
    # frozen when the stream is built (no hook), the last layer is unfrozen before the second step: its hook is set
    # at arm and its gradient leaves during backward. Frozen again at the third step, with last step's .grad still
    # on it when armed (the closure zeroes it later), it travels as zeros and is named unused at the step
    model, params, layout, link, stream = make()
    model[2].requires_grad_(False)
    stream = GradientStream(params, layout, layout.allocate(), link)
    stream.arm(version=0, flags=Flag.NONE, threshold=0)
    model(torch.randn(4, 512)).sum().backward()
    stream.finish()
    assert link.sent[-1] == Trailer(unused=frozenset({4, 5}))
    model[2].requires_grad_(True)
    link.sent.clear()
    stream.arm(version=1, flags=Flag.NONE, threshold=0)
    during: list[int] = []
    params[0].register_post_accumulate_grad_hook(lambda p: during.append(len(link.sent)))
    model(torch.randn(4, 512)).sum().backward()
    assert during[0] >= 2, "the last layer's chunk (the first in wire order) left during backward"
    stream.finish()
    assert torch.equal(link.sent[1][: params[4].numel()], params[4].grad.flatten())
    assert link.sent[-1] == Trailer(unused=frozenset())
    model[2].requires_grad_(False)
    link.sent.clear()
    stream.arm(version=2, flags=Flag.NONE, threshold=0)
    for param in params:
        param.grad = None  # what the closure's zero_grad does after arm
    model(torch.randn(4, 512)).sum().backward()
    stream.finish()
    assert not link.sent[1][: params[4].numel()].any()
    assert link.sent[-1] == Trailer(unused=frozenset({4, 5}))


def test_an_unarmed_backward_sends_nothing_and_a_second_armed_backward_is_refused() -> None:
    model, params, layout, link, stream = make()
    model(torch.randn(4, 512)).sum().backward()  # a micro-batch that only accumulates
    assert link.sent == []
    stream.arm(version=0, flags=Flag.NONE, threshold=0)
    model(torch.randn(4, 512)).sum().backward()
    with pytest.raises(RuntimeError, match="overlap_push=False"):
        model(torch.randn(4, 512)).sum().backward()
    stream.close()
    stream.arm(version=0, flags=Flag.NONE, threshold=0)
    sent = len(link.sent)
    model(torch.randn(4, 512)).sum().backward()
    assert len(link.sent) == sent, "closed: the hooks are gone"


class RecordingShardedLink:
    """What a :class:`ShardedGradientStream` asks of its ``ShardedServerLink``, with the slices' contents then."""

    def __init__(self, plan: ShardPlan, gradient: list[torch.Tensor], rank: int) -> None:
        self.remote_shards = [s for s in range(plan.shards) if s != rank]
        self._slices = [plan.views(s, gradient) for s in range(plan.shards)]
        self.sent: list[tuple] = []

    def post_to(self, shard: int, flags: Flag, threshold=None, work=None, unused=frozenset()) -> None:
        self.sent.append(("slice", shard, flags, [t.clone() for t in self._slices[shard]], unused))

    def send_trailer(self, shard: int, nonfinite: bool, unused: frozenset[int]) -> None:
        self.sent.append(("verdict", shard, nonfinite, unused))

    def push_local(self, flags: Flag, threshold=None, work=None, unused=frozenset()) -> str:
        self.sent.append(("local", flags))
        self.local_unused = unused
        return "reply"


def make_sharded(rank: int = 0):
    torch.manual_seed(0)
    # 8,970 parameters in 3 shards of 2,990: shard 0 holds part of the first weight, shard 1 the rest of it, the first
    # bias and part of the second weight, shard 2 the rest (pieces cut tensors)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    params = list(model.parameters())
    layout = FlatLayout.of(params)
    gradient = layout.allocate()
    plan = ShardPlan(layout, 3)
    link = RecordingShardedLink(plan, gradient, rank)
    # what was sent when backward reached the first weight (a hook registered before the stream's runs first)
    during: list[int] = []
    params[0].register_post_accumulate_grad_hook(lambda p: during.append(len(link.sent)))
    return model, params, layout, plan, link, ShardedGradientStream(params, layout, gradient, link, plan), during


def test_a_shards_slice_leaves_once_backward_has_produced_it_and_a_verdict_follows() -> None:
    model, params, layout, plan, link, stream, during = make_sharded(rank=0)
    stream.arm(version=3, flags=Flag.DRAIN, threshold=2)
    model(torch.randn(8, 64)).square().sum().backward()
    assert during == [1], "the last shard's slice left before backward reached the first weight"
    assert link.sent[0][:3] == ("slice", 2, Flag.DRAIN | Flag.VERDICT) and stream.incomplete
    assert stream.finish() == "reply" and not stream.incomplete
    assert [entry[:3] for entry in link.sent] == [
        ("slice", 2, Flag.DRAIN | Flag.VERDICT),
        ("slice", 1, Flag.DRAIN | Flag.VERDICT),  # complete once the first weight's gradient came
        ("verdict", 2, False),
        ("verdict", 1, False),
        ("local", Flag.DRAIN),
    ]
    expected = layout.allocate()
    layout.pack([p.grad for p in params], expected)
    for kind, shard, _, slices, _ in link.sent[:2]:
        assert all(torch.equal(a, b) for a, b in zip(slices, plan.views(shard, expected)))


def test_a_nan_in_one_slice_is_every_shards_verdict() -> None:
    # the NaN is in the first layer's weight (shard 0's slice, this rank's own): the slices streamed to shards 1 and
    # 2 were clean, the verdict after them says the gradient is not finite, so every shard rejects it
    model, params, layout, plan, link, stream, _ = make_sharded(rank=0)
    stream.arm(version=0, flags=Flag.NONE, threshold=None)
    (model(torch.randn(8, 64)).sum() + float("nan") * params[0][0, 0]).backward()
    stream.finish()
    assert [entry[:3] for entry in link.sent][-3:] == [
        ("verdict", 2, True),
        ("verdict", 1, True),
        ("local", Flag.NONFINITE),
    ]


def test_a_parameter_without_a_gradient_is_named_to_every_shard() -> None:
    # the last layer is skipped: its slice (shard 2's) is complete only at the step, which sends it flagged with the
    # unused tensors; the streamed slice's trailer and the local push name them too (the shards map them to pieces)
    model, params, layout, plan, link, stream, _ = make_sharded(rank=0)
    stream.arm(version=0, flags=Flag.NONE, threshold=None)
    model[:2](torch.randn(8, 64)).sum().backward()
    stream.finish()
    skipped = frozenset({4, 5})
    assert [entry[:3] for entry in link.sent] == [
        ("slice", 1, Flag.VERDICT),
        ("verdict", 1, False),
        ("slice", 2, Flag.NONE),
        ("local", Flag.NONE),
    ]
    assert link.sent[1][3] == link.sent[2][4] == link.local_unused == skipped


def test_a_parameter_used_only_by_an_earlier_micro_batch_counts_as_used() -> None:
    # gradient accumulation: the unarmed backward of micro-batch 1 used the 4th layer, the streamed one of micro-batch
    # 2 did not, so no hook fires for it while armed; its accumulated gradient leaves at the step, and is no "unused"
    model, params, layout, link, stream = make(unused=True)
    x = torch.randn(4, 512)
    (model[:3](x).sum() + model[3](x[:, :3]).sum()).backward()
    stream.arm(version=0, flags=Flag.NONE, threshold=0)
    model[:3](x).sum().backward()
    stream.finish()
    assert link.sent[-1] == Trailer(unused=frozenset())
    assert torch.equal(link.sent[1][-(3 * 3 + 3) : -3], params[6].grad.flatten())
