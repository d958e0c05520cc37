r"""Where a ZO parameter stands during a step, and the two ways of moving it: exact and in place.

During a step every ZO tensor is at one *position* relative to its pre-step value
:math:`\theta`: :data:`THETA` itself, a :class:`Probe` :math:`\theta + s\,\epsilon z_{ki}`
(``side`` :math:`s = \pm 1`), or a :class:`Move`: the group's rule applied to
:math:`\pm\hat g_k` (a candidate update, tried or committed). A restore strategy
moves a tensor from one position to another, one direction chunk at a time:

* :class:`ExactRestore` (``restore="exact"``) keeps a copy of the tensor for the step
  (the *anchor*) and writes every position from it, so the step ends changed by exactly
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
the estimate :math:`\hat g_k` for a move, and the rule :class:`~hybridzo.rules.Update`
of a move.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .sharding import LocalSlice, Span

__all__ = ["Theta", "THETA", "Probe", "Move", "Position", "ZOTensor", "Restore", "ExactRestore",
           "InplaceRestore", "RESTORES"]


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


@dataclass
class ZOTensor:
    """A ZO parameter within one step.

    Attributes:
        slice: its local flat data and place in the whole tensor.
        group, group_index, tensor_index: its param group and the indices seeds derive from.
        spans: the direction chunks covering ``slice``.
        restore: how it moves between positions.
        position: where it stands now.
        anchor: ``restore="exact"``'s copy of the local data.
        moving: during an in-place move, ``(from, to, spans done, position of the span in progress)``.
    """

    slice: LocalSlice
    group: Dict[str, Any]
    group_index: int
    tensor_index: int
    spans: List[Span]
    restore: "Restore"
    position: Position = THETA
    anchor: Optional[Tensor] = None
    moving: Optional[Tuple[Position, Position, int, Position]] = field(default=None, repr=False)

    def view(self, span: Span, of: Optional[Tensor] = None) -> Tensor:
        return (self.slice.flat if of is None else of)[span.local_lo:span.local_hi]


class Restore:
    """Moves ZO tensors between positions; ``step`` supplies directions, estimates and rule updates."""

    def begin(self, t: ZOTensor) -> None:
        """Prepare ``t`` (at theta) for the step."""

    def move(self, step: Any, t: ZOTensor, target: Position) -> None:
        """Move ``t`` from its position to ``target``."""
        raise NotImplementedError

    def back_to_theta(self, step: Any, t: ZOTensor) -> None:
        """Return ``t`` to theta from wherever a failure left it (optimizer state already restored)."""
        raise NotImplementedError

    def end(self, t: ZOTensor) -> None:
        """The step is over."""


class ExactRestore(Restore):
    """Every position written from a copy of theta: exact, at the price of that copy."""

    def begin(self, t: ZOTensor) -> None:
        t.anchor = t.slice.flat.clone()

    def move(self, step: Any, t: ZOTensor, target: Position) -> None:
        current = t.position
        if isinstance(target, Move) and target.same_point(current) and not step.keeps_state(t):
            t.position = target  # already there; a stateless commit writes nothing more
            return
        update = step.update(t, target) if isinstance(target, Move) else None
        for span in t.spans:
            param, anchor = t.view(span), t.view(span, t.anchor)
            if isinstance(target, Theta):
                param.copy_(anchor)
            elif isinstance(target, Probe):
                if isinstance(current, Probe) and (current.candidate, current.query, current.side) == (
                    target.candidate, target.query, -target.side
                ):
                    param.lerp_(anchor, 2.0)  # 2 theta - (theta + s eps z) = theta - s eps z
                else:
                    z = step.z(t, target.candidate, target.query, span)
                    torch.add(anchor, z, alpha=target.side * t.group["eps"], out=param)
            else:
                known = None
                if isinstance(current, Probe) and current.candidate == target.candidate:
                    # The probe in place is theta + s eps z: read its direction back from the copy
                    # instead of drawing it again (it is the perturbation the probe applied).
                    applied = torch.sub(param, anchor, out=step.scratch("applied", t, param.numel()))
                    z = step.distribution(t).read_back_(applied, current.side * t.group["eps"])
                    known = (current.query, z)
                grad = step.estimate(t, target.candidate, span, target.mirrored, known=known)
                update.apply_(param, anchor, grad, span.local_lo, span.local_hi)
        step.finish_update(t, update)
        t.position = target

    def back_to_theta(self, step: Any, t: ZOTensor) -> None:
        t.slice.flat.copy_(t.anchor)
        t.position = THETA

    def end(self, t: ZOTensor) -> None:
        t.anchor = None


class InplaceRestore(Restore):
    """Positions reached by undoing the current one in place: no copy, a few ulps per undo."""

    def move(self, step: Any, t: ZOTensor, target: Position) -> None:
        current = t.position
        if isinstance(target, Move) and target.same_point(current) and not step.keeps_state(t):
            t.position = target
            return
        undo = step.update(t, current, commit=False) if isinstance(current, Move) else None
        update = step.update(t, target) if isinstance(target, Move) else None
        for index, span in enumerate(t.spans):
            t.moving = (current, target, index, current)
            self._move_span(step, t, span, current, target, undo, update)
        t.moving = None
        step.finish_update(t, update)
        t.position = target

    def back_to_theta(self, step: Any, t: ZOTensor) -> None:
        if t.moving is None:
            positions = [t.position] * len(t.spans)
        else:
            current, target, done, in_progress = t.moving
            positions = [target] * done + [in_progress] + [current] * (len(t.spans) - done - 1)
        for span, position in zip(t.spans, positions):
            if not isinstance(position, Theta):
                undo = step.update(t, position, commit=False) if isinstance(position, Move) else None
                self._move_span(step, t, span, position, THETA, undo, None)
        t.moving = None
        t.position = THETA

    def _move_span(self, step: Any, t: ZOTensor, span: Span, current: Position, target: Position,
                   undo: Any, update: Any) -> None:
        param = t.view(span)
        eps = t.group["eps"]

        def reached_theta() -> None:  # for back_to_theta, should this span's move fail from here on
            if t.moving is not None:
                t.moving = (*t.moving[:3], THETA)

        if isinstance(current, Probe) and isinstance(target, Probe) and (
            (current.candidate, current.query) == (target.candidate, target.query)
        ):
            z = step.z(t, target.candidate, target.query, span)
            param.add_(z, alpha=(target.side - current.side) * eps)  # MeZO's -2 eps: one draw
            return
        if isinstance(current, Probe) and isinstance(target, Move) and current.candidate == target.candidate:
            # The last probe's direction is one of the estimate's: undo it while drawing it.
            def undo_probe(query: int, z: Tensor) -> None:
                if query == current.query:
                    param.add_(z, alpha=-current.side * eps)
                    reached_theta()

            grad = step.estimate(t, target.candidate, span, target.mirrored, on_direction=undo_probe)
            update.apply_(param, param, grad, span.local_lo, span.local_hi)
            return
        if isinstance(current, Move) and isinstance(target, Move) and current.candidate == target.candidate:
            grad = step.estimate(t, target.candidate, span, False)
            undo.undo_(param, grad.neg() if current.mirrored else grad, span.local_lo, span.local_hi)
            reached_theta()
            update.apply_(param, param, grad.neg_() if target.mirrored else grad, span.local_lo, span.local_hi)
            return
        if isinstance(current, Probe):
            z = step.z(t, current.candidate, current.query, span)
            param.add_(z, alpha=-current.side * eps)
        elif isinstance(current, Move):
            undo.undo_(param, step.estimate(t, current.candidate, span, current.mirrored),
                       span.local_lo, span.local_hi)
        reached_theta()
        if isinstance(target, Probe):
            z = step.z(t, target.candidate, target.query, span)
            param.add_(z, alpha=target.side * eps)
        elif isinstance(target, Move):
            grad = step.estimate(t, target.candidate, span, target.mirrored)
            update.apply_(param, param, grad, span.local_lo, span.local_hi)


RESTORES: Dict[str, Restore] = {"exact": ExactRestore(), "inplace": InplaceRestore()}
"""The values of the ``restore`` group key."""
