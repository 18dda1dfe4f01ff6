"""TokenStore: O(block) appends into geometrically grown buffers, per-head token counts, selection with positions,
batch reordering, and bytes reported = bytes allocated. Checked against a plain list-of-rows reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress.errors import KVCompressError
from kvcompress.state import PackedState, reachable_tensors, storage_nbytes
from kvcompress.store import GROWTH, PAGE_TOKENS, TokenStore

GROUP = 4  # tokens per row of the grouped tensor "g" (like a KIVI key group's scale)
B, H = 2, 3


def block(tokens: int, start: int) -> PackedState:
    """A state of `tokens` tokens whose values encode (sequence, head, token index): per-token rows "x" and
    per-group rows "g"."""
    index = torch.arange(start, start + tokens, dtype=torch.float32)
    seq = torch.arange(B, dtype=torch.float32)[:, None, None]
    head = torch.arange(H, dtype=torch.float32)[None, :, None]
    x = torch.stack([index.expand(B, H, tokens), (seq * 10 + head).expand(B, H, tokens)], dim=-1)
    g = (index[::GROUP] / GROUP).expand(B, H, tokens // GROUP)[..., None].repeat(1, 1, 1, 3)
    return PackedState({"x": x.contiguous(), "g": g.contiguous()}, tokens=tokens, head_dim=2, dtype=torch.float32)


def held_rows(store: TokenStore, b: int, h: int) -> list[float]:
    """Token indices (from the x rows) that (b, h) holds, in order."""
    count = int(store.tokens[b, h])
    return store.view().tensors["x"][b, h, :count, 0].tolist()


def check_accounting(store: TokenStore) -> None:
    tensors = reachable_tensors(store)
    assert storage_nbytes(tensors) == store.nbytes() + store.index_nbytes()
    # bounded headroom: capacity within GROWTH of the longest head, plus a page
    assert store.capacity <= max(store.length * GROWTH, store.length) + PAGE_TOKENS
    if store.ragged:  # each (sequence, head) pays for its own tokens: within GROWTH of them, plus a page
        assert bool((store.room <= torch.clamp(store.tokens * GROWTH, min=store.tokens) + PAGE_TOKENS).all())
        assert bool((store.room >= store.tokens).all())
        row_bytes = {"x": 2 * 4, "g": 3 * 4 / GROUP}  # per token
        assert store.nbytes() == sum(int(store.room.sum()) * per_token for per_token in row_bytes.values())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 8).map(lambda n: n * GROUP), min_size=1, max_size=10), st.data())
def test_uneven_heads_are_held_ragged_each_paying_for_its_own_tokens(sizes, data):
    """Heads that keep different counts (AdaKV) hold their own tokens, not the longest head's; appends grow
    each region geometrically; what is read back is the concatenation."""
    store = TokenStore()
    store.append(block(16 * GROUP, 0), first_position=0)
    counts = torch.tensor([[data.draw(st.integers(0, 16)) * GROUP for _ in range(H)] for _ in range(B)])
    store.select(torch.arange(16 * GROUP).expand(B, H, -1), counts)
    expected = [[list(map(float, range(int(counts[b, h])))) for h in range(H)] for b in range(B)]
    position = 16 * GROUP
    for size in sizes:
        store.append(block(size, position), first_position=position)
        for b in range(B):
            for h in range(H):
                expected[b][h] += list(map(float, range(position, position + size)))
        position += size
        check_accounting(store)
    assert store.ragged == (not bool((counts == counts.max()).all()))
    for b in range(B):
        for h in range(H):
            assert held_rows(store, b, h) == expected[b][h]
            count = int(store.tokens[b, h])
            assert store.position_tensor()[b, h, :count].tolist() == [int(t) for t in expected[b][h]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20).map(lambda n: n * GROUP), min_size=1, max_size=12))
def test_appends_equal_the_concatenation_and_grow_geometrically(sizes):
    store = TokenStore()
    start = 0
    reallocations = 0
    for size in sizes:
        capacity = store.capacity
        store.append(block(size, start), first_position=5 + start)
        reallocations += store.capacity != capacity
        start += size
        check_accounting(store)
    assert store.length == start and store.uniform
    if start:
        view = store.view()
        assert view.tokens == start
        assert view.tensors["x"][..., 0].eq(torch.arange(start, dtype=torch.float32)).all()
        assert view.tensors["g"][..., 0].eq(torch.arange(start // GROUP, dtype=torch.float32)).all()
        # zero-copy: the view shares the buffers' storage
        assert view.tensors["x"].untyped_storage().data_ptr() == store.buffers["x"].untyped_storage().data_ptr()
        assert store.token_positions() == range(5, 5 + start)
        assert store.padding() is None
        assert store.payload_nbytes() == B * H * (start * 2 * 4 + start // GROUP * 3 * 4)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_selection_per_head_keeps_rows_and_positions_and_frees_the_rest(data):
    total = data.draw(st.integers(1, 16)) * GROUP
    store = TokenStore()
    store.append(block(total, 0), first_position=3)
    before = store.nbytes()
    # each (sequence, head) keeps its own whole groups: uneven counts
    groups = total // GROUP
    keep_groups = [[sorted(data.draw(st.sets(st.integers(0, groups - 1), max_size=groups))) for _ in range(H)] for _ in range(B)]
    counts = torch.tensor([[len(k) * GROUP for k in row] for row in keep_groups])
    width = int(counts.max())
    keep = torch.zeros(B, H, width, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            tokens = [g * GROUP + i for g in keep_groups[b][h] for i in range(GROUP)]
            keep[b, h, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    store.select(keep, counts)
    check_accounting(store)
    assert store.nbytes() <= before
    assert store.uniform == bool((counts == width).all())
    for b in range(B):
        for h in range(H):
            expected = [float(g * GROUP + i) for g in keep_groups[b][h] for i in range(GROUP)]
            assert held_rows(store, b, h) == expected
            count = int(counts[b, h])
            positions = store.token_positions()
            assert positions[b, h, :count].tolist() == [3 + int(t) for t in expected]
            padding = store.padding()
            if padding is not None:
                assert padding[b, h].tolist() == [False] * count + [True] * (width - count)
            # padding rows hold zeros (finite whatever decodes them: attention weighs them 0, and 0 * NaN is NaN)
            assert not store.view().tensors["x"][b, h, count:].any()
    # appending after an uneven selection lands after each head's own tokens, at the positions given
    store.append(block(GROUP, 100), first_position=500)
    check_accounting(store)
    for b in range(B):
        for h in range(H):
            expected = [float(g * GROUP + i) for g in keep_groups[b][h] for i in range(GROUP)] + [100.0, 101.0, 102.0, 103.0]
            assert held_rows(store, b, h) == expected
            count = int(store.tokens[b, h])
            assert store.token_positions()[b, h, count - GROUP : count].tolist() == [500, 501, 502, 503]


def test_selection_must_keep_whole_groups_and_held_tokens():
    store = TokenStore("layer 0 keys")
    store.append(block(8, 0))
    with pytest.raises(KVCompressError, match="whole groups of 4 tokens"):
        store.select(torch.arange(6).expand(B, H, 6))
    with pytest.raises(KVCompressError, match="keep whole groups"):
        store.select(torch.tensor([1, 2, 3, 4]).expand(B, H, 4))
    with pytest.raises(KVCompressError, match="a head does not hold"):
        store.select(torch.arange(4, 12).expand(B, H, 8))
    with pytest.raises(KVCompressError, match="ascending"):
        store.select(torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]).expand(B, H, 8))


def test_float8_rows_are_selected_and_appended_unevenly_bit_for_bit():
    """fp8 states (no CPU gather or scatter for float8 in torch) move as their bytes."""
    first, second = block(8, 0), block(4, 8)
    for state in (first, second):
        state.tensors = {name: tensor.to(torch.float8_e4m3fn) for name, tensor in state.tensors.items()}
    store = TokenStore("layer 0 values")
    store.append(first, first_position=0)
    counts = torch.tensor([[8, 4, 4], [4, 8, 8]])
    store.select(torch.arange(8).expand(B, H, 8), counts)
    store.append(second, first_position=8)
    for b in range(B):
        for h in range(H):
            assert held_rows(store, b, h) == list(range(int(counts[b, h]))) + [8.0, 9.0, 10.0, 11.0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, B - 1), min_size=1, max_size=4), st.integers(1, 6))
def test_batch_reorder_follows_dim_zero(order, groups):
    store = TokenStore()
    store.append(block(groups * GROUP, 0))
    store.select(torch.arange(GROUP).expand(B, H, GROUP), torch.tensor([[GROUP] * H, [0] * H]) if groups > 1 else None)
    reference = {b: [held_rows(store, b, h) for h in range(H)] for b in range(B)}
    seq_code = store.view().tensors["x"][:, :, :1, 1].clone()
    store.map_batch(lambda t: t.index_select(0, torch.tensor(order)))
    check_accounting(store)
    assert store.tokens.shape[0] == len(order)
    for new, old in enumerate(order):
        assert [held_rows(store, new, h) for h in range(H)] == reference[old]
        if reference[old][0]:
            assert torch.equal(store.view().tensors["x"][new, :, :1, 1], seq_code[old])


def test_appends_from_another_quantizer_or_channel_choice_are_refused():
    store = TokenStore("layer 0 keys")
    store.append(block(4, 0))
    other = block(4, 4)
    other.tensors.pop("g")
    with pytest.raises(KVCompressError, match="another quantizer"):
        store.append(other)
    with pytest.raises(KVCompressError, match="multiples of 4"):
        store.append(PackedState({"x": block(8, 0).tensors["x"][:, :, :2], "g": block(8, 0).tensors["g"][:, :, :1]}, 2, 2, torch.float32))
    chosen = block(4, 4)
    chosen.shared = {"channels": torch.zeros(B, H, 1, dtype=torch.uint8)}
    with pytest.raises(KVCompressError, match="per-sequence 'channels'"):
        store.append(chosen)


def test_positions_are_int16_until_one_does_not_fit_and_held_by_the_key_store_only():
    state = block(GROUP, 0)
    keys, values = TokenStore("keys"), TokenStore("values", holds_positions=False)
    at = torch.tensor([3, 9, 30000, 32767]).expand(B, H, GROUP)
    for store in (keys, values):
        store.append(state, positions=at)
    assert keys.positions.dtype == torch.int16 and values.positions is None
    assert torch.equal(keys.token_positions(), at)
    with pytest.raises(KVCompressError, match="key store"):
        values.token_positions()
    later = torch.tensor([40000, 40001, 40002, 70000]).expand(B, H, GROUP)
    keys.append(state, positions=later)
    values.append(state, positions=later)
    assert keys.positions.dtype == torch.int32
    assert torch.equal(keys.token_positions(), torch.cat([at, later], dim=-1))
    assert values.length == keys.length == 8
