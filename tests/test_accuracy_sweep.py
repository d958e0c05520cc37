"""accuracy.py --tune / --seeds: the tuning search and choice, resumable runs, and the multi-seed report.

Everything here runs on hand-made results.json files (no training); the runs are simulated by a fake ``start``.
"""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

pytest.importorskip("scipy", reason="the benchmarks extra (pip install -e '.[benchmarks]') installs scipy")
from benchmarks import _sweep, _tuning, accuracy
from benchmarks._stats import paired_interval
from benchmarks._tuning import Score, choose, edges, knobs_tag, tuning_points

REPO_ROOT = Path(__file__).resolve().parents[1]

GRID = _tuning.GRID


def scores_of(points, values) -> Dict[str, Score]:
    return {knobs_tag(point): Score(*value) for point, value in zip(points, values)}


# ------------------------------------------------------------------------------------------ tuning logic


def test_fo_rows_search_the_lr_grid_and_pick_the_best_last_then_avg_then_grid_order():
    points = tuning_points("fo", {})
    assert points == [{"lr": lr} for lr in GRID.fo_lr] and len(points) == _tuning.TUNING_BUDGET
    assert choose("fo", scores_of(points[:4], [(10, 30)] * 4)) is None  # incomplete
    scores = scores_of(points, [(10.0, 30.0), (12.0, 31.0), (12.0, 33.0), (12.0, 33.0), (9.0, 40.0)])
    assert choose("fo", scores) == {"lr": GRID.fo_lr[2]}  # Last ties broken by Avg, then the earlier value
    assert edges({"lr": GRID.fo_lr[2]}, points) == []


