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

A steady training loop hands the same parameters and state back every step, with new gradients.
:class:`FirstOrderChecks` keeps each group's last full check, and the next step reuses it when
every object it read comes back unchanged (tested in a few C-level passes over the group's lists,
not a Python loop per tensor); a group of one device and dtype then runs torch's fused or foreach
kernels directly on its lists, as torch's functional API would after grouping them. Hundreds of
small adapter tensors thus cost the same host time per step as under ``torch.optim``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, is_, is_not
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.optimizer import _default_to_fused_or_foreach, _get_fused_kernels_supported_devices, _get_scalar_dtype
from torch.optim.sgd import sgd

from .sharding import any_sharded, local_data

__all__ = ["FirstOrderChecks", "FirstOrderStep", "check_implementation", "implementation", "initial_fo_state"]

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


_GRAD = attrgetter("grad")
# What ``p.data = ...``, ``module.to(...)`` or ``torch.utils.swap_tensors`` can change behind the same Parameter.
_DESCRIPTION = attrgetter("__class__", "shape", "dtype", "device")
_GRAD_KIND = attrgetter("dtype", "layout")


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
    # Set by a full check of a group of plain tensors: what to remember once the commit is done.
    has_grad: Optional[List[bool]] = None
    stepped: List[Tensor] = field(default_factory=list)
    # A reused check of one device and dtype, every state entry present: torch's kernels without regrouping.
    one_class: bool = False


@dataclass
class _Checked:
    """A group's step as a full check and its commit left it: every object the check read, and what it saw.

    The next step reuses the check when the same objects come back: the same parameters, the same
    of them with a gradient, each of the same class, shape, dtype and device, gradients dense and of
    their parameter's dtype, the same state entries holding the same buffers. Tensors do not change
    shape, dtype or device in place, so nothing the full check looked at can differ. The test is a
    few C-level passes over the group's lists, which keeps the per-tensor host work of a steady
    step at what ``torch.optim`` spends gathering the same lists.
    """

    settings: Tuple[Any, ...]
    params: List[Tensor]
    has_grad: List[bool]
    stepped: List[Tensor]
    described: List[Tuple[Any, ...]]
    grad_kinds: List[Tuple[Any, ...]]
    entries: List[Dict[str, Any]]
    buffers: Dict[str, List[Tensor]]
    steps: List[Tensor]
    implementation: str
    has_complex: bool
    one_class: bool

    @staticmethod
    def after(plan: _GroupStep) -> Optional["_Checked"]:
        """What ``plan``'s commit left (``plan`` from a full check), or None where it cannot be reused cheaply."""
        entries = plan.entries
        if plan.has_grad is None or any(type(entry) is not dict for entry in entries):
            return None
        return _Checked(
            _settings(plan.group), list(plan.group["params"]), plan.has_grad, plan.stepped,
            list(map(_DESCRIPTION, plan.stepped)), [(p.dtype, torch.strided) for p in plan.stepped], entries,
            {name: [entry.get(name) for entry in entries] for name in plan.buffers},
            [entry.get("step") for entry in entries] if plan.steps else [],
            plan.implementation, plan.has_complex,
            len({(p.device, p.dtype) for p in plan.stepped}) == 1 and _has_one_class_step(plan),
        )

    def reuse(self, group: Group, state: Mapping[Tensor, Any], state_unchanged: bool) -> Optional[_GroupStep]:
        """``group``'s step on this check, or None where any object it read has changed.

        ``state_unchanged``: ``state`` maps the same keys to the same entries as when the check was
        made, so that the entries need not be looked up one by one.
        """
        params = group["params"]
        if (self.settings != _settings(group) or len(params) != len(self.params)
                or not all(map(is_, params, self.params))):
            return None
        grads = list(map(_GRAD, params))
        if list(map(is_not, grads, repeat(None))) != self.has_grad:
            return None
        if len(grads) != len(self.stepped):
            grads = list(compress(grads, self.has_grad))
        if (list(map(_GRAD_KIND, grads)) != self.grad_kinds
                or list(map(_DESCRIPTION, self.stepped)) != self.described):
            return None
        entries = self.entries
        if entries:
            if not state_unchanged and not all(map(is_, map(state.get, self.stepped), entries)):
                return None
            for name, kept in (*self.buffers.items(), ("step", self.steps)):
                if kept and not all(map(is_, map(dict.get, entries, repeat(name)), kept)):
                    return None
        return _GroupStep(group, self.implementation, list(self.stepped), grads,
                          {name: list(kept) for name, kept in self.buffers.items()}, list(self.steps),
                          entries=entries, has_complex=self.has_complex, one_class=self.one_class)


def _settings(group: Group) -> Tuple[Any, ...]:
    """The group keys that decide which state a step reads and which kernel runs."""
    return group["rule"], group["momentum"] != 0, group["foreach"], group["fused"]


