"""Last/Avg accuracy of the papers' rows, run with examples/clip_cl.py, next to the papers' numbers.

Rows (CIFAR-100; the paper's numbers are its CIFAR Inc10 column, CLIP ViT-B/16):

* Table 1: FO baseline and Dual / Vision / Language w/ ZO, with MoE adapters and with LoRA (dagger);
* Table 2: each branch w/ ZO on Hop-odd, Hop-even, Prefix and Suffix layers (half the blocks: the
  paper's "six" of 12);
* Table 3: MoZO (coordinate sign, conservative, halved vision eps) on Dual w/ Hop-odd / Hop-even;
* Table 4: each branch with ZO* (naive: no candidate check) and Sign (ZO* + element-wise sign), next
  to the conservative ZO of Table 1 (the paper's default);
* ZO-FC: ZO (q=4) on a rank-5 adapter in the first 5 vision blocks with an FO linear head, and the same
  model all FO.

ZO rows use the paper's default ZO, ZO-SGD-Cons, unless the row says otherwise. Every row is one run of
``examples/clip_cl.py`` in its own process, writing ``results.json`` to ``<runs-dir>/<row>``; a row whose
``results.json`` exists is not run again, so an interrupted sweep resumes where it stopped, and a run stopped
part way goes on from its last finished task (``clip_cl.py --resume``, added when its folder holds a
checkpoint). The tables are built from whatever results exist (missing rows say so).

    python -m benchmarks.accuracy --preset cpu [--rows table1,table4] [--only NAME,...] [--jobs 2]
    python -m benchmarks.accuracy --preset paper          # ViT-B/16, OpenAI weights: for a GPU
    python -m benchmarks.accuracy --smoke                 # one row with the examples' smoke preset
    python -m benchmarks.accuracy --report-only           # tables from the finished rows, nothing run

Over seeds, tuned on a validation split (``--tune``: ``benchmarks/_tuning.py`` has the grid and the search) and with
paired 95% intervals against the FO baseline of the same adapter, written to ``accuracy_<preset>_seeds.md``
(``benchmarks/_sweep.py`` names the runs, ``benchmarks/_seeds.py`` aggregates them); resumable the same way:

    python -m benchmarks.accuracy --preset cpu --rows seeds --tune --seeds 0,1,2 --extra-seeds 3,4 --jobs 2
    python -m benchmarks.accuracy --preset cpu --rows seeds --tune --seeds 0,1,2 --extra-seeds 3,4 --report-only
    python -m benchmarks.accuracy --preset cpu --rows seeds --tune --seeds 0,1,2 --extra-seeds 3,4 --collect DIR

Every finished run of the sweep is kept in ``benchmarks/results/accuracy_<preset>_runs/`` (commit it): a fresh clone
resumes from there and ``--report-only`` rebuilds the report from it alone; ``--collect DIR`` copies the finished
runs of another runs folder (another checkout's ``runs/benchmarks/accuracy-cpu``) into it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks import _measure

from benchmarks import _seeds, _sweep, _tradeoff, _tuning
from examples.clip_cl import CHECKPOINT_NAME, parse_args as parse_clip_cl_args

CLIP_CL = ("-m", "examples.clip_cl")
"""How each row runs the example: ``python -m examples.clip_cl ...`` in the repository root."""
TINY_CHECKPOINT = _measure.REPO_ROOT / "examples" / "checkpoints" / "tiny_clip.pt"
DEFAULT_DATA_ROOT = _measure.REPO_ROOT.parent / "shared" / "data"

PRESET_DEPTH = {"smoke": 8, "cpu": 8, "paper": 12}
"""Blocks per tower of each preset's model (tiny CLIP: 8; ViT-B/16: 12), for Prefix/Suffix = half."""

PRESET_PLACEMENT_RESET = {"smoke": ("--zo-layers", "all", "--no-mozo")}
"""Flags that undo a preset's own ZO placement (smoke: MoZO on hop-odd layers), so each row's flags say it all."""

BRANCHES = {"dual": "Dual", "vision": "Vision", "language": "Language"}
LAYERS = {"hop-odd": "Hop-odd", "hop-even": "Hop-even", "prefix": "Prefix", "suffix": "Suffix"}


