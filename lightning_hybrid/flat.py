"""Flat, contiguous buffers for a list of tensors: one buffer per dtype.

Parameters and gradients travel and are averaged as a few large buffers instead of one
message or one kernel per tensor; the layout maps every tensor to its slice.
"""

from __future__ import annotations

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


class FlatLayout:
    """Where each tensor of an ordered list lives in per-dtype flat buffers."""

    def __init__(self, shapes: Sequence[torch.Size], dtypes: Sequence[torch.dtype]) -> None:
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