def test_a_search_whose_best_is_on_an_edge_goes_one_step_further_up_to_its_limit():
    points = tuning_points("fo", {})
    scores = scores_of(points, [(1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (4.0, 0.0), (5.0, 0.0)])  # best: the largest
    extended = tuning_points("fo", scores)
    assert extended == points + [{"lr": GRID.fo_lr[-1] * 2}] and choose("fo", scores) is None
    scores.update(scores_of(extended[5:], [(4.5, 0.0)]))  # worse: the largest tried value is now interior
    assert choose("fo", scores) == {"lr": GRID.fo_lr[-1]} and edges({"lr": GRID.fo_lr[-1]}, extended) == []
    scores.update(scores_of(extended[5:], [(6.0, 0.0)]))  # better again: one more, then the limit
    again = tuning_points("fo", scores)
    assert again[6:] == [{"lr": GRID.fo_lr[-1] * 4}]
    scores.update(scores_of(again[6:], [(7.0, 0.0)]))
    assert tuning_points("fo", scores) == again and len(again) == len(points) + GRID.max_extensions
    assert choose("fo", scores) == {"lr": GRID.fo_lr[-1] * 4}
    assert edges(choose("fo", scores), again) == ["lr"]  # flagged: the limit stopped the search on the edge
    low = scores_of(points, [(9.0, 0.0), (2.0, 0.0), (3.0, 0.0), (4.0, 0.0), (5.0, 0.0)])
    assert tuning_points("fo", low)[5:] == [{"lr": GRID.fo_lr[0] / 2}]


def test_zo_rows_wait_for_the_fo_lr_then_search_zo_lr_then_eps_at_the_best_zo_lr():
    assert tuning_points("zo", {}, fo_lr=None) == []
    first = tuning_points("zo", {}, fo_lr=0.02)
    assert first == [{"lr": 0.02, "zo_lr": v, "eps_language": GRID.default_eps} for v in GRID.zo_lr]
    scores = scores_of(first, [(5.0, 20.0), (8.0, 21.0), (7.0, 25.0)])
    points = tuning_points("zo", scores, fo_lr=0.02)
    assert points[3:] == [{"lr": 0.02, "zo_lr": GRID.zo_lr[1], "eps_language": eps} for eps in GRID.eps]
    assert len(points) == GRID.budget[1] == GRID.budget[0]  # the same budget as an FO row
    assert choose("zo", scores, fo_lr=0.02) is None
    scores.update(scores_of(points[3:], [(7.5, 20.0), (6.0, 30.0)]))
    assert choose("zo", scores, fo_lr=0.02) == points[1] and edges(points[1], points) == []
    scores.update(scores_of(points[3:], [(8.5, 20.0)]))  # eps 1e-4 best: on the edge, so 1e-5 is tried
    extended = tuning_points("zo", scores, fo_lr=0.02)
    assert extended[5:] == [{"lr": 0.02, "zo_lr": GRID.zo_lr[1], "eps_language": GRID.eps[0] / 10}]
    scores.update(scores_of(extended[5:], [(8.0, 20.0)]))
    assert choose("zo", scores, fo_lr=0.02) == points[3] and edges(points[3], extended) == []
    with pytest.raises(ValueError):
        tuning_points("hybrid", {})


def test_knob_flags_and_tags():
    knobs = {"lr": 0.01, "zo_lr": 0.001, "eps_language": 0.0001}
    assert _tuning.knob_flags(knobs) == ["--lr", "0.01", "--zo-lr", "0.001", "--eps-language", "0.0001"]
    assert knobs_tag(knobs) == "lr=0.01,zo_lr=0.001,eps_language=0.0001"


# --------------------------------------------------------------------------------- simulated sweep runs


def _flag(flags, name, default=None):
    flags = list(flags)
    return flags[flags.index(name) + 1] if name in flags else default


def fake_result(config: Dict, last: float, avg: float, forgetting: float = 20.0, arguments=()) -> Dict:
    """A results.json of clip_cl.py reduced to what the sweep and the reports read."""
    return {"config": config, "last": last, "avg": avg, "forgetting": forgetting, "seen_acc": [avg + 5, avg, last],
            "acc_matrix": [[avg + 5, None, None], [avg, avg, None], [last, last, last]], "steps": 100,
            "forward_passes": 100, "backward_passes": 100, "train_time_s": 60.0, "wall_time_s": 70.0,
            "peak_memory_mib": 1000.0, "peak_memory_kind": "cpu_peak_rss", "tasks": [[0], [1], [2]],
            "command": "python examples/clip_cl.py " + " ".join(arguments), "numerics": {"torch_threads": 1}}


def score(row: str, config: Dict) -> Tuple[float, float]:
    """A made-up landscape: FO best at lr 0.02, ZO best at zo_lr 0.01 and eps 1e-4; seeds add a fixed offset."""
    last = 20.0 - abs(math.log2(config["lr"] / 0.02))
    if "zo_lr" in config:
        last += 3.0 - abs(math.log10(config["zo_lr"] / 0.01)) - abs(math.log10(config["eps_language"] / 1e-4))
    last += {0: 0.0, 1: 1.5, 2: -0.7}.get(config["seed"], 0.0) + (0.4 if row != "moe-fo" else 0.0) * config["seed"]
    return last, last + 15.0


class FakeStart:
    """Writes a results.json for a run, as clip_cl.py would; records the order of runs."""

    def __init__(self, fail: str = "") -> None:
        self.started: List[_sweep.Run] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, run: _sweep.Run) -> Tuple[bool, str]:
        with self.lock:
            self.started.append(run)
        if self.fail and self.fail in str(run.out):
            return False, "FAILED (1) after 0.0 min"
        config = {"seed": int(_flag(run.flags, "--seed")),
                  "validation_fraction": float(_flag(run.flags, "--validation-fraction", 0.0)),
                  "lr": float(_flag(run.flags, "--lr", 0.01))}
        if "--zo-lr" in run.flags:
            config.update(zo_lr=float(_flag(run.flags, "--zo-lr")),
                          eps_language=float(_flag(run.flags, "--eps-language")))
        last, avg = score(run.row, config)
        run.out.mkdir(parents=True, exist_ok=True)
        command = (*run.arguments, "--data-root", "/data", "--out", str(run.out), "--no-progress", "--threads", "1")
        (run.out / "results.json").write_text(json.dumps(fake_result(config, last, avg, arguments=command)))
        return True, "ran in 0.0 min"


