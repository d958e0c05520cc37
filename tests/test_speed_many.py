"""The many-tensors set of ``benchmarks/speed.py``: dispatch counts, paired ratios and the report's sections.

The counts are checked against a hand count of the MeZO loop (8 operations per tensor, the forward's
excluded); the report writer against a committed ``speed.md`` whose full-model section must survive a
many-tensors run byte for byte. The end-to-end run uses ``--smoke`` (16 tensors per set, about 20 s).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks import speed
from benchmarks._dispatch import DispatchCounter
from benchmarks._peers import PEERS

RESULTS = Path(speed.__file__).resolve().parent / "results"


def test_the_counter_sees_every_operation_but_those_it_is_told_to_skip() -> None:
    x = torch.ones(3)
    counter = DispatchCounter()
    with counter:
        x.add_(1)
        with counter.uncounted():
            x.mul_(2)
            with counter.uncounted():
                x.sub_(1)
            x.div_(2)
        torch._foreach_add_([x, x, x], 1.0)  # one launch for the whole list
    assert counter.counts == {"aten.add_.Tensor": 1, "aten._foreach_add_.Scalar": 1}
    assert counter.total == 2


def test_a_mezo_loop_step_dispatches_eight_operations_per_tensor_besides_its_forwards() -> None:
    params = speed.TensorSet(6, ((2, 8), (8, 2))).build(torch.device("cpu"), with_grads=False)
    forward = speed.FastForward(params)
    loop = speed.MeZOLoop(params, lr=1e-3, eps=1e-3)
    counter = DispatchCounter()
    forward.counter = counter
    with counter:
        loop.step(forward)
    # Per tensor: randn_like + add_ in each of 4 sweeps; per step: (f+ - f-) / (2 eps) and float() of it.
    assert counter.counts == {"aten.randn_like.generator": 4 * 6, "aten.add_.Tensor": 4 * 6, "aten.sub.Tensor": 1,
                              "aten.div.Tensor": 1, "aten._local_scalar_dense.default": 1}
    assert forward.seconds > 0


def test_the_mezo_loop_moves_along_the_estimate_and_restores_in_between() -> None:
    params = speed.TensorSet(2, ((3, 4),)).build(torch.device("cpu"), with_grads=False)
    start = [p.detach().clone() for p in params]
    losses = []

    def closure() -> torch.Tensor:
        losses.append(sum(float((p - s).sum()) for p, s in zip(params, start)))  # sum of (theta - theta_0)
        return torch.tensor(losses[-1])

    eps, lr = 1e-2, 1e-1
    speed.MeZOLoop(params, lr=lr, eps=eps).step(closure)
    generator = torch.Generator()
    z = []
    for index, p in enumerate(params):  # the loop's seed for (step 1, tensor index)
        generator.manual_seed(len(params) + index)
        z.append(torch.randn(p.shape, generator=generator))
    total = sum(float(zi.sum()) for zi in z)
    assert losses == pytest.approx([eps * total, -eps * total], rel=1e-4)
    for p, s, zi in zip(params, start, z):  # projected gradient (f+ - f-) / (2 eps) = sum(z)
        torch.testing.assert_close(p.detach(), s - lr * total * zi, rtol=0, atol=1e-5)


def test_ratios_pair_rows_round_by_round() -> None:
    comparison = speed.Comparison("zo", "ZO-SGD", speed.TensorSet(2, ((1, 1),)))
    comparison.rows["a"] = speed.ManyRow("a", None, step_s=[1.0, 4.0, 2.0])
    comparison.rows["b"] = speed.ManyRow("b", None, step_s=[2.0, 4.0, 8.0])
    comparison.rows["c"] = speed.ManyRow("c", None, note="not available")
    assert comparison.ratio("a", "b") == 0.5  # median of 0.5, 1, 0.25 (the median of times would give 2 / 4 too)
    assert comparison.ratio("a", "c") is None and comparison.ratio("a", "missing") is None


def test_fo_rows_are_torch_optims_three_implementations_beside_hybridzo() -> None:
    params = speed.TensorSet(3, ((4, 4),)).build(torch.device("cpu"), with_grads=True)
    for rule in ("adamw", "sgd"):
        rows = speed.fo_rows(params, rule)
        assert list(rows) == ["hybridzo", "hybridzo-foreach", "hybridzo-fused", "torch-loop", "torch-foreach",
                              "torch-fused"]
        for name in ("hybridzo", "torch-loop", "torch-foreach", "torch-fused"):  # all three exist on CPU
            assert rows[name].step is not None and rows[name].note == "", name
        for name, key in (("hybridzo-foreach", "foreach"), ("hybridzo-fused", "fused")):
            assert (rows[name].step is None) == (key in rows[name].note), rows[name].note  # n/a says which key


def test_sets_default_to_both_unless_full_model_rows_are_picked() -> None:
    assert speed.selected_sets(None, None) == ("full-model", "many-tensors")
    assert speed.selected_sets(None, ["zo-central"]) == ("full-model",)
    assert speed.selected_sets("many-tensors", None) == ("many-tensors",)
    assert speed.selected_sets("all", ["zo-central"]) == ("full-model", "many-tensors")


def test_a_run_of_one_set_keeps_the_other_sets_section() -> None:
    full = "# Time per step\n\n| a |\n| --- |\n"
    many = f"{speed.MANY_TENSORS_HEADING}\n\nfirst\n"
    both = speed.merge_report(full, None, many)
    assert both == f"{full}\n{many}"
    assert speed.merge_report(both, None, many.replace("first", "second")) == both.replace("first", "second")
    assert speed.merge_report(both, full.replace("| a |", "| b |"), None) == both.replace("| a |", "| b |")
    assert speed.merge_report(both, None, None) == both
    assert speed.merge_report(full, None, None) == full
    assert speed.merge_report(None, None, many).endswith(f"\n{many}")


@pytest.mark.slow
def test_smoke_run_writes_the_many_tensors_section_and_keeps_the_full_model_one(tmp_path: Path) -> None:
    out = tmp_path / "speed.md"
    shutil.copy(RESULTS / "speed.md", out)
    shutil.copy(RESULTS / "speed.json", out.with_suffix(".json"))
    committed = (RESULTS / "speed.md").read_text()
    full_model = committed.split(f"\n{speed.MANY_TENSORS_HEADING}\n")[0]
    committed_json = json.loads((RESULTS / "speed.json").read_text())

    speed.main(["--set", "many-tensors", "--smoke", "--out", str(out)])

    report = out.read_text()
    assert report.startswith(full_model + "\n") and report.count(speed.MANY_TENSORS_HEADING) == 1
    many = report.split(f"\n{speed.MANY_TENSORS_HEADING}\n")[1]
    assert "--set many-tensors --smoke" in many and "git commit" in many
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["raw"] == committed_json["raw"] and written["environment"] == committed_json["environment"]
    comparisons = written["many_tensors"]["comparisons"]
    assert list(comparisons) == ["zo 16 x 2,048", "zo 16 x 32,768", "adamw 16 x 2,048", "adamw 4 x 65,536",
                                 "sgd 16 x 2,048", "sgd 4 x 65,536"]
    for key, comparison in comparisons.items():
        for name, row in comparison["rows"].items():
            assert len(row["step_s"]) == (2 if not row["note"] else 0), (key, name)
    loop = comparisons["zo 16 x 2,048"]["rows"]["mezo-loop"]
    assert loop["ops"]["aten.randn_like.generator"] == 4 * 16 and sum(loop["ops"].values()) == 8 * 16 + 3
    rows = {}
    for line in many.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if line.startswith("| `hybridzo-exact`") or line.startswith("| `torch-foreach`"):
            rows.setdefault(cells[0], cells)
    exact = rows["`hybridzo-exact`"]
    assert exact[2] == "16 x 2,048 (8x256, 256x8)" and float(exact[5]) > 0 and " / " in exact[6]
    assert rows["`torch-foreach`"][-1].startswith("1.00 / ")
    targets = [line for line in many.splitlines() if line.startswith("| hybridzo exact / MeZO loop")]
    assert len(targets) == 1 and targets[0].split(" | ")[-1].strip(" |") in ("yes", "**no**")


@pytest.mark.slow
@pytest.mark.peers
def test_smoke_run_sets_hybridzo_against_both_peers(tmp_path: Path) -> None:
    for key in ("mezo", "torchzero"):
        if not PEERS[key].installed():
            pytest.skip(f"needs {PEERS[key].name}, an optional peer: {PEERS[key].install}")
    out = tmp_path / "speed.md"
    speed.main(["--set", "many-tensors", "--smoke", "--out", str(out)])
    report = out.read_text()
    assert report.startswith("# Time per step\n\nThe full-model set has not been run into this file")
    rows = json.loads(out.with_suffix(".json").read_text())["many_tensors"]["comparisons"]["zo 16 x 2,048"]["rows"]
    assert {"mezo-pkg", "tz-mezo"} <= set(rows) and all(len(rows[k]["step_s"]) == 2 for k in ("mezo-pkg", "tz-mezo"))
    assert "left out" not in report
    targets = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| hybridzo")}
    assert float(targets["hybridzo exact / PyPI mezo, 16 x 2,048 (8x256, 256x8)"].split(" | ")[2]) > 0
