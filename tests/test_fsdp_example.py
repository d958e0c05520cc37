"""``examples/fsdp_zo.py`` end to end under torchrun (2 gloo processes, then 1), at toy sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_lm import fsdp2_available

pytestmark = pytest.mark.skipif(not fsdp2_available(), reason="torch.distributed with FSDP2 not available")


@pytest.mark.slow
def test_example_runs_under_torchrun_and_resumes_on_another_number_of_processes(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    tiny = ["--pretrain-steps", "3", "--batch", "4", "--width", "32", "--depth", "2", "--context", "16",
            "--text-chars", "4000", "--sample", "5", "--no-progress"]

    def run(processes: int, out: str, *args: str) -> dict:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), str(repo / "examples" / "fsdp_zo.py"), *tiny, "--out", str(tmp_path / out), *args]
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        return json.loads((tmp_path / out / "losses.json").read_text())

    whole = run(2, "whole", "--steps", "4")
    run(2, "first", "--steps", "2", "--save", str(tmp_path / "checkpoint"))
    resumed = run(1, "resumed", "--steps", "4", "--resume", str(tmp_path / "checkpoint"))  # FSDP2 on 1 process
    assert (tmp_path / "whole" / "loss.png").stat().st_size > 0
    assert len(whole["losses"]["pretrain"]) == 3 and len(whole["losses"]["zo"]) == 4
    assert resumed["losses"]["pretrain"] == whole["losses"]["pretrain"]  # the history travels with the checkpoint
    assert resumed["losses"]["zo"] == pytest.approx(whole["losses"]["zo"], rel=1e-5)
    assert resumed["world"] == 1 and whole["world"] == 2