def make_sweep(runs_dir: Path, seeds=(0, 1, 2), tune=True, extra=()) -> _sweep.Sweep:
    rows = _sweep.with_baselines(["moe-vision"], {"moe-vision": "moe-fo", "moe-fo": "moe-fo"})
    assert rows == ["moe-fo", "moe-vision"]
    return _sweep.Sweep(rows, {"moe-fo": "fo", "moe-vision": "zo"}, {"moe-fo": "moe-fo", "moe-vision": "moe-fo"},
                        runs_dir, seeds=seeds, tune=tune, validation_fraction=0.1, tune_seed=0,
                        row_arguments={row: accuracy.ROWS[row].arguments("cpu") for row in rows}, extra=extra)


def test_sweep_orders_runs_by_dependency_and_resumes_without_rerunning(tmp_path):
    start = FakeStart()
    statuses = make_sweep(tmp_path).execute(start, jobs=2)
    started = [run.out.relative_to(tmp_path).as_posix() for run in start.started]
    assert len(started) == len(statuses) == 5 + 6 + 2 * 3  # eps 1e-4 lands on the edge: 1e-5 is tried too
    position = {name: index for index, name in enumerate(started)}
    fo_tuning = [p for n, p in position.items() if n.startswith("tuning/moe-fo/")]
    zo_first = [p for n, p in position.items() if n.startswith("tuning/moe-vision/") and "eps_language=0.001" in n]
    zo_second = [p for n, p in position.items() if n.startswith("tuning/moe-vision/") and "eps_language=0.001" not in n]
    assert max(fo_tuning) < min(zo_first) and max(zo_first) < min(zo_second)
    assert "tuning/moe-vision/lr=0.02,zo_lr=0.01,eps_language=0.0001" in position  # eps tried at the best zo lr
    assert max(zo_second) < min(p for n, p in position.items() if n.startswith("seeds/moe-vision/"))

    resumed = make_sweep(tmp_path)
    again = FakeStart()
    assert resumed.execute(again, jobs=2) == {} and again.started == []  # everything kept
    assert resumed.choice("moe-fo") == {"lr": 0.02}
    assert resumed.choice("moe-vision") == {"lr": 0.02, "zo_lr": 0.01, "eps_language": 0.0001}
    seeds = resumed.seed_results()
    assert sorted(seeds["moe-vision"]) == [0, 1, 2]
    assert seeds["moe-vision"][1]["config"] == {"seed": 1, "validation_fraction": 0.0, "lr": 0.02, "zo_lr": 0.01,
                                                "eps_language": 0.0001}

    (tmp_path / "seeds" / "moe-vision" / "seed1" / "results.json").unlink()
    partial = FakeStart()
    make_sweep(tmp_path).execute(partial, jobs=2)
    assert [run.out.relative_to(tmp_path).as_posix() for run in partial.started] == ["seeds/moe-vision/seed1"]


def test_progress_counts_the_runs_still_to_name_and_estimates_their_time(tmp_path):
    def progress():
        sweep = make_sweep(tmp_path)
        sweep.load_finished()
        return sweep.progress()

    assert progress() == (0, 2 * (5 + 3), [])  # tuning budget and 3 seeds per row
    make_sweep(tmp_path).execute(FakeStart(fail="moe-vision"), jobs=2)  # the FO row only; ZO's first runs fail
    assert progress() == (8, 16, [70.0] * 8)
    make_sweep(tmp_path).execute(FakeStart(), jobs=2)
    assert progress() == (17, 17, [70.0] * 17)  # the eps search went one step further

    assert accuracy.progress_text(17, 17, [70.0] * 17) == "Progress: all 17 runs finished."
    text = accuracy.progress_text(18, 72, [1200.0] * 9 + [1320.0] * 9)  # median 21 min
    assert "18 of 72 runs finished" in text
    assert "the other 54 take about 18.9 h of run time" in text and "(21 min a run" in text and "9.4 h with" in text
    text = accuracy.progress_text(77, 80, [1200.0] * 77)  # 3 runs left: 60 min; two lanes take two run times
    assert "the other 3 take about 60 min of run time" in text and "40 min with `--jobs 2`" in text


