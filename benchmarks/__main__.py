"""Run every benchmark script of a preset: ``python -m benchmarks`` (the seconds-long smoke preset, into ``runs/``).

Reports go to ``runs/benchmarks/<preset>/`` unless ``--out-dir`` says otherwise, so nothing committed is overwritten
by accident; ``python -m benchmarks --preset cpu --out-dir benchmarks/results`` regenerates the committed results.

Presets:

* ``cpu``: what ``benchmarks/results/`` holds, on a CPU machine: memory and speed on open_clip ViT-B-16
  (random weights; batch 8 for memory, with a 2/4/16 batch sweep, batch 4 for speed), the exact-restore
  memory table, and the accuracy sweep with the tiny CLIP (hours; resumable, see accuracy.py).
* ``paper``: the same on a GPU at the papers' scale (ViT-B/16 with OpenAI weights for accuracy); reports
  get a ``_paper`` suffix.
* ``smoke`` (default): seconds-long runs on a 4-block CLIP, to check that every script starts and writes its
  report.
"""

from __future__ import annotations

import importlib
import shlex
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks import _measure

SCRIPTS = ("memory", "speed", "restore_memory", "accuracy")

PRESETS = {
    "smoke": "seconds-long runs on a 4-block CLIP, to check that every script starts",
    "cpu": "what benchmarks/results/ holds: ViT-B-16 memory and speed, tiny-CLIP accuracy (hours)",
    "paper": "the papers' scale on a GPU; reports get a _paper suffix",
}
"""``--preset`` values and what each runs."""


def script_arguments(preset: str, out_dir: Path, jobs: int = 1) -> Dict[str, List[str]]:
    """Command-line arguments of each benchmark script under ``preset``, writing into ``out_dir``."""
    suffix = "_paper" if preset == "paper" else ""
    out = {name: ["--out", str(out_dir / f"{name}{suffix}.md")] for name in ("memory", "speed", "restore_memory")}
    if preset == "smoke":
        return {
            # Rows of a peer that is not installed (mezo-pkg, tz-mezo, ...) are left out, with a note.
            "memory": ["--model", "micro", "--batch", "2", "--configs", "inference,dual,vision-limit,torchzero",
                       "--state-model", "micro", *out["memory"]],
            "speed": ["--model", "micro", "--batch", "2", "--repeats", "1", "--configs",
                      ",".join(["zo-central", "zo-conservative", "fo", "mezo-ref", "mezo-pkg", "tz-mezo",
                                "full-zo-central", "full-zo-inplace", "full-zo-rademacher",
                                "full-zo-rademacher-inplace", "full-mezo-ref", "full-mezo-pkg", "full-tz-mezo",
                                "full-tz-mezo-rademacher"]),
                      *out["speed"]],
            "restore_memory": ["--width", "64", "--depth", "2", "--batch", "4", "--placements", "adapter",
                               *out["restore_memory"]],
            "accuracy": ["--smoke", "--runs-dir", str(out_dir / "runs"), "--out", str(out_dir / "accuracy_smoke.md")],
        }
    if preset == "cpu":
        return {
            "memory": ["--model", "ViT-B-16", "--batch", "8", "--sweep-batches", "2,4,16", *out["memory"]],
            "speed": ["--model", "ViT-B-16", "--batch", "4", "--repeats", "5", *out["speed"]],
            "restore_memory": out["restore_memory"],
            "accuracy": ["--preset", "cpu", "--jobs", str(jobs), "--out", str(out_dir / "accuracy_cpu.md")],
        }
    if preset == "paper":
        return {
            "memory": ["--model", "ViT-B-16", "--device", "cuda", "--batch", "128", "--sweep-batches", "32,64",
                       *out["memory"]],
            "speed": ["--model", "ViT-B-16", "--device", "cuda", "--batch", "128", "--repeats", "10", *out["speed"]],
            "restore_memory": out["restore_memory"],
            "accuracy": ["--preset", "paper", "--jobs", str(jobs), "--out", str(out_dir / "accuracy_paper.md")],
        }
    raise ValueError(f"unknown preset {preset!r}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the selected benchmark scripts of a preset one after the other."""
    parser = _measure.script_parser("", __doc__, epilog="Run from the repository root. Each script also runs alone: "
                                                        "python -m benchmarks.<script> --help.")
    parser.add_argument("--preset", default="smoke", choices=list(PRESETS),
                        help="; ".join(f"{name}: {what}" for name, what in PRESETS.items()) + " (default: smoke)")
    parser.add_argument("--only", type=_measure.split_list, default=list(SCRIPTS),
                        help=f"comma-separated scripts to run: {', '.join(SCRIPTS)} (default: all)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="folder for the reports (markdown, JSON, plots) (default: runs/benchmarks/<preset>; "
                             "benchmarks/results to regenerate the committed ones)")
    parser.add_argument("--jobs", type=int, default=1, help="accuracy rows run in parallel")
    parser.add_argument("--dry-run", action="store_true", help="print what would run")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown scripts {sorted(unknown)}; choose from {', '.join(SCRIPTS)}")
    out_dir = args.out_dir or _measure.REPO_ROOT / "runs" / "benchmarks" / args.preset
    arguments = script_arguments(args.preset, out_dir, args.jobs)
    for name in (s for s in SCRIPTS if s in args.only):
        print(f"== python -m benchmarks.{name} {shlex.join(arguments[name])}", flush=True)
        if args.dry_run:
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        start = time.perf_counter()
        module.main(arguments[name])
        print(f"== {name} done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
