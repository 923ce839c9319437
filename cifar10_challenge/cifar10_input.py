"""CIFAR-10 from the official "python version" pickles, batched and augmented as the original.

Images are uint8 32x32x3 (HWC), fed to the model as float32 in [0, 255]. Training batches come
from a shuffled pass over the 50,000 images; when fewer than a batch remain, the tail is dropped
and the data reshuffled. Each training batch is augmented before the attack: zero-padded to
36x36, randomly cropped back to 32x32 and randomly flipped left-right (the original's
`image_size + 4`). Missing files are downloaded into `data_path` from the official archive.
"""

import os
import pickle
import shutil
import tarfile

import numpy as np

from common.io import download

from common.runtime import seeds
from common.io.download import OfficialFile
from common.runtime.errors import UserError
from common.io.files import written_in_place

TRAIN_FILES = [f"data_batch_{index}" for index in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
# The official archive, with its size and sha256 (as Keras' cifar10 loader checks it).
ARCHIVE = OfficialFile("cifar-10-python.tar.gz",
                       "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 170498071,
                       "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")
ARCHIVE_FOLDER = "cifar-10-batches-py"
IMAGE_SIZE, PADDING = 32, 2


def _unpickle(path):
    """A pickle of the official dataset files (the dataset's own format; files from `data_path`
    are trusted as the original trusted them)."""
    try:
        with open(path, "rb") as data_file:
            return pickle.load(data_file, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise UserError(f"cannot read CIFAR-10 file {path}: {error}") from error


def _load_batch(path):
    content = _unpickle(path)
    try:
        data, labels = content[b"data"], np.array(content[b"labels"], dtype=np.int64)
        images = data.reshape((-1, 3, IMAGE_SIZE, IMAGE_SIZE)).transpose(0, 2, 3, 1)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{path} is not a CIFAR-10 batch file: {error}") from error
    if data.dtype != np.uint8 or len(images) != len(labels):
        raise UserError(f"{path} is not a CIFAR-10 batch file (bad data or labels)")
    return images, labels


def _fetch_missing(data_path):
    """Downloads the official archive and unpacks its files when any is missing."""
    needed = TRAIN_FILES + [TEST_FILE, META_FILE]
    if all(os.path.exists(os.path.join(data_path, name)) for name in needed):
        return
    with download.verified_downloads(data_path, [ARCHIVE], "CIFAR-10", needed) as paths, \
            tarfile.open(paths[ARCHIVE.name]) as tar:
        for name in needed:
            member = tar.getmember(f"{ARCHIVE_FOLDER}/{name}")
            with tar.extractfile(member) as source, \
                    written_in_place(os.path.join(data_path, name)) as target:
                shutil.copyfileobj(source, target)


class CIFAR10Data:
    """The 50,000 training and 10,000 test images of CIFAR-10, with the class names."""

    def __init__(self, data_path):
        _fetch_missing(data_path)
        batches = [_load_batch(os.path.join(data_path, name)) for name in TRAIN_FILES]
        self.train_images = np.concatenate([images for images, _ in batches])
        self.train_labels = np.concatenate([labels for _, labels in batches])
        self.test_images, self.test_labels = _load_batch(os.path.join(data_path, TEST_FILE))
        meta = _unpickle(os.path.join(data_path, META_FILE))
        self.label_names = [name.decode("utf-8") for name in meta[b"label_names"]]


def pass_order(num_examples, seed, pass_index):
    """The shuffled order of one pass: a function of the seed and the pass alone."""
    return seeds.generator(seed, seeds.DATA_ORDER, pass_index).permutation(num_examples)


def batch_indices(step, batch_size, num_examples, seed):
    """Indices of the training batch at `step`: passes of whole batches, the tail dropped."""
    if batch_size > num_examples:
        raise UserError(f"training_batch_size {batch_size} is larger than the {num_examples} "
                        "training images")
    batches_per_pass = num_examples // batch_size
    pass_index, batch_in_pass = divmod(step, batches_per_pass)
    first = batch_in_pass * batch_size
    return pass_order(num_examples, seed, pass_index)[first:first + batch_size]


def augment(images, rng):
    """Zero-pads to 36x36, crops a random 32x32 window and flips half the images left-right."""
    padded = np.pad(images, ((0, 0), (PADDING, PADDING), (PADDING, PADDING), (0, 0)))
    offsets = rng.integers(0, 2 * PADDING + 1, size=(len(images), 2))
    flips = rng.random(len(images)) < 0.5
    augmented = np.empty_like(images)
    for index, ((top, left), flip) in enumerate(zip(offsets, flips)):
        window = padded[index, top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
        augmented[index] = window[:, ::-1] if flip else window
    return augmented


def training_batch(data, step, batch_size, seed):
    """The augmented training batch of `step` as float32 images in [0, 255] and labels."""
    indices = batch_indices(step, batch_size, len(data.train_labels), seed)
    rng = seeds.generator(seed, seeds.AUGMENTATION, step)
    return augment(data.train_images[indices], rng).astype(np.float32), \
        data.train_labels[indices]