class FirstOrderChecks:
    """What :class:`FirstOrderStep` remembers between steps: a cache the optimizer keeps, not state.

    Per group (by id), its last full check (:class:`_Checked`); and the optimizer state's keys and
    entries as the last commit left them, which tell in two passes that no entry was replaced,
    added or removed since. Groups that leave, and the snapshot once the state has changed, are
    dropped when the next step is planned, so that the cache keeps nothing alive for long that
    left the groups or the state.
    """

    def __init__(self) -> None:
        self.groups: Dict[int, _Checked] = {}
        self.state_keys: List[Any] = []
        self.state_entries: List[Any] = []

    def state_unchanged(self, state: Mapping[Tensor, Any]) -> bool:
        if (len(state) == len(self.state_keys) and all(map(is_, state.keys(), self.state_keys))
                and all(map(is_, state.values(), self.state_entries))):
            return True
        self.state_keys, self.state_entries = [], []
        return False

    def remember_state(self, state: Mapping[Tensor, Any]) -> None:
        self.state_keys, self.state_entries = list(state.keys()), list(state.values())


class FirstOrderStep:
    """The FO groups' update from the gradients in ``.grad``: planned when made, written by :meth:`commit`.

    Making one reads and checks everything the commit will touch and allocates the state
    entries it creates; nothing is written. Parameters whose ``.grad`` is None are skipped.

    Args:
        groups: ``(name, group)`` pairs of the FO groups, names as errors report them.
        state: the optimizer's ``state`` mapping.
        checks: what the last steps checked (:class:`FirstOrderChecks`), reused while the same
            objects come back; entries of groups not in ``groups`` are dropped.

    Raises:
        ValueError: a gradient or state buffer whose shape, dtype or device does not match its
            parameter's, a state entry holding some of AdamW's entries but not all, or a ``step``
            that is not a non-negative integer (named by group, parameter and key); ``foreach``/
            ``fused`` values torch cannot run.
        RuntimeError: a sparse gradient.
    """

    def __init__(self, groups: Sequence[Tuple[str, Group]], state: MutableMapping[Tensor, Dict[str, Any]],
                 checks: FirstOrderChecks) -> None:
        self._steps: List[_GroupStep] = []
        self._state, self._checks = state, checks
        known_groups = checks.groups
        current = {id(group) for _, group in groups}
        for key in [key for key in known_groups if key not in current]:
            del known_groups[key]
        state_unchanged = checks.state_unchanged(state) if known_groups else False
        for where, group in groups:
            if group["fused"] and group["foreach"]:
                check_implementation(group, [], where)
            known = known_groups.get(id(group))
            plan = known.reuse(group, state, state_unchanged) if known is not None else None
            if plan is None:
                known_groups.pop(id(group), None)
                plan = _plan(group, state, where)
            if plan.params:
                self._steps.append(plan)

    def commit(self) -> None:
        """Write the planned state entries, then run each group's kernel."""
        for plan in self._steps:
            for entry, key, value in plan.new_entries:
                entry[key] = value
        with torch.no_grad():
            for plan in self._steps:
                if plan.one_class:
                    _one_class_step(plan)
                elif plan.group["rule"] == "adamw":
                    _adamw(plan)
                else:
                    _sgd(plan)
        for plan in self._steps:
            if plan.has_grad is not None:  # from a full check
                checked = _Checked.after(plan)
                if checked is not None:
                    self._checks.groups[id(plan.group)] = checked
        if self._checks.groups:
            self._checks.remember_state(self._state)


def _plan(group: Group, state: MutableMapping[Tensor, Dict[str, Any]], where: str) -> _GroupStep:
    """One group's :class:`_GroupStep` from a full check: every check, and the state entries to create.

    Gradients are checked for what torch's ``.grad`` setter lets through (a sparse layout, a dtype
    unlike the parameter's where ``grad_dtype`` allows one); state, which anyone can write, for
    completeness, shape, dtype and device.
    """
    with_grad = [(i, p, p.grad) for i, p in enumerate(group["params"]) if p.grad is not None]
    sharded = any_sharded([p for _, p, _ in with_grad])
    params = [local_data(p) for _, p, _ in with_grad] if sharded else [p for _, p, _ in with_grad]
    plan = _GroupStep(group, implementation(group, params))
    if not sharded:  # FSDP2's groups hold few, large shards: no need to remember their checks
        plan.has_grad = [p.grad is not None for p in group["params"]]
        plan.stepped = params
    adam = group["rule"] == "adamw"
    names = ("exp_avg", "exp_avg_sq") if adam else ("momentum_buffer",) if group["momentum"] != 0 else ()
    buffer_lists = [plan.buffers.setdefault(name, []) for name in names]
    fused = plan.implementation == "fused"
    step_dtype = _get_scalar_dtype(is_fused=fused)
    for (position, p, grad), param in zip(with_grad, params):
        if grad.layout is not torch.strided:
            raise RuntimeError(
                f"Invalid gradient in {where}, parameter {position}: HybridZOOptimizer does not support "
                f"sparse gradients ({grad.layout}; e.g. use nn.Embedding(sparse=False))"
            )
        if sharded:
            grad = local_data(grad)
        if grad.dtype is not param.dtype:
            raise _unlike(f"Invalid gradient in {where}, parameter {position}", grad, param)
        plan.params.append(param)
        plan.grads.append(grad)
        plan.has_complex |= param.dtype.is_complex
        if fused:
            check_implementation(group, [param], f"{where} (parameter {position})")
        if not names:
            continue
        entry = state.get(p)
        if entry is None:
            entry = {}
            plan.new_entries.append((state, p, entry))
        plan.entries.append(entry)
        buffers = [entry.get(name) for name in names]
        step = entry.get("step") if adam else None
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
                if buffer.dtype is not param.dtype or buffer.shape != param.shape or buffer.device != param.device:
                    raise _unlike(f"Invalid state in {where}, parameter {position}: state {name!r}", buffer, param)
            into.append(buffer)
        if adam:
            if not (isinstance(step, Tensor) and step.dtype is step_dtype and step.dim() == 0
                    and (step.device == param.device if fused else step.is_cpu)):
                step = _step_like_torch(step, param, fused, f"{where}, parameter {position}")
                plan.new_entries.append((entry, "step", step))
            plan.steps.append(step)
    return plan