@dataclass(frozen=True)
class Row:
    """One run of ``clip_cl.py``.

    Attributes:
        name: Folder of the run and key in the tables.
        label: What the row is, in the paper's words.
        flags: ``clip_cl.py`` flags on top of ``--preset``; ``{half}`` is replaced by half the model's depth.
        paper: The paper's (Last, Avg) on CIFAR-100 Inc10, if it reports the row.
        baseline: The FO baseline of the same adapter and classifier (itself for a baseline): what the
            multi-seed report's paired differences and a ZO row's fixed FO learning rate come from.
    """

    name: str
    label: str
    flags: Tuple[str, ...]
    paper: Optional[Tuple[float, float]] = None
    baseline: str = "moe-fo"

    def display(self, preset: str) -> str:
        """``label`` with ``{half}`` filled in for ``preset``."""
        return self.label.replace("{half}", str(PRESET_DEPTH[preset] // 2))

    def arguments(self, preset: str) -> List[str]:
        """``clip_cl.py`` arguments of this row under ``preset``."""
        half = str(PRESET_DEPTH[preset] // 2)
        return ["--preset", preset, *PRESET_PLACEMENT_RESET.get(preset, ()),
                *(flag.replace("{half}", half) for flag in self.flags)]


def _rows() -> Dict[str, Row]:
    rows: List[Row] = []
    conservative = ("--conservative",)
    table1 = {
        # (adapter, branch): paper CIFAR Inc10 (Last, Avg), Table 1
        ("moe", "none"): (77.52, 85.21), ("moe", "dual"): (67.64, 75.88),
        ("moe", "vision"): (72.98, 82.08), ("moe", "language"): (76.74, 85.03),
        ("lora", "none"): (79.66, 86.34), ("lora", "dual"): (69.70, 76.82),
        ("lora", "vision"): (73.73, 82.25), ("lora", "language"): (79.63, 87.01),
    }
    for (adapter, branch), paper in table1.items():
        dagger = "\u2020" if adapter == "lora" else ""
        if branch == "none":
            rows.append(Row(f"{adapter}-fo", f"Baseline{dagger} (FO)", ("--adapter", adapter, "--zo-branch", "none"),
                            paper, baseline=f"{adapter}-fo"))
        else:
            rows.append(Row(f"{adapter}-{branch}", f"{BRANCHES[branch]} w/ ZO{dagger}",
                            ("--adapter", adapter, "--zo-branch", branch, *conservative), paper,
                            baseline=f"{adapter}-fo"))
    table2 = {
        "dual": [(79.22, 86.98), (79.12, 86.81), (76.53, 84.77), (78.03, 86.63)],
        "vision": [(79.39, 86.96), (78.95, 86.74), (76.72, 84.85), (79.23, 87.03)],
        "language": [(79.28, 87.05), (78.73, 86.27), (79.07, 86.83), (78.82, 86.71)],
    }
    layer_flags = {"hop-odd": "hop-odd", "hop-even": "hop-even", "prefix": "prefix:{half}", "suffix": "suffix:{half}"}
    for branch, papers in table2.items():
        for (key, layers), paper in zip(layer_flags.items(), papers):
            shown = LAYERS[key] + (" ({half})" if key in ("prefix", "suffix") else "")
            rows.append(Row(f"moe-{branch}-{key}", f"{BRANCHES[branch]} w/ {shown}",
                            ("--adapter", "moe", "--zo-branch", branch, "--zo-layers", layers, *conservative), paper))
    for layers, paper in (("hop-odd", (79.36, 87.02)), ("hop-even", (79.87, 87.25))):
        rows.append(Row(f"mozo-dual-{layers}", f"MoZO, Dual w/ {LAYERS[layers]}",
                        ("--adapter", "moe", "--zo-branch", "dual", "--zo-layers", layers, "--mozo"), paper))
    table4 = {"dual": ((66.67, 75.08), (66.68, 77.20)), "vision": ((72.32, 81.64), (73.34, 83.47)),
              "language": ((76.19, 84.58), (78.52, 85.91))}
    for branch, (naive, sign) in table4.items():
        base = ("--adapter", "moe", "--zo-branch", branch, "--no-conservative")
        rows.append(Row(f"zostar-{branch}", f"{BRANCHES[branch]} w/ ZO, ZO*", base, naive))
        rows.append(Row(f"sign-{branch}", f"{BRANCHES[branch]} w/ ZO, Sign", (*base, "--sign", "coordinate"), sign))
    zofc = ("--adapter", "parallel", "--classifier", "linear", "--queries", "4")
    rows.append(Row("zofc", "ZO-FC: ZO adapter (q=4), FO linear head", (*zofc, "--zo-branch", "vision"),
                    baseline="zofc-fo"))
    rows.append(Row("zofc-fo", "ZO-FC model, all FO", (*zofc, "--zo-branch", "none"), baseline="zofc-fo"))
    return {row.name: row for row in rows}


ROWS = _rows()


@dataclass(frozen=True)
class Table:
    """A paper table: its rows, the row every Δ is taken against (``None``: each row's own baseline), a caption."""

    key: str
    title: str
    rows: Tuple[str, ...]
    baseline: Optional[str]
    caption: str


TABLES: Dict[str, Table] = {
    "table1": Table("table1", "Table 1: ZO per branch (MoE adapters; LoRA marked \u2020)",
                    ("moe-fo", "moe-dual", "moe-vision", "moe-language",
                     "lora-fo", "lora-dual", "lora-vision", "lora-language"), "moe-fo",
                    "ZO rows use ZO-SGD-Cons; \u0394 is against the FO baseline of the same adapter."),
    "table2": Table("table2", "Table 2: ZO per layer",
                    tuple(n for b in BRANCHES for n in (f"moe-{b}", *(f"moe-{b}-{k}" for k in LAYERS))), "moe-fo",
                    "Prefix/Suffix cover half the blocks of each tower (six of 12 on ViT-B/16, four of 8 on the "
                    "tiny CLIP). \u0394 is against the FO baseline."),
    "table3": Table("table3", "Table 3: MoZO", ("moe-dual-hop-odd", "mozo-dual-hop-odd", "moe-dual-hop-even",
                                      "mozo-dual-hop-even"), "moe-fo",
                    "MoZO = element-wise sign of the ZO estimate + conservative selection + vision eps halved. "
                    "\u0394 is against the FO baseline."),
    "table4": Table("table4", "Table 4: ZO strategies",
                    tuple(n for b in BRANCHES for n in (f"zostar-{b}", f"sign-{b}", f"moe-{b}")), "moe-fo",
                    "ZO* = ZO-SGD (no candidate check), Sign = ZO* with element-wise sign, and the conservative "
                    "ZO of Table 1 (paper: Table 1's numbers). \u0394 is against the FO baseline."),
    "zofc": Table("zofc", "ZO-FC", ("zofc-fo", "zofc"), "zofc-fo",
                  "Parallel rank-5 adapter in the first 5 vision blocks and a linear head growing per task; the "
                  "ZO-FC summary gives no CIFAR Inc10 numbers for this protocol."),
}


COMPARED = ("moe-fo", "mozo-dual-hop-odd", "mozo-dual-hop-even", "moe-vision")
"""The rows the README compares: ``--extra-seeds`` runs them (default) with more seeds."""

SETS: Dict[str, Table] = {
    "seeds": Table("seeds", "Rows over seeds", ("moe-fo", "moe-dual", "moe-vision", "moe-language",
                                               "mozo-dual-hop-odd", "mozo-dual-hop-even", "zofc-fo", "zofc"), None,
                   "Table 1's MoE rows, MoZO on Dual Hop-odd / Hop-even, ZO-FC and its setting all FO: the rows the "
                   "README compares over seeds. \u0394 is against the FO baseline of the same adapter."),
}
"""Named selections of rows beyond the paper tables (``--rows seeds``); not in the default selection."""


# --------------------------------------------------------------------------------------------------- runs


def clip_cl_command(arguments: Sequence[str], out: Path, data_root: Path, extra: Sequence[str],
                    threads: Optional[int]) -> List[str]:
    """The ``clip_cl.py`` command of one run writing to ``out``."""
    command = [sys.executable, *CLIP_CL, *arguments, "--data-root", str(data_root), "--out", str(out),
               "--no-progress", *extra]
    return command + (["--threads", str(threads)] if threads is not None else [])


def resumable(command: Sequence[str], out: Path) -> List[str]:
    """``command``, with ``--resume`` if ``out`` holds the checkpoint of an interrupted run (see
    ``examples/resume.py``), so that it goes on from its last finished task."""
    return [*command, "--resume"] if (out / CHECKPOINT_NAME).is_file() else list(command)


def execute(command: Sequence[str], out: Path) -> Tuple[bool, str]:
    """Run ``command`` with its output in ``out/log.txt`` (appended to when it resumes); returns (succeeded,
    status line)."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "log.txt", "a" if "--resume" in command else "w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=_measure.REPO_ROOT)
    minutes = (time.perf_counter() - start) / 60
    if done.returncode != 0:
        return False, f"FAILED ({done.returncode}) after {minutes:.1f} min, see {out / 'log.txt'}"
    return True, f"ran in {minutes:.1f} min"


def run_row(row: Row, preset: str, runs_dir: Path, data_root: Path, extra: Sequence[str],
            threads: Optional[int]) -> Tuple[str, str]:
    """Run one row unless its ``results.json`` exists; returns (row name, status)."""
    out = runs_dir / row.name
    if (out / "results.json").is_file():
        return row.name, "kept (results.json exists)"
    return row.name, execute(resumable(clip_cl_command(row.arguments(preset), out, data_root, extra, threads), out),
                             out)[1]


def load_results(runs_dir: Path) -> Dict[str, Dict[str, Any]]:
    """``results.json`` of every row that has one."""
    results = {}
    for name in ROWS:
        path = runs_dir / name / "results.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    return results


# ------------------------------------------------------------------------------------------------- report


def _cell(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _baseline_of(table: Table, name: str) -> str:
    """The row Δ of ``name`` is taken against in ``table``: the table's baseline, LoRA rows' own FO baseline in a
    MoE table, or the row's own baseline in a table without one."""
    if table.baseline is None or (ROWS[name].baseline == "lora-fo" and table.baseline == "moe-fo"):
        return ROWS[name].baseline
    return table.baseline


def table_markdown(table: Table, results: Dict[str, Dict[str, Any]], preset: str) -> str:
    """Our Last/Avg (and Δ against the table's baseline) next to the paper's, one line per row."""
    lines = []
    for name in table.rows:
        row = ROWS[name]
        baseline_name = _baseline_of(table, name)
        baseline = results.get(baseline_name)
        label = row.display(preset)
        paper_last, paper_avg = row.paper if row.paper else (None, None)
        paper_baseline = ROWS[baseline_name].paper
        paper_delta = paper_last - paper_baseline[0] if row.paper and paper_baseline else None
        r = results.get(name)
        if r is None:
            lines.append([label, "not run", "", "", "", _cell(paper_last), _cell(paper_avg),
                          _cell(paper_delta, True), "", "", ""])
            continue
        delta = r["last"] - baseline["last"] if baseline else None
        steps = max(r["steps"], 1)
        lines.append([label, _cell(r["last"]), _cell(r["avg"]), _cell(delta, True), _cell(r["forgetting"]),
                      _cell(paper_last), _cell(paper_avg), _cell(paper_delta, True),
                      f"{r['forward_passes'] / steps:.1f} / {r['backward_passes'] / steps:.1f}",
                      f"{r['train_time_s'] / 60:.1f}", f"{r['peak_memory_mib']:.0f}"])
    headers = ["row", "Last", "Avg", "\u0394 Last", "forgetting", "paper Last", "paper Avg", "paper \u0394 Last",
               "fwd / bwd per step", "train (min)", "peak mem (MiB)"]
    return _measure.markdown_table(headers, lines)


def plot_table(table: Table, results: Dict[str, Dict[str, Any]], path: Path, preset: str) -> Optional[Path]:
    """Accuracy on all seen classes after each task, one line per row of the table that has results."""
    present = [name for name in table.rows if name in results]
    if not present:
        return None
    if table.baseline is not None and table.baseline in results and table.baseline not in present:
        present.insert(0, table.baseline)  # every Δ is against it, so show it too
    figure, (axes,) = _measure.figure()
    others = [name for name in present if name != table.baseline]
    styles = {name: {"color": color, "linestyle": ("-", "-.")[index % 2]}
              for index, (name, color) in enumerate(zip(others, _measure.palette(len(others))))}
    if table.baseline is not None:
        styles[table.baseline] = {"color": "black", "linestyle": "--", "linewidth": 1.8}
    tasks = 0
    for name in present:
        seen = results[name]["seen_acc"]
        tasks = max(tasks, len(seen))
        axes.plot(range(1, len(seen) + 1), seen, marker="o", markersize=3, label=ROWS[name].display(preset),
                  **styles[name])
    axes.set_xticks(range(1, tasks + 1))
    axes.set_xlabel("task")
    axes.set_ylabel("accuracy on all seen classes (%)")
    axes.set_title(f"{table.title} ({preset} preset)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    figure.tight_layout()
    return _measure.save_figure(figure, path)


def write_report(results: Dict[str, Dict[str, Any]], tables: Sequence[Table], args: argparse.Namespace,
                 info: Dict[str, Any], statuses: Dict[str, str], argv: Optional[Sequence[str]]) -> str:
    """Markdown with one table (and plot) per selected paper table."""
    any_result = next(iter(results.values()), None)
    setting = ""
    if any_result is not None:
        config = any_result["config"]
        setting = (f"- Setting (from the runs): `{config.get('model')}` on {config.get('dataset')}, "
                   f"{len(any_result['tasks'])} tasks x {config.get('classes_per_task')} classes from class position "
                   f"{config.get('first_class')}, {config.get('epochs')} epoch(s) per task, batch "
                   f"{config.get('batch_size')}, FO lr {config.get('lr')} ({config.get('fo_rule')}), ZO lr "
                   f"{config.get('zo_lr') or config.get('lr')} ({config.get('zo_rule')}), eps "
                   f"{config.get('eps_language')}, seed {config.get('seed')}, prompts of seen classes "
                   f"{'frozen at the end of their task' if config.get('freeze_seen_prompts') else 're-encoded'}. "
                   "Full configs in each row's "
                   "results.json.")
    lines = [
        f"# Continual-learning accuracy, `{args.preset}` preset",
        "",
        _measure.environment_markdown(info, _measure.command_line("benchmarks.accuracy", argv),
                                      _measure.load_average()),
        f"- Runs: `{_display_path(Path(args.runs_dir))}` (one `examples/clip_cl.py` run per row; the command is in "
        "each row's log.txt).",
    ]
    if setting:
        lines.append(setting)
    lines += [
        "- Last = accuracy on all classes after the last task, Avg = mean over tasks of the accuracy on all "
        "classes seen so far (MoE-Adapters4CL), forgetting = mean drop of each old task from its best; "
        "\u0394 Last = Last minus the table's FO baseline (ours against ours, paper against paper). The paper's "
        "numbers are CIFAR-100 Inc10 with CLIP ViT-B/16 (OpenAI weights); compare the \u0394 columns, not the "
        "absolute accuracies, when the model differs.",
    ]
    if args.report_only:
        lines.append("- Built with `--report-only` from runs made earlier: the machine, versions, date and commit above "
                     "are this report's; each run's own command, versions and checkpoint sha256 are in its "
                     "results.json.")
    if statuses:
        lines += ["", "Rows this invocation touched: " + "; ".join(f"`{k}` {v}" for k, v in statuses.items()) + "."]
    for table in tables:
        plot = plot_table(table, results, args.out.parent / f"{args.out.stem}_{table.key}.png", args.preset)
        lines += ["", f"## {table.title}", "", table.caption, "", table_markdown(table, results, args.preset)]
        if plot is not None:
            lines += ["", f"![{table.title}]({plot.name})"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ tuning and seeds


def make_sweep(args: argparse.Namespace, selected: Sequence[str]) -> _sweep.Sweep:
    """The tuning and seed runs of ``selected`` (plus their FO baselines) that ``args`` asks for."""
    baselines = {name: row.baseline for name, row in ROWS.items()}
    rows = _sweep.with_baselines(selected, baselines)
    return _sweep.Sweep(rows, {name: _sweep.row_kind(ROWS[name].flags) for name in rows}, baselines, args.runs_dir,
                        store=args.out.parent / f"accuracy_{args.preset}_runs", seeds=args.seeds,
                        extra_seeds={name: args.extra_seeds for name in args.extra_rows if name in rows},
                        tune=args.tune, validation_fraction=args.validation_fraction, tune_seed=args.tune_seed,
                        extra=shlex.split(args.clip_args), on_record=commit_record if args.commit else lambda _: None,
                        keep_records=not args.dry_run,
                        row_arguments={name: ROWS[name].arguments(args.preset) for name in rows})


def commit_record(path: Path) -> None:
    """``git commit`` one new record of the sweep (``--commit``) in the checkout it lies in, nothing else staged."""
    for command in (["add", "--", path.name], ["commit", "-q", "-m", f"accuracy sweep: {_display_path(path)}", "--",
                                                path.name]):
        subprocess.run(["git", *command], cwd=path.parent, check=True, capture_output=True)


def _knobs_text(sweep: _sweep.Sweep, name: str) -> str:
    if not sweep.tune:
        return "preset defaults"
    knobs = sweep.knobs(name)
    if knobs is None:
        return "tuning incomplete"
    return ", ".join(f"{_tuning.KNOB_FLAGS[key]} {value:g}" for key, value in knobs.items())


def reproduce_command(sweep: _sweep.Sweep, name: str, seed: int, threads: Optional[int]) -> Optional[str]:
    """The ``clip_cl.py`` command that repeats ``name``'s run with ``seed`` bit for bit (see the report's
    conditions); ``None`` while its knobs are not chosen."""
    knobs = sweep.knobs(name)
    if knobs is None:
        return None
    run = sweep.seed_run(name, seed, knobs)
    result = sweep.results.get(run.key)
    if result is not None and "numerics" in result:
        threads = result["numerics"]["torch_threads"]
    arguments = [*run.arguments, *(["--threads", str(threads)] if threads else [])]
    return "python -m examples.clip_cl " + shlex.join(arguments)


def _display_path(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it."""
    try:
        return path.resolve().relative_to(_measure.REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _duration(seconds: float) -> str:
    """``40 min`` below an hour and a half, else ``2.5 h``."""
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def progress_text(finished: int, planned: int, run_times_s: Sequence[float]) -> str:
    """How far the sweep is, and how long the rest takes at the median time of the runs finished so far."""
    if finished >= planned:
        return f"Progress: all {planned} runs finished."
    text = f"Progress: {finished} of {planned} runs finished (a grid extension would add more)"
    if not run_times_s:
        return text + "."
    median_s = statistics.median(run_times_s)
    rest = planned - finished
    # Two lanes finish the rest in ceil(rest / 2) run times, as far as the search lets two runs start at once.
    return (text + f"; the other {rest} take about {_duration(rest * median_s)} of run time at the median so far "
            f"({median_s / 60:.0f} min a run, each at the thread count it ran with), "
            f"{_duration(-(-rest // 2) * median_s)} with `--jobs 2`.")


def eps_inert(arguments: Sequence[str]) -> bool:
    """Whether eps changes the ZO steps of a ``clip_cl.py`` run only through rounding: a signed
    estimate, one query and conservative selection (docs/estimators.md)."""
    resolved = parse_clip_cl_args(arguments)
    return (resolved.zo_branch != "none" and resolved.sign != "none" and resolved.conservative
            and resolved.queries == 1)


def seeds_report(sweep: _sweep.Sweep, args: argparse.Namespace, info: Dict[str, Any], statuses: Dict[str, str],
                 argv: Optional[Sequence[str]], threads: Optional[int]) -> Tuple[str, Dict[str, Any]]:
    """Markdown and JSON of a multi-seed sweep: results over seeds with paired intervals, per-seed values, the
    tuning search and the commands that repeat each row."""
    labels = {name: ROWS[name].display(args.preset) for name in ROWS}
    order = list(sweep.rows)
    summary = _seeds.summarize(sweep.seed_results(), sweep.baselines)
    knobs = {name: _knobs_text(sweep, name) for name in order}
    tuning = {name: sweep.tuning_record(name) for name in order} if sweep.tune else {}
    grid = _tuning.GRID
    seeds_text = ", ".join(str(seed) for seed in sweep.seeds) or "none"
    if sweep.extra_seeds:
        more = sorted({seed for seeds in sweep.extra_seeds.values() for seed in seeds})
        seeds_text += (f"; also {', '.join(map(str, more))} for "
                       + "; ".join(labels[name] for name in sweep.extra_seeds) + "; and their FO baseline")
    lines = [
        f"# Continual-learning accuracy over seeds, `{args.preset}` preset",
        "",
        _measure.environment_markdown(info, _measure.command_line("benchmarks.accuracy", argv),
                                      _measure.load_average()),
        f"- Runs: `{_display_path(Path(args.runs_dir))}` "
        f"(`tuning/<row>/<knobs>/`, `{'seeds' if sweep.tune else 'seeds-untuned'}/<row>/"
        "seed<k>/`; each folder's log.txt has the command, results.json the config, versions, checkpoint sha256 "
        f"and numerics); every finished run is committed as `{_display_path(sweep.store)}/<run>.json` (the same "
        "fields without the per-step losses, with the commit that ran it), which is all this report reads.",
        f"- Seeds {seeds_text}: every row once per seed (`clip_cl.py --seed k`: data order, augmentation, routing "
        "noise and ZO directions), trained on the whole training set and evaluated on the test set. Mean \u00b1 "
        "sample standard deviation (n\u22121) over seeds.",
        "- \u0394 = row minus the FO baseline of the same adapter, paired by seed (same data order and "
        f"augmentation), mean with a 95% Student-t interval, mean \u00b1 t\u00b7s/\u221an ({_seeds.t_note(summary)}). "
        "An interval that includes 0 establishes no difference.",
    ]
    if sweep.tune:
        fo_runs, zo_runs = grid.budget
        lines.append(
            f"- Knobs tuned on a validation split, never the test set: {sweep.validation_fraction:g} of each "
            "class's training images held out (split seed fixed, independent of the training seed), the rest "
            f"trained on, tuning seed {sweep.tune_seed}. FO rows: `--lr` in {list(grid.fo_lr)} ({fo_runs} runs). "
            f"ZO rows: `--lr` fixed at their FO baseline's choice; `--zo-lr` in {list(grid.zo_lr)} at "
            f"`--eps-language` {grid.default_eps:g}, then `--eps-language` in {list(grid.eps)} at the best ZO lr "
            f"({zo_runs} runs; the vision eps follows as in clip_cl.py, half with `--mozo`). A search whose best "
            f"value is on the edge of what it tried goes one step further (x{grid.fo_step:g} for `--lr`, "
            f"x{grid.zo_step:g} for the ZO knobs), at most {grid.max_extensions} values per knob. Choice: highest "
            "validation Last, ties by Avg.")
    else:
        lines.append("- Not tuned: every row with its preset's learning rate and eps (`--zo-lr` = `--lr`).")
    if args.report_only:
        lines.append("- Built with `--report-only` from runs made earlier: machine, versions, date and commit above "
                     "are this report's; each run's own are in its results.json.")
    finished, planned, run_times = sweep.progress()
    lines.append("- " + progress_text(finished, planned, run_times))
    if statuses:
        failed = {key: status for key, status in statuses.items() if status.startswith("FAILED")}
        lines.append(f"- This invocation ran {len(statuses)} runs" + (f"; failed: {failed}" if failed else "") + ".")
    lines += ["", "## Results", "", _seeds.results_table(summary, order, labels, knobs), ""]
    lines += [f"- {sentence}" for sentence in _seeds.findings(summary, order, labels)]
    plot = _seeds.plot_seeds(summary, order, labels, args.out.with_suffix(".png"),
                             f"{args.preset} preset, seeds {seeds_text}")
    if plot is not None:
        lines += ["", f"![accuracy over seeds]({plot.name})"]
    if summary:
        lines += ["", "## Per seed", "", _seeds.per_seed_table(summary, order, labels)]
    if tuning:
        lines += ["", "## Tuning on the validation split", "",
                  "Validation Last / Avg of every tuning run (accuracy on held-out training images of the seen "
                  "classes), in the order the search named them; the chosen run is marked, with the knobs still on "
                  "the edge of what was tried after extending the grid, where the best value may lie outside it.", "", _seeds.tuning_table(tuning, order, labels)]
        signed = [labels[name] for name in tuning if eps_inert(ROWS[name].arguments(args.preset))]
        if signed:
            lines += ["", f"{'; '.join(signed)}: a signed estimate, one query and conservative selection (`--mozo`), "
                      "a step that eps changes only through rounding (docs/estimators.md, \"eps with a signed "
                      "estimate and conservative selection\"), so their eps runs differ as runs with different "
                      "seeds do, and the eps chosen is one such draw."]
    commands = {name: reproduce_command(sweep, name, (sweep.seeds or [0])[0], threads) for name in order}
    rows = {name: {"label": labels[name], **summary[name]} for name in order if name in summary}
    tradeoff = _tradeoff.plot(rows, args.out.parent / f"{args.out.stem}_tradeoff.png",
                              f"{args.preset} preset, seeds {seeds_text}")
    if tradeoff is not None:
        lines += ["", "## Memory against accuracy", "", _tradeoff.CAPTION, "", f"![memory against accuracy]({tradeoff.name})"]
    lines += ["", "## Reproducing a run", "",
              "Each command repeats that row's run bit for bit (losses and accuracy matrix) given the same "
              "checkpoint, torch and open_clip versions, thread count and CPU kernel path (results.json: "
              "`checkpoint_sha256`, `versions`, `numerics`); change `--seed` for the other seeds. Other thread counts "
              "or CPUs round differently and part after a few steps (benchmarks/README.md, Reproducibility).", "",
              "```bash", *(f"{command}  # {labels[name]}" for name, command in commands.items() if command), "```"]
    # Relative paths whether a run was read from its results.json or its record: the committed report names no
    # folder of the machine that built it.
    every_run = {run.name: _sweep.relative_command(sweep.results[run.key]["command"], _measure.REPO_ROOT)
                 for run in sweep.named_runs() if run.key in sweep.results}
    lines += ["", "## Every run", "", "The command each finished run recorded (its `results.json`), paths relative "
              "to the repository.",
              "", "<details><summary>" + f"{len(every_run)} runs</summary>", "", "```bash",
              *(f"{command}  # {name}" for name, command in every_run.items()), "```", "", "</details>"]
    record = {
        "environment": info,
        "method": {"seeds": list(sweep.seeds), "tuned": sweep.tune, "validation_fraction": sweep.validation_fraction,
                   "tune_seed": sweep.tune_seed, "grid": grid.to_dict() if sweep.tune else None,
                   "confidence": 0.95, "std": "sample (n-1)"},
        "tuning": tuning,
        "progress": {"finished_runs": finished, "planned_runs": planned},
        "runs": every_run,
        "rows": {name: {"label": labels[name], "knobs": sweep.knobs(name), "command": commands[name],
                        **summary[name]} for name in order if name in summary},
    }
    return "\n".join(lines) + "\n", record


def run_sweep(args: argparse.Namespace, selected: Sequence[str], threads: Optional[int],
              argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``--tune`` and/or ``--seeds``: run what is missing (unless ``--report-only``), write the multi-seed report."""
    sweep = make_sweep(args, selected)
    if args.dry_run:
        for run in sweep.pending():
            print(shlex.join(clip_cl_command(run.arguments, run.out, args.data_root, (), threads)))
        print("(later tuning coordinates and tuned seed runs are named once the runs they depend on finish)")
        return {}
    info = _measure.environment()
    statuses: Dict[str, str] = {}
    if args.report_only:
        sweep.load_finished()
    else:
        def start(run: _sweep.Run) -> Tuple[bool, str]:
            return execute(resumable(clip_cl_command(run.arguments, run.out, args.data_root, (), threads), run.out),
                           run.out)

        statuses = sweep.execute(start, args.jobs, report=lambda run, status: print(f"{run.out}: {status}",
                                                                                     flush=True))
    report, record = seeds_report(sweep, args, info, statuses, argv, threads)
    _measure.write_text(args.out, report)
    _measure.write_text(args.out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print(report)
    return record


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """Run the selected rows (skipping finished ones) and write the tables, plots and a JSON summary."""
    parser = _measure.script_parser("accuracy", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESET_DEPTH),
                        help="examples/clip_cl.py preset: cpu (tiny CLIP, 2 CPU cores), paper (ViT-B/16, a GPU), "
                             "smoke (seconds)")
    parser.add_argument("--smoke", action="store_true", help="shorthand for --preset smoke --only moe-language")
    parser.add_argument("--rows", type=_measure.split_list, default=list(TABLES),
                        help=f"comma-separated tables to run and report: {', '.join(TABLES)}; or a named set: "
                             f"{', '.join(SETS)} (default: every table)")
    parser.add_argument("--only", type=_measure.split_list, default=None,
                        help="comma-separated row names to run (default: every row of --rows)")
    parser.add_argument("--jobs", type=int, default=1, help="rows run in parallel")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: 1 when --jobs > 1, else torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the single-seed tables")
    parser.add_argument("--seeds", type=_measure.int_list, default=[],
                        help="comma-separated seeds, e.g. 0,1,2: run every selected row (and its FO baseline) once "
                             "per seed and write the multi-seed report (mean +/- std, paired 95%% intervals)")
    parser.add_argument("--extra-seeds", type=_measure.int_list, default=[],
                        help="more seeds, e.g. 3,4, for the rows of --extra-rows (and their FO baseline) only")
    parser.add_argument("--extra-rows", type=_measure.split_list, default=list(COMPARED),
                        help=f"rows that get --extra-seeds (default: the compared rows, {','.join(COMPARED)})")
    parser.add_argument("--tune", action="store_true",
                        help="tune each selected row's knobs on a validation split first (--lr of FO rows; --zo-lr, "
                             "then --eps-language of ZO rows; same number of runs) and run --seeds with the choice")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="--tune: share of each class's training images held out for validation")
    parser.add_argument("--tune-seed", type=int, default=0, help="--tune: training seed of the tuning runs")
    parser.add_argument("--clip-args", default="", help="extra flags for every clip_cl.py run, e.g. "
                                                        "'--max-steps-per-task 10'")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="where the runs go (default: runs/benchmarks/accuracy-<preset>)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report (default: benchmarks/results/accuracy_<preset>.md, or "
                             "accuracy_<preset>_seeds.md with --seeds/--tune)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the tables from the results already in --runs-dir")
    parser.add_argument("--collect", type=Path, default=None, metavar="RUNS_DIR",
                        help="--tune/--seeds: copy the finished runs of RUNS_DIR (another checkout's runs folder) "
                             "into the committed records, then write the report; runs nothing")
    parser.add_argument("--commit", action="store_true",
                        help="--tune/--seeds: git commit each run's record as soon as it is written")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.only = "smoke", ["moe-language"]
    if args.list:
        for row in ROWS.values():
            print(f"{row.name:>22}  {row.display(args.preset):<40} {' '.join(row.arguments(args.preset))}")
        return {}
    if args.collect is not None:
        args.runs_dir, args.report_only = args.collect, True
    unknown = ((set(args.rows) - TABLES.keys() - SETS.keys()) | (set(args.only or ()) - ROWS.keys())
               | (set(args.extra_rows) - ROWS.keys()))
    if unknown:
        parser.error(f"unknown tables or rows: {sorted(unknown)} (see --list)")
    if not 0.0 < args.validation_fraction < 1.0:
        parser.error(f"--validation-fraction must lie in (0, 1), got {args.validation_fraction}")
    multi_seed = bool(args.seeds) or bool(args.extra_seeds) or args.tune
    args.runs_dir = args.runs_dir or _measure.REPO_ROOT / "runs" / "benchmarks" / f"accuracy-{args.preset}"
    args.out = args.out or _measure.RESULTS_DIR / f"accuracy_{args.preset}{'_seeds' if multi_seed else ''}.md"
    all_tables = {**TABLES, **SETS}
    tables = [key for key in all_tables if key in args.rows]
    selected = args.only or list(dict.fromkeys(name for key in tables for name in all_tables[key].rows))
    threads = args.threads if args.threads is not None else (1 if args.jobs > 1 else None)
    if multi_seed:
        if (args.preset in ("cpu", "smoke") and not args.report_only and not args.dry_run
                and not TINY_CHECKPOINT.is_file()):
            raise SystemExit(f"{TINY_CHECKPOINT} is missing; create it with `python -m examples.tiny_clip pretrain`")
        try:
            return run_sweep(args, selected, threads, argv)
        except _sweep.StaleRunError as error:
            raise SystemExit(str(error)) from error
    extra = ["--seed", str(args.seed), *shlex.split(args.clip_args)]

    if args.dry_run:
        for name in selected:
            print(shlex.join([sys.executable, *CLIP_CL, *ROWS[name].arguments(args.preset),
                              "--out", str(args.runs_dir / name), *extra]))
        return {}
    if args.report_only:
        selected = []
    elif args.preset in ("cpu", "smoke") and not TINY_CHECKPOINT.is_file():
        raise SystemExit(f"{TINY_CHECKPOINT} is missing; create it with `python -m examples.tiny_clip pretrain`")
    if selected and not (args.data_root / "cifar-100-python").is_dir():
        raise SystemExit(f"CIFAR-100 not found under {args.data_root} (expected cifar-100-python/)")

    info = _measure.environment()
    statuses: Dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for name, status in pool.map(lambda n: run_row(ROWS[n], args.preset, args.runs_dir, args.data_root,
                                                       extra, threads), selected):
            statuses[name] = status
            print(f"{name}: {status}", flush=True)
    results = load_results(args.runs_dir)
    sections = [all_tables[key] for key in tables]
    if args.smoke:
        sections = [Table("runs", "Smoke run", tuple(selected), "moe-fo",
                          "The examples' smoke preset: a few steps on 2 tasks of 5 classes; checks the pipeline "
                          "only.")]
    report = write_report(results, sections, args, info, statuses, argv)
    _measure.write_text(args.out, report)
    summary = {name: {key: r[key] for key in ("last", "avg", "forgetting", "seen_acc", "acc_matrix", "steps",
                                              "forward_passes", "backward_passes", "train_time_s", "wall_time_s",
                                              "peak_memory_mib", "peak_memory_kind", "command")}
               for name, r in results.items()}
    _measure.write_text(args.out.with_suffix(".json"),
                        json.dumps({"environment": info, "rows": summary}, indent=1) + "\n")
    print(report)
    return results


if __name__ == "__main__":
    main()
