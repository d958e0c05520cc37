r"""FO groups step with torch.optim's own kernels: the for-loop, ``foreach`` or ``fused`` implementation.

An FO group's rule is ``torch.optim.SGD``'s (dampening 0, no Nesterov) or ``torch.optim.AdamW``'s
(no AMSGrad); :mod:`hybridzo.rules` holds both as readable per-tensor kernels, the reference the
tests check this fast path against. Here a group's tensors are handed as lists to torch's
functional API (:func:`torch.optim.sgd.sgd`, :func:`torch.optim.adamw.adamw`), which runs the
implementation the group's ``foreach``/``fused`` keys choose, exactly as ``torch.optim`` does:

* ``fused=True``: one fused kernel per device and dtype (``torch._fused_sgd_``,
  ``torch._fused_adamw_``; CPU, CUDA and the other devices torch has them for);
* ``foreach=True``: ``torch._foreach_*`` operations per device and dtype;
* ``foreach=False`` (or both None where torch defaults to it, as on CPU): the per-tensor loop.

Both None is torch's default for the device (foreach on CUDA, the for-loop on CPU), so a group
matches ``torch.optim`` with the same keys bit for bit. State is stored as torch stores it: AdamW's
``step`` is a 0-dim tensor (float32 on the parameter's device for fused, else on the CPU), and
``torch.optim`` state dicts load in both directions.

The commit cannot fail half-way for a reason that can be known before it starts:
:class:`FirstOrderStep` checks every gradient and state entry (shape, dtype, device) and allocates
every state entry the step creates before anything is written; the writes then happen in
:meth:`FirstOrderStep.commit`, which the optimizer runs with interrupts deferred. What remains is
what ``torch.optim`` shares: running out of memory for the kernels' temporaries.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.optimizer import _default_to_fused_or_foreach, _get_fused_kernels_supported_devices, _get_scalar_dtype
from torch.optim.sgd import sgd

from .sharding import is_sharded, local_data

__all__ = ["FirstOrderStep", "any_sharded", "check_implementation", "implementation", "initial_fo_state"]

Group = Mapping[str, Any]


def implementation(group: Group, params: Sequence[Tensor]) -> str:
    """``"fused"``, ``"foreach"`` or ``"for-loop"``: what torch.optim runs for ``group`` over ``params``."""
    if group["fused"]:
        return "fused"
    if group["foreach"]:
        return "foreach"
    if group["foreach"] is None and group["fused"] is None:
        _, foreach = _default_to_fused_or_foreach(list(params), differentiable=False, use_fused=False)
        return "foreach" if foreach else "for-loop"
    return "for-loop"


def check_implementation(group: Group, params: Sequence[Tensor], where: str) -> None:
    """Refuse ``foreach``/``fused`` values torch cannot run for these parameters.

    Raises:
        ValueError: ``foreach`` and ``fused`` both True, or ``fused=True`` for an FO group holding a
            tensor that is not real floating point or on a device without fused kernels.
    """
    if group["fused"] and group["foreach"]:
        raise ValueError(f"Invalid fused in {where}: True (fused and foreach cannot both be True)")
    if group["mode"] != "fo" or not group["fused"]:
        return
    devices = _get_fused_kernels_supported_devices()
    for position, param in enumerate(params):
        if not isinstance(param, Tensor):
            continue
        if not param.is_floating_point() or param.device.type not in devices:
            raise ValueError(
                f"Invalid fused in {where}: True (parameter {position} is {param.dtype} on {param.device.type}; "
                f"fused kernels need real floating-point tensors on {devices})"
            )


def any_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (FSDP2), checking one tensor per type."""
    return any(map(is_sharded, {type(t): t for t in tensors}.values()))


def _step_like_torch(value: Any, param: Tensor, fused: bool, where: str) -> Tensor:
    """AdamW's ``step`` (None: 0) as torch.optim keeps it for this implementation: a new 0-dim tensor.

    Raises:
        ValueError: ``value`` is not a non-negative integer (or a one-element tensor holding one).
    """
    count = value.item() if isinstance(value, Tensor) and value.numel() == 1 else 0 if value is None else value
    if not isinstance(count, numbers.Real) or isinstance(count, bool) or not 0 <= count < math.inf \
            or count != int(count):
        raise ValueError(f"Invalid state in {where}: state 'step' is {value!r}, not a non-negative integer")
    return torch.tensor(float(count), dtype=_get_scalar_dtype(is_fused=fused),
                        device=param.device if fused else torch.device("cpu"))


