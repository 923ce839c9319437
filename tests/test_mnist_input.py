"""MNIST data: the official files, the 55,000-image training split, epoch-stream batches."""

import gzip
import os
import shutil

import numpy as np
import pytest

from common.runtime.errors import UserError
from mnist_challenge import mnist_input


def test_official_files_load_with_the_original_split(mnist_data):
    mnist = mnist_input.MNISTData(mnist_data)
    assert mnist.train_images.shape == (55000, 784) and mnist.train_images.dtype == np.float32
    assert mnist.test_images.shape == (10000, 784) and mnist.test_labels.dtype == np.int64
    assert mnist.train_images.min() == 0.0 and mnist.train_images.max() == 1.0
    assert abs(mnist.test_images.mean() - 0.1325) < 1e-4
    assert np.bincount(mnist.test_labels).tolist() == \
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # Examples 5000.. of the training file: the labels at the split's start, from the file.
    with gzip.open(os.path.join(mnist_data, "train-labels-idx1-ubyte.gz")) as labels:
        all_labels = np.frombuffer(labels.read(), np.uint8, offset=8)
    np.testing.assert_array_equal(mnist.train_labels, all_labels[5000:])


def test_batches_cover_each_epoch_once_and_cross_epoch_ends():
    num_examples, batch_size, seed = 120, 50, 7
    stream = np.concatenate([mnist_input.batch_indices(step, batch_size, num_examples, seed)
                             for step in range(12)])
    for epoch in range(5):
        epoch_part = stream[epoch * num_examples:(epoch + 1) * num_examples]
        assert sorted(epoch_part) == list(range(num_examples))
    # Step 2 takes the last 20 of epoch 0 and the first 30 of epoch 1.
    step_2 = mnist_input.batch_indices(2, batch_size, num_examples, seed)
    np.testing.assert_array_equal(step_2[:20], mnist_input.epoch_order(num_examples, seed, 0)[100:])
    np.testing.assert_array_equal(step_2[20:], mnist_input.epoch_order(num_examples, seed, 1)[:30])
    assert not np.array_equal(mnist_input.epoch_order(num_examples, seed, 0),
                              mnist_input.epoch_order(num_examples, seed, 1))


def test_truncated_file_is_named(mnist_data, tmp_path):
    for name in mnist_input.FILES.values():
        shutil.copy(os.path.join(mnist_data, name), tmp_path)
    with gzip.open(os.path.join(mnist_data, "t10k-images-idx3-ubyte.gz")) as images:
        content = images.read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb", compresslevel=1) as images:
        images.write(content[:-100])
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz is truncated"):
        mnist_input.MNISTData(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read MNIST file .*t10k-labels"):
        mnist_input._labels(str(tmp_path / "t10k-labels-idx1-ubyte.gz"))
