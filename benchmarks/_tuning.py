"""Tuning a row's free knobs on the validation split: the grid, the order of the search and the choice.

Pure functions over run results (no processes, no files): ``accuracy.py --tune`` asks :func:`search` which runs a
row needs next, runs them, and asks again until it returns a choice.

Every row starts with the same budget, five runs:

* an FO row (``--zo-branch none``) tries :attr:`TuningGrid.fo_lr`, five values of ``--lr``;
* a row with ZO groups keeps the FO learning rate its FO baseline chose and searches coordinate-wise: first
  ``--zo-lr`` over :attr:`TuningGrid.zo_lr` (three values) at the default eps, then ``--eps-language`` over
  :attr:`TuningGrid.eps` (two more values) at the best ZO learning rate. The vision eps follows the language eps
  as ``clip_cl.py`` derives it (equal, or half with ``--mozo``).

Each of these line searches is extended past an edge while its best value lies on that edge (the optimum may lie
outside the grid), one grid step at a time (x2 for ``--lr``, x10 for the ZO knobs), at most
:attr:`TuningGrid.max_extensions` times per knob; a choice still on the edge after that is flagged by
:func:`edges`. A run's score is its validation accuracy after the last task (Last), ties broken by Avg and then by
the order in which the points were named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

Knobs = Dict[str, float]
"""Knob values of one tuning run, keyed by ``clip_cl.py`` config key (``lr``, ``zo_lr``, ``eps_language``)."""

KNOB_FLAGS = {"lr": "--lr", "zo_lr": "--zo-lr", "eps_language": "--eps-language"}
"""``clip_cl.py`` flag of each knob."""


@dataclass(frozen=True)
class TuningGrid:
    """The values tried first, the step of each extension and how far the search may extend.

    Attributes:
        fo_lr: ``--lr`` values of FO rows: factors of 2 around the cpu preset's 1e-2.
        zo_lr: ``--zo-lr`` values of the first coordinate, a decade apart.
        default_eps: ``--eps-language`` of the first coordinate.
        eps: ``--eps-language`` values tried at the best ZO learning rate, a decade either side of the default.
        fo_step: Factor between ``--lr`` values, for extensions.
        zo_step: Factor between ``--zo-lr`` (and ``--eps-language``) values, for extensions.
        max_extensions: Extra values a line search may add past its edges, per knob.
    """

    fo_lr: Tuple[float, ...] = (2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2)
    zo_lr: Tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    default_eps: float = 1e-3
    eps: Tuple[float, ...] = (1e-4, 1e-2)
    fo_step: float = 2.0
    zo_step: float = 10.0
    max_extensions: int = 2

    @property
    def budget(self) -> Tuple[int, int]:
        """Runs per FO row and per ZO row before any extension."""
        return len(self.fo_lr), len(self.zo_lr) + len(self.eps)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready description."""
        return {"fo_lr": list(self.fo_lr), "zo_lr": list(self.zo_lr), "default_eps": self.default_eps,
                "eps": list(self.eps), "runs_per_fo_row": self.budget[0], "runs_per_zo_row": self.budget[1],
                "extension_steps": {"lr": self.fo_step, "zo_lr": self.zo_step, "eps_language": self.zo_step},
                "max_extensions": self.max_extensions}


GRID = TuningGrid()
TUNING_BUDGET = GRID.budget[0]
assert GRID.budget[0] == GRID.budget[1], "FO and ZO rows start with the same number of tuning runs"


@dataclass(frozen=True)
class Score:
    """What a finished tuning run scored on the validation split."""

    last: float
    avg: float


def knobs_tag(knobs: Mapping[str, float]) -> str:
    """Name of a tuning run, e.g. ``lr=0.01,zo_lr=0.001,eps_language=0.001`` (order of ``knobs``)."""
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


