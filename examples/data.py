"""Datasets and class-incremental task splits for the continual-learning examples.

Everything here works offline: CIFAR-100 is read straight from the official "python version" pickles
(``cifar-100-python/{train,test,meta}``), and ImageFolder-style datasets (Tiny-ImageNet, ImageNet-R) are
read lazily from disk. Class orders and task splits follow MoE-Adapters4CL / PyCIL: a fixed permutation of
the class indices drawn with ``numpy.random.RandomState(1993)``, cut into consecutive chunks.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

CLASS_ORDER_SEED = 1993
"""Seed of the class permutation used by MoE-Adapters4CL and PyCIL."""

CIFAR100_FOLDER = "cifar-100-python"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def class_order(num_classes: int, seed: int = CLASS_ORDER_SEED) -> list[int]:
    """Return the fixed, seeded order in which classes arrive in class-incremental learning.

    Args:
        num_classes: Number of classes to permute (e.g. 100 for CIFAR-100).
        seed: Seed of ``numpy.random.RandomState``; default ``CLASS_ORDER_SEED`` (1993), as in
            MoE-Adapters4CL and PyCIL.

    Returns:
        A permutation of ``range(num_classes)`` as Python ints.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


def split_tasks(
    order: Sequence[int], num_tasks: int, classes_per_task: int, first_class: int = 0
) -> list[list[int]]:
    """Cut a class order into consecutive tasks.

    Args:
        order: The class order, e.g. from :func:`class_order`.
        num_tasks: Number of tasks.
        classes_per_task: Number of classes in each task.
        first_class: Position in ``order`` where the first task starts; default 0. The CPU preset uses
            ``first_class=50`` to learn ``order[50:100]`` as 5 tasks of 10 classes.

    Returns:
        ``num_tasks`` lists of ``classes_per_task`` class indices each.

    Raises:
        ValueError: If the counts are not positive or the tasks do not fit into ``order``.
    """
    if num_tasks < 1 or classes_per_task < 1:
        raise ValueError(
            f"num_tasks and classes_per_task must be positive, got {num_tasks} and {classes_per_task}"
        )
    if first_class < 0:
        raise ValueError(f"first_class must be non-negative, got {first_class}")
    end = first_class + num_tasks * classes_per_task
    if end > len(order):
        raise ValueError(
            f"{num_tasks} tasks of {classes_per_task} classes starting at position {first_class} need "
            f"{end} classes, but the class order has only {len(order)}"
        )
    return [
        [int(c) for c in order[start : start + classes_per_task]]
        for start in range(first_class, end, classes_per_task)
    ]


@dataclass
class LabeledImages:
    """A dataset held in memory.

    Attributes:
        images: uint8 array ``(N, H, W, 3)``, RGB, HWC (``(N, 32, 32, 3)`` for CIFAR).
        labels: int64 array ``(N,)`` of class indices.
        classnames: Human-readable class names indexed by label, with ``_`` replaced by spaces.
        superclass_of: For CIFAR-100, the coarse (superclass) name of each fine class; otherwise ``None``.
    """

    images: np.ndarray
    labels: np.ndarray
    classnames: list[str]
    superclass_of: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        """Return image ``index`` as an RGB PIL image."""
        return Image.fromarray(self.images[index])


@dataclass
class ImageFolderImages:
    """An ImageFolder-style dataset whose images stay on disk until accessed.

    Attributes:
        paths: Image file paths.
        labels: int64 array ``(N,)`` of class indices.
        classnames: Human-readable class names indexed by label (the folder names, ``_`` replaced by spaces).
        superclass_of: Always ``None``; present so both dataset kinds share one interface.
    """

    paths: list[Path]
    labels: np.ndarray
    classnames: list[str]
    superclass_of: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        """Open image ``index`` and convert it to RGB."""
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")


def _readable(name: str) -> str:
    return name.replace("_", " ")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _find_cifar100_folder(root: Path) -> Path | None:
    for candidate in (root / CIFAR100_FOLDER, root):
        if all((candidate / name).is_file() for name in ("train", "test", "meta")):
            return candidate
    return None


