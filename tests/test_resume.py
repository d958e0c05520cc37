"""Resuming a class-incremental run from its last finished task (examples/resume.py): the resumed run is the
uninterrupted run, bit for bit; a checkpoint of another run, or one interrupted while written, is never used."""

import json
import math

import numpy as np
import pytest
import torch

from examples import clip_cl
from examples.protocol import (
    ContinualRecord,
    LinearHeadClassifier,
    OptimConfig,
    TextPromptClassifier,
    TrainConfig,
    run_class_incremental,
)
from examples.resume import CheckpointError, TaskCheckpoint
from examples.tiny_clip import make_tokenizer, make_transforms

from test_clip_cl import run_smoke, small_clip, synthetic_images

TASKS = [[2, 0], [3, 1], [5, 4]]


class Interrupted(Exception):
    """Stands for whatever stops a process between tasks (Ctrl-C, a preemption, a session's end)."""


class InterruptAfter(TaskCheckpoint):
    """A checkpoint that stops the run right after it saved ``tasks_done`` tasks."""

    def __init__(self, path, identity, tasks_done):
        super().__init__(path, identity)
        self.stop_at = tasks_done

    def save(self, tasks_done, model, classifier, record):
        super().save(tasks_done, model, classifier, record)
        if tasks_done == self.stop_at:
            raise Interrupted


def make_run(classifier_kind):
    """A fresh process's run: model, classifier and a function that trains them on TASKS."""
    source = synthetic_images(num_classes=6)
    _, preprocess = make_transforms()
    if classifier_kind == "text":
        model = small_clip("moe")  # noisy routers: the global generator is drawn from during training
        classifier = TextPromptClassifier(model, make_tokenizer(16), source.classnames, freeze_seen_prompts=True)
        config = OptimConfig(zo_branch="dual", zo_layers="hop-odd", sign="coordinate", conservative=True)
    else:
        model = small_clip("parallel")
        classifier = LinearHeadClassifier(model, model.visual.output_dim)  # head rows drawn per task
        config = OptimConfig(zo_branch="vision", queries=2)

    def train(**kwargs):
        return run_class_incremental(classifier, TASKS, source, source, preprocess, preprocess, config,
                                     TrainConfig(batch_size=4, warmup=1, progress=False, seed=3),
                                     log=lambda line: None, **kwargs)

    return model, classifier, train


def assert_same_run(resumed: ContinualRecord, reference: ContinualRecord):
    for field in ("losses", "seen_acc", "task_start_steps", "steps", "forward_passes", "backward_passes",
                  "zo_choices", "groups"):
        assert getattr(resumed, field) == getattr(reference, field), field
    np.testing.assert_array_equal(resumed.acc_matrix, reference.acc_matrix)


def trained_state(model, classifier):
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return params, classifier.state_dict()


@pytest.mark.parametrize("classifier_kind", ["text", "linear"])
def test_resumed_run_is_the_uninterrupted_run(tmp_path, classifier_kind):
    model, classifier, train = make_run(classifier_kind)
    reference = train()
    reference_params, reference_classifier = trained_state(model, classifier)
    identity = {"run": classifier_kind}

    # Stopped after task 1, then after task 2, then run to the end: three fresh processes.
    path = tmp_path / "checkpoint.pt"
    for stop_at in (1, 2):
        _, _, train = make_run(classifier_kind)
        if stop_at > 1:
            torch.manual_seed(1234)  # whatever a new process drew before resuming: the checkpoint restores it
        with pytest.raises(Interrupted):
            train(checkpoint=InterruptAfter(path, identity, stop_at), resume=True)
        assert TaskCheckpoint(path, identity).load()["tasks_done"] == stop_at
    model, classifier, train = make_run(classifier_kind)
    torch.manual_seed(5678)
    resumed = train(checkpoint=TaskCheckpoint(path, identity), resume=True)

    assert_same_run(resumed, reference)
    assert resumed.resumed_at_task == [1, 2] and reference.resumed_at_task == []
    assert resumed.steps == len(resumed.losses) > 0 and not math.isnan(resumed.acc_matrix[-1, 0])
    params, classifier_state = trained_state(model, classifier)
    assert params.keys() == reference_params.keys()
    for name in params:
        assert torch.equal(params[name], reference_params[name]), name
    for key, value in classifier_state.items():
        expected = reference_classifier[key]
        if key == "frozen_features":
            assert value.keys() == expected.keys() and all(torch.equal(value[c], expected[c]) for c in value)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, expected), key
        else:
            assert value == expected, key