def initial_fo_state(state: MutableMapping[Tensor, Dict[str, Any]], group: Group) -> None:
    """Create the state entries an FO group's first step reads, as torch.optim would: AdamW's
    moments as zeros and ``step`` 0; SGD keeps nothing before its first step (``torch.distributed.checkpoint``
    fills in only the entries that exist)."""
    if group["rule"] != "adamw":
        return
    fused = implementation(group, [local_data(p) for p in group["params"]]) == "fused"
    for p in group["params"]:
        entry = state[p]
        for name in ("exp_avg", "exp_avg_sq"):
            if entry.get(name) is None:
                entry[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        entry["step"] = _step_like_torch(entry.get("step"), local_data(p), fused, "initial state")


@dataclass
class _GroupStep:
    """One group's step, checked and with its new state allocated: the lists torch's kernel takes."""

    group: Group
    implementation: str
    params: List[Tensor] = field(default_factory=list)
    grads: List[Tensor] = field(default_factory=list)
    buffers: Dict[str, List[Optional[Tensor]]] = field(default_factory=dict)
    steps: List[Tensor] = field(default_factory=list)
    # (mapping, key, value) written at the commit: state the step creates or converts.
    new_entries: List[Tuple[Any, Any, Any]] = field(default_factory=list)
    entries: List[MutableMapping[str, Any]] = field(default_factory=list)
    has_complex: bool = False


class FirstOrderStep:
    """The FO groups' update from the gradients in ``.grad``: planned when made, written by :meth:`commit`.

    Making one reads and checks everything the commit will touch and allocates the state
    entries it creates; nothing is written. Parameters whose ``.grad`` is None are skipped.

    Args:
        groups: ``(name, group)`` pairs of the FO groups, names as errors report them.
        state: the optimizer's ``state`` mapping.
        checked: a cache the optimizer keeps between steps (not state): per parameter id, the
            parameter, its dtype, the implementation, its state entry, step and buffers as last
            checked. A state entry whose objects are all the ones checked is not checked again
            (tensors do not change shape, dtype or device in place).

    Raises:
        ValueError: a gradient or state buffer whose shape, dtype or device does not match its
            parameter's, a state entry holding some of AdamW's entries but not all, or a ``step``
            that is not a non-negative integer (named by group, parameter and key); ``foreach``/
            ``fused`` values torch cannot run.
        RuntimeError: a sparse gradient.
    """

    def __init__(self, groups: Sequence[Tuple[str, Group]], state: MutableMapping[Tensor, Dict[str, Any]],
                 checked: Dict[int, Tuple[Any, ...]]) -> None:
        self._steps: List[_GroupStep] = []
        stepped: List[int] = []
        for where, group in groups:
            with_grad = [(i, p, p.grad) for i, p in enumerate(group["params"]) if p.grad is not None]
            if group["fused"] and group["foreach"]:
                check_implementation(group, [], where)
            if with_grad:
                self._steps.append(_plan(group, with_grad, state, checked, where))
                stepped += [id(p) for _, p, _ in with_grad]
        if len(checked) > len(stepped):
            # Forget parameters that left the groups (or have no gradient now): the cache must not keep
            # them, or their state, alive (a new head per task in continual learning).
            current = set(stepped)
            for key in [key for key in checked if key not in current]:
                del checked[key]

    def commit(self) -> None:
        """Write the planned state entries, then run each group's kernel."""
        for plan in self._steps:
            for entry, key, value in plan.new_entries:
                entry[key] = value
        with torch.no_grad():
            for plan in self._steps:
                if plan.group["rule"] == "adamw":
                    _adamw(plan)
                else:
                    _sgd(plan)


def _plan(group: Group, with_grad: List[Tuple[int, Tensor, Tensor]], state: MutableMapping[Tensor, Dict[str, Any]],
          checked: Dict[int, Tuple[Any, ...]], where: str) -> _GroupStep:
    """One group's :class:`_GroupStep`: every check, and the state entries to create, per tensor.

    Gradients are checked for what torch's ``.grad`` setter lets through (a sparse layout, a dtype
    unlike the parameter's where ``grad_dtype`` allows one); state, which anyone can write, for
    completeness, shape, dtype and device, unless ``checked`` shows the same objects passed already.
    The loop is the step's per-tensor host work: keep it short.
    """
    sharded = any_sharded([p for _, p, _ in with_grad])
    params = [local_data(p) for _, p, _ in with_grad] if sharded else [p for _, p, _ in with_grad]
    plan = _GroupStep(group, implementation(group, params))
    adam = group["rule"] == "adamw"
    names = ("exp_avg", "exp_avg_sq") if adam else ("momentum_buffer",) if group["momentum"] != 0 else ()
    buffer_lists = [plan.buffers.setdefault(name, []) for name in names]
    fused = plan.implementation == "fused"
    step_dtype = _get_scalar_dtype(is_fused=fused)
    strided, implementation_name = torch.strided, plan.implementation
    first, second = (*names, None, None)[:2]
    add_param, add_grad, add_entry, add_step = plan.params.append, plan.grads.append, plan.entries.append, \
        plan.steps.append
    for (position, p, grad), param in zip(with_grad, params):
        if grad.layout is not strided:
            raise RuntimeError(
                f"Invalid gradient in {where}, parameter {position}: HybridZOOptimizer does not support "
                f"sparse gradients ({grad.layout}; e.g. use nn.Embedding(sparse=False))"
            )
        if sharded:
            grad = local_data(grad)
        known = checked.get(id(p))
        dtype = param.dtype
        # ``p.data = ...`` or ``module.to(...)`` change a parameter's shape, dtype or device in place:
        # what was checked for the old tensor says nothing about the new one.
        if known is not None and (known[0] is not p or known[1] is not dtype or known[7] != param.shape
                                  or known[8] != param.device):
            known = None
        if grad.dtype is not dtype:
            raise _unlike(f"Invalid gradient in {where}, parameter {position}", grad, param)
        add_param(param)
        add_grad(grad)
        plan.has_complex |= dtype.is_complex
        entry = step = first_buffer = second_buffer = None
        if names:
            entry = state.get(p)
            if entry is None:
                entry = {}
                plan.new_entries.append((state, p, entry))
            add_entry(entry)
            first_buffer = entry.get(first)
            if adam:
                second_buffer, step = entry.get(second), entry.get("step")
        # The objects checked last time (``checked`` holds them, so they are these very objects).
        if (known is not None and known[2] is implementation_name and known[3] is entry and known[4] is step
                and known[5] is first_buffer and known[6] is second_buffer):
            if names:
                buffer_lists[0].append(local_data(first_buffer) if sharded else first_buffer)
                if adam:
                    buffer_lists[1].append(local_data(second_buffer) if sharded else second_buffer)
                    add_step(step)
            continue
        buffers = (first_buffer, second_buffer)[:len(names)]
        seen = (p, dtype, implementation_name, entry, step, first_buffer, second_buffer, param.shape, param.device)
        if fused:
            check_implementation(group, [param], f"{where} (parameter {position})")
        present = [n for n, v in zip(("exp_avg", "exp_avg_sq", "step"), (*buffers, step)) if v is not None]
        if adam and 0 < len(present) < 3:
            raise ValueError(f"Invalid state in {where}, parameter {position}: AdamW state holds {present} "
                             "but not all of exp_avg, exp_avg_sq and step (a fresh start has none of them)")
        for name, buffer, into in zip(names, buffers, buffer_lists):
            if buffer is None:
                if adam:  # SGD's first step makes its buffer from the gradient, inside torch's kernel
                    buffer = torch.zeros_like(p, memory_format=torch.preserve_format)
                    plan.new_entries.append((entry, name, buffer))
                    buffer = local_data(buffer) if sharded else buffer
            else:
                if not isinstance(buffer, Tensor):
                    raise ValueError(f"Invalid state in {where}, parameter {position}: state {name!r} is a "
                                     f"{type(buffer).__name__}, not a tensor")
                if sharded:
                    buffer = local_data(buffer)
                if buffer.dtype is not dtype or buffer.shape != param.shape or buffer.device != param.device:
                    raise _unlike(f"Invalid state in {where}, parameter {position}: state {name!r}", buffer, param)
            into.append(buffer)
        if adam:
            if not (isinstance(step, Tensor) and step.dtype is step_dtype and step.dim() == 0
                    and (step.device == param.device if fused else step.is_cpu)):
                step = _step_like_torch(step, param, fused, f"{where}, parameter {position}")
                plan.new_entries.append((entry, "step", step))
            plan.steps.append(step)
        checked[id(p)] = seen
    return plan


def _unlike(what: str, tensor: Tensor, param: Tensor) -> ValueError:
    return ValueError(
        f"{what} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, the parameter "
        f"{tuple(param.shape)} {param.dtype} on {param.device}"
    )


def _adamw(plan: _GroupStep) -> None:
    group = plan.group
    beta1, beta2 = group["betas"]
    adamw(
        plan.params, plan.grads, plan.buffers["exp_avg"], plan.buffers["exp_avg_sq"], [], plan.steps,  # type: ignore[arg-type]
        foreach=plan.implementation == "foreach", fused=plan.implementation == "fused",
        has_complex=plan.has_complex,
        amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
        eps=group["adam_eps"], maximize=False,
    )


def _sgd(plan: _GroupStep) -> None:
    group = plan.group
    everything = list(range(len(plan.params)))
    if group["momentum"] == 0:
        buffers: List[Optional[Tensor]] = [None] * len(plan.params)
        runs = [everything]
    else:
        buffers = plan.buffers["momentum_buffer"]
        fresh = [i for i in everything if buffers[i] is None]
        kept = [i for i in everything if buffers[i] is not None]
        # torch's fused SGD takes a first step for all of its tensors or for none: one call each.
        runs = [part for part in (fresh, kept) if part] if plan.implementation == "fused" else [everything]
    for run in runs:
        momentum_buffers = [buffers[i] for i in run]
        sgd(
            [plan.params[i] for i in run], [plan.grads[i] for i in run], momentum_buffers,
            foreach=plan.implementation == "foreach", fused=plan.implementation == "fused",
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=0.0, nesterov=False, maximize=False,
        )
        if group["momentum"] != 0:
            for i, buffer in zip(run, momentum_buffers):
                if buffers[i] is None:  # torch made it: the step's first for this tensor
                    plan.entries[i]["momentum_buffer"] = buffer
