"""Two runs of clip_cl.py with the same seed give the same losses and accuracy matrix, bit for bit.

The smoke preset, with a MoZO placement so that ZO probes, candidate selection and the MoE routing noise all run,
runs twice at once: in a fresh process with another hash seed and two DataLoader workers, and in this process
(after whatever the test session did to torch's state). Same flags, checkpoint, versions, thread count (the
preset's 1) and machine, so every number must match exactly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples import clip_cl

REPO = Path(__file__).resolve().parents[1]

DATA_ROOT = Path(os.environ.get("HYBRIDZO_DATA_ROOT", REPO.parent / "shared" / "data"))
ARGS = ["--preset", "smoke", "--zo-branch", "dual", "--zo-layers", "hop-odd", "--mozo", "--data-root", str(DATA_ROOT),
        "--no-progress"]
COMPARED = ("losses", "acc_matrix", "seen_acc", "zo_choices", "forward_passes", "backward_passes")


@pytest.mark.slow
def test_smoke_runs_repeat_bit_for_bit(tmp_path):
    if not clip_cl.TINY_CHECKPOINT.is_file():
        pytest.skip(f"tiny CLIP checkpoint {clip_cl.TINY_CHECKPOINT} not found")
    if not (DATA_ROOT / "cifar-100-python" / "train").is_file():
        pytest.skip(f"CIFAR-100 not found under {DATA_ROOT} (set HYBRIDZO_DATA_ROOT)")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    with open(tmp_path / "fresh.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "examples.clip_cl", *ARGS, "--num-workers", "2",
                                    "--out", str(tmp_path / "fresh")], cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        in_process = clip_cl.main([*ARGS, "--out", str(tmp_path / "in-process")])
        code = process.wait(timeout=600)
    assert code == 0, (tmp_path / "fresh.log").read_text()[-3000:]
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())

    assert fresh["steps"] > 0 and fresh["numerics"]["torch_threads"] == in_process["numerics"]["torch_threads"] == 1
    for key in COMPARED:
        assert in_process[key] == fresh[key], f"the two runs differ in {key}"