def test_without_resume_the_checkpoint_is_written_but_not_read(tmp_path):
    _, _, train = make_run("text")
    reference = train()
    path = tmp_path / "checkpoint.pt"
    _, _, train = make_run("text")
    with pytest.raises(Interrupted):
        train(checkpoint=InterruptAfter(path, {}, 2))
    _, _, train = make_run("text")
    restarted = train(checkpoint=TaskCheckpoint(path, {}))  # resume=False: starts over
    assert_same_run(restarted, reference)
    assert restarted.resumed_at_task == []
    assert TaskCheckpoint(path, {}).load()["tasks_done"] == len(TASKS)


def test_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path):
    path = tmp_path / "checkpoint.pt"
    model, classifier, train = make_run("text")
    record = ContinualRecord(acc_matrix=np.full((len(TASKS), len(TASKS)), np.nan)).to_dict()
    TaskCheckpoint(path, {"seed": 0, "lr": 0.02}).save(1, model, classifier, record)
    with pytest.raises(CheckpointError, match=r"lr=0\.02 \(this run: 0\.04\)") as refused:
        train(checkpoint=TaskCheckpoint(path, {"seed": 0, "lr": 0.04}), resume=True)
    assert "seed" not in str(refused.value)
    assert TaskCheckpoint(path, {"seed": 0, "lr": 0.02}).load()["tasks_done"] == 1  # left as it was

    # A model with other trainable parameters cannot take it either.
    model, classifier, _ = make_run("linear")
    from examples.resume import restore
    with pytest.raises(CheckpointError, match="trainable parameters differ"):
        restore(TaskCheckpoint(path, {"seed": 0, "lr": 0.02}).load(), model, classifier)

    torch.save({"format": 999}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="format"):
        TaskCheckpoint(tmp_path / "other.pt", {}).load()
    for garbage in (b"not a checkpoint", path.read_bytes()[:100], b""):  # a stray file, a truncated copy
        (tmp_path / "garbage.pt").write_bytes(garbage)
        with pytest.raises(CheckpointError, match="cannot be read"):
            TaskCheckpoint(tmp_path / "garbage.pt", {}).load()


def test_a_checkpoint_written_under_other_numerics_is_resumed_with_a_warning(tmp_path):
    path = tmp_path / "checkpoint.pt"
    model, classifier, _ = make_run("text")
    record = ContinualRecord(acc_matrix=np.full((len(TASKS), len(TASKS)), np.nan)).to_dict()
    TaskCheckpoint(path, {"seed": 0}, numerics={"torch_threads": 1}).save(1, model, classifier, record)
    with pytest.warns(UserWarning, match=r"other numerics: torch_threads=1 \(this run: 2\).*bit for bit"):
        assert TaskCheckpoint(path, {"seed": 0}, numerics={"torch_threads": 2}).load()["tasks_done"] == 1


@pytest.mark.parametrize("failing", ["save", "rename"])
def test_interrupt_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    path = tmp_path / "checkpoint.pt"
    model, classifier, _ = make_run("text")
    record = ContinualRecord(acc_matrix=np.full((2, 2), np.nan)).to_dict()
    TaskCheckpoint(path, {}).save(1, model, classifier, record)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        if failing == "save":  # half a file written, then the interrupt
            args[1].write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("examples.resume.torch.save" if failing == "save" else "examples.resume.os.replace", fail)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        TaskCheckpoint(path, {}).save(2, model, classifier, record)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.slow
def test_clip_cl_resume_flag_end_to_end(tmp_path, monkeypatch):
    """`--resume` on the smoke preset: the run stopped after task 1 ends as the uninterrupted one; the
    checkpoint is gone once results.json is written; other flags are refused with the flag named."""
    reference = run_smoke(tmp_path / "reference")
    assert not (tmp_path / "reference" / "checkpoint.pt").exists()

    out = tmp_path / "resumed"
    save = TaskCheckpoint.save

    def save_then_stop(self, tasks_done, *args):
        save(self, tasks_done, *args)
        raise Interrupted

    monkeypatch.setattr(TaskCheckpoint, "save", save_then_stop)
    with pytest.raises(Interrupted):
        run_smoke(out)
    monkeypatch.setattr(TaskCheckpoint, "save", save)
    with pytest.raises(SystemExit, match=r"--resume: .*seed=0 \(this run: 1\)"):
        run_smoke(out, "--resume", "--seed", "1")
    resumed = run_smoke(out, "--resume")

    for key in ("losses", "acc_matrix", "seen_acc", "last", "avg", "forgetting", "steps", "forward_passes",
                "zo_choices"):
        assert resumed[key] == reference[key], key
    assert resumed["resumed_at_task"] == [1] and reference["resumed_at_task"] == []
    assert json.loads((out / "results.json").read_text())["command"].endswith("--resume")
    assert not (out / "checkpoint.pt").exists()
    assert sorted(path.name for path in out.iterdir()) == ["accuracy_loss.png", "results.json"]
    with pytest.raises(SystemExit, match="finished run .*nothing to resume"):  # not trained again
        clip_cl.main(["--preset", "smoke", "--out", str(out), "--resume"])
