"""Draw docs/assets/hybrid_step.png, the figure of the docs' home page: one hybridzo step on a two-part model.

Run from anywhere: ``python docs/diagram.py`` (needs matplotlib, in the examples extra). The PNG is committed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parent / "assets" / "hybrid_step.png"
ZO_COLOR, FO_COLOR, GRAY = "#d9822b", "#2b6cb0", "#555555"


def box(axes, x: float, y: float, width: float, height: float, text: str, color: str, fill: str = "white",
        size: int = 10) -> None:
    axes.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.02,rounding_size=0.08",
                                  linewidth=1.6, edgecolor=color, facecolor=fill))
    axes.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=size, color="black")


def arrow(axes, start, end, color: str = GRAY, style: str = "-|>", dashed: bool = False) -> None:
    axes.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=14, linewidth=1.4, color=color,
                                   linestyle="--" if dashed else "-"))


def draw(path: Path = OUT) -> Path:
    figure = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, 10)
    axes.set_ylim(0, 4.2)
    axes.axis("off")

    axes.text(0.2, 3.9, "one opt.step(closure)", fontsize=12, weight="bold")
    # The model: input -> ZO part -> FO part -> loss.
    box(axes, 0.2, 1.7, 1.1, 0.8, "batch x, y", GRAY)
    box(axes, 1.9, 1.5, 2.2, 1.2, "ZO group\n(adapter, tower)\nmode=\"zo\"", ZO_COLOR, "#fbeadb")
    box(axes, 4.7, 1.5, 2.0, 1.2, "FO group\n(head)\nmode=\"fo\"", FO_COLOR, "#dce8f5")
    box(axes, 7.3, 1.7, 1.0, 0.8, "loss", GRAY)
    arrow(axes, (1.3, 2.1), (1.9, 2.1))
    arrow(axes, (4.1, 2.1), (4.7, 2.1))
    arrow(axes, (6.7, 2.1), (7.3, 2.1))

    # FO: one forward with autograd, backward into the FO parameters only.
    arrow(axes, (7.8, 1.65), (5.7, 1.45), FO_COLOR, dashed=True)
    axes.text(6.0, 0.95, "1. FO pass: one forward + backward\n    into FO parameters only", fontsize=9,
              color=FO_COLOR)
    # ZO: forward-only probes at theta +- eps z.
    axes.text(1.9, 3.05, "2. ZO probes: forwards at θ ± εz, no backward\n    z regenerated from a seed, "
              "never stored", fontsize=9, color=ZO_COLOR)
    arrow(axes, (3.0, 2.95), (3.0, 2.7), ZO_COLOR)
    axes.text(1.9, 0.95, "ĝ = (f(θ+εz) − f(θ−εz)) / 2ε · z", fontsize=10, color=ZO_COLOR)
    arrow(axes, (7.8, 1.65), (3.6, 1.3), ZO_COLOR, dashed=True)

    # Commit.
    box(axes, 8.6, 1.5, 1.25, 1.2, "3. commit\nZO: best\ncandidate\nFO: SGD/AdamW", GRAY, size=8)
    arrow(axes, (8.3, 2.1), (8.6, 2.1))
    axes.text(0.2, 0.3, "A failed step changes nothing; state_dict saves seeds and step counters, so a resumed "
              "run repeats its directions.", fontsize=9, color=GRAY)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    print(draw())