def load_cifar100(root: str | Path, train: bool, download: bool = False) -> LabeledImages:
    """Load CIFAR-100 from the official python-version pickles.

    Args:
        root: The folder that contains ``cifar-100-python/``, or that folder itself.
        train: ``True`` for the 50,000 training images, ``False`` for the 10,000 test images.
        download: If ``True`` and the files are missing, download them with torchvision into ``root``
            (needs internet access); default ``False``.

    Returns:
        The images (``(N, 32, 32, 3)`` uint8), fine labels, fine class names and the superclass name
        of each fine class.

    Raises:
        FileNotFoundError: If the pickles are not found (and ``download`` is ``False``).
    """
    root = Path(root).expanduser()
    folder = _find_cifar100_folder(root)
    if folder is None and download:
        import torchvision  # only needed for downloading

        torchvision.datasets.CIFAR100(str(root), train=train, download=True)
        folder = _find_cifar100_folder(root)
    if folder is None:
        tried = ", ".join(str(p) for p in (root / CIFAR100_FOLDER, root))
        raise FileNotFoundError(
            f"CIFAR-100 pickles (train, test, meta) not found; tried {tried}. "
            "Pass --data-root pointing at the folder that contains cifar-100-python/, "
            "or --download to fetch it (needs internet access)."
        )

    split = _unpickle(folder / ("train" if train else "test"))
    meta = _unpickle(folder / "meta")
    images = np.asarray(split["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    fine_labels = np.asarray(split["fine_labels"], dtype=np.int64)
    coarse_labels = np.asarray(split["coarse_labels"], dtype=np.int64)

    coarse_names = [_readable(n) for n in meta["coarse_label_names"]]
    classnames = [_readable(n) for n in meta["fine_label_names"]]
    # Each fine class belongs to exactly one superclass; read the mapping off the labels.
    coarse_of_fine = np.full(len(classnames), -1, dtype=np.int64)
    coarse_of_fine[fine_labels] = coarse_labels
    superclass_of = [coarse_names[c] for c in coarse_of_fine]
    return LabeledImages(
        images=np.ascontiguousarray(images),
        labels=fine_labels,
        classnames=classnames,
        superclass_of=superclass_of,
    )


def load_image_folder(root: str | Path, split: str) -> ImageFolderImages:
    """Index an ImageFolder-style dataset laid out as ``root/<split>/<class>/<image>``.

    Args:
        root: Dataset root (e.g. the Tiny-ImageNet or ImageNet-R folder).
        split: Sub-folder holding one folder per class, e.g. ``"train"`` or ``"test"``.

    Returns:
        Image paths and labels, with classes numbered in sorted folder-name order. Images are opened
        only when accessed.

    Raises:
        FileNotFoundError: If ``root/<split>`` does not exist or holds no images.
    """
    split_dir = Path(root).expanduser() / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder {split_dir} does not exist; check --data-root and the split name")
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images found under {split_dir}/<class>/")
    return ImageFolderImages(
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        classnames=[_readable(d.name) for d in class_dirs],
    )


VALIDATION_SEED = 31337
"""Seed of the validation split: fixed, and independent of the training ``--seed``."""


def augmentation_seed(seed: int, task: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation: a well-mixed function of the run seed, task, epoch and image.

    ``index`` is the image's position in its root dataset (:func:`source_index`), so the same image gets the same
    augmentation whichever subset (validation split, ``--max-train-per-class``) or batch it lands in, and
    whichever DataLoader worker loads it.

    Examples:
        >>> augmentation_seed(0, 1, 0, 7) == augmentation_seed(0, 1, 0, 7) != augmentation_seed(1, 0, 0, 7)
        True
    """
    return int(np.random.SeedSequence([seed, task, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(eq=False)
class SubsetImages:
    """Some images of another dataset, renumbered from 0, with the same interface as the full dataset.

    Attributes:
        source: The dataset the images come from.
        indices: Index in ``source`` of each image of the subset.
    """

    source: LabeledImages | ImageFolderImages | SubsetImages
    indices: np.ndarray

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64)
        self.labels = np.asarray(self.source.labels)[self.indices]
        self.classnames = self.source.classnames
        self.superclass_of = self.source.superclass_of

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, index: int) -> Image.Image:
        """Return image ``index`` of the subset as an RGB PIL image."""
        return self.source.image(int(self.indices[index]))


def source_index(dataset: LabeledImages | ImageFolderImages | SubsetImages, index: int) -> int:
    """Position of ``dataset``'s image ``index`` in the root dataset (through any :class:`SubsetImages`)."""
    while isinstance(dataset, SubsetImages):
        index, dataset = int(dataset.indices[index]), dataset.source
    return int(index)


def validation_indices(labels: np.ndarray, fraction: float, seed: int = VALIDATION_SEED) -> np.ndarray:
    """Pick ``fraction`` of every class's images to hold out for validation.

    Each class ``c`` with ``n`` images gives ``max(1, round(fraction * n))`` of them (none when ``fraction`` is 0),
    drawn without replacement by a generator seeded with ``(seed, c)``: the choice for a class depends on that
    class's images and ``seed`` only, not on the training seed, the task split or the other classes.

    Args:
        labels: int array ``(N,)`` of the labels of a *training* set (never hold out test images).
        fraction: Share of each class to hold out, in ``[0, 1)``.
        seed: Seed of the split; default :data:`VALIDATION_SEED`.

    Returns:
        Sorted int64 array of the held-out indices.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    if fraction == 0.0:
        return np.empty(0, dtype=np.int64)
    held_out = [np.empty(0, dtype=np.int64)]
    for c in np.unique(labels):
        class_indices = np.flatnonzero(labels == c)
        count = min(len(class_indices) - 1, max(1, round(fraction * len(class_indices))))
        generator = np.random.default_rng([seed, int(c)])
        held_out.append(generator.choice(class_indices, size=count, replace=False))
    return np.sort(np.concatenate(held_out)).astype(np.int64)


def split_validation(
    train: LabeledImages | ImageFolderImages, fraction: float, seed: int = VALIDATION_SEED
) -> tuple[SubsetImages, SubsetImages]:
    """Split a training set into ``(rest, validation)`` with :func:`validation_indices`.

    Args:
        train: The training images (the test set is never split).
        fraction: Share of each class to hold out, in ``(0, 1)``.
        seed: Seed of the split; default :data:`VALIDATION_SEED`.

    Returns:
        The images to train on and the held-out images, as two disjoint :class:`SubsetImages` of ``train``.
    """
    held_out = validation_indices(train.labels, fraction, seed)
    rest = np.setdiff1d(np.arange(len(train)), held_out, assume_unique=True)
    return SubsetImages(train, rest), SubsetImages(train, held_out)


def indices_of_classes(
    labels: np.ndarray, classes: Sequence[int], per_class: int | None = None
) -> np.ndarray:
    """Return the indices of the samples whose label is in ``classes``.

    Args:
        labels: int array ``(N,)`` of labels.
        classes: The classes to keep.
        per_class: If given, keep only the first ``per_class`` samples (in dataset order) of each class;
            default ``None`` keeps them all.

    Returns:
        Sorted int64 array of sample indices.
    """
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be positive or None, got {per_class}")
    labels = np.asarray(labels)
    selected = []
    for c in classes:
        class_indices = np.flatnonzero(labels == c)
        selected.append(class_indices if per_class is None else class_indices[:per_class])
    if not selected:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(selected)).astype(np.int64)


class ImageDataset(torch.utils.data.Dataset):
    """A subset of a dataset with a transform, yielding ``(image_tensor, label)`` pairs.

    Args:
        source: The dataset to draw from.
        indices: Indices into ``source`` that make up this subset.
        transform: Maps an RGB PIL image to a tensor (e.g. a CLIP preprocess).
        augmentation_key: If given, ``(seed, task)``: every image's transform runs with torch's global
            generator temporarily seeded by ``augmentation_seed(seed, task, self.epoch, source index)``, so
            a random augmentation depends on the image, the run and the epoch only, never on batch order,
            DataLoader workers or what else drew random numbers; default ``None`` (the transform draws from
            the global generator as it stands).
    """

    def __init__(
        self,
        source: LabeledImages | ImageFolderImages | SubsetImages,
        indices: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
        augmentation_key: tuple[int, int] | None = None,
    ) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(source)):
            raise ValueError(f"indices must lie in [0, {len(source)}), got range "
                             f"[{self.indices.min()}, {self.indices.max()}]")
        self.transform = transform
        self.augmentation_key = augmentation_key
        self.epoch = 0
        """Set by the training loop before each pass over the data (a key of the augmentation seed)."""

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[item])
        image = self.source.image(index)
        if self.augmentation_key is None:
            return self.transform(image), int(self.source.labels[index])
        seed, task = self.augmentation_key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(seed, task, self.epoch, source_index(self.source, index)))
            tensor = self.transform(image)
        return tensor, int(self.source.labels[index])
