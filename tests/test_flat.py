"""Flat layouts: wire chunks (whole tensors, last first) and parameters bound to flat buffers."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_hybrid.flat import CHUNK_BYTES, FlatLayout

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@given(st.lists(st.tuples(st.integers(0, 400_000), st.sampled_from(DTYPES)), min_size=1, max_size=12))
def test_chunks_cover_every_buffer_once_in_reverse_tensor_order(specs) -> None:
    layout = FlatLayout([torch.Size([n]) for n, _ in specs], [d for _, d in specs])
    covered = {bucket: [] for bucket in range(len(layout.dtypes))}
    for chunk in layout.chunks:
        covered[chunk.bucket].append((chunk.start, chunk.end))
    for bucket, ranges in covered.items():  # chunks of one dtype tile its buffer, from the end backwards
        assert sorted(ranges, reverse=True) == ranges
        assert sum(end - start for start, end in ranges) == layout.sizes[bucket]
        assert all(a_start == b_end for (a_start, _), (_, b_end) in zip(ranges, ranges[1:]))
    # every tensor lies inside its chunk, and chunk numbers never fall as tensors go backwards
    for index, slot in enumerate(layout.slots):
        chunk = layout.chunks[layout.chunk_of[index]]
        assert chunk.bucket == slot.bucket and chunk.start <= slot.offset <= slot.offset + slot.numel <= chunk.end
    assert list(layout.chunk_of) == sorted(layout.chunk_of, reverse=True)
    # a chunk is cut only when it reached CHUNK_BYTES or the dtype changes
    for index in range(len(layout.slots) - 1):
        if (
            layout.chunk_of[index] != layout.chunk_of[index + 1]
            and layout.slots[index].bucket == layout.slots[index + 1].bucket
        ):
            chunk = layout.chunks[layout.chunk_of[index + 1]]
            assert (chunk.end - chunk.start) * torch.empty(
                (), dtype=layout.dtypes[chunk.bucket]
            ).element_size() >= CHUNK_BYTES


def test_chunk_views_alias_the_buffers() -> None:
    tensors = [torch.randn(200, 1000), torch.randn(1000), torch.randn(300, 1000)]
    layout = FlatLayout.of(tensors)
    buffers = layout.allocate()
    layout.pack(tensors, buffers)
    assert torch.equal(torch.cat(list(reversed(layout.chunk_views(buffers)))), buffers[0])
    assert len(layout.chunks) == 2  # the last tensor (1.2 MB) alone, then the middle and the first together
    assert layout.chunk_of == (1, 1, 0)


def test_bound_parameters_live_in_the_flat_buffers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    layout = FlatLayout.of(params)
    flat = layout.allocate()
    layout.bind(params, flat, keep="params")
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "binding keeps the values"
    flat[0].fill_(7.0)  # what is received into the buffers is the model
    assert all(bool((p == 7.0).all()) for p in params)
    model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, assign=True)
    params = list(model.parameters())
    assert not any(p.data_ptr() == flat[0].data_ptr() for p in params)
    layout.bind(params, flat, keep="buffers")  # re-bound to the buffers' (the server's) values
    assert all(bool((p == 7.0).all()) for p in params)
    assert params[0].data_ptr() == flat[0].data_ptr()
