"""A remote worker's gradient leaves in chunks while backward still runs, as DDP's bucketed all-reduce does.

Each parameter's post-accumulate-grad hook copies its gradient into the flat send buffer; a chunk (see
:meth:`FlatLayout.chunks`: last parameters first, the order in which backward produces them) is sent
as soon as all its gradients are in and every chunk before it is out. At the optimizer step the rest
follows: parameters without a gradient count as zeros, as at an ordinary push.

Armed only for the backward that precedes an optimizer step (Lightning runs that closure inside
``optimizer.step``), so micro-batches of gradient accumulation send nothing.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Optional

from torch import Tensor

from lightning_hybrid.flat import FlatLayout
from lightning_hybrid.links import RemoteServerLink
from lightning_hybrid.wire import Flag


class GradientStream:
    """Sends one worker's gradient chunk by chunk over its link while backward runs."""

    def __init__(self, params: Sequence[Tensor], layout: FlatLayout, gradient: list[Tensor], link: RemoteServerLink):
        self._params = list(params)
        self._layout = layout
        self._link = link
        self._views = layout.views(gradient)
        self._chunks = layout.chunk_views(gradient)
        self._tensors_per_chunk = Counter(layout.chunk_of)
        # (version, flags, K request, work id) while armed
        self._message: Optional[tuple[int, Flag, Optional[int], Optional[int]]] = None
        self._missing: list[int] = []
        self._packed: list[bool] = []
        self._next = 0
        self._handles = [
            param.register_post_accumulate_grad_hook(functools.partial(self._ready, index))
            for index, param in enumerate(self._params)
        ]

    @property
    def incomplete(self) -> bool:
        """Part of a gradient message is out: unless finished, the link must be abandoned."""
        return 0 < self._next < len(self._chunks)

    def arm(self, version: int, flags: Flag, threshold: Optional[int], work: Optional[int] = None) -> None:
        """The next backward's gradients form a push with this header."""
        self._message = (version, flags, threshold, work)
        self._missing = [self._tensors_per_chunk[chunk] for chunk in range(len(self._chunks))]
        self._packed = [False] * len(self._params)
        self._next = 0

    def disarm(self) -> None:
        self._message = None

    def finish(self) -> None:
        """At the optimizer step: pack what no hook delivered and send every chunk not yet sent."""
        for index, packed in enumerate(self._packed):
            if not packed:
                self._pack(index)
        self._send_ready_chunks()
        self._message = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _ready(self, index: int, param: Tensor) -> None:
        if self._message is None:
            return  # a micro-batch that only accumulates, or a backward outside training steps
        chunk = self._layout.chunk_of[index]
        if self._packed[index] and chunk < self._next:
            raise RuntimeError(
                "hybrid_sgd: a parameter's gradient changed after it was sent to the server (a second backward in "
                "one optimizer step?); set HybridSGDStrategy(overlap_push=False) to push at the optimizer step."
            )
        self._pack(index)
        self._send_ready_chunks()

    def _pack(self, index: int) -> None:
        grad = self._params[index].grad
        if grad is None:
            self._views[index].zero_()
        else:
            self._views[index].copy_(grad)
        if not self._packed[index]:
            self._packed[index] = True
            self._missing[self._layout.chunk_of[index]] -= 1

    def _send_ready_chunks(self) -> None:
        assert self._message is not None
        while self._next < len(self._chunks) and self._missing[self._next] == 0:
            if self._next == 0:
                self._link.start_push(*self._message)
            self._link.send_chunk(self._chunks[self._next])
            self._next += 1
