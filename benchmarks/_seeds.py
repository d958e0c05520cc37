"""Rows over several seeds: mean +/- std per row, paired intervals against the FO baseline, tables and a plot.

Pure functions of ``results.json`` dicts (``examples/clip_cl.py``), keyed by row and seed; ``accuracy.py`` runs
the seeds and writes what these functions return.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from benchmarks import _measure
from benchmarks._stats import mean_std, paired_interval, t_quantile

METRICS = ("last", "avg", "forgetting")
"""Per-run numbers aggregated over seeds (``results.json`` keys)."""

RunsBySeed = Mapping[str, Mapping[int, Mapping[str, Any]]]
"""``runs[row][seed]`` = that run's ``results.json``."""


def _finite_or_none(value: float) -> Optional[float]:
    return None if value is None or math.isnan(value) else float(value)


def summarize(runs: RunsBySeed, baselines: Mapping[str, str], confidence: float = 0.95) -> Dict[str, Dict[str, Any]]:
    """Per row: the seeds, per-seed values, mean and sample std of each metric and of the accuracy after each
    task, and the paired difference to the row's FO baseline over the seeds both have.

    Args:
        runs: ``runs[row][seed]`` = the run's ``results.json``.
        baselines: FO baseline of each row (itself for a baseline).
        confidence: Level of the paired t-intervals; default 0.95.

    Returns:
        ``{row: {"seeds", "per_seed", "last"/"avg"/"forgetting": {"mean", "std"}, "seen_acc": {"mean", "std"},
        "baseline", "paired_seeds", "delta": {metric: PairedInterval.to_dict()}}}``; ``delta`` is absent for a
        baseline and for a row that shares no seed with its baseline.
    """
    summary: Dict[str, Dict[str, Any]] = {}
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        if not seeds:
            continue
        entry: Dict[str, Any] = {"seeds": seeds,
                                 "per_seed": {metric: [by_seed[s][metric] for s in seeds] for metric in METRICS}}
        for metric in METRICS:
            mean, std = mean_std(entry["per_seed"][metric])
            entry[metric] = {"mean": mean, "std": _finite_or_none(std)}
        peaks = [by_seed[s].get("peak_memory_mib") for s in seeds]
        if None not in peaks:
            mean, std = mean_std(peaks)
            entry["peak_memory_mib"] = {"mean": mean, "std": _finite_or_none(std)}
        curves = np.array([by_seed[s]["seen_acc"] for s in seeds], dtype=float)
        entry["seen_acc"] = {"mean": curves.mean(axis=0).tolist(),
                             "std": curves.std(axis=0, ddof=1).tolist() if len(seeds) > 1 else None}
        baseline = baselines.get(name, name)
        entry["baseline"] = baseline
        if baseline != name and baseline in runs:
            common = sorted(set(seeds) & set(runs[baseline]))
            entry["paired_seeds"] = common
            if common:
                entry["delta"] = {
                    metric: paired_interval([by_seed[s][metric] for s in common],
                                            [runs[baseline][s][metric] for s in common], confidence).to_dict()
                    for metric in METRICS
                }
        summary[name] = entry
    return summary


def _mean_std_cell(stats: Mapping[str, Optional[float]]) -> str:
    if stats["std"] is None:
        return f"{stats['mean']:.2f}"
    return f"{stats['mean']:.2f} \u00b1 {stats['std']:.2f}"


def interval_cell(interval: Optional[Mapping[str, Any]]) -> str:
    """``+1.14 [-2.31, +4.59]``; only the mean for one pair; empty without an interval."""
    if interval is None:
        return ""
    if interval["half_width"] is None:
        return f"{interval['mean']:+.2f}"
    return f"{interval['mean']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"


def verdict(interval: Optional[Mapping[str, Any]]) -> str:
    """Whether an interval establishes a difference: ``includes 0`` / ``excludes 0`` / ``n/a`` (one seed)."""
    if interval is None:
        return ""
    if interval["includes_zero"] is None:
        return "n/a (1 seed)"
    return "includes 0" if interval["includes_zero"] else "excludes 0"


def results_table(summary: Mapping[str, Mapping[str, Any]], order: Sequence[str], labels: Mapping[str, str],
                  knobs: Mapping[str, str]) -> str:
    """Markdown: per row mean +/- std of Last, Avg, forgetting and the paired differences to the FO baseline."""
    lines = []
    for name in order:
        entry = summary.get(name)
        if entry is None:
            lines.append([labels[name], "not run", "", "", "", "", "", "", "", knobs.get(name, "")])
            continue
        delta = entry.get("delta", {})
        lines.append([labels[name], str(len(entry["seeds"])), *(_mean_std_cell(entry[m]) for m in METRICS),
                      interval_cell(delta.get("last")), verdict(delta.get("last")), interval_cell(delta.get("avg")),
                      interval_cell(delta.get("forgetting")), knobs.get(name, "")])
    headers = ["row", "seeds", "Last", "Avg", "forgetting", "\u0394 Last [95% CI]", "\u0394 Last interval",
               "\u0394 Avg [95% CI]", "\u0394 forgetting [95% CI]", "knobs"]
    return _measure.markdown_table(headers, lines, align="lrrrrrlrrl")


