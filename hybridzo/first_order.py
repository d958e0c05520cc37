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

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.optimizer import _default_to_fused_or_foreach, _get_fused_kernels_supported_devices, _get_scalar_dtype
from torch.optim.sgd import sgd

from .sharding import local_data

__all__ = ["FirstOrderStep", "check_implementation", "implementation", "initial_fo_state"]

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


def _step_like_torch(value: Any, param: Tensor, fused: bool) -> Optional[Tensor]:
    """AdamW's ``step`` as torch.optim keeps it for this implementation; None if ``value`` already is."""
    dtype = _get_scalar_dtype(is_fused=fused)
    device = param.device if fused else torch.device("cpu")
    if isinstance(value, Tensor) and value.dim() == 0 and value.dtype == dtype and value.device == device:
        return None
    count = 0.0 if value is None else float(value.item() if isinstance(value, Tensor) else value)
    return torch.tensor(count, dtype=dtype, device=device)


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
        converted = _step_like_torch(entry.get("step"), local_data(p), fused)
        if converted is not None:
            entry["step"] = converted


@dataclass
class _GroupStep:
    """One group's step, checked and with its new state allocated: the lists torch's kernel takes."""

    group: Group
    implementation: str
    params: List[Tensor] = field(default_factory=list)
    grads: List[Tensor] = field(default_factory=list)
    buffers: Dict[str, List[Optional[Tensor]]] = field(default_factory=dict)
    steps: List[Tensor] = field(default_factory=list)
    # (state entry, key, value) written at the commit: state the step creates or converts.
    new_entries: List[Tuple[MutableMapping[str, Any], str, Tensor]] = field(default_factory=list)
    entries: List[MutableMapping[str, Any]] = field(default_factory=list)
    has_complex: bool = False


class FirstOrderStep:
    """The FO groups' update from the gradients in ``.grad``: planned when made, written by :meth:`commit`.

    Making one reads and checks everything the commit will touch and allocates the state
    entries it creates; nothing is written. Parameters whose ``.grad`` is None are skipped.

    Args:
        groups: ``(name, group)`` pairs of the FO groups, names as errors report them.
        state: the optimizer's ``state`` mapping.

    Raises:
        ValueError: a gradient or state buffer whose shape, dtype or device does not match its
            parameter's (named by group, parameter and key), or ``foreach``/``fused`` values torch
            cannot run.
    """

    def __init__(self, groups: Sequence[Tuple[str, Group]], state: MutableMapping[Tensor, Dict[str, Any]]) -> None:
        self._state = state
        self._steps: List[_GroupStep] = []
        for where, group in groups:
            with_grad = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
            check_implementation(group, [p for _, p in with_grad], where)
            if with_grad:
                self._steps.append(self._plan(group, with_grad, where))

    def _plan(self, group: Group, with_grad: List[Tuple[int, Tensor]], where: str) -> _GroupStep:
        params = [local_data(p) for _, p in with_grad]
        plan = _GroupStep(group, implementation(group, params))
        names = ("exp_avg", "exp_avg_sq") if group["rule"] == "adamw" else (
            ("momentum_buffer",) if group["momentum"] != 0 else ())
        plan.buffers = {name: [] for name in names}
        for (position, p), param in zip(with_grad, params):
            at = f"{where}, parameter {position}"
            grad = local_data(p.grad)  # dense: the optimizer refused sparse gradients already
            _check_like(grad, param, f"Invalid gradient in {at}")
            plan.params.append(param)
            plan.grads.append(grad)
            plan.has_complex |= param.is_complex()
            if not names and p not in self._state:
                continue  # plain SGD keeps no per-parameter state
            entry = self._state[p] if p in self._state else {}
            plan.entries.append(entry)
            if p not in self._state:
                plan.new_entries.append((self._state, p, entry))  # type: ignore[arg-type]
            for name in names:
                buffer = entry.get(name)
                if buffer is None and group["rule"] == "adamw":
                    buffer = torch.zeros_like(p, memory_format=torch.preserve_format)
                    plan.new_entries.append((entry, name, buffer))
                if buffer is not None:
                    if not isinstance(buffer, Tensor):
                        raise ValueError(f"Invalid state in {at}: state {name!r} is a {type(buffer).__name__}")
                    buffer = local_data(buffer)
                    _check_like(buffer, param, f"Invalid state in {at}: state {name!r}")
                plan.buffers[name].append(buffer)
            if group["rule"] == "adamw":
                step = entry.get("step")
                converted = _step_like_torch(step, param, plan.implementation == "fused")
                if converted is not None:
                    plan.new_entries.append((entry, "step", converted))
                plan.steps.append(step if converted is None else converted)
        return plan

    def commit(self, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
        """Write the planned state entries, then run each group's kernel.

        Args:
            grad_scale: the loss scale of ``torch.amp.GradScaler`` when the gradients are still
                scaled (it drives the step through ``_step_supports_amp_scaling``); None otherwise.
            found_inf: the scaler's inf/NaN flag (only with ``grad_scale``); the caller skips the
                step when it is set, fused kernels read it too.
        """
        for plan in self._steps:
            for entry, key, value in plan.new_entries:
                entry[key] = value
        with torch.no_grad():
            self._run(grad_scale, found_inf)

    def _run(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        if grad_scale is not None:
            _unscale([plan.grads for plan in self._steps if plan.implementation != "fused"], grad_scale)
        for plan in self._steps:
            scale = (grad_scale, found_inf) if grad_scale is not None and plan.implementation == "fused" else (None, None)
            if plan.group["rule"] == "adamw":
                _adamw(plan, *scale)
            else:
                _sgd(plan, *scale)


def _check_like(tensor: Tensor, param: Tensor, what: str) -> None:
    if tensor.shape != param.shape or tensor.dtype != param.dtype or tensor.device != param.device:
        raise ValueError(
            f"{what} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, the parameter "
            f"{tuple(param.shape)} {param.dtype} on {param.device}"
        )


def _unscale(grad_lists: List[List[Tensor]], grad_scale: Tensor) -> None:
    """Divide gradients by the loss scale as ``GradScaler.unscale_`` does (the same kernel, bit for bit)."""
    grads = [g for grads in grad_lists for g in grads]
    if not grads:
        return
    inv_scale = grad_scale.double().reciprocal().float()
    by_device: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for grad in grads:
        by_device.setdefault((grad.device, grad.dtype), []).append(grad)
    for (device, _), same in by_device.items():
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(same, found, inv_scale.to(device))


def _adamw(plan: _GroupStep, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    group = plan.group
    beta1, beta2 = group["betas"]
    adamw(
        plan.params, plan.grads, plan.buffers["exp_avg"], plan.buffers["exp_avg_sq"], [], plan.steps,  # type: ignore[arg-type]
        foreach=plan.implementation == "foreach", fused=plan.implementation == "fused",
        grad_scale=grad_scale, found_inf=found_inf, has_complex=plan.has_complex,
        amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
        eps=group["adam_eps"], maximize=False,
    )


def _sgd(plan: _GroupStep, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
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
            grad_scale=grad_scale, found_inf=found_inf,
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=0.0, nesterov=False, maximize=False,
        )
        if group["momentum"] != 0:
            for i, buffer in zip(run, momentum_buffers):
                if buffers[i] is None:  # torch made it: the step's first for this tensor
                    plan.entries[i]["momentum_buffer"] = buffer
