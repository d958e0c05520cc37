"""The multi-seed sweep of ``accuracy.py``: which runs tuning and seeds need, which are done, in what order.

A :class:`Sweep` names every run of ``examples/clip_cl.py`` it needs as a :class:`Run` (a folder, the flags on
top of the row's, and the config values its ``results.json`` must show), loads the runs already finished, and
hands out the runs that can start now: a row's tuning runs once its FO baseline has chosen its learning rate
(ZO rows keep it fixed), its second tuning coordinate once the first is scored, its seeds once its knobs are
chosen. Folders:

* ``<runs-dir>/tuning/<row>/<knobs>/``: tuning runs, on the validation split, with the tuning seed;
* ``<runs-dir>/seeds/<row>/seed<k>/`` (``seeds-untuned/`` without tuning): one test-set run per seed.

Each finished run is also kept as a small JSON record in the committed store, ``<store>/<run name>.json``
(``benchmarks/results/accuracy_<preset>_runs/tuning/<row>/<knobs>.json``, ``.../seeds/<row>/seed<k>.json``): the
fields of its ``results.json`` the reports read, its command and the commit that ran it, without the per-step
losses (a mean per task instead). A run with a ``results.json`` or a record is done and is not run again, so a fresh
clone resumes where the committed records stop and rebuilds the reports from them alone; a run made with other
``clip_cl.py`` arguments (another knob value, seed, split, row definition or ``--clip-args``) stops the sweep with
:class:`StaleRunError` instead of being overwritten.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from benchmarks import _tuning


class StaleRunError(RuntimeError):
    """A finished run's config does not match the run the sweep needs in that folder."""


@dataclass(frozen=True)
class Run:
    """One ``clip_cl.py`` process of the sweep.

    Attributes:
        row: Row name.
        flags: ``clip_cl.py`` flags on top of the row's own (knobs, ``--seed``, ``--validation-fraction``).
        expected: Config values its ``results.json`` must show (checked on resume).
        name: Unique name, its path below the runs folder and the store: ``tuning/<row>/<knobs>``,
            ``seeds/<row>/seed<k>``.
        out: Its folder, where ``clip_cl.py`` writes ``results.json``.
        record: Its committed record (``None``: the sweep keeps none).
        arguments: All its ``clip_cl.py`` arguments except where it reads and writes (``--data-root``, ``--out``,
            ``--no-progress``, ``--threads``): the row's, ``flags`` and the sweep's extra arguments.
    """

    row: str
    flags: Tuple[str, ...]
    expected: Tuple[Tuple[str, Any], ...]
    name: str
    out: Path
    record: Optional[Path] = None
    arguments: Tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Unique name (:attr:`name`)."""
        return self.name


def _same(recorded: Any, wanted: Any) -> bool:
    if isinstance(recorded, (int, float)) and isinstance(wanted, (int, float)) and not isinstance(recorded, bool):
        return math.isclose(recorded, wanted, rel_tol=1e-9, abs_tol=0.0)
    return recorded == wanted


LOCATION_FLAGS = {"--data-root": 1, "--out": 1, "--threads": 1, "--no-progress": 0, "--resume": 0}
"""``clip_cl.py`` flags (and how many values follow) that say where a run reads, writes, how many threads it
uses and whether it went on from a checkpoint, not what it computes: left out when a finished run's command is
compared with the sweep's."""


def recorded_arguments(command: str) -> Tuple[str, ...]:
    """The arguments of a ``results.json`` command (``python examples/clip_cl.py ...``), less :data:`LOCATION_FLAGS`."""
    tokens = shlex.split(command)
    start = next((i for i, token in enumerate(tokens) if token.startswith("--")), len(tokens))
    kept: List[str] = []
    index = start
    while index < len(tokens):
        skip = LOCATION_FLAGS.get(tokens[index])
        if skip is None:
            kept.append(tokens[index])
            index += 1
        else:
            index += 1 + skip
    return tuple(kept)