def _line_search(key: str, values: Sequence[float], step: float, point: Callable[[float], Knobs],
                 scores: Mapping[str, Score], max_extensions: int) -> Tuple[List[Knobs], Optional[Knobs]]:
    """The points of a search over the knob ``key`` named so far, and its best point (``None`` until decided).

    Starts with ``values``; while the best point has the lowest (highest) value tried, adds the value one ``step``
    below (above) it, at most ``max_extensions`` values in all. Points keep the order they were named in.
    """
    tried = [float(value) for value in values]
    while True:
        points = [point(value) for value in tried]
        best = _best(points, scores)
        if best is None or len(tried) - len(values) >= max_extensions:
            return points, best
        if math.isclose(best[key], min(tried)):
            tried.append(min(tried) / step)
        elif math.isclose(best[key], max(tried)):
            tried.append(max(tried) * step)
        else:
            return points, best


def search(kind: str, scores: Mapping[str, Score], fo_lr: Optional[float] = None,
           grid: TuningGrid = GRID) -> Tuple[List[Knobs], Optional[Knobs]]:
    """Every point of a row's search that can be named now, in the order named, and the choice once decided.

    Args:
        kind: ``"fo"`` (tune ``lr``) or ``"zo"`` (tune ``zo_lr``, then ``eps_language``).
        scores: Scores of the row's finished tuning runs, keyed by :func:`knobs_tag`.
        fo_lr: ZO rows: the FO learning rate their FO baseline chose (fixed during the search); ``None`` while
            that baseline is still being tuned (then nothing can be named).
        grid: The values to try.

    Returns:
        ``(points, choice)``: for FO rows the lr line search; for ZO rows the ``zo_lr`` line search, plus the
        ``eps_language`` one at the best ZO learning rate once that is decided. ``choice`` is ``None`` until every
        search is decided.
    """
    if kind == "fo":
        return _line_search("lr", grid.fo_lr, grid.fo_step, lambda lr: {"lr": lr}, scores, grid.max_extensions)
    if kind != "zo":
        raise ValueError(f"kind must be 'fo' or 'zo', got {kind!r}")
    if fo_lr is None:
        return [], None
    first, best = _line_search("zo_lr", grid.zo_lr, grid.zo_step,
                               lambda zo_lr: {"lr": fo_lr, "zo_lr": zo_lr, "eps_language": grid.default_eps},
                               scores, grid.max_extensions)
    if best is None:
        return first, None
    zo_lr = best["zo_lr"]
    second, choice = _line_search("eps_language", (grid.default_eps, *grid.eps), grid.zo_step,
                                  lambda eps: {"lr": fo_lr, "zo_lr": zo_lr, "eps_language": eps},
                                  scores, grid.max_extensions)
    return first + [point for point in second if point not in first], choice


def tuning_points(kind: str, scores: Mapping[str, Score], fo_lr: Optional[float] = None,
                  grid: TuningGrid = GRID) -> List[Knobs]:
    """The points of :func:`search` named so far."""
    return search(kind, scores, fo_lr, grid)[0]


def choose(kind: str, scores: Mapping[str, Score], fo_lr: Optional[float] = None,
           grid: TuningGrid = GRID) -> Optional[Knobs]:
    """The knobs :func:`search` chose, or ``None`` while it is not decided."""
    return search(kind, scores, fo_lr, grid)[1]


def edges(choice: Mapping[str, float], points: Sequence[Knobs], grid: TuningGrid = GRID) -> List[str]:
    """Knobs whose chosen value is the smallest or largest its line search tried (after any extension): the
    optimum may lie outside. ``points`` are the row's tuning points (:func:`search`)."""
    lines = {"lr": [point["lr"] for point in points]}
    if "zo_lr" in choice:
        lines = {"zo_lr": [p["zo_lr"] for p in points if math.isclose(p["eps_language"], grid.default_eps)],
                 "eps_language": [p["eps_language"] for p in points if math.isclose(p["zo_lr"], choice["zo_lr"])]}
    return [key for key, tried in lines.items()
            if any(math.isclose(choice[key], bound) for bound in (min(tried), max(tried)))]