def per_seed_table(summary: Mapping[str, Mapping[str, Any]], order: Sequence[str], labels: Mapping[str, str]) -> str:
    """Markdown: Last / Avg of every run, one column per seed."""
    seeds = sorted({s for name in order if name in summary for s in summary[name]["seeds"]})
    lines = []
    for name in order:
        entry = summary.get(name)
        if entry is None:
            continue
        by_seed = dict(zip(entry["seeds"], zip(entry["per_seed"]["last"], entry["per_seed"]["avg"])))
        lines.append([labels[name], *(f"{by_seed[s][0]:.2f} / {by_seed[s][1]:.2f}" if s in by_seed else ""
                                      for s in seeds)])
    return _measure.markdown_table(["row", *(f"seed {s}: Last / Avg" for s in seeds)], lines)


def findings(summary: Mapping[str, Mapping[str, Any]], order: Sequence[str], labels: Mapping[str, str]) -> List[str]:
    """One sentence per row with a paired difference: its Last interval and whether it includes 0."""
    sentences = []
    for name in order:
        entry = summary.get(name)
        if entry is None or "delta" not in entry:
            continue
        interval = entry["delta"]["last"]
        baseline = labels[entry["baseline"]]
        cell = interval_cell(interval)
        if interval["includes_zero"] is None:
            sentences.append(f"{labels[name]} \u2212 {baseline}: Last {cell} from one seed; no interval.")
        elif interval["includes_zero"]:
            sentences.append(f"{labels[name]} \u2212 {baseline}: Last {cell} over {interval['n']} seeds; the interval "
                             "includes 0, so no difference is established.")
        else:
            direction = "above" if interval["mean"] > 0 else "below"
            sentences.append(f"{labels[name]} \u2212 {baseline}: Last {cell} over {interval['n']} seeds; the interval "
                             f"excludes 0: {direction} the FO baseline at this scale.")
    return sentences


def t_note(summary: Mapping[str, Mapping[str, Any]], confidence: float = 0.95) -> str:
    """The t quantile behind the intervals, for the report's method line."""
    counts = sorted({entry["delta"]["last"]["n"] for entry in summary.values() if "delta" in entry})
    parts = [f"t = {t_quantile((1 + confidence) / 2, n - 1):.3f} for {n} seeds, {n - 1} dof" for n in counts if n > 1]
    return "; ".join(parts) if parts else "no row has two paired seeds yet"


def tuning_table(tuning: Mapping[str, Mapping[str, Any]], order: Sequence[str], labels: Mapping[str, str]) -> str:
    """Markdown: every tuning run (knobs, validation Last / Avg) and the chosen one."""
    lines = []
    for name in order:
        record = tuning.get(name)
        if record is None:
            continue
        for point in record["points"]:
            knobs = point["knobs"]
            chosen = record.get("choice") == knobs
            score = (f"{point['last']:.2f}", f"{point['avg']:.2f}") if point.get("last") is not None else (
                point.get("status", "not run"), "")
            mark = ""
            if chosen:
                mark = "**chosen**" + (f" (edge: {', '.join(record['edges'])})" if record.get("edges") else "")
            values = [f"{knobs[key]:g}" if key in knobs else "" for key in ("lr", "zo_lr", "eps_language")]
            lines.append([labels[name], *values, *score, mark])
    return _measure.markdown_table(["row", "--lr", "--zo-lr", "--eps-language", "val Last", "val Avg", ""], lines,
                                   align="lrrrrrl")


def plot_seeds(summary: Mapping[str, Mapping[str, Any]], order: Sequence[str], labels: Mapping[str, str],
               path: Path, title: str) -> Optional[Path]:
    """Two panels: accuracy on all seen classes after each task (mean, error bars = std over seeds), and each
    row's paired Δ Last against its FO baseline with its 95% interval."""
    present = [name for name in order if name in summary]
    if not present:
        return None
    colours = dict(zip(present, _measure.palette(len(present))))
    figure, (curves, deltas) = _measure.figure(ncols=2, size=(12, 4.8))
    for name in present:
        entry = summary[name]
        mean = entry["seen_acc"]["mean"]
        std = entry["seen_acc"]["std"]
        baseline = entry["baseline"] == name
        curves.errorbar(range(1, len(mean) + 1), mean, yerr=std, capsize=3, marker="o", markersize=3,
                        label=f"{labels[name]} (n={len(entry['seeds'])})", color=colours[name],
                        linestyle="--" if baseline else "-", linewidth=1.8 if baseline else 1.2)
    curves.set_xticks(range(1, 1 + max(len(summary[name]["seen_acc"]["mean"]) for name in present)))
    curves.set_xlabel("task")
    curves.set_ylabel("accuracy on all seen classes (%)")
    curves.set_title("mean \u00b1 std over seeds", fontsize=9)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    with_delta = [name for name in present if "delta" in summary[name]]
    for position, name in enumerate(with_delta):
        interval = summary[name]["delta"]["last"]
        error = None if interval["half_width"] is None else [[interval["half_width"]], [interval["half_width"]]]
        deltas.errorbar([interval["mean"]], [position], xerr=error, fmt="o", capsize=4, color=colours[name])
    deltas.axvline(0.0, color="black", linewidth=1)
    deltas.set_yticks(range(len(with_delta)))
    deltas.set_yticklabels([f"{labels[n]} \u2212 {labels[summary[n]['baseline']]}" for n in with_delta], fontsize=7)
    deltas.invert_yaxis()
    deltas.set_xlabel("\u0394 Last (points), paired over seeds, 95% t-interval")
    deltas.grid(alpha=0.3, axis="x")
    _measure.title(figure, title, fontsize=9)
    figure.tight_layout()
    return _measure.save_figure(figure, path)