def test_sweep_refuses_a_finished_run_made_with_other_values(tmp_path):
    make_sweep(tmp_path, seeds=(0,)).execute(FakeStart(), jobs=1)
    path = tmp_path / "seeds" / "moe-fo" / "seed0" / "results.json"
    result = json.loads(path.read_text())
    result["config"]["lr"] = 0.005
    path.write_text(json.dumps(result))
    with pytest.raises(_sweep.StaleRunError, match="lr=0.005"):
        make_sweep(tmp_path, seeds=(0,)).execute(FakeStart(), jobs=1)


def test_sweep_refuses_runs_made_with_other_clip_args(tmp_path):
    make_sweep(tmp_path, seeds=(0,)).execute(FakeStart(), jobs=1)
    with pytest.raises(_sweep.StaleRunError, match="--max-steps-per-task 5"):
        make_sweep(tmp_path, seeds=(0,), extra=("--max-steps-per-task", "5")).load_finished()
    assert _sweep.recorded_arguments("python -m examples.clip_cl --preset cpu --data-root /d --out /o --no-progress "
                                     "--seed 1 --threads 1") == ("--preset", "cpu", "--seed", "1")


def test_a_run_stopped_part_way_goes_on_from_its_checkpoint(tmp_path):
    import sys

    out = tmp_path / "run"
    command = [sys.executable, "-c", "import sys; print('args', sys.argv[1:])"]
    assert accuracy.resumable(command, out) == command  # nothing to go on from
    assert accuracy.execute(command, out)[0]
    (out / "checkpoint.pt").write_bytes(b"")  # what clip_cl.py leaves after a finished task
    resumed = accuracy.resumable(command, out)
    assert resumed == [*command, "--resume"]
    assert accuracy.execute(resumed, out)[0]
    log = (out / "log.txt").read_text()
    assert log.count("args []") == 1 and log.count("args ['--resume']") == 1  # the stopped run's log is kept
    # A resumed run is the same run: its command matches the sweep's.
    assert _sweep.recorded_arguments("python -m examples.clip_cl --preset cpu --out /o --seed 1 --resume") == \
        _sweep.recorded_arguments("python -m examples.clip_cl --preset cpu --out /o --seed 1")


def test_a_failed_run_is_not_retried_and_blocks_what_depends_on_it(tmp_path):
    start = FakeStart(fail="tuning/moe-fo/lr=0.04")
    sweep = make_sweep(tmp_path)
    statuses = sweep.execute(start, jobs=2)
    assert len(start.started) == 5  # only the FO grid: without its choice nothing else can be named
    assert sum(status.startswith("FAILED") for status in statuses.values()) == 1
    assert sweep.choice("moe-fo") is None and sweep.seed_results() == {}
    record = sweep.tuning_record("moe-fo")
    assert [point["status"] for point in record["points"]].count("done") == 4 and record["choice"] is None


def test_untuned_seed_runs_use_the_preset_and_their_own_folder(tmp_path):
    start = FakeStart()
    make_sweep(tmp_path, seeds=(0, 1), tune=False).execute(start, jobs=2)
    assert sorted(run.out.relative_to(tmp_path).as_posix() for run in start.started) == [
        "seeds-untuned/moe-fo/seed0", "seeds-untuned/moe-fo/seed1", "seeds-untuned/moe-vision/seed0",
        "seeds-untuned/moe-vision/seed1"]
    assert all(_flag(run.flags, "--lr") is None for run in start.started)


# ------------------------------------------------------------------------------------------------ reports


