"""The layout of a step's ZO work, built once: direction chunks and where they meet the parameters.

A ZO step works one direction chunk at a time (see :mod:`hybridzo.directions` for the
stream): each :class:`Chunk` is one chunk of one class (dtype, device) of one ZO param
group, together with the *pieces* of parameters it covers on this process. Its held
entries live, during a pass, in flat buffers of the chunk's held length (the drawn
direction, the anchor copy of theta, a moved value); :meth:`Chunk.gather` and
:meth:`Chunk.scatter` copy between such a buffer and the parameters with one
``torch._foreach_copy_`` over the pieces' views, and the arithmetic between them is a
handful of operations on whole flat buffers. So a step's work grows with the number
of chunks, not of tensors: hundreds of small adapter tensors share one chunk.

:class:`StepPlan` holds the chunks of the ZO groups with a key of everything they
depend on (the groups' identities and lengths, each parameter's identity, storage,
shape, strides, dtype and device, the chunk sizes); the optimizer keeps one and builds
a new one when the key changes (a group added or edited, a parameter replaced or moved,
``load_state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import directions
from .directions import chunk_elements
from .sharding import LocalSlice, local_data, local_slice, logical_views

__all__ = ["Piece", "Chunk", "StepPlan", "plan_key", "flat_parts"]


def flat_parts(flat: Tensor, views: Sequence[Tensor], sizes: Sequence[int]) -> List[Tensor]:
    """``flat`` cut into consecutive parts of ``sizes`` entries, each shaped like its view."""
    parts = torch.split(flat, sizes) if len(sizes) > 1 else (flat,)
    return [p if v.dim() == 1 else p.view(v.shape) for p, v in zip(parts, views)]


@dataclass
class Piece:
    """Where a chunk meets one parameter: its logical local entries ``[local_lo, local_hi)``,
    which are the chunk's held entries ``[held_lo, held_lo + local_hi - local_lo)``."""

    param: Tensor
    local_lo: int
    local_hi: int
    held_lo: int

    @property
    def held_hi(self) -> int:
        return self.held_lo + self.local_hi - self.local_lo


@dataclass
class Chunk:
    """One direction chunk of one class of one ZO group, as this process holds it.

    Attributes:
        group, group_index: the param group and its index (seeds derive from it).
        class_index, index: the class within the group and the chunk within the class.
        length: entries of the whole chunk (the last of a class may be short).
        runs: the ranges ``[lo, hi)`` of the chunk whose entries this process holds, in order.
        held: the number of entries held: the length of the chunk's flat buffers.
        pieces: the parameters' parts, in order of the held entries.
        views: logical views of the pieces' local data, in order (one per piece unless a
            non-contiguous parameter needs several); sizes: their numbers of entries.
    """

    group: Dict[str, Any]
    group_index: int
    class_index: int
    index: int
    length: int
    runs: List[Tuple[int, int]]
    held: int
    pieces: List[Piece]
    views: List[Tensor]
    sizes: List[int]
    dtype: torch.dtype
    device: torch.device
    _state_views: Dict[str, Tuple[List[Optional[Tensor]], List[Tensor]]] = field(default_factory=dict, repr=False)

    def empty(self) -> Tensor:
        """A flat buffer for the held entries."""
        return torch.empty(self.held, dtype=self.dtype, device=self.device)

    def parts(self, flat: Tensor) -> List[Tensor]:
        """A flat buffer cut into the parts matching :attr:`views`."""
        return flat_parts(flat, self.views, self.sizes)

    def gather(self, out: Tensor) -> Tensor:
        """Copy the parameters' held entries into the flat buffer ``out``; returns it."""
        if all(v.dim() == 1 for v in self.views):
            torch.cat(self.views, out=out)  # one kernel, faster than a copy per view
        else:
            torch._foreach_copy_(self.parts(out), self.views)
        return out

    def gather_add(self, out: Tensor, flat: Tensor, alpha: float) -> Tensor:
        """``out`` = the parameters' held entries ``+ alpha * flat``; returns ``out``."""
        if len(self.views) == 1 and self.views[0].dim() == 1:
            return torch.add(self.views[0], flat, alpha=alpha, out=out)  # one pass over a large tensor
        return self.gather(out).add_(flat, alpha=alpha)

    def scatter(self, flat: Tensor) -> None:
        """Write the flat buffer ``flat`` into the parameters' held entries."""
        torch._foreach_copy_(self.views, self.parts(flat))

    def state_views(self, name: str, buffers: List[Optional[Tensor]]) -> List[Tensor]:
        """Views of the pieces' state ``buffers`` (None: none yet) matching the held entries, in
        logical order like the parameters (whatever the buffers' own layout); cached while the
        buffers are the same tensors."""
        cached = self._state_views.get(name)
        if cached is None or len(cached[0]) != len(buffers) or any(a is not b for a, b in zip(cached[0], buffers)):
            views: List[Tensor] = []
            for piece, buffer in zip(self.pieces, buffers):
                if buffer is not None:
                    views += logical_views(local_data(buffer), piece.local_lo, piece.local_hi)
            cached = self._state_views[name] = (list(buffers), views)
        return cached[1]

    def held_entries(self, drawn: Tensor, out: Tensor) -> Tensor:
        """The held entries of a drawn chunk: a view when they are one run, else copied into ``out``."""
        if len(self.runs) == 1:
            lo, hi = self.runs[0]
            return drawn[lo:hi]
        return torch.cat([drawn[lo:hi] for lo, hi in self.runs], out=out)


