"""Tuning a row's free knobs on the validation split: the grid, the order of the search and the choice.

Pure functions over run results (no processes, no files): ``accuracy.py --tune`` asks :func:`tuning_points`
which runs a row needs next, runs them, and asks :func:`choose` for the winner.

The protocol gives every row the same budget, :data:`TUNING_BUDGET` runs:

* an FO row (``--zo-branch none``) tries :attr:`TuningGrid.fo_lr`, five values of ``--lr``;
* a row with ZO groups keeps the FO learning rate its FO baseline chose and searches coordinate-wise: first
  ``--zo-lr`` over :attr:`TuningGrid.zo_lr` (three values) at the default eps, then ``--eps-language`` over
  :attr:`TuningGrid.eps` (two more values) at the best ZO learning rate. The vision eps follows the language eps
  as ``clip_cl.py`` derives it (equal, or half with ``--mozo``).

A run's score is its validation accuracy after the last task (Last), ties broken by Avg and then by grid order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

Knobs = Dict[str, float]
"""Knob values of one tuning run, keyed by ``clip_cl.py`` config key (``lr``, ``zo_lr``, ``eps_language``)."""

KNOB_FLAGS = {"lr": "--lr", "zo_lr": "--zo-lr", "eps_language": "--eps-language"}
"""``clip_cl.py`` flag of each knob."""


@dataclass(frozen=True)
class TuningGrid:
    """The values tried; see the module docstring for the order.

    Attributes:
        fo_lr: ``--lr`` values of FO rows: factors of 2 around the cpu preset's 1e-2 (see the preset notes in
            ``examples/clip_cl.py`` for the smaller values tried then).
        zo_lr: ``--zo-lr`` values of the first coordinate, a decade apart.
        default_eps: ``--eps-language`` of the first coordinate.
        eps: ``--eps-language`` values tried at the best ZO learning rate, a decade either side of the default.
    """

    fo_lr: Tuple[float, ...] = (2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2)
    zo_lr: Tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    default_eps: float = 1e-3
    eps: Tuple[float, ...] = (1e-4, 1e-2)

    @property
    def budget(self) -> Tuple[int, int]:
        """Runs per FO row and per ZO row."""
        return len(self.fo_lr), len(self.zo_lr) + len(self.eps)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready description."""
        return {"fo_lr": list(self.fo_lr), "zo_lr": list(self.zo_lr), "default_eps": self.default_eps,
                "eps": list(self.eps), "runs_per_fo_row": self.budget[0], "runs_per_zo_row": self.budget[1]}


GRID = TuningGrid()
TUNING_BUDGET = GRID.budget[0]
assert GRID.budget[0] == GRID.budget[1], "FO and ZO rows get the same number of tuning runs"


@dataclass(frozen=True)
class Score:
    """What a finished tuning run scored on the validation split."""

    last: float
    avg: float


def knobs_tag(knobs: Mapping[str, float]) -> str:
    """Folder name of a tuning run, e.g. ``lr=0.01,zo_lr=0.001,eps_language=0.001`` (order of ``knobs``)."""
    return ",".join(f"{key}={value:g}" for key, value in knobs.items())


def knob_flags(knobs: Mapping[str, float]) -> List[str]:
    """``clip_cl.py`` flags that set ``knobs``."""
    return [item for key, value in knobs.items() for item in (KNOB_FLAGS[key], f"{value:g}")]


def _best(points: Sequence[Knobs], scores: Mapping[str, Score]) -> Optional[Knobs]:
    """The point with the highest (Last, Avg), earliest in ``points`` on a tie; ``None`` unless all are scored."""
    if not points or any(knobs_tag(point) not in scores for point in points):
        return None
    ranked = sorted(enumerate(points), key=lambda item: (-scores[knobs_tag(item[1])].last,
                                                         -scores[knobs_tag(item[1])].avg, item[0]))
    return ranked[0][1]


def tuning_points(kind: str, scores: Mapping[str, Score], fo_lr: Optional[float] = None,
                  grid: TuningGrid = GRID) -> List[Knobs]:
    """Every point of a row's search that can be named now, in grid order.

    Args:
        kind: ``"fo"`` (tune ``lr``) or ``"zo"`` (tune ``zo_lr``, then ``eps_language``).
        scores: Scores of the row's finished tuning runs, keyed by :func:`knobs_tag`.
        fo_lr: ZO rows: the FO learning rate their FO baseline chose (fixed during the search); ``None`` while
            that baseline is still being tuned (then nothing can be named).
        grid: The values to try.

    Returns:
        For FO rows the whole lr grid; for ZO rows the first coordinate, plus the second once the first is
        scored.
    """
    if kind == "fo":
        return [{"lr": lr} for lr in grid.fo_lr]
    if kind != "zo":
        raise ValueError(f"kind must be 'fo' or 'zo', got {kind!r}")
    if fo_lr is None:
        return []
    first = [{"lr": fo_lr, "zo_lr": zo_lr, "eps_language": grid.default_eps} for zo_lr in grid.zo_lr]
    best = _best(first, scores)
    if best is None:
        return first
    return first + [{"lr": fo_lr, "zo_lr": best["zo_lr"], "eps_language": eps} for eps in grid.eps]


def choose(kind: str, scores: Mapping[str, Score], fo_lr: Optional[float] = None,
           grid: TuningGrid = GRID) -> Optional[Knobs]:
    """The chosen knobs once every point of the search is scored, else ``None``."""
    points = tuning_points(kind, scores, fo_lr, grid)
    complete = len(points) == (grid.budget[0] if kind == "fo" else grid.budget[1])
    return _best(points, scores) if complete else None


def edges(kind: str, choice: Mapping[str, float], grid: TuningGrid = GRID) -> List[str]:
    """Knobs whose chosen value is the smallest or largest tried: the optimum may lie outside the grid."""
    tried = {"lr": grid.fo_lr} if kind == "fo" else {"zo_lr": grid.zo_lr,
                                                      "eps_language": (grid.default_eps, *grid.eps)}
    return [key for key, values in tried.items()
            if any(math.isclose(choice[key], bound) for bound in (min(values), max(values)))]
