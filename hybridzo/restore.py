r"""Where a ZO parameter stands during a step, and the two ways of moving it: exact and in place.

During a step every ZO tensor is at one *position* relative to its pre-step value
:math:`\theta`: :data:`THETA` itself, a :class:`Probe` :math:`\theta + s\,\epsilon z_{ki}`
(``side`` :math:`s = \pm 1`), or a :class:`Move`: the group's rule applied to
:math:`\pm\hat g_k` (a candidate update, tried or committed). A restore strategy
moves the parameters one direction chunk (:class:`~hybridzo.plan.Chunk`) at a time from
one position to another, computing each chunk's new values in a flat buffer and writing
them into the parameters once, so that a failure leaves every chunk at one position or
the next, never between (the step records which, and a failure returns each from where
it is):

* :class:`ExactRestore` (``restore="exact"``) keeps a copy of the chunk's entries for the
  step (the *anchor*, one flat buffer per chunk) and writes every position from it, so the step ends changed by exactly
  the chosen update, bit for bit. The mirrored probe :math:`\theta - \epsilon z` is
  computed from the current one as :math:`2\theta - (\theta + \epsilon z)`, and a move
  made right after a probe reads the probe's direction back as
  :math:`(\text{param} - \theta)/(\pm\epsilon)`, the perturbation the probe applied
  (rounding included), instead of drawing :math:`z` again.
* :class:`InplaceRestore` (``restore="inplace"``) keeps no copy: it undoes the current
  position in place (subtracting a probe, inverting a move through
  :meth:`~hybridzo.rules.Update.undo_`) and applies the next one, drawing each direction
  once for both where they share it (MeZO's :math:`+\epsilon, -2\epsilon` and the last
  undo fused with the update). Every undo rounds, a few ulps per probe.

The step (:mod:`hybridzo.zo_step`) supplies the directions: ``z`` for a probe,
the estimate :math:`\hat g_k` for a move, and the rule update of a move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from .plan import Chunk

__all__ = ["Theta", "THETA", "Probe", "Move", "Position", "Restore", "ExactRestore", "InplaceRestore", "RESTORES"]


@dataclass(frozen=True)
class Theta:
    """The pre-step value."""


THETA = Theta()


@dataclass(frozen=True)
class Probe:
    """``theta + side * eps * z``, ``z`` the direction of ``(candidate, query)``."""

    candidate: int
    query: int
    side: int


@dataclass(frozen=True)
class Move:
    """The rule's step from theta along the estimate of ``candidate`` (``-estimate`` if mirrored).

    For plain SGD the move is ``theta - delta`` and its mirror ``theta + delta``; ``commit``
    writes optimizer state too.
    """

    candidate: int
    mirrored: bool = False
    commit: bool = False

    def same_point(self, other: "Position") -> bool:
        return isinstance(other, Move) and (other.candidate, other.mirrored) == (self.candidate, self.mirrored)

    def __str__(self) -> str:
        return f"theta{'+' if self.mirrored else '-'}delta[{self.candidate}]"


Position = Union[Theta, Probe, Move]


class Restore:
    """Moves a chunk's entries between positions; ``step`` (:class:`~hybridzo.zo_step.ZOStep`)
    supplies directions, estimates and rule updates and records where each chunk stands."""

    def begin(self, step: Any, n: int, chunk: Chunk) -> None:
        """Prepare chunk ``n`` (at theta) for the step."""

    def move(self, step: Any, n: int, chunk: Chunk, current: Position, target: Position) -> None:
        """Move chunk ``n`` from ``current`` to ``target``, recording each position it reaches
        with ``step.reached(n, position)``."""
        raise NotImplementedError

    def back_to_theta(self, step: Any, n: int, chunk: Chunk, current: Position) -> None:
        """Return chunk ``n`` to theta from ``current`` after a failure (optimizer state already
        restored)."""
        raise NotImplementedError


class ExactRestore(Restore):
    """Every position written from a copy of theta: exact, at the price of that copy."""

    def begin(self, step: Any, n: int, chunk: Chunk) -> None:
        step.anchors[n] = chunk.gather(chunk.empty())

    def move(self, step: Any, n: int, chunk: Chunk, current: Position, target: Position) -> None:
        anchor = step.anchors[n]
        if isinstance(target, Theta):
            chunk.scatter(anchor)
        elif isinstance(target, Probe):
            if isinstance(current, Probe) and (current.candidate, current.query, current.side) == (
                target.candidate, target.query, -target.side
            ):
                # 2 theta - (theta + s eps z) = theta - s eps z, without drawing z again
                torch._foreach_lerp_(chunk.views, chunk.parts(anchor), 2.0)
            else:
                z = step.z(chunk, target.candidate, target.query)
                chunk.scatter(torch.add(anchor, z, alpha=target.side * chunk.group["eps"], out=z))
        else:
            known = None
            if isinstance(current, Probe) and current.candidate == target.candidate:
                # The probe in place is theta + s eps z: read its direction back from the copy
                # instead of drawing it again (it is the perturbation the probe applied).
                applied = chunk.gather(step.scratch("values", chunk, chunk.held)).sub_(anchor)
                known = (current.query, step.distribution(chunk).read_back_(applied, current.side * chunk.group["eps"]))
            moved = step.estimate(chunk, target.candidate, target.mirrored, known=known)
            update = step.update(chunk, target)
            update.apply_(moved, anchor, moved)  # the estimate is read before the moved value overwrites it
            if not target.same_point(current):
                chunk.scatter(moved)
            step.reached(n, target)
            update.write_state()
            return
        step.reached(n, target)

    def back_to_theta(self, step: Any, n: int, chunk: Chunk, current: Position) -> None:
        chunk.scatter(step.anchors[n])
        step.reached(n, THETA)


class InplaceRestore(Restore):
    """Positions reached by undoing the current one in place: no copy, a few ulps per undo."""

    def move(self, step: Any, n: int, chunk: Chunk, current: Position, target: Position) -> None:
        eps = chunk.group["eps"]
        if not isinstance(current, Move) and not isinstance(target, Move):
            if isinstance(current, Probe) and isinstance(target, Probe) and (
                (current.candidate, current.query) == (target.candidate, target.query)
            ):
                z = step.z(chunk, target.candidate, target.query)
                torch._foreach_add_(chunk.views, chunk.parts(z), alpha=(target.side - current.side) * eps)  # MeZO's -2 eps
                step.reached(n, target)
                return
            if isinstance(current, Probe):
                z = step.z(chunk, current.candidate, current.query)
                torch._foreach_add_(chunk.views, chunk.parts(z), alpha=-current.side * eps)
                step.reached(n, THETA)
            if isinstance(target, Probe):
                z = step.z(chunk, target.candidate, target.query)
                torch._foreach_add_(chunk.views, chunk.parts(z), alpha=target.side * eps)
                step.reached(n, target)
            return
        # A move is involved: compute the new values in a flat buffer, then write them once.
        values = step.scratch("values", chunk, chunk.held)
        grad: Optional[Tensor] = None
        if isinstance(current, Probe):
            if isinstance(target, Move) and current.candidate == target.candidate:
                # The last probe's direction is one of the estimate's: undo it while drawing it.
                def undo_probe(query: int, z: Tensor) -> None:
                    if query == current.query:
                        chunk.gather_add(values, z, -current.side * eps)

                grad = step.estimate(chunk, target.candidate, target.mirrored, on_direction=undo_probe)
            else:
                chunk.gather_add(values, step.z(chunk, current.candidate, current.query), -current.side * eps)
        else:
            chunk.gather(values)
        if isinstance(current, Move):
            estimate = step.estimate(chunk, current.candidate, False)
            step.update(chunk, current, commit=False).undo_(values, estimate.neg() if current.mirrored else estimate)
            if isinstance(target, Move) and target.candidate == current.candidate:
                grad = estimate.neg_() if target.mirrored else estimate
        if isinstance(target, Move):
            if grad is None:
                grad = step.estimate(chunk, target.candidate, target.mirrored)
            update = step.update(chunk, target)
            update.apply_(grad, values, grad)
            if not target.same_point(current):  # a commit of the trial in place keeps its values
                chunk.scatter(grad)
            step.reached(n, target)
            update.write_state()
            return
        if isinstance(target, Probe):
            values.add_(step.z(chunk, target.candidate, target.query), alpha=target.side * eps)
        chunk.scatter(values)
        step.reached(n, target)

    def back_to_theta(self, step: Any, n: int, chunk: Chunk, current: Position) -> None:
        self.move(step, n, chunk, current, THETA)


RESTORES: Dict[str, Restore] = {"exact": ExactRestore(), "inplace": InplaceRestore()}
"""The values of the ``restore`` group key."""
