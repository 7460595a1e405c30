"""The host store's arenas: views into blocks of power-of-two sizes (plan_blocks), because torch's
pinned-memory allocator rounds every request up to the next power of two."""

from __future__ import annotations

import pytest
import torch

from edgeprism.cache.host_store import ARENA_ALIGN, HostStore, arena_stride, plan_blocks

MiB = 2**20


@pytest.mark.parametrize("arena_bytes, count, most", [
    (128 * 2_506_752, 48, 0.05),  # Qwen3-30B-A3B int4 layers: 24 GiB pinned one a layer, 15 GiB in blocks
    (128 * 9_437_184, 48, 0.05),  # its bf16 layers: 96 GiB one a layer, 56 GiB in blocks
    (8 * 3 * 4096 * 14336 * 2, 32, 0.05),  # Mixtral-8x7B bf16: 128 GiB one a layer, 88 GiB in blocks
    (128 * 2_506_752, 12, 0.12),
    (3 * MiB + 5, 7, 0.5),
    (10**9, 1, 0.08),
])
def test_plan_blocks_holds_every_arena_in_power_of_two_blocks_with_little_waste(arena_bytes, count, most):
    plan = plan_blocks(arena_bytes, count)
    stride = arena_stride(arena_bytes)
    assert stride % ARENA_ALIGN == 0 and arena_bytes <= stride < arena_bytes + ARENA_ALIGN
    assert sum(n for _, n in plan) == count
    for block, n in plan:
        assert n >= 1 and block & (block - 1) == 0 and n * stride <= block
    total = sum(block for block, _ in plan)
    assert total <= (1 + most) * count * arena_bytes, (total / 2**30, plan)
    one_a_layer = count * (1 << (arena_bytes - 1).bit_length())
    assert total <= one_a_layer


@pytest.mark.parametrize("dtype, fmt", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int4")])
def test_arenas_are_aligned_disjoint_views_that_keep_their_rows(dtype, fmt):
    """Every arena starts on a page of its block (the block itself: 64-byte aligned pageable, page-aligned
    pinned), none overlaps another, and each keeps what is written to its rows (filled then read back)."""
    from edgeprism.moe.quant import make_format

    layers, E, G, D, inter = [0, 2, 3, 5, 7], 6, 2, 64, 128
    f = make_format(fmt, D, inter // G, dtype) if fmt else None
    store = HostStore(layers, E, G, D, inter, dtype, pin=False, fmt=f)
    assert not store.pinned and list(store.arenas) == layers
    spans = []
    for layer in layers:
        a = store.arenas[layer]
        assert a.shape == (E * G, store.numel) and a.is_contiguous() and a.dtype == store.format.row_dtype
        assert a.data_ptr() % 64 == 0
        spans.append((a.data_ptr(), a.data_ptr() + a.numel() * a.element_size()))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    stride = arena_stride(E * G * store.unit_bytes)
    for layer in layers:  # each arena sits a whole number of strides into its block (its storage)
        a = store.arenas[layer]
        assert (a.data_ptr() - a.untyped_storage().data_ptr()) % stride == 0
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        for e in range(E):
            w = [torch.randn(*shape, generator=g) for shape in ((inter, D), (inter, D), (D, inter))]
            store.fill_expert(layer, e, *w)
            expected = store.format.pack(w[0][:inter // G], w[1][:inter // G], w[2][:, :inter // G])
            torch.testing.assert_close(store.arenas[layer][e * G], expected, rtol=0, atol=0)
    # a later layer's fill left the earlier ones intact
    first = store.arenas[layers[0]].clone()
    store.fill_expert(layers[-1], 0, *(torch.zeros_like(t) for t in w))
    assert torch.equal(store.arenas[layers[0]], first)
