"""MNIST from the four official IDX files, split and batched as the original's tutorial loader.

Pixels are float32 in [0, 1], images flat (784). Training uses examples 5000..59999 of the
official training file (the first 5000 were the tutorial's validation split, which only the
overfitting guard of fast training looks at); the test set is
the official 10,000 in file order. Missing files are downloaded into `data_path`.
"""

import gzip
import os

import numpy as np

from common.io import download

from common.runtime import seeds
from common.io.download import OfficialFile
from common.runtime.errors import UserError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
SOURCE_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
# The official files' sizes and sha256 digests (as TensorFlow Datasets registers them).
OFFICIAL_FILES = [OfficialFile(name, SOURCE_URL + name, size, sha256) for name, size, sha256 in [
    (FILES["train_images"], 9912422,
     "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    (FILES["train_labels"], 28881,
     "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    (FILES["test_images"], 1648877,
     "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    (FILES["test_labels"], 4542,
     "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
]]
VALIDATION_SIZE = 5000
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def _fetch_missing(data_path):
    """Downloads whichever official files are not in `data_path` yet, checked, into it."""
    missing = [file for file in OFFICIAL_FILES
               if not os.path.exists(os.path.join(data_path, file.name))]
    if not missing:
        return
    names = [file.name for file in missing]
    with download.verified_downloads(data_path, missing, "MNIST", names) as paths:
        for name, path in paths.items():
            os.replace(path, os.path.join(data_path, name))


def _read_idx(path, magic, dims):
    """The uint8 array of an IDX file, checking its magic number and its declared size."""
    try:
        with gzip.open(path, "rb") as idx_file:
            content = idx_file.read()
    except (OSError, EOFError) as error:
        raise UserError(f"cannot read MNIST file {path}: {error}") from error
    header_size = 4 * (dims + 1)
    header = np.frombuffer(content[:header_size], dtype=">u4")
    if len(header) != dims + 1 or header[0] != magic:
        raise UserError(f"{path} is not an MNIST IDX file (bad header)")
    shape = tuple(int(size) for size in header[1:])
    data = np.frombuffer(content, dtype=np.uint8, offset=header_size)
    if data.size != np.prod(shape):
        raise UserError(f"{path} is truncated: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def _images(path):
    images = _read_idx(path, IMAGE_MAGIC, 3)
    return (images.reshape(len(images), -1) / 255.0).astype(np.float32)


def _labels(path):
    return _read_idx(path, LABEL_MAGIC, 1).astype(np.int64)


class MNISTData:
    """The training split (55,000), the validation split (5,000, never trained on) and the test
    set (10,000) of MNIST."""

    def __init__(self, data_path):
        _fetch_missing(data_path)
        path = {key: os.path.join(data_path, name) for key, name in FILES.items()}
        images, labels = _images(path["train_images"]), _labels(path["train_labels"])
        self.train_images, self.train_labels = images[VALIDATION_SIZE:], labels[VALIDATION_SIZE:]
        self.validation_images = images[:VALIDATION_SIZE]
        self.validation_labels = labels[:VALIDATION_SIZE]
        self.test_images = _images(path["test_images"])
        self.test_labels = _labels(path["test_labels"])
        if len(self.train_images) != len(self.train_labels) or \
                len(self.test_images) != len(self.test_labels):
            raise UserError(f"MNIST files in {data_path} disagree on the number of examples")


def epoch_order(num_examples, seed, epoch):
    """The shuffled order of one epoch: a function of the seed and the epoch alone."""
    return seeds.generator(seed, seeds.DATA_ORDER, epoch).permutation(num_examples)


def batch_indices(step, batch_size, num_examples, seed):
    """Indices of the training batch at `step`, in a stream of epochs reshuffled one by one.

    A batch that crosses an epoch's end takes the rest of that epoch and the first examples of
    the next, so nothing is dropped (the tutorial's `next_batch`). As the order depends only on
    the step, a resumed run continues the same sequence.
    """
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    orders = {epoch: epoch_order(num_examples, seed, epoch) for epoch in np.unique(epochs)}
    return np.array([orders[epoch][offset] for epoch, offset in zip(epochs, offsets)])
