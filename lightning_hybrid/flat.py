"""Flat, contiguous buffers for a list of tensors: one buffer per dtype.

Parameters and gradients travel and are averaged as a few large buffers instead of one
message or one kernel per tensor; the layout maps every tensor to its slice.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class _Slot:
    bucket: int
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclass(frozen=True)
class _Chunk:
    bucket: int
    start: int
    end: int


def buffers_signature(dtypes: Sequence[torch.dtype], sizes: Sequence[int]) -> int:
    """A checksum of flat buffers' dtypes and sizes, which a message announces before its payload."""
    return zlib.crc32(repr([(str(d), n) for d, n in zip(dtypes, sizes)]).encode())


CHUNK_BYTES = 1 << 20  # gradients travel in chunks of about this size, so that sending overlaps backward


class FlatLayout:
    """Where each tensor of an ordered list lives in per-dtype flat buffers."""

    def __init__(
        self, shapes: Sequence[torch.Size], dtypes: Sequence[torch.dtype], chunk_groups: Sequence[int] | None = None
    ) -> None:
        """``chunk_groups``: how many consecutive tensors form each wire chunk (in tensor order; every chunk of one
        dtype), where the chunks are given (a striped shard's, see ``ShardPlan``) rather than cut at ``CHUNK_BYTES``."""
        self.dtypes: list[torch.dtype] = []
        sizes: list[int] = []
        slots = []
        for shape, dtype in zip(shapes, dtypes):
            if dtype not in self.dtypes:
                self.dtypes.append(dtype)
                sizes.append(0)
            bucket = self.dtypes.index(dtype)
            slots.append(_Slot(bucket, sizes[bucket], torch.Size(shape)))
            sizes[bucket] += torch.Size(shape).numel()
        self.slots: tuple[_Slot, ...] = tuple(slots)
        self.sizes: tuple[int, ...] = tuple(sizes)
        self.chunks, self.chunk_of = self._plan_chunks() if chunk_groups is None else self._given_chunks(chunk_groups)
        # a gradient message announces it, so that a payload of another layout (e.g. float64 instead of float32) is
        # refused before its bytes are read
        self.signature = buffers_signature(self.dtypes, self.sizes)

    def _plan_chunks(self) -> tuple[tuple[_Chunk, ...], tuple[int, ...]]:
        """Cut the buffers into wire chunks of whole tensors, last tensors first (the order in which backward
        produces gradients), each at least ``CHUNK_BYTES`` unless it ends a dtype run or the list."""
        chunks: list[_Chunk] = []
        chunk_of = [0] * len(self.slots)
        start = end = bucket = -1
        for index in reversed(range(len(self.slots))):
            slot = self.slots[index]
            itemsize = torch.empty((), dtype=self.dtypes[slot.bucket]).element_size()
            if slot.bucket != bucket or (end - start) * itemsize >= CHUNK_BYTES:
                if bucket >= 0:
                    chunks.append(_Chunk(bucket, start, end))
                bucket, end = slot.bucket, slot.offset + slot.numel
            start = slot.offset
            chunk_of[index] = len(chunks)
        if bucket >= 0:
            chunks.append(_Chunk(bucket, start, end))
        return tuple(chunks), tuple(chunk_of)

    def _given_chunks(self, groups: Sequence[int]) -> tuple[tuple[_Chunk, ...], tuple[int, ...]]:
        """Wire chunks of ``groups`` consecutive tensors each, the last group first (as :meth:`_plan_chunks`)."""
        if sum(groups) != len(self.slots) or any(count < 1 for count in groups):
            raise ValueError(f"chunk_groups {list(groups)} must split {len(self.slots)} tensors into non-empty runs")
        chunks: list[_Chunk] = []
        chunk_of = [0] * len(self.slots)
        end = len(self.slots)
        for count in reversed(groups):
            first, last = self.slots[end - count], self.slots[end - 1]
            if first.bucket != last.bucket or any(s.bucket != first.bucket for s in self.slots[end - count : end]):
                raise ValueError("a wire chunk must hold tensors of one dtype")
            for index in range(end - count, end):
                chunk_of[index] = len(chunks)
            chunks.append(_Chunk(first.bucket, first.offset, last.offset + last.numel))
            end -= count
        return tuple(chunks), tuple(chunk_of)

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> FlatLayout:
        return cls([t.shape for t in tensors], [t.dtype for t in tensors])

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def allocate(self, device: torch.device | str = "cpu", pin_memory: bool = False) -> list[Tensor]:
        return [torch.zeros(n, dtype=d, device=device, pin_memory=pin_memory) for n, d in zip(self.sizes, self.dtypes)]

    def views(self, buffers: Sequence[Tensor]) -> list[Tensor]:
        """Tensors shaped like the originals that alias slices of ``buffers``."""
        return [buffers[s.bucket][s.offset : s.offset + s.numel].view(s.shape) for s in self.slots]

    def chunk_views(self, buffers: Sequence[Tensor]) -> list[Tensor]:
        """Slices of ``buffers`` in wire order (see ``chunks``): what a gradient message carries."""
        return [buffers[c.bucket][c.start : c.end] for c in self.chunks]

    def pack(self, tensors: Sequence[Tensor | None], out: Sequence[Tensor]) -> None:
        """Copy ``tensors`` into the flat buffers ``out``; ``None`` (an unused parameter's grad) becomes zeros.

        Copies are blocking on purpose: staging buffers are reused right after.
        """
        for tensor, view in zip(tensors, self.views(out)):
            if tensor is None:
                view.zero_()
            else:
                view.copy_(tensor)

    def unpack(self, buffers: Sequence[Tensor], into: Sequence[Tensor]) -> None:
        """Copy the flat buffers back into the tensors ``into`` (in place)."""
        with torch.no_grad():
            for tensor, view in zip(into, self.views(buffers)):
                tensor.copy_(view)

    def bind(self, params: Sequence[Tensor], buffers: Sequence[Tensor], *, keep: str) -> None:
        """Make each parameter's storage a slice of ``buffers``, so that parameters received into the flat
        buffers are the model at once (no copy per tensor). ``keep="params"`` first copies the parameters'
        values into the buffers; ``keep="buffers"`` re-binds parameters whose storage was replaced (e.g. by
        ``load_state_dict(assign=True)``) to the buffers' values."""
        if keep not in ("params", "buffers"):
            raise ValueError(f"keep must be 'params' or 'buffers', got {keep!r}")
        with torch.no_grad():
            for param, view in zip(params, self.views(buffers)):
                if param.data_ptr() == view.data_ptr() and param.shape == view.shape:
                    continue
                if keep == "params":
                    view.copy_(param)
                param.data = view
