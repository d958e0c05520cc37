"""Every example runs as ``python examples/<name>.py`` and as ``python -m examples.<name>``, from the repository root
and from another directory; the quick start trains, checkpoints and resumes; the example's figure says what it shows.

From another directory, ``-m`` needs the checkout on ``PYTHONPATH`` (``examples`` is not installed); a script needs
nothing. Relative paths in flags are relative to the current directory, as every help text says.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("HYBRIDZO_DATA_ROOT", REPO.parent / "shared" / "data"))

SCRIPTS = {
    # example -> arguments that show its help
    "clip_cl": ["--help"],
    "fsdp_zo": ["--help"],
    "quickstart": ["--help"],
    "reproducibility": ["--help"],
    "tiny_clip": ["pretrain", "--help"],
}
"""Every runnable example; a new script in examples/ must be added here (checked below)."""

LIBRARY_MODULES = {"__init__", "adapters", "branches", "data", "plots", "protocol", "resume"}
"""Modules of examples/ that the scripts import and that have no command line."""

WAYS = ["script from the root", "script from elsewhere", "-m from the root", "-m from elsewhere"]


def run_example(name: str, arguments: List[str], way: str, elsewhere: Path, timeout: float = 300):
    """Run ``examples/<name>.py`` one of the :data:`WAYS`; return the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    if way.startswith("script"):
        command = [sys.executable, "examples/" + name + ".py" if way.endswith("root") else
                   str(REPO / "examples" / f"{name}.py")]
    else:
        command = [sys.executable, "-m", f"examples.{name}"]
        if way.endswith("elsewhere"):
            env["PYTHONPATH"] = str(REPO)
    cwd = REPO if way.endswith("root") else elsewhere
    return subprocess.run([*command, *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_script_is_listed():
    found = {path.stem for path in (REPO / "examples").glob("*.py")}
    assert found == set(SCRIPTS) | LIBRARY_MODULES
    for name in SCRIPTS:
        assert 'if __name__ == "__main__":' in (REPO / "examples" / f"{name}.py").read_text(), name


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_example_help_runs_every_way(name: str, way: str, tmp_path: Path):
    done = run_example(name, SCRIPTS[name], way, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout and "--" in done.stdout


def test_fsdp_example_help_shows_every_flag_with_help_and_default():
    pytest.importorskip("torch.distributed")
    sys.path.insert(0, str(REPO))
    from examples import fsdp_zo

    parser = fsdp_zo.build_parser()
    flags = [action for action in parser._actions if "--help" not in action.option_strings]
    assert len(flags) >= 20
    assert [action.option_strings for action in flags if not action.help] == []
    text = " ".join(parser.format_help().split())
    for action in flags:
        if action.default is not False:  # on/off flags are off by default
            assert f"(default: {action.default})" in text, action.option_strings


@pytest.mark.slow
@pytest.mark.parametrize("way", ["script from elsewhere", "-m from the root"])
def test_quickstart_trains_checkpoints_and_resumes(way: str, tmp_path: Path):
    start = time.perf_counter()
    done = run_example("quickstart", ["--out", "quickstart-run"], way, tmp_path)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "the same losses bit for bit" in done.stdout
    # --out is relative to the current directory
    checkpoint = (tmp_path if way.endswith("elsewhere") else REPO) / "quickstart-run" / "checkpoint.pt"
    assert checkpoint.is_file()
    if not way.endswith("elsewhere"):
        checkpoint.unlink()
        checkpoint.parent.rmdir()
    assert seconds < 60, f"{seconds:.0f} s (the README promises well under 30 s on 2 idle cores)"


def test_quickstart_asserts_what_it_promises(tmp_path: Path):
    """In-process: the loss falls by more than half, and the resumed half repeats the uninterrupted one exactly."""
    sys.path.insert(0, str(REPO))
    from examples import quickstart

    result = quickstart.main(["--steps", "200", "--out", str(tmp_path)])
    losses, resumed = result["losses"], result["resumed"]
    assert len(losses) == 200 and resumed == losses[100:]
    assert np.mean(losses[-10:]) < 0.7 * losses[0]
    with pytest.raises(SystemExit):
        quickstart.main(["--steps", "5", "--out", str(tmp_path)])


@pytest.mark.slow
def test_clip_cl_smoke_preset_as_a_script_from_another_directory(tmp_path: Path):
    if not (DATA_ROOT / "cifar-100-python").is_dir():
        pytest.skip(f"CIFAR-100 not found under {DATA_ROOT} (set HYBRIDZO_DATA_ROOT)")
    if not (REPO / "examples" / "checkpoints" / "tiny_clip.pt").is_file():
        pytest.skip("examples/checkpoints/tiny_clip.pt is missing")
    pytest.importorskip("open_clip", reason="needs the examples extra")
    (tmp_path / "data").symlink_to(DATA_ROOT)
    done = run_example("clip_cl", ["--preset", "smoke", "--data-root", "data", "--out", "smoke", "--no-progress"],
                       "script from elsewhere", tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (tmp_path / "smoke" / "results.json").is_file() and (tmp_path / "smoke" / "accuracy_loss.png").is_file()


def test_accuracy_figure_has_chance_line_and_defines_last_and_avg():
    pytest.importorskip("matplotlib", reason="needs the examples extra")
    sys.path.insert(0, str(REPO))
    from examples.plots import accuracy_and_loss_figure, moving_average, smoothing_window

    figure = accuracy_and_loss_figure([66.0, 27.0], [1.7, 1.5, 1.3, 1.1, 0.9, 2.2, 2.0, 1.9, 1.7, 1.6],
                                      [0, 5], seen_classes=[5, 10])
    accuracy_axes, loss_axes = figure.axes
    accuracy_legend = " ".join(text.get_text() for text in accuracy_axes.get_legend().get_texts())
    assert "Last (after the final task) 27.0" in accuracy_legend and "Avg (mean over tasks) 46.5" in accuracy_legend
    assert "chance" in accuracy_legend
    chance = [line for line in accuracy_axes.get_lines() if line.get_label().startswith("chance")][0]
    assert list(chance.get_ydata()) == [20.0, 10.0]
    loss_legend = [text.get_text() for text in loss_axes.get_legend().get_texts()]
    assert "trailing mean of 2 steps, within each task" in loss_legend
    assert not any("moving average (10 steps)" in label for label in loss_legend)
    # A 10-step window on 5-step tasks would be the cumulative mean; the drawn window is half the shortest task.
    assert smoothing_window([5, 5], 10) == 2 and smoothing_window([100, 40], 10) == 10
    assert smoothing_window([1], 10) == 1
    values = [4.0, 2.0, 0.0, 2.0, 4.0]
    assert list(moving_average(values, 2)) == [4.0, 3.0, 1.0, 1.0, 3.0]