class StepPlan:
    """The chunks of a step's ZO groups; valid while :func:`plan_key` of the groups is :attr:`key`.

    Args:
        zo_groups: ``(index, group)`` of every ZO param group.
        key: :func:`plan_key` of ``zo_groups``.
    """

    def __init__(self, zo_groups: List[Tuple[int, Dict[str, Any]]], key: Hashable) -> None:
        self.key = key
        self.chunks: List[Chunk] = []
        for group_index, group in zo_groups:
            classes: Dict[Tuple[torch.dtype, torch.device], List[LocalSlice]] = {}
            for param in group["params"]:
                piece = local_slice(param)
                classes.setdefault((piece.local.dtype, piece.local.device), []).append(piece)
            for class_index, ((dtype, device), slices) in enumerate(classes.items()):
                self.chunks += _class_chunks(group, group_index, class_index, slices, dtype, device)
        self.held = sum(chunk.held for chunk in self.chunks)


def _class_chunks(group: Dict[str, Any], group_index: int, class_index: int, slices: List[LocalSlice],
                  dtype: torch.dtype, device: torch.device) -> List[Chunk]:
    """The chunks of one class's virtual vector that this process holds entries of."""
    size = chunk_elements(device)
    total = sum(s.numel for s in slices)
    meets: Dict[int, List[Tuple[LocalSlice, int, int, int]]] = {}  # chunk -> (slice, local lo, hi, chunk lo)
    offset = 0
    for s in slices:
        lo = offset + s.start  # global index of the first local entry in the virtual vector
        hi = lo + s.local.numel()
        while lo < hi:
            chunk = lo // size
            end = min(hi, (chunk + 1) * size)
            meets.setdefault(chunk, []).append((s, lo - offset - s.start, end - offset - s.start, lo - chunk * size))
            lo = end
        offset += s.numel
    chunks = []
    for index in sorted(meets):
        runs: List[Tuple[int, int]] = []
        pieces, views, held = [], [], 0
        for s, local_lo, local_hi, chunk_lo in meets[index]:
            chunk_hi = chunk_lo + local_hi - local_lo
            if runs and runs[-1][1] == chunk_lo:
                runs[-1] = (runs[-1][0], chunk_hi)
            else:
                runs.append((chunk_lo, chunk_hi))
            pieces.append(Piece(s.param, local_lo, local_hi, held))
            views += logical_views(s.local, local_lo, local_hi)
            held += local_hi - local_lo
        chunks.append(Chunk(group, group_index, class_index, index, min(size, total - index * size), runs, held,
                            pieces, views, [v.numel() for v in views], dtype, device))
    return chunks


def plan_key(zo_groups: List[Tuple[int, Dict[str, Any]]]) -> Hashable:
    """Everything a :class:`StepPlan` of ``zo_groups`` depends on."""
    tensors = []
    for _, group in zo_groups:
        for param in group["params"]:
            local = local_data(param)
            tensors.append((id(param), local.data_ptr(), local.shape, local.stride(), local.dtype, local.device,
                            param.shape))
    groups = tuple((index, id(group), id(group["params"]), len(group["params"])) for index, group in zo_groups)
    return groups, tuple(tensors), tuple(directions._CHUNK_ELEMENTS.items()), directions._DEFAULT_CHUNK_ELEMENTS
