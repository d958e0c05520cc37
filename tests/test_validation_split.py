"""The validation split of examples/data.py and clip_cl.py, and the per-image augmentation seeds."""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from examples import clip_cl
from examples.data import (
    ImageDataset,
    LabeledImages,
    SubsetImages,
    augmentation_seed,
    indices_of_classes,
    source_index,
    split_validation,
    validation_indices,
)


def images(labels) -> LabeledImages:
    labels = np.asarray(labels, dtype=np.int64)
    pixels = (np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8))
    return LabeledImages(pixels, labels, [f"class {c}" for c in range(int(labels.max()) + 1)])


label_lists = st.lists(st.integers(0, 6), min_size=2, max_size=120)


@settings(max_examples=80)
@given(label_lists, st.sampled_from([0.05, 0.1, 0.2, 0.5]), st.integers(0, 2**31))
def test_split_is_disjoint_covers_the_training_set_and_holds_out_each_class(labels, fraction, seed):
    train = images(labels)
    rest, held_out = split_validation(train, fraction, seed)
    assert set(rest.indices).isdisjoint(held_out.indices)
    assert sorted([*rest.indices, *held_out.indices]) == list(range(len(labels)))
    labels = np.asarray(labels)
    for c in np.unique(labels):
        count = int((labels == c).sum())
        expected = 0 if count == 1 else min(count - 1, max(1, round(fraction * count)))
        assert int((held_out.labels == c).sum()) == expected  # every class keeps a training image
    assert np.array_equal(held_out.labels, labels[held_out.indices])


@settings(max_examples=40)
@given(label_lists, st.integers(0, 6))
def test_a_class_split_depends_on_that_class_and_the_split_seed_only(labels, dropped):
    """The held-out images of a class do not move when other classes come or go (another task split)."""
    labels = np.asarray(labels)
    full = validation_indices(labels, 0.2, seed=7)
    kept = np.flatnonzero(labels != dropped)  # a training set without one class, images in the same order
    partial = kept[validation_indices(labels[kept], 0.2, seed=7)]
    assert np.array_equal(partial, full[labels[full] != dropped])


def test_split_seed_matters_and_zero_fraction_holds_nothing_out():
    labels = np.repeat(np.arange(5), 40)
    assert not np.array_equal(validation_indices(labels, 0.1, 1), validation_indices(labels, 0.1, 2))
    assert validation_indices(labels, 0.0).size == 0
    with pytest.raises(ValueError):
        validation_indices(labels, 1.0)


def test_clip_cl_holds_out_training_images_never_test_images_and_ignores_the_training_seed():
    train, test = images(np.repeat(np.arange(4), 30)), images(np.repeat(np.arange(4), 10))
    splits = []
    for seed in (0, 1, 7):
        args = clip_cl.parse_args(["--validation-fraction", "0.2", "--seed", str(seed)])
        rest, evaluated, record = clip_cl.evaluation_split(args, train, test)
        assert rest.source is train and evaluated.source is train  # the test set is not touched
        assert set(rest.indices).isdisjoint(evaluated.indices)
        assert record["split"] == "validation" and record["held_out_images"] == len(evaluated) == 24
        splits.append(evaluated.indices)
    assert all(np.array_equal(splits[0], other) for other in splits[1:])
    rest, evaluated, record = clip_cl.evaluation_split(clip_cl.parse_args([]), train, test)
    assert (rest, evaluated, record["split"]) == (train, test, "test")


def test_subset_indices_and_caps_read_through_to_the_source():
    train = images(np.repeat(np.arange(3), 10))
    rest, held_out = split_validation(train, 0.3, seed=0)
    capped = indices_of_classes(rest.labels, [1], per_class=4)
    assert len(capped) == 4 and set(rest.labels[capped]) == {1}
    assert source_index(rest, int(capped[0])) == int(rest.indices[capped[0]])
    nested = SubsetImages(rest, np.array([2, 0]))
    assert source_index(nested, 0) == int(rest.indices[2])
    assert np.asarray(nested.image(1))[0, 0, 0] == int(rest.indices[0])


def _random_crop(image):
    """A stand-in augmentation that draws from torch's global generator, as torchvision's transforms do."""
    return torch.as_tensor(np.array(image), dtype=torch.float32).mean() + torch.rand(1)


def test_seeded_augmentation_ignores_global_rng_order_and_workers_but_follows_epoch_and_seed():
    train = images(np.repeat(np.arange(2), 6))
    dataset = ImageDataset(train, np.arange(12), _random_crop, augmentation_key=(3, 1))
    torch.manual_seed(0)
    first = torch.stack([dataset[i][0] for i in range(12)])
    torch.manual_seed(123)
    torch.rand(5)  # whatever else drew numbers before
    reversed_order = torch.stack([dataset[i][0] for i in reversed(range(12))]).flip(0)
    assert torch.equal(first, reversed_order)
    state = torch.get_rng_state()
    dataset[0]
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left alone
    loaded = torch.cat([batch for batch, _ in DataLoader(dataset, batch_size=5, num_workers=2)])
    assert torch.equal(loaded, first)
    dataset.epoch = 1
    assert not torch.equal(torch.stack([dataset[i][0] for i in range(12)]), first)
    other_seed = ImageDataset(train, np.arange(12), _random_crop, augmentation_key=(4, 1))
    assert not torch.equal(torch.stack([other_seed[i][0] for i in range(12)]), first)


def test_augmentation_follows_the_image_not_its_position_in_a_subset():
    train = images(np.repeat(np.arange(2), 6))
    rest, _ = split_validation(train, 0.5, seed=0)
    whole = ImageDataset(train, np.arange(12), _random_crop, augmentation_key=(0, 0))
    subset = ImageDataset(rest, np.arange(len(rest)), _random_crop, augmentation_key=(0, 0))
    for position in range(len(rest)):
        assert torch.equal(subset[position][0], whole[int(rest.indices[position])][0])
    assert augmentation_seed(0, 0, 0, 5) != augmentation_seed(0, 0, 1, 5) != augmentation_seed(0, 1, 0, 5)
