"""Class-incremental learning of CLIP with adapters, optimised by hybridzo's zeroth-/first-order mix.

Reproduces the setting of "Branch, or Layer? Zeroth-Order Optimization for Continual Learning of
Vision-Language Models" (MoE-Adapters4CL with ZO on one CLIP branch, on interleaved layers, or MoZO) and of
ZO-FC (ZO on a small parallel adapter, FO on a linear classifier), at paper scale on a GPU or at CPU scale
with a tiny CLIP pretrained offline.

Examples (after ``pip install -e ".[examples]"``; ``python examples/clip_cl.py`` works the same, from any
directory, and relative paths in flags are relative to the current directory)::

    # FO baseline and MoZO on odd layers of both towers, tiny CLIP on 2 CPU cores (< 30 min each)
    python -m examples.clip_cl --preset cpu --zo-branch none --out runs/cpu-fo
    python -m examples.clip_cl --preset cpu --zo-branch dual --zo-layers hop-odd --mozo --out runs/cpu-mozo

    # ZO-FC: ZO on a rank-5 adapter in the first 5 vision blocks, FO linear head
    python -m examples.clip_cl --preset zofc

    # The paper's setting on a GPU: ViT-B/16 (OpenAI weights), CIFAR-100 Inc10
    python -m examples.clip_cl --preset paper --zo-branch language --zo-layers hop-even

Writes ``results.json`` (config, class order, tasks, accuracy matrix, Last/Avg/forgetting, pass counts, time,
peak memory, per-step losses, the evaluated split, the thread count and kernel path) and ``accuracy_loss.png`` to
``--out``. With the same flags, checkpoint, versions, thread count and CPU kernel path, a run repeats its losses
and accuracy matrix bit for bit (see ``reproducibility.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if __package__ in (None, ""):  # `python examples/clip_cl.py`: import as the package examples/ of this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "examples"

from .branches import ZO_BRANCHES

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from .protocol import OptimConfig

# torch, open_clip and the modules that import them are imported by the functions that use them, after the
# command line is parsed, so that --help and argument errors answer at once.

EXAMPLES_DIR = Path(__file__).resolve().parent
TINY_CHECKPOINT = EXAMPLES_DIR / "checkpoints" / "tiny_clip.pt"
"""Checkpoint loaded by ``--model tiny`` (written by ``python -m examples.tiny_clip pretrain``)."""

CHECKPOINT_NAME = "checkpoint.pt"
"""The run's state after its last finished task, in ``--out`` (see ``--resume`` and :mod:`examples.resume`)."""

MOZO_VISION_EPS_RATIO = 0.5
"""With ``--mozo`` and no ``--eps-vision``: eps of the vision tower = this ratio * ``--eps-language``."""

IMAGE_FOLDER_DATASETS = {
    # --dataset: (folder under --data-root, train split, test split)
    "tinyimagenet": ("tiny-imagenet-200", "train", "val"),
    "imagenet-r": ("imagenet-r", "train", "test"),
}

# The CPU presets adapt the paper's recipe to the tiny CLIP, which does not know the classes it learns: batch 32
# and lr 1e-2 (its adapters need more and larger steps), one torch thread (its many small kernels stall on shared
# cores), and frozen prompts of seen classes (their features are learnt, and re-encoding overwrites them). The
# measurements behind each choice are in benchmarks/README.md ("Tuning the CPU presets").
_TINY_CIFAR = dict(model="tiny", dataset="cifar100", first_class=50, batch_size=32, lr=1e-2, threads=1,
                   freeze_seen_prompts=True)
