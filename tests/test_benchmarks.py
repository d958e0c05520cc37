"""Smoke test of the benchmark scripts: each starts, runs at toy sizes and writes its report.

The benchmarks themselves are not tests (they take minutes to hours); this runs each script once with
``python -m benchmarks --preset smoke``'s arguments (a 4-block CLIP, one repeat, one accuracy row with the
examples' smoke preset). The scripts run in parallel subprocesses to keep the whole file well under a
minute on two cores; those runs are marked ``slow``. The accuracy script is skipped when the tiny CLIP checkpoint
or CIFAR-100 is missing. Tests that need an optional peer (PyPI ``mezo``, torchzero; see ``benchmarks/_peers.py``)
are marked ``peers`` and skip, saying why, when it is not installed; without it the scripts leave its rows out with
a note, which is tested too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from benchmarks.__main__ import SCRIPTS, script_arguments
from benchmarks._peers import PEERS
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


def require_peer(key: str) -> None:
    """Skip, saying how to install it, unless the optional peer ``key`` is installed."""
    peer = PEERS[key]
    if not peer.installed():
        pytest.skip(f"needs {peer.name}, an optional peer: {peer.install} (.ci/run installs it)")


def report_of(smoke_runs: Tuple[Path, Dict[str, Tuple[int, str]]], script: str, name: str) -> str:
    out_dir, outcomes = smoke_runs
    assert outcomes[script][0] == 0, outcomes[script][1][-3000:]
    return (out_dir / name).read_text()


def table_rows(report: str) -> Dict[str, List[str]]:
    """Markdown table rows by their first cell (stripped of backticks)."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


@pytest.mark.slow
def test_speed_times_full_model_zo_with_both_distributions_and_restores(
    smoke_runs: Tuple[Path, Dict[str, Tuple[int, str]]]
) -> None:
    rows = table_rows(report_of(smoke_runs, "speed", "speed.md"))
    labels = {"full-zo-central": "gaussian", "full-zo-inplace": "gaussian, restore='inplace'",
              "full-zo-rademacher": "rademacher", "full-zo-rademacher-inplace": "rademacher, restore='inplace'"}
    for name, label in labels.items():
        assert rows[name][1] == f"hybridzo ZO-SGD, central q=1, {label}" and rows[name][2] == "full model"
        assert float(rows[name][-1]) > 0  # direction sweeps, from last_step_info
    ratio = rows["hybridzo rademacher / gaussian, full model"]
    assert float(ratio[1]) > 0


@pytest.mark.slow
@pytest.mark.peers
def test_speed_compares_against_pypi_mezo(smoke_runs: Tuple[Path, Dict[str, Tuple[int, str]]]) -> None:
    require_peer("mezo")
    report = report_of(smoke_runs, "speed", "speed.md")
    assert "| `mezo-pkg` | PyPI mezo.update |" in report and "| `full-mezo-pkg` | PyPI mezo.update |" in report
    rows = table_rows(report)
    for ratio in ("hybridzo / PyPI mezo, adapters", "hybridzo / PyPI mezo, full model",
                  "hybridzo rademacher / PyPI mezo, full model"):
        assert float(rows[ratio][1]) > 0, ratio


@pytest.mark.slow
@pytest.mark.peers
def test_speed_compares_against_torchzero(smoke_runs: Tuple[Path, Dict[str, Tuple[int, str]]]) -> None:
    require_peer("torchzero")
    report = report_of(smoke_runs, "speed", "speed.md")
    rows = table_rows(report)
    assert rows["tz-mezo"][1:3] == ["torchzero MeZO, gaussian", "adapters"]
    assert rows["full-tz-mezo"][1:3] == ["torchzero MeZO, gaussian", "full model"]
    assert rows["full-tz-mezo-rademacher"][1:3] == ["torchzero MeZO, rademacher (its default)", "full model"]
    for name in ("tz-mezo", "full-tz-mezo", "full-tz-mezo-rademacher"):
        assert rows[name][-1] == "4 (source)"
    for ratio in ("hybridzo / torchzero MeZO, adapters", "hybridzo / torchzero MeZO (gaussian), full model",
                  "hybridzo rademacher / torchzero MeZO (rademacher), full model"):
        assert float(rows[ratio][1]) > 0, ratio
    assert "left out" not in report


@pytest.mark.slow
@pytest.mark.peers
def test_restore_memory_sets_the_peers_against_the_forward(
    smoke_runs: Tuple[Path, Dict[str, Tuple[int, str]]]
) -> None:
    require_peer("mezo")
    require_peer("torchzero")
    rows = {}
    for line in report_of(smoke_runs, "restore_memory", "restore_memory.md").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if len(cells) == 6 and cells[0] in ("adapter", ""):
            rows[cells[1]] = cells
    for label in ("hybridzo step, restore='exact'", "hybridzo step, restore='inplace'", "MeZO in-place loop",
                  "PyPI mezo.update", "torchzero MeZO (gaussian)"):
        assert rows[label][3].startswith(("+", "-")) and float(rows[label][4]) >= 0, label


