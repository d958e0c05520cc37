"""Random perturbation directions, regenerated from integer seeds in fixed-size chunks.

A zeroth-order step needs the same direction ``z`` several times (to perturb the
parameters before each probe and again to build the update). Storing ``z`` would cost
a copy of every ZO parameter, so it is regenerated instead.

**The direction stream.** For ZO param group ``g`` (seed ``S``, step count ``T``),
candidate ``k`` and query ``i``, the group's tensors are split into *classes* by
``(dtype, device)``, numbered by first appearance in group order. A class's *virtual
vector* is the concatenation, in group order, of its tensors' entries in logical
row-major order (whatever their memory layout; for an FSDP2 shard, the global indices
of the local rows). It is cut into chunks of :func:`chunk_elements` entries; chunk ``c``
(``L_c`` entries, the last may be short) is drawn by :meth:`Distribution.fill_` from a
private generator seeded with :func:`chunk_seed` ``(S, g, T, k, i, class, c)``.

So one generator call draws the directions of many small tensors at once, a process
that holds only a slice of a tensor (an FSDP2 shard) draws the chunks that cover its
slice and the union over processes is exactly what one process draws (whatever the
number of processes), replicas (DDP) draw the same, and a resumed run draws what the
uninterrupted one would. Chunks also bound the scratch memory of a step: one chunk,
never a tensor-sized temporary.

Two distributions, both with ``E[z z^T] = I`` (so the ZO estimators stay unbiased):

* :class:`Gaussian` (``"gaussian"``, the default): ``z ~ N(0, I)``, as MeZO.
* :class:`Rademacher` (``"rademacher"``): entries ``+1``/``-1`` with equal probability,
  as classic SPSA; built from random bits (32 entries per 32-bit draw), so it costs a
  fraction of a Gaussian draw.

Regenerating with the same seed gives the same values on the same kind of device, for
any dtype, and never touches the user's global RNG streams.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

__all__ = [
    "mix_seed",
    "chunk_seed",
    "chunk_elements",
    "Distribution",
    "Gaussian",
    "Rademacher",
    "DISTRIBUTIONS",
    "DirectionGenerator",
]

_MASK64 = (1 << 64) - 1

#: Chunk size in entries per device type: large enough that the per-chunk cost (reseeding,
#: launching a kernel) is negligible, small enough to bound scratch memory and the entries a
#: shard draws beyond its own slice. Part of the direction stream: changing it changes z.
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*words: int) -> int:
    """Hash non-negative integers into one 63-bit seed (SplitMix64 over each word).

    Deterministic across platforms and Python versions (unlike ``hash``), and
    sensitive to the order of the words.
    """
    state = 0
    for word in words:
        state = _splitmix64(state ^ (int(word) & _MASK64))
    return state >> 1


def chunk_seed(seed: int, group_index: int, steps: int, candidate: int, query: int, class_index: int,
               chunk: int) -> int:
    """The seed of chunk ``chunk`` of class ``class_index`` of group ``group_index``'s direction
    ``z_{candidate, query}`` at step ``steps`` (group seed ``seed``)."""
    return mix_seed(seed, group_index, steps, candidate, query, class_index, chunk)


def chunk_elements(device: torch.device) -> int:
    """Entries per direction chunk on ``device`` (2**20 on CPU, 2**22 elsewhere)."""
    return _CHUNK_ELEMENTS.get(device.type, _DEFAULT_CHUNK_ELEMENTS)


class Distribution:
    """How a chunk of direction entries is drawn from a seeded generator."""

    name = ""

    def padded_length(self, length: int) -> int:
        """Scratch entries :meth:`fill_` writes to produce ``length`` entries."""
        return length

    def fill_(self, out: Tensor, length: int, generator: torch.Generator) -> Tensor:
        """Draw ``length`` entries into ``out`` (at least :meth:`padded_length` long); return them."""
        raise NotImplementedError

    def read_back_(self, applied: Tensor, scale: float) -> Tensor:
        """The direction ``z`` of a perturbation ``applied = scale * z`` that was written into the
        parameters, rounding included; computed in place in ``applied``."""
        return applied.div_(scale)


class Gaussian(Distribution):
    """Standard normal entries (MeZO's directions)."""

    name = "gaussian"

    def fill_(self, out: Tensor, length: int, generator: torch.Generator) -> Tensor:
        return out[:length].normal_(generator=generator)


class Rademacher(Distribution):
    """``+1``/``-1`` entries with equal probability, 32 per random 32-bit word.

    The words' bytes index a table of the 256 sign patterns of 8 entries, so a chunk costs
    one draw per 32 entries and one gather, instead of one draw and a Box-Muller transform per
    entry. (The byte order of the words makes the stream platform-specific, as are the
    generators themselves.)
    """

    name = "rademacher"

    def __init__(self) -> None:
        self._tables: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}

    def padded_length(self, length: int) -> int:
        return -(-length // 32) * 32

    def _table(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        table = self._tables.get((dtype, device))
        if table is None:
            bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
            table = (bits * 2 - 1).to(dtype=dtype, device=device)
            self._tables[(dtype, device)] = table
        return table

    def read_back_(self, applied: Tensor, scale: float) -> Tensor:
        # Entries are +-1: their signs are exact, where a quotient would carry rounding.
        return applied.sign_() if scale > 0 else applied.sign_().neg_()

    def fill_(self, out: Tensor, length: int, generator: torch.Generator) -> Tensor:
        padded = self.padded_length(length)
        words = torch.empty(padded // 32, dtype=torch.int32, device=out.device)
        words.random_(-(2**31), 2**31, generator=generator)
        table = self._table(out.dtype, out.device)
        torch.index_select(table, 0, words.view(torch.uint8).int(), out=out[:padded].view(-1, 8))
        return out[:length]


DISTRIBUTIONS: Dict[str, Distribution] = {d.name: d for d in (Gaussian(), Rademacher())}
"""The values of the ``distribution`` group key."""


class DirectionGenerator:
    """Draws direction chunks from integer seeds with one private generator per device.

    The generators are reseeded before every draw, so a chunk depends only on
    ``(seed, length, distribution, dtype, device type)``. They are a cache, not state:
    they are rebuilt after pickling.
    """

    def __init__(self) -> None:
        self._generators: Dict[torch.device, torch.Generator] = {}

    def fill_(self, out: Tensor, seed: int, length: int, distribution: Distribution) -> Tensor:
        """Draw the chunk of ``length`` entries seeded by ``seed`` (see :func:`chunk_seed`) into ``out``.

        ``out`` must hold ``distribution.padded_length(length)`` entries; returns the
        ``length`` drawn entries (a view of ``out``).
        """
        generator = self._generators.get(out.device)
        if generator is None:
            generator = torch.Generator(device=out.device)
            self._generators[out.device] = generator
        generator.manual_seed(seed)
        return distribution.fill_(out, length, generator)
