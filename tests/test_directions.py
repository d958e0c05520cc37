"""The direction stream: chunks of a class's virtual vector; any sharding of its tensors draws, in union, the same."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridzo.directions import DISTRIBUTIONS, DirectionGenerator, chunk_seed
from hybridzo.plan import _class_chunks
from hybridzo.reference import direction
from hybridzo.sharding import LocalSlice, logical_views

WORDS = (7, 0, 3, 1, 2)  # seed, group index, steps, candidate, query


def drawn_by(slices, chunk_size, distribution, dtype, monkeypatch, class_index=0):
    """What a process holding ``slices`` (one class) draws for each slice, through the step's plan."""
    monkeypatch.setattr("hybridzo.directions._CHUNK_ELEMENTS", {"cpu": chunk_size})
    kind, generator = DISTRIBUTIONS[distribution], DirectionGenerator()
    out = [torch.full((s.local.numel(),), float("nan"), dtype=dtype) for s in slices]
    group = {"params": [s.param for s in slices]}
    for chunk in _class_chunks(group, WORDS[1], class_index, slices, dtype, torch.device("cpu")):
        buffer = torch.empty(kind.padded_length(chunk.length), dtype=dtype)
        seed = chunk_seed(WORDS[0], WORDS[1], WORDS[2], WORDS[3], WORDS[4], class_index, chunk.index)
        held = chunk.held_entries(generator.fill_(buffer, seed, chunk.length, kind), chunk.empty())
        for piece in chunk.pieces:
            index = next(i for i, s in enumerate(slices) if s.param is piece.param)
            out[index][piece.local_lo:piece.local_hi] = held[piece.held_lo:piece.held_hi]
    return out


def row_shards(rows: int, row_size: int, world: int):
    """FSDP2's dim-0 split (torch.chunk semantics): (start entry, entries) per rank, empty ranks included."""
    per_rank = math.ceil(rows / world)
    for rank in range(world):
        first = min(rank * per_rank, rows)
        count = max(0, min(per_rank, rows - first))
        yield first * row_size, count * row_size


@settings(max_examples=60, deadline=None)
@given(tensors=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 5)), min_size=1, max_size=4),
       world=st.integers(1, 5), chunk=st.integers(1, 50), distribution=st.sampled_from(sorted(DISTRIBUTIONS)),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_shards_draw_exactly_the_unsharded_direction(tensors, world, chunk, distribution, dtype):
    with pytest.MonkeyPatch.context() as patch:
        params = [torch.empty(rows * row_size, dtype=dtype) for rows, row_size in tensors]
        whole = drawn_by([LocalSlice(p, p, 0, p.numel()) for p in params], chunk, distribution, dtype, patch)
        by_rank = [
            drawn_by([LocalSlice(p, torch.empty(count, dtype=dtype), start, p.numel())
                      for p, (start, count) in zip(params, shards)], chunk, distribution, dtype, patch)
            for shards in zip(*(row_shards(rows, row_size, world) for rows, row_size in tensors))
        ]
        for t in range(len(params)):
            assert torch.equal(torch.cat([rank[t] for rank in by_rank]), whole[t])


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=5), chunk=st.integers(1, 40),
       distribution=st.sampled_from(sorted(DISTRIBUTIONS)))
def test_a_class_is_one_virtual_vector_cut_into_chunks(sizes, chunk, distribution):
    """Brute force: draw every chunk of the concatenation; each tensor's direction is its range of it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("hybridzo.directions._CHUNK_ELEMENTS", {"cpu": chunk})
        group = {"params": [torch.empty(n, dtype=torch.float64) for n in sizes], "seed": WORDS[0],
                 "steps": WORDS[2], "distribution": distribution}
        total, kind = sum(sizes), DISTRIBUTIONS[distribution]
        chunks = []
        for c in range(-(-total // chunk)):
            length = min(chunk, total - c * chunk)
            generator = torch.Generator().manual_seed(chunk_seed(*WORDS, 0, c))
            chunks.append(kind.fill_(torch.empty(kind.padded_length(length), dtype=torch.float64), length, generator))
        virtual = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.float64)
        got = torch.cat([direction(group, WORDS[1], WORDS[3], WORDS[4], j) for j in range(len(sizes))])
        assert torch.equal(got, virtual)


def test_classes_split_by_dtype_and_number_by_first_appearance():
    group = {"params": [torch.empty(3, dtype=torch.float32), torch.empty(4, dtype=torch.float64),
                        torch.empty(2, dtype=torch.float32)], "seed": 1, "steps": 0, "distribution": "gaussian"}
    kind = DISTRIBUTIONS["gaussian"]
    float32_class = kind.fill_(torch.empty(5), 5, torch.Generator().manual_seed(chunk_seed(1, 0, 0, 0, 0, 0, 0)))
    float64_class = kind.fill_(torch.empty(4, dtype=torch.float64), 4,
                               torch.Generator().manual_seed(chunk_seed(1, 0, 0, 0, 0, 1, 0)))
    assert torch.equal(direction(group, 0, 0, 0, 0), float32_class[:3])
    assert torch.equal(direction(group, 0, 0, 0, 2), float32_class[3:])
    assert torch.equal(direction(group, 0, 0, 0, 1), float64_class)


layouts = st.sampled_from(["contiguous", "transposed", "channels_last", "permuted", "sliced"])


def strided(layout: str, shape, generator):
    if layout == "transposed":
        return torch.randn(tuple(reversed(shape)), generator=generator, dtype=torch.float64).t()
    if layout == "channels_last" and len(shape) == 4:
        return torch.randn(shape, generator=generator, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last)
    if layout == "permuted" and len(shape) == 3:
        return torch.randn(shape[2], shape[0], shape[1], generator=generator, dtype=torch.float64).permute(1, 2, 0)
    if layout == "sliced":  # a column slice: gaps in memory
        return torch.randn(*shape[:-1], shape[-1] + 2, generator=generator, dtype=torch.float64)[..., 1:-1]
    return torch.randn(shape, generator=generator, dtype=torch.float64)


@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), layout=layouts, data=st.data())
def test_logical_views_reach_the_row_major_range_in_order(shape, layout, data):
    if layout == "transposed":
        shape = shape[:2]
        if len(shape) < 2:
            shape = shape + [3]
    tensor = strided(layout, tuple(shape), torch.Generator().manual_seed(0))
    lo = data.draw(st.integers(0, tensor.numel()))
    hi = data.draw(st.integers(lo, tensor.numel()))
    views = logical_views(tensor, lo, hi)
    assert len(views) <= max(1, 2 * tensor.dim() - 1)
    flat = torch.cat([v.reshape(-1) for v in views]) if views else torch.empty(0, dtype=tensor.dtype)
    assert torch.equal(flat, tensor.reshape(-1)[lo:hi])
    for view in views:  # views, not copies: writing through them writes the tensor
        assert view.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()


def test_rademacher_entries_are_fair_independent_signs():
    kind, n = DISTRIBUTIONS["rademacher"], 1 << 16
    z = DirectionGenerator().fill_(torch.empty(n), 3, n, kind)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    by_bit = z.view(-1, 32).mean(0)  # every bit position of the random words is used fairly
    assert by_bit.abs().max().item() < 5 / math.sqrt(n / 32)
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 / math.sqrt(n)  # neighbours uncorrelated
