"""Functional update rules that can be tried without committing optimizer state.

Each rule writes the updated value into ``param`` (which holds the pre-step value
when called) from a gradient or gradient estimate. With ``commit=False`` the
per-parameter ``state`` is read but never written: new moment buffers are built
in temporaries, so a candidate update can be evaluated and thrown away. With
``commit=True`` the same operations run in place on the state buffers; elementwise
in-place and out-of-place operations round identically, so a committed update is
bit-for-bit the candidate that was evaluated.

The operations follow ``torch.optim.SGD`` (dampening 0, no Nesterov) and
``torch.optim.AdamW`` (no AMSGrad) single-tensor implementations step for step,
so FO groups match them numerically.

Both rules are affine in the parameter, ``rule(theta) = (1 - lr * weight_decay) * theta
+ rule(0)``, since the moments and the momentum buffer's old part do not depend on
``theta``; :func:`undo_rule_` uses this to take a trial move back without a copy of
``theta``.
"""

from __future__ import annotations

from typing import Any, Mapping, MutableMapping, Tuple

import torch
from torch import Tensor

__all__ = ["sgd_", "adamw_", "apply_rule", "undo_rule_", "theta_slope", "keeps_state"]


def sgd_(
    param: Tensor,
    grad: Tensor,
    state: MutableMapping[str, Any],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    commit: bool = True,
) -> None:
    r"""SGD with heavy-ball momentum and L2 weight decay.

    .. math::
        d = g + \lambda \theta,\quad b \leftarrow \mu b + d \;(b_1 = d),\quad
        \theta \leftarrow \theta - \eta\, b

    Args:
        param: parameter to update in place.
        grad: gradient or gradient estimate (not modified).
        state: per-parameter state; holds ``momentum_buffer`` when ``momentum != 0``.
        lr: learning rate :math:`\eta`.
        momentum: momentum factor :math:`\mu` (default 0: no buffer is kept).
        weight_decay: L2 penalty :math:`\lambda` added to the gradient (default 0).
        commit: write the new momentum buffer into ``state`` (default True).
    """
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = grad.detach().clone()
            if commit:
                state["momentum_buffer"] = buf
        elif commit:
            buf.mul_(momentum).add_(grad)
        else:
            buf = buf.mul(momentum).add_(grad)
        grad = buf
    param.add_(grad, alpha=-lr)


def adamw_(
    param: Tensor,
    grad: Tensor,
    state: MutableMapping[str, Any],
    *,
    lr: float,
    betas: Tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    weight_decay: float = 0.0,
    commit: bool = True,
) -> None:
    r"""AdamW (Loshchilov & Hutter) with decoupled weight decay.

    .. math::
        \theta \leftarrow \theta(1 - \eta\lambda),\quad
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,\\
        \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,
        \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    Args:
        param: parameter to update in place.
        grad: gradient or gradient estimate (not modified).
        state: per-parameter state with ``step`` (int), ``exp_avg`` and ``exp_avg_sq``.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)).
        adam_eps: :math:`\epsilon` added to the denominator (default 1e-8).
        weight_decay: decoupled decay :math:`\lambda` (default 0).
        commit: write step and moments into ``state`` (default True).
    """
    beta1, beta2 = betas
    step = state.get("step", 0) + 1
    exp_avg = state.get("exp_avg")
    exp_avg_sq = state.get("exp_avg_sq")
    if exp_avg is None or exp_avg_sq is None:
        exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        if commit:
            state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
    elif not commit:
        exp_avg, exp_avg_sq = exp_avg.clone(), exp_avg_sq.clone()

    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(adam_eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    if commit:
        state["step"] = step


def keeps_state(group: Mapping[str, Any]) -> bool:
    """Whether the group's rule stores per-parameter buffers (plain SGD does not)."""
    return group["rule"] == "adamw" or group["momentum"] != 0


def apply_rule(
    param: Tensor,
    grad: Tensor,
    state: MutableMapping[str, Any],
    group: Mapping[str, Any],
    commit: bool,
) -> None:
    """Apply the rule named by ``group["rule"]`` with that group's hyperparameters."""
    if group["rule"] == "sgd":
        sgd_(param, grad, state, lr=group["lr"], momentum=group["momentum"],
             weight_decay=group["weight_decay"], commit=commit)
    else:
        adamw_(param, grad, state, lr=group["lr"], betas=group["betas"],
               adam_eps=group["adam_eps"], weight_decay=group["weight_decay"], commit=commit)


def theta_slope(group: Mapping[str, Any]) -> float:
    """The factor both rules multiply the parameter by: ``1 - lr * weight_decay``."""
    return 1 - group["lr"] * group["weight_decay"]


def undo_rule_(
    param: Tensor, grad: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]
) -> None:
    """Invert ``apply_rule(param, grad, state, group, commit=False)`` in place, up to rounding.

    ``param`` holds the moved value; afterwards it holds the value before the move,
    ``(moved - rule(0)) / (1 - lr * weight_decay)``. Costs one temporary the size of
    ``param`` (plus the rule's own temporaries), never a copy of all parameters.

    Raises:
        ValueError: ``lr * weight_decay == 1``, where the move forgets ``param``.
    """
    slope = theta_slope(group)
    if slope == 0:
        raise ValueError(
            f"Invalid weight_decay: {group['weight_decay']!r} (lr * weight_decay = 1 maps every "
            "parameter to the same value, so restore='inplace' cannot undo a trial move)"
        )
    moved_origin = torch.zeros_like(param, memory_format=torch.preserve_format)
    apply_rule(moved_origin, grad, dict(state), group, commit=False)
    param.sub_(moved_origin)
    if slope != 1:
        param.div_(slope)
