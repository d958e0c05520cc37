"""Memory against accuracy: one point per placement, the figure a user picks a placement from.

Two panels, Last (mean over seeds with its 95% Student-t interval) on the y-axis of both:

* x = the peak memory of the accuracy runs themselves (``results.json``'s ``peak_memory_mib``: the tiny CLIP's whole
  process, CPU peak RSS, mean over seeds);
* x = the training peak incl. weights of the same placement on open_clip ViT-B-16 at batch 8
  (``benchmarks/results/memory.json``, ``memory.py``), where the weights are a smaller share of the step.

``accuracy.py`` draws it with every multi-seed report; for a report whose runs are gone (the untuned one),
``python -m benchmarks._tradeoff benchmarks/results/accuracy_cpu_seeds_untuned.json`` draws it from the report's
JSON, with the peaks of the single-seed runs of the same rows (``accuracy_cpu.json``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from benchmarks import _measure
from benchmarks._stats import t_quantile

MEMORY_CONFIG = {"moe-fo": "fo", "moe-dual": "dual", "moe-vision": "vision", "moe-language": "language",
                 "mozo-dual-hop-odd": "dual-hop-odd", "mozo-dual-hop-even": "dual-hop-even",
                 "lora-fo": "lora-fo", "lora-dual": "lora-dual", "lora-vision": "lora-vision",
                 "lora-language": "lora-language"}
"""``memory.py`` configuration of each accuracy row's placement (MoZO changes the estimate, not the memory)."""

CAPTION = ("Last after the last task (mean over seeds, bars: 95% t-interval of the mean) against peak training "
           "memory: left, the accuracy runs' own peak (tiny CLIP, CPU peak RSS of the whole process, mean over "
           "seeds); right, the same placement's training peak incl. weights on ViT-B-16 at batch 8 "
           "(memory.md). FO baselines are stars with a dashed line (the MoE adapters' in black); the legend gives each row's paired "
           "\u0394 Last against its FO baseline with its 95% interval.")


def vit_peaks(path: Path = _measure.RESULTS_DIR / "memory.json") -> Dict[str, float]:
    """Training peak incl. weights (MiB) of each accuracy row's placement on ViT-B-16, from ``memory.json``."""
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())["results"]
    return {row: results[config]["total_mib"] for row, config in MEMORY_CONFIG.items() if config in results}


def _interval(entry: Mapping[str, Any]) -> float:
    """Half width of the 95% t-interval of a row's mean Last (0 for one seed)."""
    n, std = len(entry["seeds"]), entry["last"]["std"]
    return 0.0 if n < 2 or std is None else t_quantile(0.975, n - 1) * std / math.sqrt(n)


def _legend_label(entry: Mapping[str, Any]) -> str:
    delta = entry.get("delta", {}).get("last")
    if delta is None:
        return f"{entry['label']} (n={len(entry['seeds'])})"
    interval = "" if delta["half_width"] is None else f" [{delta['low']:+.1f}, {delta['high']:+.1f}]"
    return f"{entry['label']}: \u0394 {delta['mean']:+.1f}{interval} (n={len(entry['seeds'])})"


def plot(rows: Mapping[str, Mapping[str, Any]], path: Path, title: str,
         cpu_peaks: Optional[Mapping[str, float]] = None, vit: Optional[Mapping[str, float]] = None) -> Optional[Path]:
    """Draw the figure; ``None`` (nothing written) when no row has a peak.

    Args:
        rows: Per row the multi-seed summary (``_seeds.summarize``) with its ``label``.
        path: PNG to write.
        title: Figure title.
        cpu_peaks: Peaks of the accuracy runs for rows whose summary has none (MiB).
        vit: ViT-B-16 peaks per row (default: :func:`vit_peaks`).
    """
    vit = vit_peaks() if vit is None else vit
    cpu = {name: (entry["peak_memory_mib"]["mean"] if "peak_memory_mib" in entry else (cpu_peaks or {}).get(name))
           for name, entry in rows.items()}
    panels = [(cpu, "peak memory of the accuracy runs themselves (MiB; axis not from 0)"),
              (vit, "training peak incl. weights, ViT-B-16 batch 8 (MiB)")]
    if not any(peaks.get(name) is not None for peaks, _ in panels for name in rows):
        return None
    figure, axes = _measure.figure(ncols=2, size=(12, 5.6))
    colours = _measure.palette(len(rows))
    handles = {}
    for axis, (peaks, xlabel) in zip(axes, panels):
        for (name, entry), colour in zip(rows.items(), colours):
            baseline = entry["baseline"] == name
            colour = "black" if name == "moe-fo" else colour
            if peaks.get(name) is None:
                continue
            if baseline:
                axis.axhline(entry["last"]["mean"], color=colour, linestyle="--", linewidth=0.8)
            handles[name] = axis.errorbar([peaks[name]], [entry["last"]["mean"]], yerr=[_interval(entry)],
                                          fmt="*" if baseline else "o", markersize=14 if baseline else 8, capsize=5,
                                          color=colour, label=_legend_label(entry))
        axis.set_xlabel(xlabel)
        if peaks is vit:
            axis.set_xlim(left=0)
        axis.set_ylabel("Last (%), mean over seeds, 95% interval")
        axis.grid(alpha=0.3)
    figure.legend(handles=list(handles.values()), loc="lower center", ncol=2, fontsize=9, frameon=False,
                  title="\u0394 Last against the FO baseline, paired over seeds, 95% interval", title_fontsize=9)
    _measure.title(figure, f"Memory against accuracy per placement ({title})", fontsize=10)
    figure.tight_layout(rect=(0, 0.05 + 0.04 * math.ceil(len(handles) / 2), 1, 1))
    return _measure.save_figure(figure, path)


def main(argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Draw the figure of a committed multi-seed report's JSON."""
    parser = _measure.script_parser("_tradeoff", __doc__)
    parser.add_argument("report", type=Path, help="JSON of a multi-seed report, e.g. "
                                                  "benchmarks/results/accuracy_cpu_seeds_untuned.json")
    parser.add_argument("--cpu-peaks", type=Path, default=_measure.RESULTS_DIR / "accuracy_cpu.json",
                        help="JSON of the single-seed tables: peak memory of rows whose runs recorded none")
    parser.add_argument("--out", type=Path, default=None, help="PNG (default: the report's name + _tradeoff.png)")
    args = parser.parse_args(argv)
    record = json.loads(args.report.read_text())
    cpu_peaks = {name: row["peak_memory_mib"] for name, row in json.loads(args.cpu_peaks.read_text())["rows"].items()}
    seeds = ", ".join(map(str, record["method"]["seeds"]))
    title = (f"{'tuned' if record['method']['tuned'] else 'untuned'}, seeds {seeds}; left: peaks of the "
             f"seed-0 runs in {args.cpu_peaks.name}")
    return plot(record["rows"], args.out or args.report.with_name(f"{args.report.stem}_tradeoff.png"), title, cpu_peaks)


if __name__ == "__main__":
    main()