def test_seeds_report_on_hand_made_runs(tmp_path):
    runs = tmp_path / "runs"
    make_sweep(runs).execute(FakeStart(), jobs=2)
    out = tmp_path / "accuracy_test_seeds.md"
    record = accuracy.main(["--preset", "cpu", "--only", "moe-vision", "--tune", "--seeds", "0,1,2", "--report-only",
                            "--runs-dir", str(runs), "--out", str(out)])
    report = out.read_text()

    lasts = {row: [score(row, {"lr": 0.02, "seed": s, **({"zo_lr": 0.01, "eps_language": 1e-4}
                                                          if row == "moe-vision" else {})})[0] for s in (0, 1, 2)]
             for row in ("moe-fo", "moe-vision")}
    interval = paired_interval(lasts["moe-vision"], lasts["moe-fo"])
    vision = record["rows"]["moe-vision"]
    assert vision["last"]["mean"] == pytest.approx(sum(lasts["moe-vision"]) / 3)
    assert vision["delta"]["last"]["half_width"] == pytest.approx(interval.half_width)
    assert vision["delta"]["last"]["includes_zero"] is False  # a constant +3 gain with little spread
    assert vision["knobs"] == {"lr": 0.02, "zo_lr": 0.01, "eps_language": 0.0001}
    assert record["tuning"]["moe-fo"]["choice"] == {"lr": 0.02}
    assert record["method"]["grid"]["runs_per_zo_row"] == 5

    line = next(line for line in report.splitlines() if line.startswith("| Vision w/ ZO |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    mean, std = vision["last"]["mean"], vision["last"]["std"]
    assert cells[1] == "3" and cells[2] == f"{mean:.2f} \u00b1 {std:.2f}"
    assert cells[5] == f"{interval.mean:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]" and cells[6] == "excludes 0"
    assert "--zo-lr 0.01" in cells[-1]
    assert "t = 4.303 for 3 seeds, 2 dof" in report
    assert "the interval excludes 0" in report
    assert re.search(r"\| Vision w/ ZO \| 0\.02 \| 0\.01 \| 0\.0001 \| [\d.]+ \| [\d.]+ \| \*\*chosen\*\*", report)
    assert ("python -m examples.clip_cl --preset cpu --adapter moe --zo-branch vision --conservative --lr 0.02 "
            "--zo-lr 0.01 --eps-language 0.0001 --seed 0 --threads 1") in report
    assert (out.with_suffix(".png")).stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text())["rows"]["moe-fo"]["seeds"] == [0, 1, 2]


def test_seeds_report_says_when_an_interval_includes_zero(tmp_path):
    runs = tmp_path / "runs"
    for row, lasts in {"zofc-fo": (24.0, 19.0, 22.0), "zofc": (25.0, 18.0, 21.5)}.items():
        for seed, last in enumerate(lasts):
            folder = runs / "seeds-untuned" / row / f"seed{seed}"
            folder.mkdir(parents=True)
            arguments = (*accuracy.ROWS[row].arguments("cpu"), "--seed", str(seed), "--out", str(folder))
            (folder / "results.json").write_text(json.dumps(fake_result(
                {"seed": seed, "validation_fraction": 0.0, "lr": 0.01}, last, last + 14, arguments=arguments)))
    out = tmp_path / "report.md"
    record = accuracy.main(["--preset", "cpu", "--only", "zofc", "--seeds", "0,1,2", "--report-only",
                            "--runs-dir", str(runs), "--out", str(out)])
    report = out.read_text()
    assert record["rows"]["zofc"]["baseline"] == "zofc-fo"
    assert record["rows"]["zofc"]["delta"]["last"]["includes_zero"] is True
    assert "includes 0, so no difference is established" in report
    assert "Not tuned" in report and "preset defaults" in report


def test_single_seed_tables_are_rebuilt_from_the_committed_json():
    """The 30-row report (accuracy_cpu.md) still comes out of its JSON summary, row for row."""
    committed = accuracy._measure.RESULTS_DIR / "accuracy_cpu.json"
    results = json.loads(committed.read_text())["rows"]
    report = committed.with_suffix(".md").read_text()
    for table in accuracy.TABLES.values():
        rebuilt = accuracy.table_markdown(table, results, "cpu")
        assert rebuilt in report, table.key


def test_rows_set_seeds_names_the_issue_rows():
    assert accuracy.SETS["seeds"].rows == ("moe-fo", "moe-dual", "moe-vision", "moe-language", "mozo-dual-hop-odd",
                                           "mozo-dual-hop-even", "zofc-fo", "zofc")
    assert {accuracy.ROWS[name].baseline for name in accuracy.SETS["seeds"].rows} == {"moe-fo", "zofc-fo"}
    assert accuracy.ROWS["lora-vision"].baseline == "lora-fo"
    assert [_sweep.row_kind(accuracy.ROWS[name].flags) for name in ("moe-fo", "zofc-fo", "zofc", "mozo-dual-hop-odd")] \
        == ["fo", "fo", "zo", "zo"]


# ------------------------------------------------------------------------------------- committed records


def make_stored_sweep(runs_dir: Path, store: Path, **kwargs) -> _sweep.Sweep:
    sweep = make_sweep(runs_dir, **kwargs)
    sweep.store = store
    return sweep


def test_every_finished_run_is_recorded_and_a_fresh_clone_resumes_from_the_records_alone(tmp_path):
    runs, store = tmp_path / "runs", tmp_path / "results" / "accuracy_cpu_runs"
    committed = []
    sweep = make_stored_sweep(runs, store)
    sweep.on_record = committed.append
    sweep.execute(FakeStart(), jobs=2)
    names = sorted(path.relative_to(store).as_posix() for path in store.rglob("*.json"))
    assert names == sorted(f"{run.name}.json" for run in sweep.named_runs()) and len(names) == 5 + 6 + 2 * 3
    assert sorted(committed) == sorted(store.rglob("*.json"))  # each handed on as it was written
    assert "tuning/moe-vision/lr=0.02,zo_lr=0.01,eps_language=0.0001.json" in names
    record = json.loads((store / "seeds" / "moe-vision" / "seed1.json").read_text())
    result = json.loads((runs / "seeds" / "moe-vision" / "seed1" / "results.json").read_text())
    assert {key: record[key] for key in result if key in record} == {key: result[key] for key in result
                                                                    if key in _sweep.RECORD_KEYS}
    assert "commit" in record and "--seed 1" in record["command"]

    fresh = make_stored_sweep(tmp_path / "fresh-clone-runs", store)  # no runs folder: the records alone
    again = FakeStart()
    assert fresh.execute(again, jobs=2) == {} and again.started == []
    assert fresh.choice("moe-vision") == sweep.choice("moe-vision")
    assert fresh.seed_results()["moe-vision"][2]["last"] == sweep.seed_results()["moe-vision"][2]["last"]

    (store / "seeds" / "moe-vision" / "seed2.json").unlink()  # an interrupted sweep: resumes with what is missing
    resumed = FakeStart()
    make_stored_sweep(tmp_path / "other-runs", store).execute(resumed, jobs=1)
    assert [run.name for run in resumed.started] == ["seeds/moe-vision/seed2"]
    assert (store / "seeds" / "moe-vision" / "seed2.json").is_file()


def test_a_record_made_with_other_arguments_is_refused(tmp_path):
    store = tmp_path / "store"
    make_stored_sweep(tmp_path / "runs", store, seeds=(0,)).execute(FakeStart(), jobs=1)
    with pytest.raises(_sweep.StaleRunError, match="--max-steps-per-task 5"):
        make_stored_sweep(tmp_path / "fresh", store, seeds=(0,), extra=("--max-steps-per-task", "5")).load_finished()


def test_compact_records_drop_per_step_losses_and_keep_their_mean_per_task():
    result = {**fake_result({"seed": 0}, 10.0, 20.0), "losses": [1.0, 3.0, 2.0, 2.0, 5.0], "task_start_steps": [0, 2],
              "classnames": [["a"]]}
    record = _sweep.compact(result, "abc123")
    assert "losses" not in record and "classnames" not in record
    assert record["loss_per_task"] == [2.0, 3.0] and record["commit"] == "abc123" and record["last"] == 10.0


def test_collect_imports_the_finished_runs_of_another_runs_folder_and_rebuilds_the_report(tmp_path):
    other = tmp_path / "other-checkout-runs"
    make_sweep(other).execute(FakeStart(), jobs=2)  # the old code: runs only, no records
    out = tmp_path / "results" / "accuracy_cpu_seeds.md"
    common = ["--preset", "cpu", "--only", "moe-vision", "--tune", "--seeds", "0,1,2", "--out", str(out)]
    collected = accuracy.main([*common, "--collect", str(other)])
    store = out.parent / "accuracy_cpu_runs"
    assert len(list(store.rglob("*.json"))) == 5 + 6 + 2 * 3
    report = out.read_text()
    rebuilt = accuracy.main([*common, "--report-only", "--runs-dir", str(tmp_path / "no-runs")])  # records alone
    assert rebuilt["rows"] == collected["rows"] and rebuilt["tuning"] == collected["tuning"]
    assert out.read_text().split("## Results")[1] == report.split("## Results")[1]
    assert "## Every run" in report and report.count("# tuning/") == 11 and report.count("# seeds/") == 6


def test_report_names_runs_inside_the_checkout_by_relative_paths_as_its_records_do(tmp_path, monkeypatch):
    # A sweep run in the checkout itself: results.json commands carry absolute --out paths below the repository.
    monkeypatch.setattr(accuracy._measure, "REPO_ROOT", tmp_path)
    runs = tmp_path / "runs" / "benchmarks" / "accuracy-cpu"
    make_sweep(runs).execute(FakeStart(), jobs=2)
    out = tmp_path / "results" / "accuracy_cpu_seeds.md"
    common = ["--preset", "cpu", "--only", "moe-vision", "--tune", "--seeds", "0,1,2", "--out", str(out)]
    accuracy.main([*common, "--report-only", "--runs-dir", str(runs)])  # reads the runs' results.json
    from_runs = out.read_text().split("## Every run")[1]
    assert str(tmp_path) not in from_runs and "--out runs/benchmarks/accuracy-cpu/seeds/moe-vision/seed0" in from_runs
    accuracy.main([*common, "--report-only", "--runs-dir", str(tmp_path / "no-runs")])  # the records alone
    assert out.read_text().split("## Every run")[1] == from_runs


def test_relative_command_rewrites_absolute_location_paths_only():
    command = "python -m examples.clip_cl --lr 0.01 --data-root /repo/../data --out /repo/runs/x --threads 1"
    assert _sweep.relative_command(command, Path("/repo")) == (
        "python -m examples.clip_cl --lr 0.01 --data-root ../data --out runs/x --threads 1")
    assert _sweep.relative_command("python x.py --out runs/x", Path("/repo")) == "python x.py --out runs/x"


def test_extra_seeds_run_the_compared_rows_and_their_baseline_only(tmp_path):
    rows = ["moe-fo", "moe-vision", "moe-language"]
    sweep = _sweep.Sweep(rows, {"moe-fo": "fo", "moe-vision": "zo", "moe-language": "zo"},
                         {row: "moe-fo" for row in rows}, tmp_path / "runs", seeds=(0, 1, 2),
                         extra_seeds={"moe-vision": (3, 4)}, tune=False,
                         row_arguments={row: accuracy.ROWS[row].arguments("cpu") for row in rows})
    start = FakeStart()
    sweep.execute(start, jobs=2)
    seeds = {row: sorted(int(run.name[-1]) for run in start.started if run.row == row) for row in rows}
    assert seeds == {"moe-fo": [0, 1, 2, 3, 4], "moe-vision": [0, 1, 2, 3, 4], "moe-language": [0, 1, 2]}


def test_the_report_uses_five_paired_seeds_where_there_are_five(tmp_path):
    runs = tmp_path / "runs"
    make_sweep(runs, seeds=(0, 1, 2, 3, 4), tune=False).execute(FakeStart(), jobs=2)
    out = tmp_path / "report.md"
    record = accuracy.main(["--preset", "cpu", "--only", "moe-vision", "--seeds", "0,1,2", "--extra-seeds", "3,4",
                            "--extra-rows", "moe-vision", "--report-only", "--runs-dir", str(runs), "--out", str(out)])
    assert record["rows"]["moe-vision"]["delta"]["last"]["n"] == 5
    assert "t = 2.776 for 5 seeds, 4 dof" in out.read_text()
    assert (tmp_path / "report_tradeoff.png").stat().st_size > 0


def test_the_tradeoff_figure_of_the_committed_untuned_report(tmp_path):
    from benchmarks import _tradeoff

    memory = json.loads((accuracy._measure.RESULTS_DIR / "memory.json").read_text())["results"]
    peaks = _tradeoff.vit_peaks()
    assert peaks["moe-vision"] == memory["vision"]["total_mib"] and peaks["moe-fo"] == memory["fo"]["total_mib"]
    assert peaks["mozo-dual-hop-odd"] == memory["dual-hop-odd"]["total_mib"] and "zofc" not in peaks
    out = _tradeoff.main([str(accuracy._measure.RESULTS_DIR / "accuracy_cpu_seeds_untuned.json"),
                          "--out", str(tmp_path / "tradeoff.png")])
    assert out == tmp_path / "tradeoff.png" and out.stat().st_size > 10_000
    entry = {"seeds": [0, 1, 2], "last": {"mean": 20.0, "std": 1.0}}
    assert _tradeoff._interval(entry) == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2) s / sqrt(n)


