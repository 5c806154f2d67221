"""GradientStream: chunks leave during backward, in wire order, header first; the rest at the step.

The link here records what it is asked to send (the real one is exercised by every multi-process test,
where overlap_push is on by default and K = N still equals DDP exactly)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.overlap import GradientStream
from lightning_hybrid.wire import Flag


class RecordingLink:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def start_push(self, version: int, flags: Flag, threshold: int = 0, work: int | None = None) -> None:
        self.sent.append(("header", version, flags, threshold))

    def send_chunk(self, chunk: torch.Tensor) -> None:
        self.sent.append(chunk.clone())


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
    assert link.sent[0] == ("header", 5, Flag.DRAIN, 2)
    stream.finish()
    assert len(link.sent) == 1 + len(layout.chunks)
    expected = layout.allocate()
    layout.pack([p.grad for p in params], expected)
    for sent, chunk in zip(link.sent[1:], layout.chunk_views(expected)):
        assert torch.equal(sent, chunk)
    assert not stream.incomplete


def test_unused_parameters_are_sent_as_zeros_at_the_step() -> None:
    model, params, layout, link, stream = make(unused=True)
    stream.arm(version=0, flags=Flag.NONE, threshold=0)
    model[:3](torch.randn(4, 512)).sum().backward()
    assert link.sent == [], "the unused layer's chunk (the first in wire order) holds everything back"
    stream.finish()
    assert len(link.sent) == 1 + len(layout.chunks)
    assert torch.equal(link.sent[1][-(3 * 3 + 3) :], torch.zeros(12))  # the unused layer ends the first chunk


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
