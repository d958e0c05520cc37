"""Smoke test of the benchmark scripts: each starts, runs at toy sizes and writes its report.

The benchmarks themselves are not tests (they take minutes to hours); this runs each script once with
``python -m benchmarks --preset smoke``'s arguments (a 4-block CLIP, one repeat, one accuracy row with the
examples' smoke preset). The scripts run in parallel subprocesses to keep the whole file well under a
minute on two cores; those runs are marked ``slow``. The accuracy script is skipped when the tiny CLIP checkpoint
or CIFAR-100 is missing, the PyPI ``mezo`` row of the speed script when that optional peer is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest

from benchmarks.__main__ import SCRIPTS, script_arguments
from benchmarks.accuracy import DEFAULT_DATA_ROOT, TINY_CHECKPOINT

REPO_ROOT = Path(__file__).resolve().parents[1]

ACCURACY_INPUTS_PRESENT = TINY_CHECKPOINT.is_file() and (DEFAULT_DATA_ROOT / "cifar-100-python").is_dir()
EXPECTED_FILES = {
    "memory": ("memory.md", "memory.png", "memory.json"),
    "speed": ("speed.md", "speed.json"),
    "restore_memory": ("restore_memory.md",),
    "accuracy": ("accuracy_smoke.md", "accuracy_smoke.json"),
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Dict[str, Tuple[int, str]]]:
    """Run every script's smoke arguments at once; return the output folder and (exit code, log) per script."""
    out_dir = tmp_path_factory.mktemp("benchmarks")
    arguments = script_arguments("smoke", out_dir)
    scripts = [name for name in SCRIPTS if name != "accuracy" or ACCURACY_INPUTS_PRESENT]
    processes = {}
    for name in scripts:
        log = open(out_dir / f"{name}.log", "w")
        processes[name] = (subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *arguments[name]],
                                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT), log)
    outcomes = {}
    for name, (process, log) in processes.items():
        code = process.wait(timeout=300)
        log.close()
        outcomes[name] = (code, (out_dir / f"{name}.log").read_text())
    return out_dir, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_writes_its_report(smoke_runs: Tuple[Path, Dict[str, Tuple[int, str]]], script: str) -> None:
    if script == "accuracy" and not ACCURACY_INPUTS_PRESENT:
        pytest.skip(f"needs {TINY_CHECKPOINT} and CIFAR-100 under {DEFAULT_DATA_ROOT}")
    out_dir, outcomes = smoke_runs
    code, log = outcomes[script]
    assert code == 0, log[-3000:]
    for name in EXPECTED_FILES[script]:
        path = out_dir / name
        assert path.is_file() and path.stat().st_size > 0, f"{script} did not write {name}:\n{log[-3000:]}"
    report = (out_dir / EXPECTED_FILES[script][0]).read_text()
    assert report.startswith("# ") and "\n| --- |" in report and "git commit" in report


@pytest.mark.slow
def test_speed_compares_against_pypi_mezo(smoke_runs: Tuple[Path, Dict[str, Tuple[int, str]]]) -> None:
    pytest.importorskip("mezo", reason="PyPI mezo, an optional peer: pip install --no-deps mezo==0.0.1 (.ci/run does)")
    out_dir, outcomes = smoke_runs
    assert outcomes["speed"][0] == 0, outcomes["speed"][1][-3000:]
    report = (out_dir / "speed.md").read_text()
    assert "| `mezo-pkg` | PyPI mezo.update |" in report
    assert "| hybridzo / PyPI mezo, adapters | not measured |" not in report


def test_main_lists_every_script_without_running() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "smoke", "--dry-run"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in SCRIPTS:
        assert f"== python -m benchmarks.{name} " in done.stdout


def test_help_describes_preset_and_out_dir() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps help to the terminal width
    assert "--preset {cpu,paper,smoke} cpu: what benchmarks/results/ holds" in text
    assert "--out-dir OUT_DIR folder for the reports" in text


def test_accuracy_rows_place_zo_alike_under_the_smoke_and_cpu_presets() -> None:
    from benchmarks.accuracy import ROWS
    from examples.clip_cl import parse_args

    def placement(row, preset):  # the smoke preset's own MoZO hop-odd placement must not leak into the rows
        args = parse_args(row.arguments(preset))
        return args.zo_branch, args.zo_layers, args.mozo, args.sign, args.conservative, args.queries

    for row in ROWS.values():
        assert placement(row, "smoke") == placement(row, "cpu"), row.name


def _fake_result(last: float, avg: float) -> dict:
    """A results.json of examples/clip_cl.py, reduced to what the accuracy report reads."""
    return {"last": last, "avg": avg, "forgetting": 10.0, "seen_acc": [avg, last], "acc_matrix": [[avg, None],
            [last, last]], "steps": 100, "forward_passes": 500, "backward_passes": 0, "train_time_s": 90.0,
            "wall_time_s": 100.0, "peak_memory_mib": 1000.0, "peak_memory_kind": "cpu_peak_rss", "command": "x",
            "tasks": [[0], [1]], "config": {"model": "tiny", "freeze_seen_prompts": True}}


def test_accuracy_report_only_tabulates_finished_rows(tmp_path: Path) -> None:
    import json

    from benchmarks.accuracy import main as accuracy_main

    runs = tmp_path / "runs"
    for name, (last, avg) in {"moe-fo": (20.0, 30.0), "moe-dual": (12.5, 27.0)}.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "results.json").write_text(json.dumps(_fake_result(last, avg)))
    out = tmp_path / "accuracy_test.md"
    results = accuracy_main(["--preset", "cpu", "--rows", "table1", "--report-only", "--runs-dir", str(runs),
                             "--out", str(out)])

    assert sorted(results) == ["moe-dual", "moe-fo"]
    assert not (runs / "moe-vision").exists()  # nothing was run
    lines = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.read_text().splitlines()
             if line.startswith("| ")}
    dual = lines["Dual w/ ZO"]
    # Last, Avg, Δ Last against the FO baseline (12.5 - 20.0), forgetting; paper Δ = 67.64 - 77.52.
    assert dual[1:5] == ["12.50", "27.00", "-7.50", "10.00"] and dual[7] == "-9.88"
    assert dual[8] == "5.0 / 0.0"
    assert lines["Vision w/ ZO"][1] == "not run"
    assert "prompts of seen classes frozen" in out.read_text() and "--report-only" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["rows"]["moe-dual"]["last"] == 12.5


@pytest.mark.slow
def test_memory_keep_from_adds_a_configuration_to_an_earlier_run(
    smoke_runs: Tuple[Path, Dict[str, Tuple[int, str]]], tmp_path: Path
) -> None:
    import json

    out_dir, outcomes = smoke_runs
    assert outcomes["memory"][0] == 0, outcomes["memory"][1][-3000:]
    earlier = out_dir / "memory.json"
    out = tmp_path / "memory.md"
    common = [sys.executable, "-m", "benchmarks.memory", "--model", "micro", "--configs", "dual-inplace",
              "--state-model", "", "--keep-from", str(earlier), "--out", str(out)]
    done = subprocess.run([*common, "--batch", "2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    assert "| Dual w/ ZO |" in report and "| Dual w/ ZO, restore='inplace' |" in report
    assert f"Kept from `{earlier.as_posix()}`" in report and "`dual`" in report
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["kept_from"]["configs"] == ["dual"]
    assert record["results"]["dual"] == json.loads(earlier.read_text())["results"]["dual"]

    refused = subprocess.run([*common, "--batch", "4"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "measured with other settings" in refused.stderr