def test_commit_records_each_record_alone(tmp_path):
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "start")
    (tmp_path / "staged.txt").write_text("not the sweep's")
    git("add", "staged.txt")
    record = tmp_path / "store" / "seeds" / "moe-fo" / "seed0.json"
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    subprocess.run(["git", "config", "user.name", "t"], cwd=tmp_path, check=True)
    subprocess.run(["git", "config", "user.email", "t@t"], cwd=tmp_path, check=True)
    accuracy.commit_record(record)
    assert git("show", "--name-only", "--format=%s", "HEAD").split() == [
        "accuracy", "sweep:", str(record), "store/seeds/moe-fo/seed0.json"]
    assert git("diff", "--cached", "--name-only").split() == ["staged.txt"]  # left staged, not committed


def test_a_record_names_its_paths_relative_to_the_checkout_that_ran_it(tmp_path):
    root = tmp_path / "checkout"
    result = {**fake_result({"seed": 0}, 10.0, 20.0),
              "command": f"python -m examples.clip_cl --seed 0 --data-root {tmp_path / 'shared' / 'data'} "
                         f"--out {root / 'runs' / 'x'} --threads 1 --no-progress"}
    result["config"] = {**result["config"], "data_root": str(tmp_path / "shared" / "data"),
                        "out": str(root / "runs" / "x")}
    record = _sweep.compact(result, "abc123", root)
    assert record["command"] == ("python -m examples.clip_cl --seed 0 --data-root ../shared/data --out runs/x "
                                 "--threads 1 --no-progress")
    assert (record["config"]["data_root"], record["config"]["out"]) == ("../shared/data", "runs/x")
    assert _sweep.recorded_arguments(record["command"]) == _sweep.recorded_arguments(result["command"])


@pytest.mark.parametrize("flags, inert", [
    (("--mozo",), True),  # coordinate sign + conservative, one query
    (("--sign", "scalar", "--conservative"), True),
    (("--mozo", "--queries", "4"), False),  # q differences weigh the directions
    (("--conservative",), False),  # unsigned: the move scales with d / eps
    (("--mozo", "--no-conservative"), False),
    (("--zo-branch", "none", "--mozo"), False),  # all FO: no ZO step at all
])
def test_eps_inert_reads_the_resolved_run(flags, inert):
    assert accuracy.eps_inert(["--preset", "cpu", "--zo-branch", "dual", *flags]) is inert
