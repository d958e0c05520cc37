"""The part of a parameter this process holds, as a flat view, and where it sits in the whole.

Plain tensors are held whole. FSDP2 (``torch.distributed.fsdp.fully_shard``) turns
parameters into DTensors sharded on dim 0: each process holds a block of rows, which
is a contiguous range of the tensor's flattened (row-major) index space. Update rules
are elementwise, so they run on the local data of parameter, gradient and state alike;
ZO directions are drawn for the global index range of the local rows
(:mod:`hybridzo.directions`), so a sharded run draws exactly the directions an
unsharded one does. :func:`logical_views` reaches a range of a tensor's logical
(row-major) entries whatever its memory layout, so a transposed or ``channels_last``
tensor takes the same direction entries as a contiguous one with the same values.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["LocalSlice", "local_data", "flat_view", "logical_views", "is_sharded", "local_slice", "prepare_fsdp",
           "is_prepared"]


def _dtensor_type() -> Optional[type]:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        return None
    return DTensor


_DTensor = _dtensor_type()


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 parameter, gradient or state)."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def any_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor, looking at each type once (a step's per-tensor cost).

    Without a default process group there are none (a DTensor's device mesh needs one), and the
    tensors are not looked at.
    """
    if _DTensor is None or not torch.distributed.is_initialized():
        return False
    return any(issubclass(kind, _DTensor) for kind in set(map(type, tensors)))


# The FSDP2 parameters of models passed to prepare_fsdp: id -> (the module holding it, its attribute name).
# No weak references to the parameters themselves: module.to() and other conversions swap a DTensor
# parameter's contents in place (torch.utils.swap_tensors), which refuses tensors with weak references.
_PREPARED: Dict[int, Tuple["weakref.ref[nn.Module]", str]] = {}


def prepare_fsdp(model: nn.Module) -> nn.Module:
    """Make a model sharded with FSDP2 (``fully_shard``) safe for :class:`~hybridzo.HybridZOOptimizer`.

    A ZO step writes probes and updates into each process's parameter shards, then runs
    forwards. FSDP2 normally keeps the root module's gathered parameters after a forward
    that is not followed by backward (a ZO probe), and the next forward reuses that copy:
    writes to the shards in between, and ``requires_grad`` changes, would not reach it.
    This sets every FSDP module of ``model`` to reshard after forward (the root too, as
    ``fully_shard(..., reshard_after_forward=True)`` would; the root's parameters are then
    gathered again for each forward), drops any copy gathered so far, and records the
    model's sharded parameters, which the optimizer checks before a step.

    Call it after ``fully_shard`` and before the first step; it returns ``model``.

    Raises:
        ValueError: ``model`` holds no FSDP2 module.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = ()  # type: ignore[assignment,misc]
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)] if FSDPModule else []
    if not modules:
        raise ValueError(
            f"Invalid model: {type(model).__name__} holds no FSDP2 module; call "
            "torch.distributed.fsdp.fully_shard on its blocks and on the model first"
        )
    for module in modules:
        module.set_reshard_after_forward(True, recurse=False)
        module.reshard()  # while a module is gathered, parameters() returns the gathered copies
    for key in [key for key, (owner, _) in _PREPARED.items() if owner() is None]:
        del _PREPARED[key]
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if is_sharded(param):
                _PREPARED[id(param)] = (weakref.ref(module), name)
    return model


def is_prepared(param: Tensor) -> bool:
    """Whether ``param`` is a plain tensor or a parameter of a model passed to :func:`prepare_fsdp`.

    A parameter keeps its identity through ``model.to(...)`` (FSDP2 swaps its contents), so it stays
    prepared; one that replaced a prepared parameter (e.g. ``load_state_dict(assign=True)``) is not.
    """
    if not is_sharded(param):
        return True
    entry = _PREPARED.get(id(param))
    if entry is None:
        return False
    owner = entry[0]()
    return owner is not None and getattr(owner, entry[1], None) is param


def local_data(tensor: Tensor) -> Tensor:
    """The data this process holds: the local shard of a DTensor, else the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def flat_view(tensor: Tensor) -> Tensor:
    """A 1-D view of a dense tensor in memory order (real entries for complex tensors).

    Raises:
        ValueError: the tensor's memory is not dense (overlapping or with gaps).
    """
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    if tensor.is_contiguous():
        return tensor.view(-1)
    # A permuted dense layout (e.g. channels_last): order dims by stride, then it is contiguous.
    order = sorted(range(tensor.dim()), key=lambda d: tensor.stride(d), reverse=True)
    permuted = tensor.permute(order)
    if not permuted.is_contiguous():
        raise ValueError(
            f"a tensor of shape {tuple(tensor.shape)} with strides {tensor.stride()} is not dense "
            "in memory, so it has no flat view to update in place"
        )
    return permuted.view(-1)


