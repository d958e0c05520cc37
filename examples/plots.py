"""Figures for the continual-learning examples (matplotlib's Agg canvas; no display or pyplot state needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start), same length as ``values``.

    Args:
        values: The series to smooth.
        window: Number of trailing points averaged (at least 1).
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    series = np.asarray(values, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(series)])
    ends = np.arange(1, len(series) + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def smoothing_window(task_lengths: Sequence[int], smoothing: int) -> int:
    """The moving-average window actually drawn: ``smoothing``, shrunk to half the shortest task (at least 1).

    A trailing window as long as a task would average everything since the task began (a cumulative mean, not a
    moving average), so the window never exceeds half a task.
    """
    shortest = min((length for length in task_lengths if length > 0), default=1)
    return max(1, min(smoothing, shortest // 2))


def plot_accuracy_and_loss(
    seen_acc: Sequence[float],
    losses: Sequence[float],
    task_start_steps: Sequence[int],
    path: str | Path,
    title: str | None = None,
    smoothing: int = 10,
    seen_classes: Sequence[int] | None = None,
) -> Path:
    """Save :func:`accuracy_and_loss_figure` to ``path`` (PNG by suffix; folders created) and return it as a Path."""
    path = Path(path)
    figure = accuracy_and_loss_figure(seen_acc, losses, task_start_steps, title, smoothing, seen_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def accuracy_and_loss_figure(
    seen_acc: Sequence[float],
    losses: Sequence[float],
    task_start_steps: Sequence[int],
    title: str | None = None,
    smoothing: int = 10,
    seen_classes: Sequence[int] | None = None,
) -> Figure:
    """A two-panel figure: accuracy on seen classes per task, and training loss per step.

    The accuracy panel marks Last (accuracy on all seen classes after the final task) and Avg (the mean over
    tasks of the accuracy on all classes seen so far) in its legend and, given ``seen_classes``, draws the
    chance level 100 / (classes seen). The loss panel (the papers' Figure 2 view) shows the raw per-step loss,
    its trailing moving average within each task (window: :func:`smoothing_window`) and a dashed line at the
    start of every task.

    Args:
        seen_acc: Accuracy (%) on all seen classes after each task.
        losses: Training loss of every step, tasks in sequence.
        task_start_steps: Index into ``losses`` of each task's first step.
        title: Figure title; default ``None`` (no title).
        smoothing: Longest window of the moving average drawn over the loss; default 10 steps.
        seen_classes: Number of classes seen after each task, for the chance line; default ``None`` (no line).

    Returns:
        The figure, on an Agg canvas.
    """
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_axes, loss_axes = figure.subplots(1, 2)

    tasks = np.arange(1, len(seen_acc) + 1)
    last, avg = seen_acc[-1], float(np.mean(seen_acc))
    accuracy_axes.plot(tasks, seen_acc, marker="o",
                       label=f"accuracy on all seen classes\nLast (after the final task) {last:.1f}, "
                             f"Avg (mean over tasks) {avg:.1f}")
    for task, accuracy in zip(tasks, seen_acc):
        accuracy_axes.annotate(f"{accuracy:.1f}", (task, accuracy), textcoords="offset points", xytext=(0, 6),
                               ha="center", fontsize=8)
    if seen_classes is not None:
        chance = 100.0 / np.asarray(seen_classes, dtype=float)
        accuracy_axes.plot(tasks, chance, color="gray", linestyle=":", label="chance: 100 / classes seen")
    accuracy_axes.set_xticks(tasks)
    accuracy_axes.set_xlabel("after task")
    accuracy_axes.set_ylabel("accuracy on all seen classes (%)")
    accuracy_axes.set_ylim(0, 100)
    accuracy_axes.grid(alpha=0.3)
    accuracy_axes.legend(fontsize=8, loc="upper right")

    steps = np.arange(len(losses))
    loss_axes.plot(steps, losses, linewidth=0.6, alpha=0.4, label="per step")
    # Smooth within each task only, so a task's new classes do not blur into the previous task's tail.
    segment_ends = [*task_start_steps[1:], len(losses)]
    window = smoothing_window([end - start for start, end in zip(task_start_steps, segment_ends)], smoothing)
    for index, (start, end) in enumerate(zip(task_start_steps, segment_ends)):
        if end > start:
            loss_axes.plot(steps[start:end], moving_average(losses[start:end], window), color="C1", linewidth=1.5,
                           label=f"trailing mean of {window} steps, within each task" if index == 0 else None)
    for index, start in enumerate(task_start_steps):
        loss_axes.axvline(start, color="gray", linestyle="--", linewidth=0.8,
                          label="task start" if index == 0 else None)
    loss_axes.set_xlabel("training step")
    loss_axes.set_ylabel("training loss (current task's classes)")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend(fontsize=8)

    if title:
        figure.suptitle(title)
    return figure