PRESETS: dict[str, dict[str, Any]] = {
    # Quick end-to-end check (used by the test suite): 2 tasks x 5 classes, a few steps each, with a small hybrid
    # (MoZO on the odd layers of both towers, FO on the even ones) so that both ZO and FO paths run.
    "smoke": dict(
        _TINY_CIFAR, adapter="moe", tasks=2, classes_per_task=5, max_train_per_class=32, max_test_per_class=20,
        warmup=2, zo_branch="dual", zo_layers="hop-odd", mozo=True,
    ),
    # CPU scale: the tiny CLIP (pretrained on the first 50 classes) learns the other 50 as 5 tasks of 10.
    "cpu": dict(_TINY_CIFAR, adapter="moe", tasks=5, classes_per_task=10, max_test_per_class=100),
    # ZO-FC on the CPU setting: ZO (4 queries) on a rank-5 adapter in the first 5 vision blocks,
    # FO on a linear head over the image features.
    "zofc": dict(
        _TINY_CIFAR, adapter="parallel", classifier="linear", tasks=5, classes_per_task=10, max_test_per_class=100,
        zo_branch="vision", zo_layers="all", queries=4,
    ),
    # The papers' backbone and benchmark, for a GPU: ViT-B/16 (OpenAI weights), CIFAR-100 Inc10.
    "paper": dict(
        model="ViT-B-16", pretrained="openai", dataset="cifar100", adapter="moe", first_class=0, tasks=10,
        classes_per_task=10,
    ),
}
"""``--preset`` values: defaults that explicit flags override."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default, except for on/off flags and ``None`` defaults (their help explains them)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (defaults are the paper's settings; ``--preset`` replaces some)."""
    parser = argparse.ArgumentParser(prog="python -m examples.clip_cl", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="fill defaults for a setting: " + "; ".join(
                            f"{name}: {', '.join(f'{k}={v}' for k, v in values.items())}"
                            for name, values in PRESETS.items()) + " (explicit flags override)")

    data = parser.add_argument_group("data and tasks")
    data.add_argument("--data-root", default="../shared/data",
                      help="folder holding cifar-100-python/, tiny-imagenet-200/{train,val}/<class>/ or "
                           "imagenet-r/{train,test}/<class>/, relative to the current directory")
    data.add_argument("--dataset", default="cifar100", choices=["cifar100", "tinyimagenet", "imagenet-r"],
                      help="benchmark")
    data.add_argument("--download", action="store_true", help="download CIFAR-100 if missing (needs internet)")
    data.add_argument("--classes-per-task", type=int, default=10, help="classes per task (Inc10: 10, Inc20: 20)")
    data.add_argument("--tasks", type=int, default=None,
                      help="number of tasks; default: as many as fit after --first-class")
    data.add_argument("--first-class", type=int, default=0,
                      help="position in the class order (seed 1993) where the first task starts")
    data.add_argument("--max-train-per-class", type=int, default=None,
                      help="use at most this many training images per class (default: all)")
    data.add_argument("--max-test-per-class", type=int, default=None,
                      help="use at most this many test (or validation) images per class (default: all)")
    data.add_argument("--validation-fraction", type=float, default=0.0,
                      help="hold out this share of every class's training images (chosen with "
                           "--validation-seed, not --seed), train on the rest and report accuracy on the held-out "
                           "images instead of the test set (for tuning); 0: train on all, test on the test set")
    data.add_argument("--validation-seed", type=int, default=None,
                      help="seed of the validation split (fixed, independent of the training --seed; default: "
                           "examples.data.VALIDATION_SEED)")

    model = parser.add_argument_group("model and adapters")
    model.add_argument("--model", default="ViT-B-16",
                       help="open_clip model name, or 'tiny' for the tiny CLIP of examples/tiny_clip.py")
    model.add_argument("--pretrained", default=None,
                       help="open_clip pretrained tag or a local checkpoint file; 'none' for random weights; "
                            f"default: 'openai', or {TINY_CHECKPOINT.relative_to(EXAMPLES_DIR.parent)} "
                            "for --model tiny")
    model.add_argument("--adapter", default="moe", choices=["moe", "lora", "parallel"],
                       help="trainable units: MoE adapters in every block of both towers (MoE-Adapters4CL), "
                            "LoRA on attention in both towers, or ZO-FC's parallel adapter in the vision tower")
    model.add_argument("--num-experts", type=int, default=2, help="experts per MoE adapter")
    model.add_argument("--top-k", type=int, default=2, help="experts used per sample")
    model.add_argument("--bottleneck", type=int, default=64, help="hidden size of each MoE expert")
    model.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    model.add_argument("--parallel-rank", type=int, default=5, help="rank of the ZO-FC parallel adapter")
    model.add_argument("--parallel-blocks", type=int, default=5,
                       help="leading vision blocks that get the ZO-FC parallel adapter")
    model.add_argument("--classifier", default="text", choices=["text", "linear"],
                       help="text: CLIP prompt logits ('a bad photo of a {}.'); linear: ZO-FC's growing "
                            "linear head on the image features (always FO)")
    model.add_argument("--freeze-seen-prompts", action=argparse.BooleanOptionalAction, default=False,
                       help="text classifier: keep each class's prompt feature from the end of its task instead "
                            "of re-encoding old prompts through adapters trained on later tasks (default: off, "
                            "as in MoE-Adapters4CL; on in the cpu preset)")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=1, help="epochs per task")
    training.add_argument("--batch-size", type=int, default=128, help="training batch size")
    training.add_argument("--max-steps-per-task", type=int, default=None,
                          help="stop each task after this many steps (default: all epochs)")
    training.add_argument("--lr", type=float, default=1e-3, help="learning rate of the FO groups")
    training.add_argument("--fo-rule", default="adamw", choices=["adamw", "sgd"], help="update rule of FO groups")
    training.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of every group")
    training.add_argument("--warmup", type=int, default=30,
                          help="linear warm-up steps of the cosine schedule, restarted every task")
    training.add_argument("--seed", type=int, default=0, help="seed of data order, routing noise, ZO directions")
    training.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    training.add_argument("--threads", type=int, default=None,
                          help="torch CPU threads (default: torch's choice, which depends on the machine; results "
                               "are reproducible for a fixed thread count only)")
    training.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                          help="torch.use_deterministic_algorithms for the run (warn-only on CUDA)")
    training.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")

    zo = parser.add_argument_group("zeroth-order placement (every trainable parameter not placed here is FO)")
    zo.add_argument("--zo-branch", default="none", choices=list(ZO_BRANCHES),
                    help="towers whose trainable parameters are ZO: none (FO baseline), dual (both), "
                         "vision or language")
    zo.add_argument("--zo-layers", default="all",
                    help="layers of those towers that are ZO, numbered from 1: all, hop-odd, hop-even, "
                         "prefix:K or suffix:K (the other layers stay FO)")
    zo.add_argument("--mozo", action=argparse.BooleanOptionalAction, default=False,
                    help="MoZO: --sign coordinate, --conservative, and --eps-vision = "
                         f"{MOZO_VISION_EPS_RATIO} x --eps-language unless given explicitly (on in the smoke "
                         "preset)")
    zo.add_argument("--sign", default=None, choices=["none", "coordinate", "scalar"],
                    help="sign normalisation of the ZO estimate: none, coordinate (element-wise, MoZO) or "
                         "scalar (default: coordinate with --mozo, else none)")
    zo.add_argument("--eps-vision", type=float, default=None,
                    help="ZO perturbation scale in the vision tower (default: --eps-language, halved with "
                         "--mozo)")
    zo.add_argument("--eps-language", type=float, default=1e-3, help="ZO perturbation scale in the language tower")
    zo.add_argument("--zo-lr", type=float, default=None, help="learning rate of the ZO groups (default: --lr)")
    zo.add_argument("--zo-rule", default="sgd", choices=["sgd", "adamw"],
                    help="update rule applied to the ZO estimate")
    zo.add_argument("--conservative", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the lowest-loss point among theta, theta-delta, theta+delta (the branch/layer "
                         "paper's default ZO; default: on with --mozo, else off)")
    zo.add_argument("--candidates", type=int, default=1, help="independent ZO estimates competing by loss")
    zo.add_argument("--queries", type=int, default=1, help="random directions averaged per ZO estimate")
    zo.add_argument("--estimator", default="central", choices=["central", "forward"],
                    help="finite differences: central (2 forwards per query) or forward (1)")
    zo.add_argument("--zo-restore", default="exact", choices=["exact", "inplace"],
                    help="how ZO parameters return after probes: exact (from a copy, bit for bit) or inplace "
                         "(no copy, MeZO's round trip; for ZO on large parameter sets)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", default=None,
                        help="output folder, relative to the current directory (default: "
                             "runs/<preset>-<dataset>-<placement>-seed<seed>)")
    output.add_argument("--no-progress", action="store_true", help="hide the per-task progress bars")
    output.add_argument("--resume", action="store_true",
                        help=f"continue from the last finished task saved in --out/{CHECKPOINT_NAME} (written after "
                             "every task, deleted when the run ends), with the same losses and accuracies as a run "
                             "never interrupted; starts at the first task if there is none")
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other flags (MoZO, device, output folder); returns ``args``."""
    args.sign = args.sign or ("coordinate" if args.mozo else "none")
    if args.conservative is None:
        args.conservative = args.mozo
    if args.eps_vision is None:
        args.eps_vision = args.eps_language * (MOZO_VISION_EPS_RATIO if args.mozo else 1.0)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.out is None:
        placement = "fo" if args.zo_branch == "none" else f"zo-{args.zo_branch}-{args.zo_layers.replace(':', '')}"
        placement += "-mozo" if args.mozo else ""
        placement += "-val" if args.validation_fraction > 0 else ""
        args.out = f"runs/{args.preset or 'custom'}-{args.dataset}-{placement}-seed{args.seed}"
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``): preset defaults first, then explicit flags, then
    :func:`resolve_args`."""
    parser = build_parser()
    preliminary, _ = parser.parse_known_args(argv)
    if preliminary.preset is not None:
        parser.set_defaults(**PRESETS[preliminary.preset])
    return resolve_args(parser.parse_args(argv))


def optim_config_from_args(args: argparse.Namespace) -> OptimConfig:
    """The ZO/FO placement and optimizer hyperparameters selected by resolved ``args``."""
    from .protocol import OptimConfig

    return OptimConfig(
        lr=args.lr,
        fo_rule=args.fo_rule,
        weight_decay=args.weight_decay,
        zo_branch=args.zo_branch,
        zo_layers=args.zo_layers,
        zo_lr=args.zo_lr,
        zo_rule=args.zo_rule,
        eps_vision=args.eps_vision,
        eps_language=args.eps_language,
        sign=None if args.sign == "none" else args.sign,
        queries=args.queries,
        estimator=args.estimator,
        candidates=args.candidates,
        conservative=args.conservative,
        zo_restore=args.zo_restore,
    )


def checkpoint_file(args: argparse.Namespace) -> Path | None:
    """The local weights file that ``--model``/``--pretrained`` load, or ``None`` (random or a named tag)."""
    if args.pretrained is not None and args.pretrained.lower() == "none":
        return None
    if args.model == "tiny":
        return Path(args.pretrained) if args.pretrained else TINY_CHECKPOINT
    return Path(args.pretrained) if args.pretrained and Path(args.pretrained).is_file() else None


def load_model(args: argparse.Namespace) -> tuple[nn.Module, Callable, Callable, Callable]:
    """Return ``(model, preprocess_train, preprocess_eval, tokenizer)`` for ``--model``/``--pretrained``."""
    import open_clip

    random_weights = args.pretrained is not None and args.pretrained.lower() == "none"
    if args.model == "tiny":
        from .tiny_clip import build_tiny_clip, load_tiny_clip, make_tokenizer, make_transforms

        if random_weights:
            return build_tiny_clip(), *make_transforms(), make_tokenizer()
        return load_tiny_clip(args.pretrained or TINY_CHECKPOINT)
    pretrained = None if random_weights else (args.pretrained or "openai")
    model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(args.model, pretrained=pretrained)
    return model, preprocess_train, preprocess_eval, open_clip.get_tokenizer(args.model)


def add_adapters(model: nn.Module, args: argparse.Namespace) -> list[str]:
    """Attach the ``--adapter`` units to ``model`` and return their parameter names."""
    from .adapters import add_lora, add_moe_adapters, add_parallel_adapter

    if args.adapter == "moe":
        return add_moe_adapters(model, num_experts=args.num_experts, top_k=args.top_k, bottleneck=args.bottleneck)
    if args.adapter == "lora":
        return add_lora(model, rank=args.lora_rank)
    return add_parallel_adapter(model, rank=args.parallel_rank, blocks=args.parallel_blocks, tower="vision")


def _wnid_names(folder: Path) -> dict[str, str]:
    """WordNet id -> first synonym, from Tiny-ImageNet's ``words.txt`` or ImageNet-R's ``README.txt``."""
    names: dict[str, str] = {}
    for listing in (folder / "words.txt", folder / "README.txt"):
        if listing.is_file():
            for line in listing.read_text(errors="replace").splitlines():
                match = re.match(r"(n\d{8})\s+(.+)", line.strip())
                if match:
                    names.setdefault(match.group(1), match.group(2).split(",")[0].strip())
    return names


def load_datasets(args: argparse.Namespace) -> tuple[Any, Any]:
    """Return ``(train, test)`` datasets of ``--dataset`` under ``--data-root``."""
    from .data import load_cifar100, load_image_folder

    root = Path(args.data_root).expanduser()
    if args.dataset == "cifar100":
        return load_cifar100(root, train=True, download=args.download), load_cifar100(root, train=False)
    folder_name, train_split, test_split = IMAGE_FOLDER_DATASETS[args.dataset]
    folder = root / folder_name if (root / folder_name).is_dir() else root
    train, test = load_image_folder(folder, train_split), load_image_folder(folder, test_split)
    if train.classnames != test.classnames:
        raise ValueError(f"the class folders of {folder / train_split} and {folder / test_split} differ")
    # Folder names of these datasets are WordNet ids; prompts need words.
    names = _wnid_names(folder)
    for source in (train, test):
        source.classnames = [names.get(name, name) for name in source.classnames]
    return train, test


def evaluation_split(args: argparse.Namespace, train: Any, test: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The images to train on, the images to report accuracy on, and a record of which they are.

    With ``--validation-fraction F > 0``: F of every class's *training* images held out (seeded by
    ``--validation-seed``), training on the rest and evaluation on the held-out ones; the test set is not used.
    Otherwise the whole training set and the test set.
    """
    from .data import VALIDATION_SEED, split_validation

    if args.validation_fraction <= 0:
        return train, test, {"split": "test", "validation_fraction": 0.0}
    if args.validation_seed is None:
        args.validation_seed = VALIDATION_SEED
    rest, held_out = split_validation(train, args.validation_fraction, args.validation_seed)
    return rest, held_out, {"split": "validation", "validation_fraction": args.validation_fraction,
                            "validation_seed": args.validation_seed, "held_out_images": len(held_out),
                            "training_images": len(rest)}


NOT_IDENTITY = frozenset({"out", "data_root", "no_progress", "resume", "num_workers"})
"""Flags that say where a run reads and writes, not what it computes: a checkpoint may be resumed with others."""


def run_identity(args: argparse.Namespace, weights_sha256: str | None) -> dict[str, Any]:
    """What a checkpoint must have been written under to be resumed by ``args``: every flag that changes what
    is computed, and the weights' checksum."""
    return {**{key: value for key, value in vars(args).items() if key not in NOT_IDENTITY},
            "weights_sha256": weights_sha256}


def versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    import open_clip
    import torch

    return {"torch": torch.__version__, "open_clip": open_clip.__version__}


def format_accuracy_table(acc_matrix: np.ndarray, seen_acc: Sequence[float]) -> str:
    """Text table: one row per training stage, accuracy (%) per task seen so far and on all seen classes."""
    num_tasks = len(seen_acc)
    header = ["after"] + [f"T{j + 1}" for j in range(num_tasks)] + ["seen"]
    rows = [header]
    for t in range(num_tasks):
        cells = [f"{acc_matrix[t, j]:.1f}" if j <= t else "" for j in range(num_tasks)]
        rows.append([f"task {t + 1}"] + cells + [f"{seen_acc[t]:.1f}"])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one class-incremental experiment; write ``results.json`` and ``accuracy_loss.png`` to ``--out``.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The results dict written to ``results.json``.
    """
    args = parse_args(argv)
    out = Path(args.out)
    if args.resume and (out / "results.json").is_file() and not (out / CHECKPOINT_NAME).is_file():
        raise SystemExit(f"--resume: {out} holds a finished run (results.json, no {CHECKPOINT_NAME}); nothing to "
                         "resume. Run without --resume to run it again.")
    import torch

    from .reproducibility import pinned_numerics

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} requested but CUDA is not available; pass --device cpu")
    # Threads and deterministic kernels are restored afterwards: main() may be called in-process (tests).
    with pinned_numerics(args.threads, args.device, args.deterministic):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """The body of :func:`main` for parsed ``args``."""
    from .adapters import freeze_backbone
    from .data import class_order, split_tasks
    from .resume import CheckpointError, TaskCheckpoint, write_atomically
    from .plots import plot_accuracy_and_loss
    from .reproducibility import numerics_fingerprint, seed_global_generators
    from .protocol import (
        LinearHeadClassifier,
        TextPromptClassifier,
        TrainConfig,
        average_accuracy,
        forgetting,
        last_accuracy,
        run_class_incremental,
    )

    seed_global_generators(args.seed)

    model, preprocess_train, preprocess_eval, tokenizer = load_model(args)
    weights = checkpoint_file(args)
    weights_sha256 = None if weights is None else hashlib.sha256(weights.read_bytes()).hexdigest()
    out = Path(args.out)
    task_checkpoint = TaskCheckpoint(out / CHECKPOINT_NAME, run_identity(args, weights_sha256),
                                     numerics={"versions": versions(), **numerics_fingerprint()})
    trainable = add_adapters(model, args)
    freeze_backbone(model, trainable)
    model.to(args.device)

    train_source, test_source, evaluation = evaluation_split(args, *load_datasets(args))
    order = class_order(len(train_source.classnames))
    num_tasks = args.tasks or (len(order) - args.first_class) // args.classes_per_task
    tasks = split_tasks(order, num_tasks, args.classes_per_task, args.first_class)

    if args.classifier == "text":
        classifier = TextPromptClassifier(
            model, tokenizer, train_source.classnames, freeze_seen_prompts=args.freeze_seen_prompts
        )
    else:
        classifier = LinearHeadClassifier(model, model.visual.output_dim)
    optim_config = optim_config_from_args(args)
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        warmup=args.warmup,
        max_steps_per_task=args.max_steps_per_task,
        num_workers=args.num_workers,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
    )
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model} + {args.adapter} adapters ({num_trainable:,} trainable parameters), "
          f"{args.dataset}: {num_tasks} tasks x {args.classes_per_task} classes, "
          f"ZO on {args.zo_branch}/{args.zo_layers}, device {args.device}")
    try:
        record = run_class_incremental(
            classifier,
            tasks,
            train_source,
            test_source,
            preprocess_train,
            preprocess_eval,
            optim_config,
            train_config,
            max_train_per_class=args.max_train_per_class,
            max_test_per_class=args.max_test_per_class,
            checkpoint=task_checkpoint,
            resume=args.resume,
        )
    except CheckpointError as error:
        raise SystemExit(f"--resume: {error}") from None

    results = {
        "command": "python -m examples.clip_cl " + shlex.join(sys.argv[1:] if argv is None else argv),
        "config": vars(args),
        "class_order": order,
        "tasks": tasks,
        "classnames": [[train_source.classnames[c] for c in task] for task in tasks],
        "last": last_accuracy(record.seen_acc),
        "avg": average_accuracy(record.seen_acc),
        "forgetting": forgetting(record.acc_matrix),
        **record.to_dict(),
        "trainable_parameters": num_trainable,
        "checkpoint_sha256": weights_sha256,
        "versions": versions(),
        "evaluation": evaluation,
        "numerics": numerics_fingerprint(),
    }
    out.mkdir(parents=True, exist_ok=True)
    # Written whole or not at all: a sweep takes a readable results.json for a finished run.
    text = json.dumps(results, indent=1) + "\n"
    write_atomically(out / "results.json", lambda partial: partial.write_text(text))
    task_checkpoint.discard()
    title = (f"{args.model} {args.dataset} {args.adapter}: ZO {args.zo_branch}/{args.zo_layers}"
             f"{' MoZO' if args.mozo else ''}, Last {results['last']:.1f}, Avg {results['avg']:.1f}")
    seen_classes = [sum(len(task) for task in tasks[:t + 1]) for t in range(len(tasks))]
    plot_accuracy_and_loss(record.seen_acc, record.losses, record.task_start_steps, out / "accuracy_loss.png", title,
                           seen_classes=seen_classes)

    if evaluation["split"] == "validation":
        print(f"accuracy on held-out training images ({args.validation_fraction:g} of each class, validation split), "
              "not on the test set")
    print(format_accuracy_table(record.acc_matrix, record.seen_acc))
    print(f"Last {results['last']:.2f}  Avg {results['avg']:.2f}  forgetting {results['forgetting']:.2f}  "
          f"| {record.steps} steps, {record.forward_passes} forwards, {record.backward_passes} backwards, "
          f"{record.wall_time_s:.0f} s, peak memory {record.peak_memory_mib:.0f} MiB ({record.peak_memory_kind})")
    print(f"wrote {out / 'results.json'} and {out / 'accuracy_loss.png'}")
    return results


if __name__ == "__main__":
    main()
