"""A tiny open_clip CLIP that can be pretrained offline on a CPU, for CPU-sized continual-learning runs.

No pretrained CLIP weights can be downloaded here, so the examples use a small CLIP pretrained from scratch
on CIFAR-100's training images of the *first* 50 classes of ``class_order(100)``; the continual-learning
runs then learn the other 50. The architecture is open_clip's own (``open_clip.CLIP``): a ViT image tower
for 32x32 images and the standard causal text tower with open_clip's bundled BPE tokenizer (vocabulary
49,408), both 8 blocks deep so that layer-wise placements (odd/even blocks, first/last four) mean something.

Pretrain (about 17 minutes on 2 CPU cores; see examples/checkpoints/README.md for the stored checkpoint)::

    python -m examples.tiny_clip pretrain --data-root ../shared/data \\
        --out examples/checkpoints/tiny_clip.pt --minutes 16 --threads 1

Load::

    model, preprocess_train, preprocess_eval, tokenizer = load_tiny_clip("examples/checkpoints/tiny_clip.pt")
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torchvision import transforms
from tqdm import tqdm

if __package__ in (None, ""):  # `python examples/tiny_clip.py`: import as the package examples/ of this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "examples"

from .data import class_order, load_cifar100

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "tiny_clip.pt"
"""Where ``pretrain`` writes by default, and what ``clip_cl.py --model tiny`` loads."""

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 8},
}
"""Model config: keyword arguments of ``open_clip.CLIP`` with the tower configs as plain dicts."""

PRETRAIN_TEMPLATES = (
    "a photo of a {cls}, a kind of {superclass}.",
    "a blurry photo of a {cls}, a type of {superclass}.",
    "a low resolution photo of the {cls}, which is one of the {superclass}.",
    "a close-up photo of a {cls}, one of the {superclass}.",
    "a small photo of the {cls}, from the {superclass} category.",
    "a picture of a {cls}.",
    "a photo of the {superclass}: a {cls}.",
    "an image of a {cls} ({superclass}).",
)
"""Pretraining captions; naming the CIFAR-100 superclass ties unseen classes' text to seen ones."""

ZERO_SHOT_TEMPLATE = "a bad photo of a {}."
NUM_PRETRAIN_CLASSES = 50


def build_tiny_clip(config: dict[str, Any] | None = None) -> open_clip.CLIP:
    """Build a randomly initialised tiny CLIP.

    Args:
        config: Model config in the form of :data:`TINY_CLIP_CONFIG`; default ``None`` uses that.

    Returns:
        An ``open_clip.CLIP`` in fp32.
    """
    config = TINY_CLIP_CONFIG if config is None else config
    return open_clip.CLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=open_clip.CLIPVisionCfg(**config["vision_cfg"]),
        text_cfg=open_clip.CLIPTextCfg(**config["text_cfg"]),
    )


def make_tokenizer(context_length: int = TINY_CLIP_CONFIG["text_cfg"]["context_length"]) -> SimpleTokenizer:
    """Return open_clip's bundled BPE tokenizer (the one of ViT-B-32), padding/truncating to ``context_length``.

    Args:
        context_length: Tokens per text; default 32, the tiny model's context length.
    """
    return SimpleTokenizer(context_length=context_length)


