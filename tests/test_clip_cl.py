"""The CLIP continual-learning example: flag -> param-group mapping, the training loop, and an end-to-end run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from examples import clip_cl
from examples.adapters import add_moe_adapters, add_parallel_adapter, freeze_backbone
from examples.data import LabeledImages
from examples.protocol import (
    LinearHeadClassifier,
    OptimConfig,
    TextPromptClassifier,
    TrainConfig,
    build_groups,
    run_class_incremental,
    warmup_cosine,
)
from examples.tiny_clip import build_tiny_clip, make_tokenizer

REPO = Path(__file__).resolve().parents[1]

DATA_ROOT = Path(os.environ.get("HYBRIDZO_DATA_ROOT", REPO.parent / "shared" / "data"))
NUM_LAYERS = 4
SMALL_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": NUM_LAYERS, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": NUM_LAYERS},
}
EPS_VISION, EPS_LANGUAGE = 5e-4, 2e-3


def small_clip(adapter: str = "moe") -> torch.nn.Module:
    """A random 4-layer CLIP with adapters, backbone frozen."""
    torch.manual_seed(0)
    model = build_tiny_clip(SMALL_CLIP)
    if adapter == "moe":
        names = add_moe_adapters(model, bottleneck=8)
    else:
        names = add_parallel_adapter(model, rank=2, blocks=2)
    freeze_backbone(model, names)
    return model


def expected_zo_names(trainable: list, tower_prefix: str, layers: str) -> set:
    """Names of ``trainable`` in the tower whose layer (numbered from 1) ``layers`` selects."""
    selected = set()
    for name in trainable:
        if not name.startswith(tower_prefix):
            continue
        number = int(re.search(r"resblocks\.(\d+)\.", name).group(1)) + 1
        keep = {
            "all": True,
            "hop-odd": number % 2 == 1,
            "hop-even": number % 2 == 0,
            "suffix:2": number > NUM_LAYERS - 2,
        }[layers]
        if keep:
            selected.add(name)
    return selected


PLACEMENTS = [("none", "all")] + [
    (branch, layers) for branch in ("dual", "vision", "language") for layers in ("all", "hop-odd", "suffix:2")
]


@pytest.mark.parametrize("branch, layers", PLACEMENTS)
def test_placement_flags_map_to_groups(branch, layers):
    model = small_clip()
    args = clip_cl.parse_args(["--zo-branch", branch, "--zo-layers", layers, "--sign", "coordinate",
                               "--eps-vision", str(EPS_VISION), "--eps-language", str(EPS_LANGUAGE),
                               "--zo-restore", "inplace"])
    groups = build_groups(model.named_parameters(), clip_cl.optim_config_from_args(args))
    name_of = {id(p): n for n, p in model.named_parameters()}
    names_in = {group["name"]: {name_of[id(p)] for p in group["params"]} for group in groups}
    by_name = {group["name"]: group for group in groups}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    expected = {}
    if branch in ("dual", "vision"):
        expected["vision-zo"] = expected_zo_names(trainable, "visual.", layers)
    if branch in ("dual", "language"):
        expected["language-zo"] = expected_zo_names(trainable, "transformer.", layers)
    fo_names = set(trainable) - set().union(*expected.values())
    if fo_names:  # dual/all leaves nothing to FO, and the empty group is omitted
        expected["fo"] = fo_names
    assert names_in == expected
    for tower, eps in (("vision", EPS_VISION), ("language", EPS_LANGUAGE)):
        if f"{tower}-zo" in by_name:
            group = by_name[f"{tower}-zo"]
            assert (group["mode"], group["eps"], group["sign"], group["restore"]) == ("zo", eps, "coordinate",
                                                                                   "inplace")
    if "fo" in by_name:
        assert (by_name["fo"]["mode"], by_name["fo"]["rule"]) == ("fo", "adamw")


def test_mozo_shortcut_and_explicit_overrides():
    args = clip_cl.parse_args(["--mozo", "--zo-branch", "dual", "--eps-language", "2e-3"])
    config = clip_cl.optim_config_from_args(args)
    assert (config.sign, config.conservative) == ("coordinate", True)
    assert (config.eps_vision, config.eps_language) == (1e-3, 2e-3)

    args = clip_cl.parse_args(["--mozo", "--eps-vision", "3e-4", "--sign", "scalar", "--no-conservative"])
    config = clip_cl.optim_config_from_args(args)
    assert (config.sign, config.conservative, config.eps_vision) == ("scalar", False, 3e-4)

    config = clip_cl.optim_config_from_args(clip_cl.parse_args([]))
    assert (config.zo_branch, config.sign, config.conservative, config.eps_vision, config.zo_restore) == (
        "none", None, False, 1e-3, "exact")


def test_preset_fills_defaults_and_flags_override():
    args = clip_cl.parse_args(["--preset", "smoke", "--batch-size", "8"])
    assert (args.model, args.tasks, args.classes_per_task, args.first_class) == ("tiny", 2, 5, 50)
    assert args.batch_size == 8
    assert args.freeze_seen_prompts
    # The smoke preset is a small hybrid, MoZO on the odd layers of both towers, so the quick check runs ZO.
    assert (args.zo_branch, args.zo_layers, args.mozo, args.sign, args.conservative) == (
        "dual", "hop-odd", True, "coordinate", True)
    fo = clip_cl.parse_args(["--preset", "smoke", "--zo-branch", "none", "--no-mozo"])
    assert (fo.zo_branch, fo.mozo, fo.sign, fo.conservative) == ("none", False, "none", False)
    assert not clip_cl.parse_args(["--preset", "smoke", "--no-freeze-seen-prompts"]).freeze_seen_prompts
    paper = clip_cl.parse_args(["--preset", "paper"])
    assert paper.pretrained == "openai" and not paper.freeze_seen_prompts


def test_zo_branch_without_adapters_is_rejected():
    model = small_clip(adapter="parallel")  # vision tower only
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_groups(model.named_parameters(), OptimConfig(zo_branch="language"))


def test_warmup_cosine_schedule():
    multiplier = warmup_cosine(2, 6)
    assert [multiplier(s) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.5 * (1 + np.cos(np.pi / 4)),
                                                               0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))])


def synthetic_images(num_classes: int = 4, per_class: int = 6) -> LabeledImages:
    generator = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = generator.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    return LabeledImages(images, labels, [f"thing {c}" for c in range(num_classes)])


@pytest.mark.parametrize("classifier_kind", ["text", "linear"])
def test_run_class_incremental_records_a_consistent_history(classifier_kind):
    from examples.tiny_clip import make_transforms

    adapter = "moe" if classifier_kind == "text" else "parallel"
    model = small_clip(adapter)
    if classifier_kind == "text":
        classifier = TextPromptClassifier(model, make_tokenizer(16), synthetic_images().classnames)
        config = OptimConfig(zo_branch="dual", zo_layers="hop-odd", sign="coordinate", conservative=True)
    else:
        classifier = LinearHeadClassifier(model, model.visual.output_dim)
        config = OptimConfig(zo_branch="vision", queries=2, zo_restore="inplace")
    source = synthetic_images()
    _, preprocess = make_transforms()
    tasks = [[2, 0], [3, 1]]
    record = run_class_incremental(classifier, tasks, source, source, preprocess, preprocess, config,
                                   TrainConfig(batch_size=4, warmup=1, progress=False), log=lambda line: None)

    steps_per_task = 3  # 2 classes x 6 images / batch 4
    assert record.steps == len(record.losses) == 2 * steps_per_task
    assert record.task_start_steps == [0, steps_per_task]
    assert record.backward_passes == record.steps  # every placement keeps an FO group
    # One FO pass plus ZO probes every step (conservative adds two candidate forwards).
    forwards_per_step = 5 if classifier_kind == "text" else 1 + 2 * 2
    assert record.forward_passes == forwards_per_step * record.steps
    assert np.isnan(record.acc_matrix[0, 1]) and not np.isnan(record.acc_matrix[np.tril_indices(2)]).any()
    assert len(record.seen_acc) == 2
    assert all(np.isfinite(record.losses))
    if classifier_kind == "linear":
        assert classifier.head.num_classes == 4


def _shift_language_adapters(model: torch.nn.Module) -> None:
    """Move every language-tower adapter parameter, as training a new task would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and name.startswith("transformer."):
                parameter.add_(torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_seen_prompts_keeps_old_class_rows(freeze):
    model = small_clip()
    tokenizer = make_tokenizer(16)
    classnames = synthetic_images().classnames
    classifier = TextPromptClassifier(model, tokenizer, classnames, freeze_seen_prompts=freeze)
    model.eval()
    images = torch.randn(3, 3, 32, 32)

    def reference_logits(classes):  # prompts encoded through the model as it is now
        prompts = [classifier.template.format(classnames[c]) for c in classes]
        text = model.encode_text(tokenizer(prompts), normalize=True)
        return model.logit_scale.exp() * model.encode_image(images, normalize=True) @ text.T

    with torch.no_grad():
        model.train()
        classifier.end_task([2, 0])
        assert model.training  # end_task restores the mode it found
        model.eval()
        old_logits = reference_logits([2, 0])
        _shift_language_adapters(model)
        new_logits = reference_logits([2, 0, 3])
        assert not torch.allclose(old_logits, new_logits[:, :2])  # the shift does move the old prompts
        scored = classifier.scorer([2, 0, 3], torch.device("cpu"))(images)
        trained = classifier.train_logits(images, [3])

    # Class 3 (not yet seen) always follows the adapters; classes 2 and 0 keep their end-of-task rows
    # only when frozen.
    torch.testing.assert_close(scored[:, 2], new_logits[:, 2])
    torch.testing.assert_close(trained[:, 0], new_logits[:, 2])
    torch.testing.assert_close(scored[:, :2], old_logits if freeze else new_logits[:, :2])


def run_smoke(out: Path, *flags: str) -> dict:
    """``python -m examples.clip_cl --preset smoke`` in-process; checks what every run writes."""
    if not clip_cl.TINY_CHECKPOINT.is_file():
        pytest.skip(f"tiny CLIP checkpoint {clip_cl.TINY_CHECKPOINT} not found")
    if not (DATA_ROOT / "cifar-100-python" / "train").is_file():
        pytest.skip(f"CIFAR-100 not found under {DATA_ROOT} (set HYBRIDZO_DATA_ROOT)")
    results = clip_cl.main(["--preset", "smoke", "--data-root", str(DATA_ROOT), "--no-progress", "--out", str(out),
                            *flags])

    assert (out / "accuracy_loss.png").stat().st_size > 0
    written = json.loads((out / "results.json").read_text())
    assert written["last"] == results["last"]
    assert written["command"].startswith("python -m examples.clip_cl --preset smoke ")
    num_tasks = 2
    assert np.array(written["acc_matrix"], dtype=float).shape == (num_tasks, num_tasks)
    assert written["acc_matrix"][0][1] is None
    assert len(written["tasks"]) == num_tasks and all(len(task) == 5 for task in written["tasks"])
    assert len(written["seen_acc"]) == num_tasks
    assert written["steps"] == len(written["losses"]) > 0
    assert written["backward_passes"] == written["steps"]
    assert 0.0 <= written["last"] <= 100.0
    return written


@pytest.mark.slow
def test_smoke_preset_end_to_end_runs_a_mozo_hybrid(tmp_path):
    written = run_smoke(tmp_path)
    config = written["config"]
    assert (config["zo_branch"], config["zo_layers"], config["mozo"]) == ("dual", "hop-odd", True)
    assert config["sign"] == "coordinate" and config["conservative"] is True
    # One FO pass with backward, then the conservative ZO step's 4 forwards: theta +/- eps z, theta -/+ Delta.
    assert written["forward_passes"] == 5 * written["steps"]


@pytest.mark.slow
def test_smoke_preset_end_to_end_all_fo(tmp_path):
    written = run_smoke(tmp_path, "--zo-branch", "none", "--no-mozo")
    assert written["config"]["zo_branch"] == "none"
    assert written["forward_passes"] == written["steps"]


def test_help_answers_before_importing_torch():
    code = ("import runpy, sys\n"
            "sys.argv = ['clip_cl', '--help']\n"
            "try:\n"
            "    runpy.run_module('examples.clip_cl', run_name='__main__')\n"
            "except SystemExit as stop:\n"
            "    assert stop.code == 0, stop.code\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'numpy', 'hybridzo') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--zo-branch {none,dual,vision,language}" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_image_folder_dataset_gets_words_for_wordnet_ids(tmp_path):
    from PIL import Image

    folder = tmp_path / "tiny-imagenet-200"
    for split in ("train", "val"):
        for wnid in ("n01443537", "n01629819"):
            (folder / split / wnid).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / split / wnid / "0.png")
    (folder / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n")
    args = clip_cl.parse_args(["--dataset", "tinyimagenet", "--data-root", str(tmp_path)])
    train, test = clip_cl.load_datasets(args)
    assert train.classnames == test.classnames == ["goldfish", "European fire salamander"]
    assert list(train.labels) == [0, 1]
