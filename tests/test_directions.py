"""Directions drawn in chunks: any slicing of a tensor into shards draws, in union, the whole direction."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridzo.directions import DISTRIBUTIONS, DirectionGenerator
from hybridzo.sharding import LocalSlice


def draw_slice(piece: LocalSlice, seed: int, chunk_size: int, distribution: str) -> torch.Tensor:
    """What a process holding ``piece`` draws for its entries (as the ZO step does, chunk by chunk)."""
    kind, generator = DISTRIBUTIONS[distribution], DirectionGenerator()
    out = torch.empty(piece.flat.numel(), dtype=piece.flat.dtype)
    for span in piece.spans(chunk_size):
        buffer = torch.empty(kind.padded_length(span.length), dtype=out.dtype)
        drawn = generator.fill_(buffer, seed, span.chunk, span.length, kind)
        out[span.local_lo:span.local_hi] = drawn[span.lo:span.hi]
    return out


def row_shards(rows: int, row_size: int, world: int):
    """FSDP2's dim-0 split (torch.chunk semantics): (start entry, entries) per rank, empty ranks included."""
    per_rank = math.ceil(rows / world)
    for rank in range(world):
        first = min(rank * per_rank, rows)
        count = max(0, min(per_rank, rows - first))
        yield first * row_size, count * row_size


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), row_size=st.integers(1, 9), world=st.integers(1, 7), chunk=st.integers(1, 50),
       seed=st.integers(0, 2**63 - 1), distribution=st.sampled_from(sorted(DISTRIBUTIONS)),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_shards_draw_exactly_the_unsharded_direction(rows, row_size, world, chunk, seed, distribution, dtype):
    numel = rows * row_size
    whole = draw_slice(LocalSlice(None, torch.empty(numel, dtype=dtype), 0, numel), seed, chunk, distribution)
    pieces = [
        draw_slice(LocalSlice(None, torch.empty(count, dtype=dtype), start, numel), seed, chunk, distribution)
        for start, count in row_shards(rows, row_size, world)
    ]
    assert torch.equal(torch.cat(pieces), whole)


@given(numel=st.integers(1, 200), start=st.integers(0, 199), chunk=st.integers(1, 64))
def test_spans_cover_the_slice_once_in_order(numel, start, chunk):
    start = min(start, numel - 1)
    length = numel - start
    spans = LocalSlice(None, torch.empty(length), start, numel).spans(chunk)
    covered = [i for span in spans for i in range(span.local_lo, span.local_hi)]
    assert covered == list(range(length))
    for span in spans:
        assert 0 <= span.lo < span.hi <= span.length <= chunk
        assert span.chunk * chunk + span.lo == start + span.local_lo


def test_rademacher_entries_are_fair_independent_signs():
    kind, n = DISTRIBUTIONS["rademacher"], 1 << 16
    z = DirectionGenerator().fill_(torch.empty(n), 3, 0, n, kind)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    by_bit = z.view(-1, 32).mean(0)  # every bit position of the random words is used fairly
    assert by_bit.abs().max().item() < 5 / math.sqrt(n / 32)
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 / math.sqrt(n)  # neighbours uncorrelated