def _unlike(what: str, tensor: Tensor, param: Tensor) -> ValueError:
    return ValueError(
        f"{what} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, the parameter "
        f"{tuple(param.shape)} {param.dtype} on {param.device}"
    )


def _has_one_class_step(plan: _GroupStep) -> bool:
    """Whether :func:`_one_class_step` runs ``plan``'s implementation: fused, or foreach SGD."""
    return plan.implementation == "fused" or (plan.implementation == "foreach" and plan.group["rule"] == "sgd")


def _one_class_step(plan: _GroupStep) -> None:
    """What torch's functional ``adamw``/``sgd`` run for tensors of one device and dtype whose state exists.

    The same kernels with the same arguments, call for call (``torch.optim.adam._fused_adam``,
    ``torch.optim.sgd._fused_sgd`` and ``_multi_tensor_sgd``), without grouping the lists by device
    and dtype again: the reused check knows there is one group. On hundreds of small tensors that
    grouping and the loops around it are a fifth of torch's step.
    """
    group = plan.group
    lr, weight_decay = group["lr"], group["weight_decay"]
    if group["rule"] == "adamw":
        beta1, beta2 = group["betas"]
        torch._foreach_add_(plan.steps, 1)
        torch._fused_adamw_(
            plan.params, plan.grads, plan.buffers["exp_avg"], plan.buffers["exp_avg_sq"], [], plan.steps,
            amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=group["adam_eps"],
            maximize=False, grad_scale=None, found_inf=None,
        )
        return
    momentum = group["momentum"]
    buffers = plan.buffers.get("momentum_buffer", [])
    if plan.implementation == "fused":
        torch._fused_sgd_(
            plan.params, plan.grads, buffers, weight_decay=weight_decay, momentum=momentum, lr=lr,
            dampening=0.0, nesterov=False, maximize=False, is_first_step=False, grad_scale=None, found_inf=None,
        )
        return
    grads = plan.grads
    if weight_decay != 0:
        grads = torch._foreach_add(grads, plan.params, alpha=weight_decay)
    if momentum != 0:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads, alpha=1 - 0.0)  # 1 - dampening, as torch computes it
        grads = buffers
    torch._foreach_add_(plan.params, grads, alpha=-lr)


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
    momentum = group["momentum"]
    buffers: List[Optional[Tensor]] = plan.buffers["momentum_buffer"] if momentum != 0 else [None] * len(plan.params)
    runs = [range(len(plan.params))]
    first = momentum != 0 and any(map(is_, buffers, repeat(None)))
    if first and plan.implementation == "fused":
        # torch's fused SGD takes a first step for all of its tensors or for none: one call each.
        runs = [[i for i, b in enumerate(buffers) if b is None], [i for i, b in enumerate(buffers) if b is not None]]
    for run in runs:
        if not run:
            continue
        whole = len(run) == len(plan.params)
        momentum_buffers = buffers if whole else [buffers[i] for i in run]
        sgd(
            plan.params if whole else [plan.params[i] for i in run],
            plan.grads if whole else [plan.grads[i] for i in run], momentum_buffers,
            foreach=plan.implementation == "foreach", fused=plan.implementation == "fused",
            weight_decay=group["weight_decay"], momentum=momentum, lr=group["lr"],
            dampening=0.0, nesterov=False, maximize=False,
        )
        if first:
            for i, buffer in zip(run, momentum_buffers):
                if plan.entries[i].get("momentum_buffer") is None:  # torch made it: the tensor's first step
                    plan.entries[i]["momentum_buffer"] = buffer
