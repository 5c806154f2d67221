"""How a sharded parameter server splits the model: rank ``s`` serves one contiguous slice of every flat buffer.

Shard ``s`` of N holds elements ``[n*s//N, n*(s+1)//N)`` of each dtype's flat buffer of ``n`` elements, so a
shard's gradient, master and reply are plain views of the workers' flat buffers (no packing), and every rank
sends and receives ``(N-1)/N`` of the model per step, as a ring all-reduce does. With ``weights`` a shard's
slice is its weight's share instead: a rank on a slower link serves less, since every update needs every shard
and its link carries its slice to and from every worker. A slice cuts tensors into
*pieces*; the shard's optimizer steps the pieces, which is exact for element-wise optimizers only (their
per-element state is sliced with the parameters). Optimizer state travels in checkpoints in the unsharded
format (one entry per whole parameter), so checkpoints move freely between sharded, unsharded and DDP runs.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_hybrid.flat import CHUNK_BYTES, FlatLayout

STRIPES_PER_SHARD = 4  # at least, where stripes of CHUNK_BYTES would be fewer (a small model)

# optimizers whose update of an element depends only on that element's gradient, state and scalar step count
ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Adamax,
    torch.optim.ASGD,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Rprop,
)


def check_shard_weights(weights: Sequence[float], shards: int | None) -> Sequence[float]:
    """One positive, finite share per shard (per rank of a sharded server; ``shards=None``: not known yet)."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"shard_weights must be a list of numbers, one per rank, got {weights!r}")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf")]
    if bad:
        raise ValueError(f"shard_weights must be positive finite numbers, got {bad[0]!r} in {list(weights)}")
    if shards is not None and len(weights) != shards:
        raise ValueError(
            f"shard_weights gives {len(weights)} shares for {shards} ranks: give one per rank (global rank order), "
            "or shard_weights=None for equal slices"
        )
    return weights