@pytest.mark.slow
@pytest.mark.peers
def test_memory_sets_torchzero_against_the_forward(smoke_runs: Tuple[Path, Dict[str, Tuple[int, str]]]) -> None:
    require_peer("torchzero")
    rows = table_rows(report_of(smoke_runs, "memory", "memory.md"))
    row = rows["Dual w/ ZO*, torchzero MeZO (gaussian)"]
    assert len(row) == 5 and float(row[2]) > 0 and float(row[4]) > 0  # the pure-ZO table: step / forward


@pytest.mark.slow
def test_memory_reports_the_pure_zo_step_against_the_forward(
    smoke_runs: Tuple[Path, Dict[str, Tuple[int, str]]]
) -> None:
    report = report_of(smoke_runs, "memory", "memory.md")
    assert "excluding weights (above model): step / forward (MiB)" in report
    row = table_rows(report)["Dual w/ ZO"]
    assert float(row[-1]) > 0 and " / " in row[-2]


def test_scripts_leave_a_missing_peers_rows_out_with_a_note() -> None:
    from benchmarks import memory, restore_memory, speed
    from benchmarks._peers import leave_out_missing

    def without(module: str) -> bool:
        return module not in ("torchzero", "scipy")

    kept, notes = leave_out_missing(["zo-central", "mezo-pkg", "tz-mezo", "full-tz-mezo"], speed.PEER_OF, without)
    assert kept == ["zo-central", "mezo-pkg"]
    assert notes == ["`tz-mezo`, `full-tz-mezo` left out: torchzero is not installed "
                     "(`pip install torchzero==0.4.4 scipy==1.17.1`)"]
    assert leave_out_missing(["fo"], speed.PEER_OF, lambda module: False) == (["fo"], [])
    for script, names in ((speed, speed.ALL_CONFIGS), (memory, memory.CONFIGS),
                          (restore_memory, restore_memory.OPERATIONS)):
        assert set(script.PEER_OF) <= set(names) and set(script.PEER_OF.values()) <= set(PEERS), script.__name__


@pytest.mark.slow
def test_speed_report_says_which_peer_rows_it_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import _measure, speed

    monkeypatch.setattr(_measure, "installed", lambda module: False)
    out = tmp_path / "speed.md"
    raw = speed.main(["--model", "micro", "--batch", "2", "--repeats", "1", "--configs",
                      "zo-central,mezo-pkg,full-tz-mezo", "--out", str(out)])
    assert sorted(raw) == ["zo-central"]
    report = out.read_text()
    assert "- `mezo-pkg` left out: PyPI `mezo` is not installed (`pip install --no-deps mezo==0.0.1`)." in report
    assert "- `full-tz-mezo` left out: torchzero is not installed" in report
    assert table_rows(report)["hybridzo / torchzero MeZO, adapters"][1] == "not measured"


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
    assert "--preset {smoke,cpu,paper} smoke: seconds-long runs" in text and "(default: smoke)" in text
    assert "--out-dir OUT_DIR folder for the reports" in text and "(default: runs/benchmarks/<preset>;" in text


def test_main_without_arguments_runs_the_smoke_preset_under_runs() -> None:
    """``python -m benchmarks`` alone must not start the hours-long cpu preset nor write into benchmarks/results."""
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if line.startswith("== python -m benchmarks.")]
    smoke = script_arguments("smoke", REPO_ROOT / "runs" / "benchmarks" / "smoke")
    assert commands == [f"== python -m benchmarks.{name} {' '.join(smoke[name])}" for name in SCRIPTS]
    assert "benchmarks/results" not in done.stdout
    cpu = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "cpu", "--dry-run"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert f"--out {REPO_ROOT / 'runs' / 'benchmarks' / 'cpu' / 'memory.md'}" in cpu.stdout


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


def test_memory_limit_names_and_placements() -> None:
    from benchmarks.memory import CONFIGS, LIMITS, config_names, limit_of

    assert config_names("fo, limits") == ["fo", *LIMITS]
    assert limit_of("dual-inplace") == limit_of("dual") == "dual-limit"
    assert limit_of("lora-vision") == "lora-vision-limit" and limit_of("vision-prefix") == "vision-prefix-limit"
    assert limit_of("fo") is None and limit_of("inference") is None
    assert len(LIMITS) == 18 and all(CONFIGS[name].operation == "limit" for name in LIMITS)


