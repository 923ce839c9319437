"""CIFAR-10 data: the official pickles, the original's pass logic and augmentation."""

import os
import shutil

import numpy as np
import pytest

from cifar10_challenge import cifar10_input
from common.runtime.errors import UserError


@pytest.fixture(scope="module")
def cifar(request):
    from helpers import shared_path
    return cifar10_input.CIFAR10Data(shared_path("data", "cifar10"))


def test_official_pickles_load(cifar):
    assert cifar.train_images.shape == (50000, 32, 32, 3) and cifar.train_images.dtype == np.uint8
    assert cifar.test_images.shape == (10000, 32, 32, 3)
    assert cifar.label_names[:3] == ["airplane", "automobile", "bird"]
    assert cifar.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert cifar.train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    means = cifar.train_images.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(means, [125.3069, 122.9504, 113.8654], atol=1e-3)


def test_passes_drop_the_tail_and_reshuffle():
    num_examples, batch_size, seed = 100, 32, 5
    batches_per_pass = 3
    first_pass = [cifar10_input.batch_indices(step, batch_size, num_examples, seed)
                  for step in range(batches_per_pass)]
    order = cifar10_input.pass_order(num_examples, seed, 0)
    np.testing.assert_array_equal(np.concatenate(first_pass), order[:96])
    next_pass = cifar10_input.batch_indices(batches_per_pass, batch_size, num_examples, seed)
    np.testing.assert_array_equal(next_pass, cifar10_input.pass_order(num_examples, seed, 1)[:32])
    assert not np.array_equal(next_pass, order[:32])
    assert all(len(batch) == batch_size for batch in first_pass)


def test_augmentation_pads_crops_and_flips():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (400, 32, 32, 3)).astype(np.uint8)
    augmented = cifar10_input.augment(images, np.random.default_rng(1))
    assert augmented.shape == images.shape and augmented.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    seen_offsets, flips = set(), 0
    for padded_image, result in zip(padded, augmented):
        matches = [(top, left, flip) for top in range(5) for left in range(5)
                   for flip in (False, True)
                   if np.array_equal(result, (lambda w: w[:, ::-1] if flip else w)(
                       padded_image[top:top + 32, left:left + 32]))]
        assert matches, "each result is a flipped or unflipped 32x32 window of the padded image"
        top, left, flip = matches[0]
        seen_offsets.add((top, left))
        flips += flip
        # The images have no zero pixel: the zeros are the padding the window takes in.
        rows, columns = abs(top - 2), abs(left - 2)
        assert np.count_nonzero(result == 0) == 3 * (32 * (rows + columns) - rows * columns)
    assert len(seen_offsets) == 25
    assert 150 < flips < 250
    assert (augmented == 0).any(), "windows off the centre show the zero padding"


def test_training_batch_is_float_in_pixel_range(cifar):
    x, y = cifar10_input.training_batch(cifar, 7, 128, seed=3)
    assert x.shape == (128, 32, 32, 3) and x.dtype == np.float32 and y.shape == (128,)
    assert x.min() >= 0 and x.max() <= 255
    again, _ = cifar10_input.training_batch(cifar, 7, 128, seed=3)
    np.testing.assert_array_equal(x, again)


def test_a_corrupt_file_is_named(cifar_data, tmp_path):
    for name in os.listdir(cifar_data):
        shutil.copy(os.path.join(cifar_data, name), tmp_path)
    with open(tmp_path / "data_batch_3", "r+b") as batch:
        batch.truncate(1000)
    with pytest.raises(UserError, match="cannot read CIFAR-10 file .*data_batch_3"):
        cifar10_input.CIFAR10Data(str(tmp_path))