def make_transforms(image_size: int = 32) -> tuple[Callable, Callable]:
    """Return ``(preprocess_train, preprocess_eval)`` for RGB PIL images.

    Args:
        image_size: Side of the model's square input; default 32 (CIFAR).

    Returns:
        Train: resize to ``image_size`` (a no-op for CIFAR), random crop with 4 px zero padding,
        horizontal flip, tensor, CIFAR-100 normalisation. Eval: resize, centre crop, tensor, normalisation.
    """
    normalize = transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)
    preprocess_train = transforms.Compose([
        transforms.Resize(image_size),
        transforms.RandomCrop(image_size, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    preprocess_eval = transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize,
    ])
    return preprocess_train, preprocess_eval


def load_tiny_clip(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[open_clip.CLIP, Callable, Callable, SimpleTokenizer]:
    """Load a checkpoint written by ``python -m examples.tiny_clip pretrain``.

    Args:
        path: Checkpoint file (config + fp16 state dict + metadata).
        device: Device for the model; default ``"cpu"``.

    Returns:
        ``(model, preprocess_train, preprocess_eval, tokenizer)``; the model is fp32 and in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tiny CLIP checkpoint {path} not found; create it with "
            "`python -m examples.tiny_clip pretrain --data-root <dir with cifar-100-python> --out {path}`"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    model = build_tiny_clip(config)
    model.load_state_dict({name: value.float() for name, value in checkpoint["state_dict"].items()})
    preprocess_train, preprocess_eval = make_transforms(config["vision_cfg"]["image_size"])
    tokenizer = make_tokenizer(config["text_cfg"]["context_length"])
    return model.to(device).eval(), preprocess_train, preprocess_eval, tokenizer


def save_tiny_clip(model: open_clip.CLIP, config: dict[str, Any], metadata: dict[str, Any], path: Path) -> None:
    """Save config, an fp16 copy of the state dict (halves the file) and metadata to ``path``."""
    state = {name: value.detach().to(torch.float16) for name, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "state_dict": state, "metadata": metadata}, path)


def _normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> normalised float."""
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def augment_batch(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Batched random crop (zero padding) and horizontal flip of uint8 ``(N, 3, H, W)`` images.

    The same augmentation as ``make_transforms()[0]``, done on whole batches because per-image PIL
    transforms would cost as much CPU as the tiny model itself.

    Args:
        images: uint8 images ``(N, 3, H, W)``.
        generator: Random generator (for reproducibility).
        padding: Zero padding on each side before cropping; default 4.

    Returns:
        Normalised float images ``(N, 3, H, W)``.
    """
    n, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    rows = (top + torch.arange(height).view(1, height, 1)).expand(n, height, width)
    cols = (left + torch.arange(width).view(1, 1, width)).expand(n, height, width)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1, 1), cols.flip(-1), cols)
    batch_index = torch.arange(n).view(n, 1, 1).expand(n, height, width)
    cropped = padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2)
    return _normalize(cropped)


@torch.no_grad()
def zero_shot_accuracy(
    model: open_clip.CLIP,
    tokenizer: SimpleTokenizer,
    images: np.ndarray,
    labels: np.ndarray,
    classnames: Sequence[str],
    classes: Sequence[int],
    template: str = ZERO_SHOT_TEMPLATE,
    batch_size: int = 500,
) -> float:
    """Zero-shot top-1 accuracy among ``classes`` on the images of those classes.

    Args:
        model: The CLIP model.
        tokenizer: Its tokenizer.
        images: uint8 images ``(N, H, W, 3)``.
        labels: Class of each image ``(N,)``.
        classnames: Name of every class, indexed by label.
        classes: Candidate classes; only images of these classes are scored.
        template: Prompt with one ``{}`` for the class name; default ``"a bad photo of a {}."``.
        batch_size: Images per forward pass; default 500.

    Returns:
        Accuracy in [0, 1].
    """
    model.eval()
    classes = list(classes)
    text_features = F.normalize(model.encode_text(tokenizer([template.format(classnames[c]) for c in classes])),
                                dim=-1)
    keep = np.isin(labels, classes)
    images_kept = torch.from_numpy(images[keep]).permute(0, 3, 1, 2)
    position = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([position[int(c)] for c in labels[keep]])
    correct = 0
    for start in range(0, len(targets), batch_size):
        features = F.normalize(model.encode_image(_normalize(images_kept[start:start + batch_size])), dim=-1)
        correct += (features @ text_features.T).argmax(-1).eq(targets[start:start + batch_size]).sum().item()
    return correct / max(len(targets), 1)


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP InfoNCE with one caption per class present in the batch (UniCL-style).

    Images of the same class share their caption, so they are not treated as negatives of each other:
    image -> text is a cross-entropy over the batch's captions, and text -> image spreads the target
    uniformly over the caption's images.

    Args:
        image_features: ``(N, D)`` L2-normalised image embeddings.
        text_features: ``(C, D)`` L2-normalised caption embeddings, one per class present.
        targets: ``(N,)`` index of each image's caption.
        logit_scale: Log of the temperature's inverse.
    """
    logits = logit_scale.exp() * image_features @ text_features.T
    image_to_text = F.cross_entropy(logits, targets)
    positives = F.one_hot(targets, num_classes=text_features.shape[0]).T.float()
    text_to_image = F.cross_entropy(logits.T, positives / positives.sum(1, keepdim=True))
    return (image_to_text + text_to_image) / 2


def _parameter_groups(model: open_clip.CLIP, weight_decay: float) -> list[dict[str, Any]]:
    # No weight decay on gains, biases, embeddings and the logit scale (standard CLIP practice); this also
    # keeps the embeddings of tokens never seen in pretraining at their initial values.
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        is_matrix = parameter.ndim >= 2 and "embedding" not in name and name != "positional_embedding"
        (decay if is_matrix else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain the tiny CLIP contrastively and save it; returns the checkpoint's metadata."""
    start_time = time.monotonic()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    order = class_order(100)
    seen_classes, unseen_classes = order[:NUM_PRETRAIN_CLASSES], order[NUM_PRETRAIN_CLASSES:]
    train = load_cifar100(args.data_root, train=True, download=args.download)
    test = load_cifar100(args.data_root, train=False)
    keep = np.isin(train.labels, seen_classes)
    train_images = torch.from_numpy(train.images[keep]).permute(0, 3, 1, 2).contiguous()
    train_labels = torch.from_numpy(train.labels[keep])
    captions = {
        c: [t.format(cls=train.classnames[c], superclass=train.superclass_of[c]) for t in PRETRAIN_TEMPLATES]
        for c in seen_classes
    }

    config = copy.deepcopy(TINY_CLIP_CONFIG)
    model = build_tiny_clip(config)
    tokenizer = make_tokenizer(config["text_cfg"]["context_length"])
    optimizer = torch.optim.AdamW(_parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    steps_per_epoch = len(train_labels) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    train_start = time.monotonic()
    train_budget = 60 * args.minutes

    def progress() -> float:
        # Whichever runs out first, steps or time, so that a run slowed by a busy CPU still ends annealed.
        return max(step / total_steps, (time.monotonic() - train_start) / train_budget)

    def learning_rate(fraction: float) -> float:
        # Linear warm-up over the first 5%, then cosine decay to zero.
        warmup = 0.05
        if fraction < warmup:
            return args.lr * (fraction + 1 / total_steps) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (fraction - warmup) / (1 - warmup))))

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    step, stopped_by_time = 0, False
    model.train()
    progress_bar = tqdm(total=total_steps, desc="pretrain", unit="step", mininterval=5, file=sys.stdout)
    for epoch in range(args.epochs):
        permutation = torch.randperm(len(train_labels), generator=generator)
        for batch_start in range(0, steps_per_epoch * args.batch_size, args.batch_size):
            fraction = progress()
            if fraction >= 1:
                stopped_by_time = True
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(fraction)
            batch = permutation[batch_start:batch_start + args.batch_size]
            labels = train_labels[batch]
            present, targets = labels.unique(return_inverse=True)
            texts = tokenizer([random.choice(captions[int(c)]) for c in present])
            images = augment_batch(train_images[batch], generator)
            with autocast:
                image_features = F.normalize(model.encode_image(images).float(), dim=-1)
                text_features = F.normalize(model.encode_text(texts).float(), dim=-1)
            loss = contrastive_loss(image_features, text_features, targets, model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # as in CLIP
            step += 1
            progress_bar.update()
            if step % 20 == 0:
                images_per_second = step * args.batch_size / (time.monotonic() - train_start)
                progress_bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", img_s=f"{images_per_second:.0f}")
        if stopped_by_time:
            break
    progress_bar.close()
    train_seconds = time.monotonic() - train_start

    model.eval()
    with autocast:
        seen_accuracy = zero_shot_accuracy(model, tokenizer, test.images, test.labels, test.classnames,
                                           seen_classes)
        unseen_accuracy = zero_shot_accuracy(model, tokenizer, test.images, test.labels, test.classnames,
                                             unseen_classes)
    elapsed = time.monotonic() - start_time
    metadata = {
        "seed": args.seed,
        "command": "python -m examples.tiny_clip " + shlex.join(sys.argv[1:]),
        "arguments": {k: str(v) for k, v in vars(args).items() if k != "func"},
        "pretrain_classes": seen_classes,
        "steps": step,
        "planned_steps": total_steps,
        "stopped_by_time_budget": stopped_by_time,
        "images_seen": step * args.batch_size,
        "train_images_per_second": step * args.batch_size / train_seconds,
        "elapsed_seconds": elapsed,
        "zero_shot_template": ZERO_SHOT_TEMPLATE,
        "zero_shot_accuracy_pretrain_classes": seen_accuracy,
        "zero_shot_accuracy_other_classes": unseen_accuracy,
        "torch_version": str(torch.__version__),
        "open_clip_version": open_clip.__version__,
    }
    save_tiny_clip(model, config, metadata, Path(args.out))
    print(f"steps {step}/{total_steps} ({'stopped by time budget' if stopped_by_time else 'complete'}), "
          f"{metadata['train_images_per_second']:.0f} images/s, elapsed {elapsed / 60:.1f} min")
    print(f"zero-shot accuracy ({ZERO_SHOT_TEMPLATE!r}): pretraining 50 classes {100 * seen_accuracy:.2f}%, "
          f"other 50 classes {100 * unseen_accuracy:.2f}%")
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    return metadata


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.tiny_clip", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain", help="pretrain on CIFAR-100's first 50 classes of class_order(100)")
    p.add_argument("--data-root", default="data",
                   help="folder containing cifar-100-python/, relative to the current directory (default: data)")
    p.add_argument("--download", action="store_true", help="download CIFAR-100 if missing (needs internet)")
    p.add_argument("--out", default=None,
                   help="checkpoint path, relative to the current directory (default: the checkpoint "
                        "examples/checkpoints/tiny_clip.pt of this checkout, from any directory)")
    p.add_argument("--minutes", type=float, default=16.0,
                   help="wall-clock budget of the training loop; the learning-rate schedule follows whichever "
                        "of steps and time runs out first, then the model is evaluated and saved (default: 16)")
    p.add_argument("--epochs", type=int, default=5, help="epochs the cosine schedule spans (default: 5)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast on the CPU (default: on)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (default: 2); use 1 when other jobs share the 2 cores, since "
                        "oversubscribed threads slow every step down many times over")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=pretrain)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(DEFAULT_CHECKPOINT)
    args.func(args)


if __name__ == "__main__":
    main()