def logical_views(tensor: Tensor, lo: int, hi: int) -> List[Tensor]:
    """Views of ``tensor`` that hold, one after the other (each in row-major order), its entries
    ``[lo, hi)`` in logical row-major order, whatever its strides.

    One view for a contiguous tensor; otherwise at most ``2 * tensor.dim() - 1``: the partial
    row before the first whole row of dim 0, the whole rows, the partial row after them (the
    partial rows split the same way, one dim down).
    """
    if hi <= lo:
        return []
    if tensor.is_contiguous():
        return [tensor.view(-1)[lo:hi]]
    row = tensor.numel() // tensor.shape[0]
    if lo % row == 0 and hi % row == 0:
        return [tensor[lo // row:hi // row]]
    views: List[Tensor] = []
    if lo % row:
        first = lo // row
        end = min(hi, (first + 1) * row)
        views += logical_views(tensor[first], lo - first * row, end - first * row)
        lo = end
    whole_end = hi // row * row
    if lo < whole_end:
        views.append(tensor[lo // row:whole_end // row])
        lo = whole_end
    if lo < hi:
        last = lo // row
        views += logical_views(tensor[last], lo - last * row, hi - last * row)
    return views


@dataclass
class LocalSlice:
    """A parameter's local data and its place in the global (logical, row-major) index space.

    Attributes:
        param: the parameter (a plain tensor or a DTensor).
        local: the local data (the whole tensor, or a DTensor's local rows), detached.
        start: global logical index of the first local entry.
        numel: entries of the whole (global) tensor.
    """

    param: Tensor
    local: Tensor
    start: int
    numel: int


def local_slice(param: Tensor) -> LocalSlice:
    """The :class:`LocalSlice` of a plain tensor or of a DTensor sharded on dim 0 (or replicated).

    Raises:
        ValueError: a DTensor sharded on a dim other than 0, or sharded on dim 0 more than once
            (its local entries are then not one contiguous range of the flattened tensor).
    """
    if not is_sharded(param):
        flat_view(param.detach())  # refuses memory that is not dense (overlapping entries, gaps)
        return LocalSlice(param, param.detach(), 0, param.numel())
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = [p.dim for p in param.placements if isinstance(p, Shard)]
    others = [p for p in param.placements if not isinstance(p, (Shard, Replicate))]
    if others or any(d != 0 for d in shard_dims) or len(shard_dims) > 1:
        raise ValueError(
            f"ZO groups need parameters sharded on dim 0 only (FSDP2's default), got placements "
            f"{tuple(param.placements)}; a local shard along another dim is not a contiguous range of "
            "the flattened parameter"
        )
    local = param.to_local()
    if not local.is_contiguous():
        raise ValueError(f"the local shard of a parameter of shape {tuple(param.shape)} is not contiguous")
    start = 0
    if shard_dims and local.numel() > 0:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        start = offset[0] * math.prod(param.shape[1:])
    return LocalSlice(param, local.detach(), start, param.numel())