def stripe_elements_for(layout: FlatLayout, shards: int) -> int:
    """Stripes of ``CHUNK_BYTES`` (a wire chunk's size), or smaller where the model holds fewer than
    ``STRIPES_PER_SHARD`` of them per shard: each shard steps and answers a few stripes in turn."""
    largest = CHUNK_BYTES // max(dtype.itemsize for dtype in layout.dtypes)
    return max(1, min(largest, -(-layout.numel // (shards * STRIPES_PER_SHARD))))


def _per_element(value: Any) -> bool:
    """Optimizer state with one value per parameter element (a momentum buffer), not a scalar (a step count)."""
    return isinstance(value, Tensor) and value.dim() > 0


class ShardPlan:
    """Which piece of which parameter each of ``shards`` server ranks holds (in shares of ``weights``, if given).

    By default shard ``s`` holds one contiguous slice of each flat buffer. With ``stripe_elements`` the buffers
    are cut into stripes of that many elements, dealt to the shards in turn (in proportion to ``weights``): the
    gradients backward produces at one moment then go to every shard, not all to the last one (see
    ``docs/cluster-chunkwise-prototype.txt``), and each stripe is one wire chunk of its shard's layout."""

    def __init__(
        self,
        layout: FlatLayout,
        shards: int,
        weights: Sequence[float] | None = None,
        stripe_elements: int | None = None,
    ) -> None:
        if not 1 <= shards <= layout.numel:
            raise ValueError(f"cannot split {layout.numel} parameter elements into {shards} shards")
        if stripe_elements is not None and stripe_elements < 1:
            raise ValueError(f"stripe_elements must be a positive number of elements, got {stripe_elements}")
        self.layout = layout
        self.shards = shards
        self.weights = None if weights is None else tuple(float(w) for w in check_shard_weights(weights, shards))
        self.stripe_elements = stripe_elements
        self.striped = stripe_elements is not None
        # stripes[s]: (flat buffer, first element, end) of every range shard s holds, in buffer and element order
        self.stripes = self._striped(stripe_elements) if stripe_elements is not None else self._contiguous()
        empty = [s for s, stripes in enumerate(self.stripes) if not stripes]
        if empty:
            shares = "equal slices" if weights is None else f"shard_weights={list(weights)}"
            raise ValueError(
                f"shard {empty[0]} of {shards} would hold no parameter element with {shares} of {layout.numel} "
                "elements: raise its weight, or shard over fewer ranks"
            )
        # pieces[s]: (tensor index, first element, end) of every tensor slice shard s holds: in tensor order for
        # contiguous slices (as checkpoints of earlier runs number them), stripe by stripe when striped
        self.pieces: list[list[tuple[int, int, int]]] = []
        self.layouts: list[FlatLayout] = []
        for stripes in self.stripes:
            per_stripe = [self._pieces_of(bucket, start, end) for bucket, start, end in stripes]
            pieces = [p for group in per_stripe for p in group]
            if not self.striped:
                pieces.sort()
            self.pieces.append(pieces)
            self.layouts.append(
                FlatLayout(
                    [torch.Size([end - start]) for _, start, end in pieces],
                    [layout.dtypes[layout.slots[index].bucket] for index, _, _ in pieces],
                    chunk_groups=[len(group) for group in per_stripe] if self.striped else None,
                )
            )

    def _contiguous(self) -> list[list[tuple[int, int, int]]]:
        bounds = [self._bounds(n) for n in self.layout.sizes]
        return [
            [(bucket, b[s], b[s + 1]) for bucket, b in enumerate(bounds) if b[s + 1] > b[s]] for s in range(self.shards)
        ]

    def _striped(self, elements: int) -> list[list[tuple[int, int, int]]]:
        """Stripes dealt by smooth weighted round robin: each goes to the shard furthest behind its share."""
        weights = self.weights or (1.0,) * self.shards
        total, credit = sum(weights), [0.0] * self.shards
        stripes: list[list[tuple[int, int, int]]] = [[] for _ in range(self.shards)]
        for bucket, n in enumerate(self.layout.sizes):
            for start in range(0, n, elements):
                credit = [c + w for c, w in zip(credit, weights)]
                shard = max(range(self.shards), key=lambda s: (credit[s], -s))
                credit[shard] -= total
                stripes[shard].append((bucket, start, min(start + elements, n)))
        return stripes

    def _pieces_of(self, bucket: int, start: int, end: int) -> list[tuple[int, int, int]]:
        """(tensor index, first element, end) of each tensor slice in elements ``[start, end)`` of a flat buffer."""
        pieces = []
        for index, slot in enumerate(self.layout.slots):
            if slot.bucket == bucket:
                low, high = max(slot.offset, start), min(slot.offset + slot.numel, end)
                if high > low:
                    pieces.append((index, low - slot.offset, high - slot.offset))
        return pieces

    def _bounds(self, n: int) -> list[int]:
        """Where each shard's slice of a flat buffer of ``n`` elements starts, and the end: ``shards + 1`` values."""
        if self.weights is None:
            return [n * s // self.shards for s in range(self.shards + 1)]
        total, cumulative = sum(self.weights), 0.0
        bounds = [0]
        for weight in self.weights[:-1]:
            cumulative += weight
            bounds.append(min(int(n * cumulative / total), n))
        return bounds + [n]

    def views(self, shard: int, buffers: Sequence[Tensor]) -> list[Tensor]:
        """Shard ``shard``'s flat buffers (in its own layout's dtype order) as views of the whole model's: one
        contiguous slice per dtype, so not for a striped plan (see :meth:`wire_views`)."""
        if self.striped:
            raise ValueError("a striped shard's buffers are no views of the model's: use wire_views")
        ranges = {bucket: (start, end) for bucket, start, end in self.stripes[shard]}
        buckets = [self.layout.dtypes.index(dtype) for dtype in self.layouts[shard].dtypes]
        return [buffers[b][ranges[b][0] : ranges[b][1]] for b in buckets]

    def wire_views(self, shard: int, buffers: Sequence[Tensor]) -> list[Tensor]:
        """A striped shard's wire chunks (``layouts[shard].chunk_views``: last stripe first) as views of the whole
        model's ``buffers``: chunk i of a message to or from the shard is view i on a worker."""
        if not self.striped:
            raise ValueError("a contiguous shard's wire chunks are its layout's: use views, then chunk_views")
        return [buffers[bucket][start:end] for bucket, start, end in reversed(self.stripes[shard])]

    def piece_indices(self, shard: int, tensors: Collection[int]) -> frozenset[int]:
        """Which of shard ``shard``'s pieces cut the tensors numbered ``tensors`` (in the whole model's order)."""
        if not tensors:
            return frozenset()
        return frozenset(piece for piece, (index, _, _) in enumerate(self.pieces[shard]) if index in tensors)

    def piece_tensors(self, shard: int, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The shard's pieces of ``tensors`` (the whole model's, in layout order), as flat views."""
        return [tensors[index].detach().reshape(-1)[start:end] for index, start, end in self.pieces[shard]]

    def group_sizes(self, shard: int, optimizer: Optimizer) -> list[int]:
        """How many of the shard's pieces fall in each of ``optimizer``'s parameter groups."""
        group_of = [g for g, group in enumerate(optimizer.param_groups) for _ in group["params"]]
        sizes = [0] * len(optimizer.param_groups)
        for index, _, _ in self.pieces[shard]:
            sizes[group_of[index]] += 1
        return sizes

    # ------------------------------------------------------------------ optimizer state
    def shard_state(
        self, shard: int, full: dict[str, Any], scalars: dict[int, dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Shard ``shard``'s slice of an unsharded optimizer ``state_dict``; ``scalars`` (from :meth:`merge_states`
        of a run with as many shards) restores the shard's own step counts, which differ between shards when
        updates are asynchronous."""
        state: dict[int, dict[str, Any]] = {}
        for piece, (index, start, end) in enumerate(self.pieces[shard]):
            if index in full["state"]:
                state[piece] = {
                    key: value.reshape(-1)[start:end] if _per_element(value) else value
                    for key, value in {**full["state"][index], **(scalars or {}).get(piece, {})}.items()
                }
                # copies: optimizers update their state in place (e.g. Adam's step tensor), shards must not share it
                state[piece] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state[piece].items()}
        groups = []
        for group in full["param_groups"]:
            members = set(group["params"])
            groups.append(
                {**group, "params": [p for p, (index, _, _) in enumerate(self.pieces[shard]) if index in members]}
            )
        return {"state": state, "param_groups": groups}

    def merge_states(
        self, shard_states: Sequence[dict[str, Any]], param_groups: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], list[dict[int, dict[str, Any]]]]:
        """The unsharded ``state_dict`` of the shards' optimizers (per-element state joined, scalars taken from
        the first piece), and each shard's scalar state per piece, to restore it exactly."""
        owners: dict[int, list[tuple[int, int]]] = {}
        for shard, pieces in enumerate(self.pieces):
            for piece, (index, _, _) in enumerate(pieces):
                owners.setdefault(index, []).append((shard, piece))
        for parts in owners.values():  # in element order (striped: a tensor's pieces alternate between shards)
            parts.sort(key=lambda part: self.pieces[part[0]][part[1]][1])
        state: dict[int, dict[str, Any]] = {}
        for index, slot in enumerate(self.layout.slots):
            parts = [shard_states[shard]["state"].get(piece) for shard, piece in owners[index]]
            if all(part is None for part in parts):
                continue
            if any(part is None for part in parts):
                raise RuntimeError(
                    f"hybrid_sgd: parameter {index} has optimizer state on some shards only; save checkpoints "
                    "after a drain (Lightning's checkpoints do)"
                )
            state[index] = {
                key: torch.cat([part[key].reshape(-1) for part in parts]).view(slot.shape)
                if _per_element(value)
                else value
                for key, value in parts[0].items()
            }
        scalars = [
            {piece: {k: v for k, v in entry.items() if not _per_element(v)} for piece, entry in s["state"].items()}
            for s in shard_states
        ]
        start, groups = 0, []
        for group in param_groups:
            count = len(group["params"])
            groups.append(
                {**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + count))}
            )
            start += count
        return {"state": state, "param_groups": groups}, scalars
