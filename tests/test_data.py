"""Tests for examples/data.py: class orders, task splits and the CIFAR-100 / ImageFolder loaders."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from examples.data import (
    CLASS_ORDER_SEED,
    ImageDataset,
    LabeledImages,
    class_order,
    indices_of_classes,
    load_cifar100,
    load_image_folder,
    split_tasks,
)

CIFAR_ROOT = Path(os.environ.get("HYBRIDZO_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_cifar = pytest.mark.skipif(
    not (CIFAR_ROOT / "cifar-100-python" / "train").is_file(), reason="CIFAR-100 not available"
)


def test_class_order_is_deterministic_permutation():
    order = class_order(100)
    assert order == class_order(100, seed=CLASS_ORDER_SEED)
    assert sorted(order) == list(range(100))
    assert all(type(c) is int for c in order)
    # The CIFAR-100 order used by PyCIL and MoE-Adapters4CL with seed 1993.
    assert order[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert class_order(100, seed=0) != order


def test_class_order_rejects_nonpositive():
    with pytest.raises(ValueError):
        class_order(0)


def test_split_tasks_consecutive_chunks():
    order = class_order(100)
    tasks = split_tasks(order, num_tasks=5, classes_per_task=10, first_class=50)
    assert len(tasks) == 5 and all(len(t) == 10 for t in tasks)
    assert [c for t in tasks for c in t] == order[50:100]
    assert split_tasks(order, 10, 10) == [order[i : i + 10] for i in range(0, 100, 10)]


@pytest.mark.parametrize("num_tasks,per_task,first", [(11, 10, 0), (6, 10, 50), (1, 1, 100), (0, 10, 0), (2, 0, 0)])
def test_split_tasks_rejects_bad_sizes(num_tasks, per_task, first):
    with pytest.raises(ValueError):
        split_tasks(list(range(100)), num_tasks, per_task, first_class=first)


def test_indices_of_classes_per_class_is_first_samples():
    labels = np.array([0, 1, 2, 1, 0, 2, 1, 0])
    np.testing.assert_array_equal(indices_of_classes(labels, [1, 0]), [0, 1, 3, 4, 6, 7])
    np.testing.assert_array_equal(indices_of_classes(labels, [1, 0], per_class=2), [0, 1, 3, 4])
    assert indices_of_classes(labels, []).size == 0
    with pytest.raises(ValueError):
        indices_of_classes(labels, [0], per_class=0)


def test_image_dataset_applies_transform():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    source = LabeledImages(images=images, labels=np.array([3, 7]), classnames=["a"] * 8, superclass_of=None)
    dataset = ImageDataset(source, [1], transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert len(dataset) == 1
    tensor, label = dataset[0]
    assert label == 7 and isinstance(label, int)
    assert torch.equal(tensor, torch.from_numpy(images[1]))
    with pytest.raises(ValueError):
        ImageDataset(source, [2], transform=lambda im: im)


def test_load_image_folder(tmp_path):
    for classname in ("b_class", "a_class"):
        (tmp_path / "train" / classname).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (5, 5), color=i * 100).save(tmp_path / "train" / classname / f"{i}.png")
    folder = load_image_folder(tmp_path, "train")
    assert folder.classnames == ["a class", "b class"]
    assert list(folder.labels) == [0, 0, 1, 1]
    assert folder.image(0).mode == "RGB"
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path, "val")


def test_missing_cifar_names_paths_and_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_cifar100(tmp_path, train=True)


@pytest.fixture(scope="module")
def cifar():
    return load_cifar100(CIFAR_ROOT, train=True), load_cifar100(CIFAR_ROOT / "cifar-100-python", train=False)


@needs_cifar
def test_cifar100_sizes_and_names(cifar):
    train, test = cifar
    assert train.images.shape == (50_000, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (10_000, 32, 32, 3)
    assert train.labels.dtype == np.int64
    assert np.all(np.bincount(train.labels, minlength=100) == 500)
    assert np.all(np.bincount(test.labels, minlength=100) == 100)
    assert len(train.classnames) == 100 and train.classnames[0] == "apple"
    assert train.classnames == sorted(train.classnames)
    assert train.superclass_of[train.classnames.index("apple")] == "fruit and vegetables"
    assert len(set(train.superclass_of)) == 20


@needs_cifar
def test_cifar100_official_train_order(cifar):
    train, _ = cifar
    first = [train.classnames[c] for c in train.labels[:10]]
    assert first == ["cattle", "dinosaur", "apple", "boy", "aquarium fish",
                     "telephone", "train", "cup", "cloud", "elephant"]


@needs_cifar
def test_cifar100_pixel_statistics(cifar):
    train, _ = cifar
    mean = train.images[:5000].reshape(-1, 3).mean(axis=0) / 255
    np.testing.assert_allclose(mean, [0.507, 0.487, 0.441], atol=0.01)