RECORD_KEYS = ("command", "config", "tasks", "last", "avg", "forgetting", "acc_matrix", "seen_acc", "task_start_steps",
               "steps", "forward_passes", "backward_passes", "zo_choices", "wall_time_s", "train_time_s",
               "peak_memory_mib", "peak_memory_kind", "trainable_parameters", "checkpoint_sha256", "versions",
               "evaluation", "numerics", "resumed_at_task")
"""``results.json`` fields a committed record keeps (the per-step ``losses`` become ``loss_per_task``)."""


def git_checkout(folder: Path) -> Tuple[str, Optional[Path]]:
    """The commit checked out where ``folder`` lies and that checkout's root (``("", None)`` outside one)."""
    done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD", "--show-toplevel"], capture_output=True,
                          text=True)
    if done.returncode != 0:
        return "", None
    commit, root = done.stdout.split()
    return commit, Path(root)


def _relative(path: str, root: Optional[Path]) -> str:
    """``path`` relative to ``root`` if it is absolute (a record names no folder of the machine that ran it)."""
    return os.path.relpath(path, root) if root is not None and os.path.isabs(path) else path


def relative_command(command: str, root: Optional[Path]) -> str:
    """``command`` with the paths of :data:`LOCATION_FLAGS` relative to ``root`` where they are absolute."""
    tokens = shlex.split(command)
    for i in range(1, len(tokens)):
        if LOCATION_FLAGS.get(tokens[i - 1]) == 1 and tokens[i - 1] != "--threads":
            tokens[i] = _relative(tokens[i], root)
    return shlex.join(tokens)


def compact(result: Mapping[str, Any], commit: str, root: Optional[Path] = None) -> Dict[str, Any]:
    """The committed record of a ``results.json``: :data:`RECORD_KEYS`, the mean loss of each task and the commit
    of the checkout that ran it; the paths of :data:`LOCATION_FLAGS` written relative to its ``root``."""
    record = {key: result[key] for key in RECORD_KEYS if key in result}
    if "command" in record:
        record["command"] = relative_command(record["command"], root)
    if isinstance(record.get("config"), dict):
        record["config"] = {key: _relative(value, root) if key in ("data_root", "out") and isinstance(value, str)
                            else value for key, value in record["config"].items()}
    losses, starts = result.get("losses"), result.get("task_start_steps")
    if losses and starts:
        bounds = [*starts, len(losses)]
        record["loss_per_task"] = [sum(losses[a:b]) / max(b - a, 1) for a, b in zip(bounds, bounds[1:])]
    record["commit"] = commit
    return record


def _checked(run: Run, path: Path) -> Dict[str, Any]:
    """``path`` (a ``results.json`` or a record) of ``run``; raises :class:`StaleRunError` if it was run with
    other values."""
    result = json.loads(path.read_text())
    config = result.get("config", {})
    wrong = {key: (config.get(key), wanted) for key, wanted in run.expected if not _same(config.get(key), wanted)}
    if wrong:
        details = ", ".join(f"{key}={got!r} (needed {wanted!r})" for key, (got, wanted) in wrong.items())
        raise StaleRunError(f"{path} was run with {details}; delete it to run it again with this sweep's values")
    recorded = recorded_arguments(result.get("command", ""))
    if recorded != run.arguments:
        raise StaleRunError(f"{path} was run with the arguments {shlex.join(recorded)!r}, this sweep needs "
                            f"{shlex.join(run.arguments)!r}; delete {path} to run it again")
    return result


def finished_result(run: Run) -> Optional[Dict[str, Any]]:
    """The run's ``results.json``, else its committed record, if either exists (see :func:`_checked`); a
    ``results.json`` still being written counts as not there."""
    for path in (run.out / "results.json", run.record):
        if path is not None and path.is_file():
            try:
                return _checked(run, path)
            except json.JSONDecodeError:
                if path == run.record:
                    raise
    return None


