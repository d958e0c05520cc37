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

The work is done per chunk of the step's :class:`~hybridzo.plan.StepPlan` (many small
tensors share a chunk): one generator call per direction chunk, a few operations on
flat buffers, and one ``torch._foreach_*`` operation wherever the parameters or their
state are read or written. :mod:`hybridzo.reference` computes the same step one tensor
at a time.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, MutableMapping, Optional, Set, Tuple

import torch
from torch import Tensor

from .closure import ClosureRunner
from .directions import DISTRIBUTIONS, DirectionGenerator, Distribution, chunk_seed
from .interrupts import deferred_interrupts
from .plan import Chunk, StepPlan, flat_parts
from .restore import RESTORES, THETA, Move, Position, Probe, Restore, Theta
from .rules import RULES, Update
from .sharding import local_data, logical_views

__all__ = ["ZOStep", "ChunkUpdate"]


class ZOStep:
    """One step's ZO part over the ZO param groups.

    Args:
        zo_groups: ``(index, group)`` of every ZO param group (their step-wide keys agree).
        runner: calls the closure.
        state: the optimizer's per-parameter state.
        generator: draws direction chunks.
        plan: the chunks of ``zo_groups`` (see :class:`~hybridzo.plan.StepPlan`).
    """

    def __init__(self, zo_groups: List[Tuple[int, Dict[str, Any]]], runner: ClosureRunner,
                 state: MutableMapping[Tensor, Dict[str, Any]], generator: DirectionGenerator,
                 plan: StepPlan) -> None:
        self.settings = zo_groups[0][1]
        self.zo_groups = zo_groups
        self.runner, self.state, self.generator, self.plan = runner, state, generator, plan
        self.positions: List[Position] = [THETA] * len(plan.chunks)
        self.anchors: Dict[int, Tensor] = {}  # restore="exact": chunk number -> flat copy of theta
        self.differences: List[List[float]] = []
        self.generated = 0
        self.fresh: Set[int] = set()  # ids of parameters whose rule buffers this commit creates
        # What a commit overwrites, until the step ends: (state views, their former values) per chunk
        # and buffer, and (parameter, whether it had a state entry, buffers created, former step).
        self.backups: List[Tuple[List[Tensor], List[Tensor]]] = []
        self.entries: List[Tuple[Tensor, bool, List[str], Any]] = []
        self._coefficients: Dict[Tuple[int, int], List[float]] = {}
        # Scratch memory of a pass over the chunks, one buffer per use, dtype and device, as long as
        # the longest chunk (drawn with padding) it serves; released when the pass ends.
        self._scratch: Dict[Tuple[str, torch.dtype, torch.device], Tensor] = {}
        self._capacity: Dict[Tuple[torch.dtype, torch.device], int] = {}
        for chunk in plan.chunks:
            key = (chunk.dtype, chunk.device)
            longest = max(chunk.held, DISTRIBUTIONS["rademacher"].padded_length(chunk.length))
            self._capacity[key] = max(self._capacity.get(key, 0), longest)
        for n, chunk in enumerate(plan.chunks):
            self.restore(chunk).begin(self, n, chunk)

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
        if isinstance(choice, Theta):
            self._move_all(THETA)
            return
        stateful = [(group, p) for _, group in self.zo_groups for p in group["params"]
                    if RULES[group["rule"]].buffer_names(group)]
        for group, p in stateful:  # every buffer exists before the first chunk writes
            names = RULES[group["rule"]].buffer_names(group)
            existed = p in self.state
            entry = self.state[p]
            missing = [name for name in names if entry.get(name) is None]
            self.entries.append((p, existed, missing, entry.get("step")))
            for name in missing:
                entry[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if len(missing) == len(names):
                self.fresh.add(id(p))
        self._move_all(Move(choice.candidate, choice.mirrored, commit=True))
        for group, p in stateful:
            if group["rule"] == "adamw":
                self.state[p]["step"] = int(self.state[p].get("step", 0)) + 1

    def back_to_theta(self) -> None:
        """After a failure: the optimizer state a commit wrote as it was, every chunk back to theta."""
        with deferred_interrupts():
            for views, saved in reversed(self.backups):
                torch._foreach_copy_(views, saved)
            for p, existed, missing, step_count in self.entries:
                if not existed:
                    self.state.pop(p, None)
                    continue
                entry = self.state[p]
                for name in missing:
                    entry.pop(name, None)
                if step_count is None:
                    entry.pop("step", None)
                else:
                    entry["step"] = step_count
            self.backups.clear()
            self.entries.clear()
            for n, chunk in enumerate(self.plan.chunks):
                if self.positions[n] != THETA:
                    self.restore(chunk).back_to_theta(self, n, chunk, self.positions[n])
        self._scratch.clear()

    def end(self) -> None:
        self.anchors.clear()
        self.backups.clear()
        self.entries.clear()

    @property
    def direction_sweeps(self) -> float:
        """Direction entries drawn so far, in passes over the local ZO entries."""
        return self.generated / self.plan.held if self.plan.held else 0.0

    # ------------------------------------------------------- for the restore strategies

    @staticmethod
    def restore(chunk: Chunk) -> Restore:
        return RESTORES[chunk.group["restore"]]

    @staticmethod
    def distribution(chunk: Chunk) -> Distribution:
        return DISTRIBUTIONS[chunk.group["distribution"]]

    @staticmethod
    def keeps_state(chunk: Chunk) -> bool:
        return bool(RULES[chunk.group["rule"]].buffer_names(chunk.group))

    def scratch(self, name: str, chunk: Chunk, length: int) -> Tensor:
        """``length`` entries of scratch memory named ``name`` for ``chunk``'s dtype and device, reused
        until the current pass over the chunks ends."""
        key = (name, chunk.dtype, chunk.device)
        buffer = self._scratch.get(key)
        if buffer is None:
            buffer = torch.empty(self._capacity[key[1:]], dtype=chunk.dtype, device=chunk.device)
            self._scratch[key] = buffer
        return buffer[:length]

    def reached(self, n: int, position: Position) -> None:
        """Chunk ``n``'s parameters now stand at ``position``."""
        self.positions[n] = position

    def update(self, chunk: Chunk, move: Move, commit: Optional[bool] = None) -> "ChunkUpdate":
        """The rule update of ``move`` over ``chunk``'s held entries."""
        return ChunkUpdate(self, chunk, move.commit if commit is None else commit)

    def z(self, chunk: Chunk, candidate: int, query: int) -> Tensor:
        """The held entries of chunk ``chunk`` of direction ``z_{candidate, query}`` (scratch)."""
        group, distribution = chunk.group, self.distribution(chunk)
        seed = chunk_seed(group["seed"], chunk.group_index, group["steps"], candidate, query, chunk.class_index,
                          chunk.index)
        drawn = self.scratch("draw", chunk, distribution.padded_length(chunk.length))
        self.generated += chunk.length
        return chunk.held_entries(self.generator.fill_(drawn, seed, chunk.length, distribution),
                                  self.scratch("held draw", chunk, chunk.held))

    def estimate(self, chunk: Chunk, candidate: int, mirrored: bool,
                 on_direction: Optional[Callable[[int, Tensor], None]] = None,
                 known: Optional[Tuple[int, Tensor]] = None) -> Tensor:
        """The held entries of the estimate of ``candidate`` (negated if ``mirrored``), in scratch.

        ``on_direction(query, z)`` sees each direction before it is used. ``known = (query, z)``
        gives that query's direction (a buffer the estimate may overwrite) instead of drawing it.
        """
        coefficients = self._coefficients_of(chunk, candidate)
        estimate: Optional[Tensor] = None
        for query, coefficient in enumerate(coefficients):
            z = known[1] if known is not None and known[0] == query else self.z(chunk, candidate, query)
            if on_direction is not None:
                on_direction(query, z)
            if len(coefficients) == 1:
                estimate = z.mul_(coefficient)
            elif estimate is None:
                estimate = torch.mul(z, coefficient, out=self.scratch("estimate", chunk, chunk.held))
            else:
                estimate.add_(z, alpha=coefficient)
        assert estimate is not None  # queries >= 1 is validated
        if chunk.group["sign"] == "coordinate":
            estimate.sign_()
        return estimate.neg_() if mirrored else estimate

    # --------------------------------------------------------------------- internals

    def _loss_at(self, position: Position, phase: str) -> float:
        self._move_all(position)
        return self.runner.probe(phase)

    def _move_all(self, target: Position) -> None:
        # An interrupt waits for the pass to end, so it never lands between two writes of a chunk.
        try:
            with deferred_interrupts():
                for n, chunk in enumerate(self.plan.chunks):
                    current = self.positions[n]
                    if current == target:
                        continue
                    if isinstance(target, Move) and target.same_point(current) and not self.keeps_state(chunk):
                        self.positions[n] = target  # already there; a stateless commit writes nothing more
                        continue
                    self.restore(chunk).move(self, n, chunk, current, target)
        finally:
            self._scratch.clear()  # scratch lives for one pass, never through a forward

    def _coefficients_of(self, chunk: Chunk, candidate: int) -> List[float]:
        key = (chunk.group_index, candidate)
        if key not in self._coefficients:
            row, group = self.differences[candidate], chunk.group
            self._coefficients[key] = [
                (float((d > 0) - (d < 0)) if group["sign"] == "scalar" else d / group["eps"]) / len(row)
                for d in row
            ]
        return self._coefficients[key]


class ChunkUpdate:
    """A move's rule update over one chunk's held entries: the single-tensor kernels of
    :mod:`hybridzo.rules` run on the chunk's flat buffers, the state buffers gathered into
    flat buffers too (zeros where a parameter has none yet; the kernels update these
    private copies in place) and, for a commit, written back (after a copy of what they
    held, which :meth:`ZOStep.back_to_theta` writes back should the step fail).

    Parameters whose AdamW step counts differ are updated piece by piece, each with its own.
    """

    def __init__(self, step: ZOStep, chunk: Chunk, commit: bool) -> None:
        self.step, self.commit = step, commit
        group = chunk.group
        rule = RULES[group["rule"]]
        names = rule.buffer_names(group)
        entries = [step.state[piece.param] if piece.param in step.state else {} for piece in chunk.pieces] \
            if names else []
        self.buffers: Dict[str, Optional[Tensor]] = {}
        self._copies: List[Tuple[List[Tensor], List[Tensor]]] = []  # (state views, flat parts)
        for name in names:
            buffers = [entry.get(name) for entry in entries]
            if all(buffer is None for buffer in buffers):
                self.buffers[name] = None  # an uncommitted move before the first step
                continue
            flat = step.scratch(f"state {name}", chunk, chunk.held)
            if all(buffer is not None for buffer in buffers):
                views = chunk.state_views(name, buffers)
                parts = flat_parts(flat, views, [v.numel() for v in views])
            else:  # zeros where a parameter has no buffer yet
                flat.zero_()
                views, parts = [], []
                for piece, buffer in zip(chunk.pieces, buffers):
                    if buffer is not None:
                        piece_views = logical_views(local_data(buffer), piece.local_lo, piece.local_hi)
                        views += piece_views
                        parts += flat_parts(flat[piece.held_lo:piece.held_hi], piece_views,
                                            [v.numel() for v in piece_views])
            torch._foreach_copy_(parts, views)
            if commit:  # (a commit created the missing buffers: all are present, parts cover flat)
                step.backups.append((views, flat_parts(flat.clone(), parts, [p.numel() for p in parts])))
            self.buffers[name] = flat
            self._copies.append((views, parts))
        fresh = commit and bool(names) and all(id(piece.param) in step.fresh for piece in chunk.pieces)
        steps = [int(entry.get("step", 0)) + 1 for entry in entries] if rule.name == "adamw" else []
        if len(set(steps)) <= 1:
            self.parts = [(Update(rule, group, self.buffers, fresh, steps[0] if steps else 1, commit, private=True),
                           0, chunk.held)]
        else:
            self.parts = [(Update(rule, group, self.buffers, fresh, s, commit, private=True), piece.held_lo,
                           piece.held_hi) for piece, s in zip(chunk.pieces, steps)]

    def apply_(self, out: Tensor, theta: Tensor, grad: Tensor) -> None:
        """Write the moved values into ``out`` (which may alias ``theta`` or ``grad``)."""
        for update, lo, hi in self.parts:
            update.apply_(out[lo:hi], theta[lo:hi], grad[lo:hi], lo, hi)

    def undo_(self, moved: Tensor, grad: Tensor) -> None:
        """Invert an uncommitted :meth:`apply_` in place, up to rounding."""
        for update, lo, hi in self.parts:
            update.undo_(moved[lo:hi], grad[lo:hi], lo, hi)

    def write_state(self) -> None:
        """A commit: write the updated state buffers back."""
        if self.commit:
            for views, parts in self._copies:
                torch._foreach_copy_(views, parts)
