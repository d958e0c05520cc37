r"""Update rules (SGD, AdamW) as elementwise kernels that can try a move without committing state.

A rule moves a parameter from :math:`\theta` given a gradient or gradient estimate
:math:`g`. :class:`Update` is one tensor's move: it holds the rule, the group's
hyperparameters, the step number and flat views of the state buffers. Its kernels work
on any slice ``[lo, hi)`` of the flattened tensor (a chunk of a ZO direction, or the
whole tensor for FO groups), and write into ``out``, which may alias ``theta``:

* ``commit=False`` (a candidate move) reads the state and writes nothing into it: new
  moments are built in temporaries, so the move can be evaluated and thrown away;
* ``commit=True`` runs the same operations in place on the state buffers, so a committed
  move is bit for bit the candidate that was evaluated (elementwise in-place and
  out-of-place operations round identically).

The operations follow ``torch.optim.SGD`` (dampening 0, no Nesterov) and
``torch.optim.AdamW`` (no AMSGrad) single-tensor implementations step for step, so FO
groups match them numerically; complex parameters are updated through their real view,
as torch does.

Both rules are affine in the parameter, ``rule(theta) = (1 - lr * weight_decay) * theta +
rule(0)``, since the moments and the momentum buffer's old part do not depend on
``theta``; :meth:`Update.undo_` uses this to take a move back without a copy of ``theta``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Mapping, MutableMapping, Optional, Tuple

import torch
from torch import Tensor

from .sharding import flat_view, local_data

__all__ = ["Rule", "SGD", "AdamW", "RULES", "Update", "begin_update", "initial_state", "finish", "theta_slope",
           "state_keys", "check_state"]


def theta_slope(group: Mapping[str, Any]) -> float:
    """The factor both rules multiply the parameter by: ``1 - lr * weight_decay``."""
    return 1 - group["lr"] * group["weight_decay"]


@dataclass
class Update:
    """One tensor's move under its group's rule.

    Attributes:
        rule: the :class:`Rule`.
        group: the param group (hyperparameters).
        buffers: flat local views of the state buffers, by name; None where a buffer does not
            exist yet and the move is not committed.
        fresh: the buffers were created for this (committed) move: its first step.
        step: the step number this move takes (AdamW's bias correction).
        commit: whether the kernels write the state buffers.
        private: the buffers are the move's own copies (a ZO chunk's gathered state): an
            uncommitted move may update them in place instead of copying them first.
    """

    rule: "Rule"
    group: Mapping[str, Any]
    buffers: Dict[str, Optional[Tensor]]
    fresh: bool
    step: int
    commit: bool
    private: bool = False

    def views(self, lo: int, hi: int) -> Dict[str, Optional[Tensor]]:
        return {k: None if v is None else v[lo:hi] for k, v in self.buffers.items()}

    def apply_(self, out: Tensor, theta: Tensor, grad: Tensor, lo: int = 0, hi: Optional[int] = None) -> None:
        """Write the moved value of entries ``[lo, hi)`` into ``out`` (which may alias ``theta``)."""
        hi = theta.numel() + lo if hi is None else hi
        self.rule.kernel(self, out, theta, grad, self.views(lo, hi))

    def undo_(self, moved: Tensor, grad: Tensor, lo: int = 0, hi: Optional[int] = None) -> None:
        """Invert an uncommitted :meth:`apply_` in place, up to rounding.

        ``moved`` holds the moved value; afterwards it holds ``(moved - rule(0)) / slope`` with
        ``slope = 1 - lr * weight_decay``. Costs one temporary the size of the slice.
        """
        hi = moved.numel() + lo if hi is None else hi
        origin = torch.zeros_like(moved)
        trial = Update(self.rule, self.group, self.buffers, False, self.step, commit=False)
        self.rule.kernel(trial, origin, origin, grad, trial.views(lo, hi))
        moved.sub_(origin)
        slope = theta_slope(self.group)
        if slope != 1:
            moved.div_(slope)


class Rule:
    """An update rule: its state buffers and its elementwise kernel."""

    name = ""

    def buffer_names(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        """State buffers the rule keeps for each parameter (none for plain SGD)."""
        raise NotImplementedError

    def kernel(self, update: Update, out: Tensor, theta: Tensor, grad: Tensor,
               buffers: Dict[str, Optional[Tensor]]) -> None:
        raise NotImplementedError


class SGD(Rule):
    r"""SGD with heavy-ball momentum and L2 weight decay (``torch.optim.SGD``, dampening 0).

    .. math::
        d = g + \lambda \theta,\quad b \leftarrow \mu b + d \;(b_1 = d),\quad
        \theta \leftarrow \theta - \eta\, b
    """

    name = "sgd"

    def buffer_names(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def kernel(self, update: Update, out: Tensor, theta: Tensor, grad: Tensor,
               buffers: Dict[str, Optional[Tensor]]) -> None:
        group = update.group
        if group["weight_decay"] != 0:
            grad = grad.add(theta, alpha=group["weight_decay"])
        if group["momentum"] != 0:
            buf = buffers["momentum_buffer"]
            if buf is None:
                pass  # an uncommitted first step: the buffer would be a copy of grad
            elif update.fresh:
                grad = buf.copy_(grad)
            elif update.commit or update.private:
                grad = buf.mul_(group["momentum"]).add_(grad)
            else:
                grad = buf.mul(group["momentum"]).add_(grad)
        torch.add(theta, grad, alpha=-group["lr"], out=out)


class AdamW(Rule):
    r"""AdamW (Loshchilov & Hutter) with decoupled weight decay (``torch.optim.AdamW``).

    .. math::
        \theta \leftarrow \theta(1 - \eta\lambda),\quad
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,\\
        \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,
        \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
    """

    name = "adamw"

    def buffer_names(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def kernel(self, update: Update, out: Tensor, theta: Tensor, grad: Tensor,
               buffers: Dict[str, Optional[Tensor]]) -> None:
        group = update.group
        lr, (beta1, beta2) = group["lr"], group["betas"]
        exp_avg, exp_avg_sq = buffers["exp_avg"], buffers["exp_avg_sq"]
        if exp_avg is None or exp_avg_sq is None:
            exp_avg, exp_avg_sq = torch.zeros_like(grad), torch.zeros_like(grad)
        elif not (update.commit or update.private):
            exp_avg, exp_avg_sq = exp_avg.clone(), exp_avg_sq.clone()
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**update.step
        bias_correction2 = 1 - beta2**update.step
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(group["adam_eps"])
        # out is written last, by operations that allocate nothing: a failure leaves it untouched.
        if group["weight_decay"] != 0:
            torch.mul(theta, 1 - lr * group["weight_decay"], out=out)
        elif out is not theta:
            out.copy_(theta)
        out.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


RULES: Dict[str, Rule] = {r.name: r for r in (SGD(), AdamW())}
"""The values of the ``rule`` group key."""


def begin_update(
    state: MutableMapping[str, Any], param: Tensor, group: Mapping[str, Any], commit: bool
) -> Update:
    """One tensor's :class:`Update`; a committed one creates missing buffers (zeros) in ``state``.

    Call :meth:`finish` after the kernels of a committed update ran on every entry.
    """
    rule = RULES[group["rule"]]
    names = rule.buffer_names(group)
    fresh = commit and any(state.get(name) is None for name in names)
    if fresh:
        for name in names:
            state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
    buffers = {
        name: None if state.get(name) is None else flat_view(local_data(state[name])) for name in names
    }
    return Update(rule, group, buffers, fresh, int(state.get("step", 0)) + 1, commit)


def initial_state(state: MutableMapping[str, Any], param: Tensor, group: Mapping[str, Any]) -> None:
    """Create every state entry a first step reads, as zeros: the rule's buffers and AdamW's ``step`` (0).

    What ``torch.distributed.checkpoint`` needs before it loads a state dict, since it fills in only
    the entries that already exist.
    """
    begin_update(state, param, group, commit=True)
    if group["rule"] == "adamw":
        state.setdefault("step", 0)


def finish(state: MutableMapping[str, Any], update: Update) -> None:
    """Record a committed update's step number (AdamW's bias correction needs it)."""
    if update.commit and update.rule.name == "adamw":
        state["step"] = update.step


def state_keys(group: Mapping[str, Any]) -> Tuple[str, ...]:
    """The state keys a parameter's entry holds under its group's rule once it has taken a step."""
    names = RULES[group["rule"]].buffer_names(group)
    return (*names, "step") if group["rule"] == "adamw" else names


def check_state(state: Mapping[str, Any], param: Tensor, group: Mapping[str, Any]) -> Optional[str]:
    """Why ``state`` cannot serve ``param`` under its group's rule, or None if it can.

    Checks that an entry holding anything holds every key the rule reads (an empty entry is a
    fresh start, as in ``torch.optim``; ``torch.optim.AdamW`` refuses an incomplete one too), the
    buffers the rule reads (shape, and floating point like the parameter) and AdamW's ``step`` (a
    non-negative integer, or a one-element tensor holding one, as ``torch.optim.AdamW`` saves it).
    """
    required = state_keys(group)
    held = [key for key, value in state.items() if value is not None]
    missing = [key for key in required if state.get(key) is None]
    if held and missing:
        return (f"state {missing[0]!r} is missing (the entry holds {sorted(map(str, held))}; a "
                f"{group['rule']} entry needs {list(required)}, or no entry at all for a fresh start)")
    for name in RULES[group["rule"]].buffer_names(group):
        buffer = state.get(name)
        if buffer is None:
            continue
        if not isinstance(buffer, Tensor):
            return f"state {name!r} is a {type(buffer).__name__}, not a tensor"
        if tuple(buffer.shape) != tuple(param.shape):
            return f"state {name!r} has shape {tuple(buffer.shape)}, the parameter {tuple(param.shape)}"
        if buffer.is_complex() != param.is_complex() or not (buffer.is_floating_point() or buffer.is_complex()):
            return f"state {name!r} has dtype {buffer.dtype}, the parameter {param.dtype}"
    if group["rule"] == "adamw" and "step" in state:
        step = state["step"]
        if isinstance(step, Tensor):
            step = step.item() if step.numel() == 1 else None
        if not isinstance(step, numbers.Real) or isinstance(step, bool) or not (math.isfinite(step) and 0 <= step == int(step)):
            return f"state 'step' is {state['step']!r}, not a non-negative integer"
    return None