@dataclass
class Sweep:
    """Tuning and seed runs of some rows (see the module docstring).

    Attributes:
        rows: Rows to run, baselines included.
        kinds: ``"fo"`` or ``"zo"`` per row (what tuning searches).
        baselines: FO baseline of each row (itself for a baseline).
        runs_dir: Root folder of the runs.
        store: Root folder of the committed records (``None``: none kept).
        seeds: Seeds of the test-set runs (empty: tuning only).
        extra_seeds: More seeds for some rows (and their baselines), e.g. ``{"moe-vision": (3, 4)}``.
        tune: Whether to tune first and run the seeds with the chosen knobs.
        validation_fraction: Share of each class held out for tuning.
        tune_seed: Training seed of the tuning runs.
        grid: Values tuning tries.
        row_arguments: ``clip_cl.py`` arguments of each row (preset and row flags).
        extra: Arguments added to every run (``accuracy.py --clip-args``).
        on_record: Called with the path of each record the sweep writes (e.g. to commit it).
        keep_records: Whether to write records at all (``False`` for a dry run).
    """

    rows: Sequence[str]
    kinds: Mapping[str, str]
    baselines: Mapping[str, str]
    runs_dir: Path
    store: Optional[Path] = None
    seeds: Sequence[int] = ()
    extra_seeds: Mapping[str, Sequence[int]] = field(default_factory=dict)
    tune: bool = False
    validation_fraction: float = 0.1
    tune_seed: int = 0
    grid: _tuning.TuningGrid = _tuning.GRID
    row_arguments: Mapping[str, Sequence[str]] = field(default_factory=dict)
    extra: Sequence[str] = ()
    on_record: Callable[[Path], None] = lambda path: None
    keep_records: bool = True
    results: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """Finished runs' ``results.json`` by :attr:`Run.key`."""
    failed: Dict[str, str] = field(default_factory=dict)
    """Status of failed runs by :attr:`Run.key` (not retried within one invocation)."""

    def _run(self, row: str, flags: Sequence[str], expected: Mapping[str, Any], name: str) -> Run:
        arguments = (*self.row_arguments.get(row, ()), *flags, *self.extra)
        record = None if self.store is None else self.store / f"{name}.json"
        return Run(row, tuple(flags), tuple(expected.items()), name, self.runs_dir / name, record, arguments)

    def save_record(self, run: Run, result: Mapping[str, Any]) -> None:
        """Write ``run``'s committed record from its ``results.json`` unless it exists."""
        if run.record is None or run.record.is_file() or not self.keep_records:
            return
        run.record.parent.mkdir(parents=True, exist_ok=True)
        run.record.write_text(json.dumps(compact(result, *git_checkout(run.out)), indent=1) + "\n")
        self.on_record(run.record)

    # ----------------------------------------------------------------------------------------------- tuning

    def tuning_run(self, row: str, knobs: _tuning.Knobs) -> Run:
        """The tuning run of ``row`` at ``knobs``."""
        expected = {"seed": self.tune_seed, "validation_fraction": self.validation_fraction, **knobs}
        flags = (*_tuning.knob_flags(knobs), "--seed", str(self.tune_seed), "--validation-fraction",
                 f"{self.validation_fraction:g}")
        return self._run(row, flags, expected, f"tuning/{row}/{_tuning.knobs_tag(knobs)}")

    def scores(self, row: str, fo_lr: Optional[float]) -> Dict[str, _tuning.Score]:
        """Validation scores of ``row``'s finished tuning runs (those named so far), keyed by knobs tag."""
        scores: Dict[str, _tuning.Score] = {}
        while True:  # later points are named once earlier ones are scored
            count = len(scores)
            for knobs in _tuning.tuning_points(self.kinds[row], scores, fo_lr, self.grid):
                result = self.results.get(self.tuning_run(row, knobs).key)
                if result is not None:
                    scores[_tuning.knobs_tag(knobs)] = _tuning.Score(result["last"], result["avg"])
            if len(scores) == count:
                return scores

    def fo_lr_for(self, row: str) -> Optional[float]:
        """The FO learning rate a ZO row keeps while tuning: its baseline's choice (``None`` until chosen)."""
        baseline = self.baselines[row]
        choice = self.choice(baseline) if baseline != row else None
        return None if choice is None else choice["lr"]

    def choice(self, row: str) -> Optional[_tuning.Knobs]:
        """The knobs tuning chose for ``row``; ``None`` while its search is incomplete."""
        fo_lr = self.fo_lr_for(row) if self.kinds[row] == "zo" else None
        return _tuning.choose(self.kinds[row], self.scores(row, fo_lr), fo_lr, self.grid)

    def tuning_record(self, row: str) -> Dict[str, Any]:
        """JSON-ready account of ``row``'s search: fixed FO lr, every point named so far with its score, choice."""
        kind = self.kinds[row]
        fo_lr = self.fo_lr_for(row) if kind == "zo" else None
        scores = self.scores(row, fo_lr)
        named, choice = _tuning.search(kind, scores, fo_lr, self.grid)
        points = []
        for knobs in named:
            run = self.tuning_run(row, knobs)
            score = scores.get(_tuning.knobs_tag(knobs))
            points.append({"knobs": knobs, "last": None if score is None else score.last,
                           "avg": None if score is None else score.avg,
                           "status": "done" if score else self.failed.get(run.key, "not run"), "run": run.name})
        return {"kind": kind, "baseline": self.baselines[row], "fixed_fo_lr": fo_lr, "points": points,
                "choice": choice, "edges": _tuning.edges(choice, named, self.grid) if choice else []}

    # ------------------------------------------------------------------------------------------------ seeds

    def seed_run(self, row: str, seed: int, knobs: Mapping[str, float]) -> Run:
        """The test-set run of ``row`` with ``seed`` (and the tuned ``knobs``)."""
        expected = {"seed": seed, "validation_fraction": 0.0, **knobs}
        folder = "seeds" if self.tune else "seeds-untuned"
        return self._run(row, (*_tuning.knob_flags(knobs), "--seed", str(seed)), expected, f"{folder}/{row}/seed{seed}")

    def seeds_of(self, row: str) -> List[int]:
        """Seeds of ``row``'s test-set runs: :attr:`seeds`, and :attr:`extra_seeds` of the row and of the rows
        whose baseline it is (paired intervals need the baseline's runs)."""
        more = [seed for name, seeds in self.extra_seeds.items()
                if name == row or (self.baselines.get(name) == row and name in self.rows) for seed in seeds]
        return list(dict.fromkeys([*self.seeds, *more]))

    def knobs(self, row: str) -> Optional[_tuning.Knobs]:
        """Knobs of ``row``'s seed runs: the tuned ones (``None`` until chosen), or none without tuning."""
        return self.choice(row) if self.tune else {}

    def seed_results(self) -> Dict[str, Dict[int, Dict[str, Any]]]:
        """``results[row][seed]`` of the finished seed runs."""
        out: Dict[str, Dict[int, Dict[str, Any]]] = {}
        for row in self.rows:
            knobs = self.knobs(row)
            if knobs is None:
                continue
            for seed in self.seeds_of(row):
                result = self.results.get(self.seed_run(row, seed, knobs).key)
                if result is not None:
                    out.setdefault(row, {})[seed] = result
        return out

    def progress(self) -> Tuple[int, int, List[float]]:
        """``(finished, planned, run_times_s)``: finished runs, the runs the sweep needs as far as it can tell
        (each row's tuning budget or the points named so far, if more, and its seed runs) and the wall times of
        the finished runs."""
        finished = [run for run in self.named_runs() if run.key in self.results]
        planned = 0
        for row in self.rows:
            if self.tune:
                fo_lr = self.fo_lr_for(row) if self.kinds[row] == "zo" else None
                named = len(_tuning.tuning_points(self.kinds[row], self.scores(row, fo_lr), fo_lr, self.grid))
                planned += max(self.grid.budget[0 if self.kinds[row] == "fo" else 1], named)
            planned += len(self.seeds_of(row))
        times = [float(self.results[run.key]["wall_time_s"]) for run in finished
                 if "wall_time_s" in self.results[run.key]]
        return len(finished), planned, times

    # ------------------------------------------------------------------------------------------- scheduling

    def named_runs(self) -> List[Run]:
        """Every run that can be named now (tuning points known so far, seeds of rows whose knobs are chosen)."""
        runs: List[Run] = []
        for row in self.rows:
            if self.tune:
                fo_lr = self.fo_lr_for(row) if self.kinds[row] == "zo" else None
                runs += [self.tuning_run(row, knobs) for knobs in
                         _tuning.tuning_points(self.kinds[row], self.scores(row, fo_lr), fo_lr, self.grid)]
            knobs = self.knobs(row)
            if knobs is not None:
                runs += [self.seed_run(row, seed, knobs) for seed in self.seeds_of(row)]
        return runs

    def load_finished(self, running: AbstractSet[str] = frozenset()) -> None:
        """Read every nameable run's ``results.json``, until no new run becomes nameable.

        Args:
            running: Keys of runs in progress, whose ``results.json`` may be half written: not read.
        """
        while True:
            new = [run for run in self.named_runs() if run.key not in self.results and run.key not in running]
            loaded = [(run, finished_result(run)) for run in new]
            loaded = [(run, result) for run, result in loaded if result is not None]
            if not loaded:
                return
            for run, result in loaded:
                self.results[run.key] = result
                self.save_record(run, result)

    def pending(self, running: AbstractSet[str] = frozenset()) -> List[Run]:
        """Runs that can start now: named, not finished, not failed, not ``running``."""
        self.load_finished(running)
        return [run for run in self.named_runs()
                if run.key not in self.results and run.key not in self.failed and run.key not in running]

    def execute(self, start: Callable[[Run], Tuple[bool, str]], jobs: int,
                report: Callable[[Run, str], None] = lambda run, status: None) -> Dict[str, str]:
        """Run everything the sweep needs, ``jobs`` at a time, as runs become possible.

        Args:
            start: Runs one :class:`Run` to completion; returns (succeeded, status line).
            jobs: Runs at once.
            report: Called with each run and its status when it ends.

        Returns:
            Status of every run started, by folder.
        """
        statuses: Dict[str, str] = {}
        running: Dict[Future, Run] = {}
        with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
            while True:
                busy = {run.key for run in running.values()}
                for run in self.pending(busy):
                    if len(running) < max(jobs, 1):
                        running[pool.submit(start, run)] = run
                        busy.add(run.key)
                if not running:
                    return statuses
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    run = running.pop(future)
                    succeeded, status = future.result()
                    statuses[run.key] = status
                    if succeeded:
                        result = finished_result(run)
                        if result is None:
                            succeeded, status = False, f"FAILED: no results.json in {run.out}"
                        else:
                            self.results[run.key] = result
                            self.save_record(run, result)
                    if not succeeded:
                        self.failed[run.key] = status
                        statuses[run.key] = status
                    report(run, status)


def row_kind(flags: Sequence[str]) -> str:
    """``"fo"`` for a row with ``--zo-branch none``, else ``"zo"``."""
    flags = list(flags)
    branch = flags[flags.index("--zo-branch") + 1] if "--zo-branch" in flags else "none"
    return "fo" if branch == "none" else "zo"


def with_baselines(rows: Sequence[str], baselines: Mapping[str, str]) -> List[str]:
    """``rows`` plus the FO baselines they are compared with (needed for tuning and paired intervals)."""
    out: List[str] = []
    for row in rows:
        for name in (baselines[row], row):
            if name not in out:
                out.append(name)
    return out

