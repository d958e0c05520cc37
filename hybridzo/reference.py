r"""The ZO step one tensor at a time: a readable reference for :mod:`hybridzo.zo_step`.

:class:`~hybridzo.HybridZOOptimizer` runs the ZO part of a step over direction chunks
shared by many tensors (:mod:`hybridzo.plan`); :func:`reference_step` computes the same
step plainly, tensor by tensor, from a copy of :math:`\theta`, and the tests hold the
optimizer to it. With ZO param groups :math:`g` (step-wide settings: :math:`K`
candidates, :math:`q` queries, the estimator, ``conservative``):

1. **Probe.** For each candidate :math:`k` and query :math:`i` draw :math:`z_{ki}`
   (:func:`direction`; :math:`E[zz^T] = I`), evaluate
   :math:`f(\theta + \epsilon_g z_{ki})` and, for the central estimator,
   :math:`f(\theta - \epsilon_g z_{ki})` (every group perturbed together); the projected
   difference is :math:`d_{ki} = (f^+ - f^-)/2` (central) or :math:`f^+ - f(\theta)`
   (forward).
2. **Estimate.** :math:`\hat g_{k,g} = \frac1q \sum_i c_{ki,g}\, z_{ki,g}` with
   :math:`c = d/\epsilon_g` (``sign=None`` and ``"coordinate"``, which then takes the
   element-wise sign of :math:`\hat g`) or :math:`c = \operatorname{sign}(d)` (``"scalar"``).
3. **Select** (:math:`K > 1` or conservative). Candidate move :math:`\theta - \Delta_k` is
   the group's rule (:mod:`hybridzo.rules`, SGD with momentum and weight decay, or AdamW)
   applied to :math:`\hat g_k` without writing its state; conservative adds the mirror (the
   rule applied to :math:`-\hat g_k`, :math:`\theta + \Delta_k` for plain SGD) and
   :math:`\theta`. The lowest loss wins; ties go to the earlier of
   :math:`\theta+\Delta_0, \theta-\Delta_0, \theta+\Delta_1, \dots, \theta` (ZO-Bench's
   ZO-SGD-Cons order for :math:`K = 1`).
4. **Commit** the winner: its parameters and its rule state (:math:`\theta`: nothing).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, MutableMapping, Optional, Tuple

import torch
from torch import Tensor

from .directions import DISTRIBUTIONS, chunk_elements, chunk_seed
from .rules import begin_update, finish

__all__ = ["direction", "reference_step"]

Group = Dict[str, Any]


def direction(group: Group, group_index: int, candidate: int, query: int, tensor_index: int) -> Tensor:
    """``z_{candidate, query}`` of tensor ``tensor_index`` of ZO group ``group_index`` (plain tensors).

    The tensor's entries are a range of its class's virtual vector (the group's tensors of
    its dtype and device, concatenated in logical row-major order); draw the chunks that
    cover the range (see :mod:`hybridzo.directions`) and keep the range.
    """
    params = group["params"]
    p = params[tensor_index]
    classes = list(dict.fromkeys((q.dtype, q.device) for q in params))
    same_class = [j for j, q in enumerate(params) if (q.dtype, q.device) == (p.dtype, p.device)]
    offset = sum(params[j].numel() for j in same_class if j < tensor_index)
    total = sum(params[j].numel() for j in same_class)
    size, distribution = chunk_elements(p.device), DISTRIBUTIONS[group["distribution"]]
    parts = [torch.empty(0, dtype=p.dtype, device=p.device)]
    for chunk in range(offset // size, -(-(offset + p.numel()) // size)):
        length = min(size, total - chunk * size)
        seed = chunk_seed(group["seed"], group_index, group["steps"], candidate, query,
                          classes.index((p.dtype, p.device)), chunk)
        drawn = torch.empty(distribution.padded_length(length), dtype=p.dtype, device=p.device)
        distribution.fill_(drawn, length, torch.Generator(device=p.device).manual_seed(seed))
        parts.append(drawn[max(offset - chunk * size, 0):min(offset + p.numel() - chunk * size, length)])
    return torch.cat(parts).view(p.shape)


@torch.no_grad()
def reference_step(zo_groups: List[Tuple[int, Group]], closure: Callable[[], Any],
                   state: MutableMapping[Tensor, Dict[str, Any]]) -> Tuple[float, Optional[str]]:
    """One ZO step of ``zo_groups`` (``(index, group)``, plain tensors) as the optimizer takes it.

    Writes the parameters, the chosen move's ``state`` and each group's ``steps``; returns the
    loss at theta (for central probes without selection: the mean probe loss) and the choice
    (as ``last_step_info["chosen"]`` names it).
    """
    settings = zo_groups[0][1]
    K, q = settings["candidates"], settings["queries"]
    central, conservative = settings["estimator"] == "central", settings["conservative"]
    tensors = [(gi, g, j, p) for gi, g in zo_groups for j, p in enumerate(g["params"])]
    theta = [p.detach().clone() for _, _, _, p in tensors]
    z = {(k, i): [direction(g, gi, k, i, j) for gi, g, j, _ in tensors] for k in range(K) for i in range(q)}

    def loss_at(values: List[Tensor]) -> float:
        for (_, _, _, p), value in zip(tensors, values):
            p.copy_(value)
        return float(closure())

    def probe(k: int, i: int, side: int) -> float:
        return loss_at([t + side * g["eps"] * zt for t, (_, g, _, _), zt in zip(theta, tensors, z[k, i])])

    loss0 = loss_at(theta) if not central or conservative else None
    d, probe_losses = [], []
    for k in range(K):
        row = []
        for i in range(q):
            plus = probe(k, i, +1)
            if central:
                minus = probe(k, i, -1)
                probe_losses += [plus, minus]
                row.append((plus - minus) / 2)
            else:
                row.append(plus - loss0)
        d.append(row)

    def estimate(k: int, n: int, mirrored: bool) -> Tensor:
        g = tensors[n][1]
        c = [((dki > 0) - (dki < 0) if g["sign"] == "scalar" else dki / g["eps"]) / q for dki in d[k]]
        ghat = z[k, 0][n] * c[0]
        for i in range(1, q):
            ghat = ghat + c[i] * z[k, i][n]
        ghat = ghat.sign() if g["sign"] == "coordinate" else ghat
        return -ghat if mirrored else ghat

    def move(k: int, mirrored: bool, commit: bool) -> List[Tensor]:
        values = []
        for n, (_, g, _, p) in enumerate(tensors):
            entry = state[p] if commit or p in state else {}
            update = begin_update(entry, p, g, commit)
            value = torch.empty_like(theta[n])
            update.apply_(value.view(-1), theta[n].reshape(-1), estimate(k, n, mirrored).reshape(-1))
            finish(entry, update)
            values.append(value)
        return values

    chosen: Optional[Tuple[int, bool]] = (0, False)
    if K > 1 or conservative:
        options = [(k, m) for k in range(K) for m in ((True, False) if conservative else (False,))]
        losses = {option: loss_at(move(*option, commit=False)) for option in options}
        if conservative:
            options.append(None)
            losses[None] = loss0
        chosen = options[0]
        for option in options[1:]:
            if losses[option] < losses[chosen]:
                chosen = option
    loss_at_theta = loss0 if loss0 is not None else sum(probe_losses) / len(probe_losses)
    for (_, _, _, p), value in zip(tensors, theta if chosen is None else move(*chosen, commit=True)):
        p.copy_(value)
    for _, g in zo_groups:
        g["steps"] += 1
    name = None
    if K > 1 or conservative:
        name = "theta" if chosen is None else f"theta{'+' if chosen[1] else '-'}delta[{chosen[0]}]"
    return loss_at_theta, name
