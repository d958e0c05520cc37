r"""The zeroth-order part of one optimizer step: probe, select, commit.

:class:`ZOStep` owns what the step's ZO part needs: the closure runner, the ZO tensors
with their restore strategies, the direction stream and its scratch memory, the
projected differences and the forward count. Its :meth:`~ZOStep.search` and
:meth:`~ZOStep.commit` read like the algorithm:

1. **probe**: for each candidate :math:`k` and query :math:`i`, move every ZO tensor to
   :math:`\theta \pm \epsilon z_{ki}` and evaluate the loss; the projected difference is
   :math:`d_{ki} = (f(\theta+\epsilon z) - f(\theta-\epsilon z))/2` (central) or
   :math:`f(\theta+\epsilon z) - f(\theta)` (forward);
2. **select** (``candidates > 1`` or ``conservative``): evaluate each candidate move and,
   if conservative, its mirror; keep the lowest loss;
3. **commit** the chosen move, writing only its optimizer state (or stay at theta).

Group :math:`g`'s estimate for candidate :math:`k` is
:math:`\hat g_{k,g} = \frac{1}{q}\sum_i \frac{d_{ki}}{\epsilon_g} z_{ki,g}` (``sign="scalar"``:
:math:`\operatorname{sign}(d_{ki})` instead of :math:`d_{ki}/\epsilon_g`; ``sign="coordinate"``:
the element-wise sign of :math:`\hat g`), built one direction chunk at a time.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, MutableMapping, Optional, Tuple

import torch
from torch import Tensor

from .closure import ClosureRunner
from .directions import DISTRIBUTIONS, DirectionGenerator, Distribution, chunk_elements, mix_seed
from .journal import Journal
from .restore import RESTORES, THETA, Move, Position, Probe, Theta, ZOTensor
from .rules import RULES, Update, begin_update, finish
from .sharding import Span, local_slice

__all__ = ["ZOStep"]


class ZOStep:
    """One step's ZO part over the ZO param groups.

    Args:
        zo_groups: ``(index, group)`` of every ZO param group (their step-wide keys agree).
        runner: calls the closure.
        state: the optimizer's per-parameter state.
        journal: keeps what a commit overwrites.
        generator: draws direction chunks.
    """

    def __init__(self, zo_groups: List[Tuple[int, Dict[str, Any]]], runner: ClosureRunner,
                 state: MutableMapping[Tensor, Dict[str, Any]], journal: Journal,
                 generator: DirectionGenerator) -> None:
        self.settings = zo_groups[0][1]
        self.runner, self.state, self.journal, self.generator = runner, state, journal, generator
        self.tensors: List[ZOTensor] = []
        for group_index, group in zo_groups:
            for tensor_index, param in enumerate(group["params"]):
                piece = local_slice(param)
                spans = piece.spans(chunk_elements(piece.flat.device))
                self.tensors.append(ZOTensor(piece, group, group_index, tensor_index, spans,
                                             RESTORES[group["restore"]]))
        self.differences: List[List[float]] = []
        self.generated = 0
        self._coefficients: Dict[Tuple[int, int], List[float]] = {}
        self._scratch: Dict[Tuple[str, torch.dtype, torch.device], Tensor] = {}
        # One scratch buffer per use, dtype and device, as long as the longest chunk it serves.
        self._capacity: Dict[Tuple[torch.dtype, torch.device], int] = {}
        for t in self.tensors:
            key = (t.slice.flat.dtype, t.slice.flat.device)
            padded = DISTRIBUTIONS[t.group["distribution"]].padded_length
            longest = max((padded(span.length) for span in t.spans), default=0)
            self._capacity[key] = max(self._capacity.get(key, 0), longest)
            t.restore.begin(t)

    # ------------------------------------------------------------ the algorithm

    def search(self, loss_at_theta: Optional[float]) -> Tuple[float, Position]:
        """Probe and select; returns the loss at theta and the position to commit.

        Writes only the ZO parameters (probes, trial moves), never optimizer state; they end
        the search at some position that :meth:`commit` moves from.
        """
        needs_loss = self.settings["estimator"] == "forward" or self.settings["conservative"]
        if loss_at_theta is None and needs_loss:
            loss_at_theta = self.runner.probe("the loss at theta")
        probe_mean = self.probe(loss_at_theta)
        loss_at_theta = probe_mean if loss_at_theta is None else loss_at_theta
        if self.selects:
            return loss_at_theta, self.select(loss_at_theta)
        return loss_at_theta, Move(0)

    @property
    def selects(self) -> bool:
        """Whether candidates compete by loss (``candidates > 1`` or ``conservative``)."""
        return self.settings["candidates"] > 1 or self.settings["conservative"]

    def chosen_name(self, choice: Position) -> Optional[str]:
        """How ``last_step_info["chosen"]`` names a choice: None without selection."""
        if not self.selects:
            return None
        return str(choice) if isinstance(choice, Move) else "theta"

    def probe(self, loss_at_theta: Optional[float]) -> Optional[float]:
        """Fill ``differences[k][i]``; returns the mean probe loss of central probes, else None."""
        central = self.settings["estimator"] == "central"
        losses: List[float] = []
        for k in range(self.settings["candidates"]):
            row = []
            for i in range(self.settings["queries"]):
                plus = self._loss_at(Probe(k, i, +1), f"probe +eps (candidate {k}, query {i})")
                if central:
                    minus = self._loss_at(Probe(k, i, -1), f"probe -eps (candidate {k}, query {i})")
                    row.append((plus - minus) / 2)
                    losses += [plus, minus]
                else:
                    row.append(plus - loss_at_theta)  # type: ignore[operator]
            self.differences.append(row)
        return sum(losses) / len(losses) if losses else None

    def select(self, loss_at_theta: float) -> Position:
        """Evaluate the candidate moves; the lowest loss wins, ties by preference order.

        The preference order is, for each candidate ``k``: its mirror theta+delta[k], then
        theta-delta[k], and theta last; for one conservative candidate that is ZO-Bench's
        ZO-SGD-Cons rule.
        """
        conservative = self.settings["conservative"]
        candidates = range(self.settings["candidates"])
        losses: Dict[Position, float] = {}
        for k in candidates:
            for move in (Move(k), Move(k, mirrored=True)) if conservative else (Move(k),):
                losses[move] = self._loss_at(move, f"candidate {move}")
        preference: List[Position] = []
        for k in candidates:
            preference += [Move(k, mirrored=True), Move(k)] if conservative else [Move(k)]
        if conservative:
            losses[THETA] = loss_at_theta
            preference.append(THETA)
        best = preference[0]
        for option in preference[1:]:
            if losses[option] < losses[best]:
                best = option
        return best

    def commit(self, choice: Position) -> None:
        """Move to the chosen candidate and write its optimizer state (theta: write nothing)."""
        target = choice if isinstance(choice, Theta) else Move(choice.candidate, choice.mirrored, commit=True)
        self._move_all(target)

    def back_to_theta(self) -> None:
        """After a failure: every ZO tensor back to theta (optimizer state already restored)."""
        for t in self.tensors:
            t.restore.back_to_theta(self, t)
        self._scratch.clear()

    def end(self) -> None:
        for t in self.tensors:
            t.restore.end(t)

    @property
    def direction_sweeps(self) -> float:
        """Direction entries drawn so far, in passes over the local ZO entries."""
        total = sum(t.slice.flat.numel() for t in self.tensors)
        return self.generated / total if total else 0.0

    # ------------------------------------------------------- for the restore strategies

    def keeps_state(self, t: ZOTensor) -> bool:
        return bool(RULES[t.group["rule"]].buffer_names(t.group))

    def update(self, t: ZOTensor, move: Move, commit: Optional[bool] = None) -> Update:
        """The rule update of ``move`` for ``t``; a committed one journals the state first."""
        commit = move.commit if commit is None else commit
        param = t.slice.param
        if commit and self.keeps_state(t):
            self.journal.keep_state(param)
            state: MutableMapping[str, Any] = self.state[param]
        else:
            state = self.state[param] if param in self.state else {}
        return begin_update(state, param, t.group, commit)

    def finish_update(self, t: ZOTensor, update: Optional[Update]) -> None:
        if update is not None and update.commit and t.slice.param in self.state:
            finish(self.state[t.slice.param], update)

    @staticmethod
    def distribution(t: ZOTensor) -> Distribution:
        return DISTRIBUTIONS[t.group["distribution"]]

    def z(self, t: ZOTensor, candidate: int, query: int, span: Span) -> Tensor:
        """The entries of direction ``z_{candidate, query}`` of ``t`` that ``span`` covers (scratch)."""
        group = t.group
        distribution = self.distribution(t)
        seed = mix_seed(group["seed"], t.group_index, group["steps"], candidate, query, t.tensor_index)
        out = self.scratch("z", t, distribution.padded_length(span.length))
        self.generated += span.length
        return self.generator.fill_(out, seed, span.chunk, span.length, distribution)[span.lo:span.hi]

    def estimate(self, t: ZOTensor, candidate: int, span: Span, mirrored: bool,
                 on_direction: Optional[Callable[[int, Tensor], None]] = None,
                 known: Optional[Tuple[int, Tensor]] = None) -> Tensor:
        """The entries of the estimate of ``candidate`` (negated if ``mirrored``) that ``span`` covers.

        ``on_direction(query, z)`` sees each direction chunk before it is used. ``known =
        (query, z)`` gives that query's direction (scratch the estimate may overwrite) instead
        of drawing it.
        """
        coefficients = self._coefficients_of(t, candidate)
        estimate: Optional[Tensor] = None
        for query, coefficient in enumerate(coefficients):
            if known is not None and known[0] == query:
                z = known[1]
            else:
                z = self.z(t, candidate, query, span)
            if on_direction is not None:
                on_direction(query, z)
            if len(coefficients) == 1:
                estimate = z.mul_(coefficient)
            elif estimate is None:
                estimate = torch.mul(z, coefficient, out=self.scratch("estimate", t, span.hi - span.lo))
            else:
                estimate.add_(z, alpha=coefficient)
        assert estimate is not None  # queries >= 1 is validated
        if t.group["sign"] == "coordinate":
            estimate.sign_()
        return estimate.neg_() if mirrored else estimate

    # --------------------------------------------------------------------- internals

    def _loss_at(self, position: Position, phase: str) -> float:
        self._move_all(position)
        return self.runner.probe(phase)

    def _move_all(self, target: Position) -> None:
        for t in self.tensors:
            t.restore.move(self, t, target)
        self._scratch.clear()  # scratch lives for one pass, never through a forward

    def _coefficients_of(self, t: ZOTensor, candidate: int) -> List[float]:
        key = (t.group_index, candidate)
        if key not in self._coefficients:
            row, group = self.differences[candidate], t.group
            self._coefficients[key] = [
                (float((d > 0) - (d < 0)) if group["sign"] == "scalar" else d / group["eps"]) / len(row)
                for d in row
            ]
        return self._coefficients[key]

    def scratch(self, name: str, t: ZOTensor, length: int) -> Tensor:
        """``length`` entries of scratch memory named ``name`` for ``t``'s dtype and device, reused
        until the current pass over the tensors ends."""
        flat = t.slice.flat
        key = (name, flat.dtype, flat.device)
        buffer = self._scratch.get(key)
        if buffer is None:
            buffer = torch.empty(self._capacity[key[1:]], dtype=flat.dtype, device=flat.device)
            self._scratch[key] = buffer
        return buffer[:length]