def test_limit_freezes_the_zo_part_and_keeps_the_fo_groups() -> None:
    pytest.importorskip("open_clip")
    from benchmarks._workload import Placement, build_workload, limit_optimizer, make_optimizer

    def groups(optimizer) -> Dict[str, Tuple[List[int], Dict]]:
        return {g["name"]: ([id(p) for p in g["params"]], {k: v for k, v in g.items() if k not in ("params", "seed")})
                for g in optimizer.param_groups}

    workload = build_workload("micro", "moe", batch=2, prompts=3, device="cpu")
    hybrid = make_optimizer(workload, Placement("vision", "hop-odd"))
    zo = [p for g in hybrid.param_groups if g["mode"] == "zo" for p in g["params"]]
    limit = limit_optimizer(workload, Placement("vision", "hop-odd"))
    assert limit is not None and groups(limit) == {name: group for name, group in groups(hybrid).items()
                                                   if group[1]["mode"] == "fo"}
    assert zo and not any(p.requires_grad for p in zo)
    assert type(limit) is type(hybrid)
    assert limit_optimizer(build_workload("micro", "moe", 2, 3, "cpu"), Placement("dual")) is None


@pytest.mark.peers
def test_torchzero_peer_is_mezo_zo_sgd() -> None:
    """Central differences along one z, two forwards, then lr * (f+ - f-) / (2 eps) * z subtracted: MeZO's step."""
    require_peer("torchzero")
    import torch

    from benchmarks._peers import TorchzeroMeZO

    torch.manual_seed(0)
    trained = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.randn(3, dtype=torch.float64), requires_grad=False)
    c = torch.randn(6, dtype=torch.float64)
    lr, eps = 0.05, 1e-3
    seen: List[torch.Tensor] = []

    def closure() -> torch.Tensor:
        seen.append(torch.cat([trained.detach(), frozen.detach()]))
        return (c * trained).sum() + 0.5 * (trained * trained).sum() + (frozen * frozen).sum()

    for distribution in ("gaussian", "rademacher"):
        seen.clear()
        peer = TorchzeroMeZO([trained, frozen], lr, eps, distribution)
        before = torch.cat([trained.detach(), frozen.detach()])
        peer.step(closure)
        assert len(seen) == 2  # return_approx_loss=True: no third forward at theta
        z = (seen[0] - before) / eps
        torch.testing.assert_close(seen[1], before - eps * z)
        assert not frozen.requires_grad  # unfrozen for the step only, and trained like the rest
        f_plus, f_minus = ((c * x[:6]).sum() + 0.5 * (x[:6] ** 2).sum() + (x[6:] ** 2).sum() for x in seen)
        torch.testing.assert_close(torch.cat([trained.detach(), frozen.detach()]),
                                   before - lr * (f_plus - f_minus) / (2 * eps) * z)
        if distribution == "rademacher":
            torch.testing.assert_close(z.abs(), torch.ones_like(z))
        else:
            assert z.abs().std() > 0.1
        assert trained.grad is not None  # torchzero keeps its estimate in .grad ...
        peer.zero_grad()
        assert trained.grad is None and frozen.grad is None  # ... until zero_grad drops it


def test_memory_and_fsdp_reports_are_rebuilt_from_their_committed_json_byte_for_byte() -> None:
    """The committed reports come out of their JSON unchanged: the report code and the data agree."""
    import argparse
    import json
    import re

    from benchmarks import _measure, fsdp_memory, memory

    results = _measure.RESULTS_DIR
    record = json.loads((results / "memory.json").read_text())
    committed = (results / "memory.md").read_text()
    args = argparse.Namespace(**record["settings"], plot=Path("memory.png"), state_model="tiny",
                              sweep_batches=[2, 4, 16])
    load_after = re.search(r"at start, (.*) at end", committed).group(1)
    sweep = {int(batch): rows for batch, rows in record["batch_sweep"].items()}
    assert memory.write_report(record["results"], sweep, record["optimizer_state"], args, record["environment"],
                               load_after, ["--batch", "8", "--sweep-batches", "2,4,16"]) == committed

    record = json.loads((results / "fsdp_memory.json").read_text())
    args = argparse.Namespace(**record["settings"])
    assert fsdp_memory.report(args, record["runs"], record["environment"], record["command"],
                              record["load_after"]) == (results / "fsdp_memory.md").read_text()


def test_compare_commits_times_every_setting_of_both_versions(tmp_path: Path) -> None:
    """Against itself (the checkout as the other one), each setting gets a time per version and a ratio."""
    from benchmarks import compare_commits

    out = tmp_path / "compare.md"
    times = compare_commits.main(["--other", str(REPO_ROOT), "--model", "micro", "--rounds", "2", "--out", str(out)])
    assert set(times) == set(compare_commits.SETTINGS)
    assert all(len(t["old"]) == len(t["new"]) == 2 and min(t["old"] + t["new"]) > 0 for t in times.values())
    rows = table_rows(out.read_text())
    rows.pop("setting")  # the header
    assert set(rows) == set(compare_commits.SETTINGS)
    assert all(float(row[3]) > 0 for row in rows.values())  # new / old
    assert "--other ." in out.read_text()  # named relative to the repository, not by this machine's folders
    import hybridzo

    assert sys.modules["hybridzo_other"] is not hybridzo  # two copies of the package side by side
