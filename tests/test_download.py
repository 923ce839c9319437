"""The datasets' official files downloaded through TensorFlow Datasets from a server on
127.0.0.1: placed under their official names when their size and sha256 match, refused and
removed when they do not, and a clear error naming the folder and files when offline."""

import hashlib
import os
import tarfile

import numpy as np
import pytest

from cifar10_challenge import cifar10_input
from common.io.download import OfficialFile
from common.runtime.errors import UserError
from mnist_challenge import mnist_input


def official(path, url, name=None):
    """The OfficialFile of the local file `path` served at `url` (size and sha256 read here)."""
    content = open(path, "rb").read()
    return OfficialFile(name or os.path.basename(path), url, len(content),
                        hashlib.sha256(content).hexdigest())


def leftovers(folder):
    return sorted(os.listdir(folder))


@pytest.fixture
def served_mnist(file_server, mnist_data, monkeypatch):
    """The shared MNIST files served locally, as the loader's official files."""
    served, url = file_server
    files = []
    for file in mnist_input.OFFICIAL_FILES:
        (served / file.name).write_bytes(open(os.path.join(mnist_data, file.name), "rb").read())
        files.append(official(served / file.name, url + file.name))
    monkeypatch.setattr(mnist_input, "OFFICIAL_FILES", files)
    return files


def test_mnist_downloads_into_the_data_folder(served_mnist, mnist_data, tmp_path):
    folder = tmp_path / "MNIST_data"
    mnist = mnist_input.MNISTData(str(folder))
    assert leftovers(folder) == sorted(file.name for file in served_mnist)
    for file in served_mnist:
        assert (folder / file.name).read_bytes() == \
            open(os.path.join(mnist_data, file.name), "rb").read()
    np.testing.assert_array_equal(mnist.test_labels[:5], [7, 2, 1, 0, 4])


def test_only_the_missing_files_are_downloaded(served_mnist, mnist_data, tmp_path, monkeypatch):
    folder = tmp_path / "MNIST_data"
    folder.mkdir()
    for file in served_mnist[1:]:
        (folder / file.name).write_bytes(open(os.path.join(mnist_data, file.name), "rb").read())
    first = served_mnist[0]
    # Only the first file may be fetched: every other address is wrong.
    monkeypatch.setattr(mnist_input, "OFFICIAL_FILES", [first] + [
        OfficialFile(file.name, "http://127.0.0.1:9/unused", file.size, file.sha256)
        for file in served_mnist[1:]])
    mnist_input.MNISTData(str(folder))
    assert leftovers(folder) == sorted(file.name for file in served_mnist)


@pytest.mark.parametrize("corrupt", [
    lambda file: OfficialFile(file.name, file.url, file.size, "0" * 64),
    lambda file: OfficialFile(file.name, file.url.replace("/t10k", "/cut/t10k"), file.size,
                              file.sha256),
])
def test_a_wrong_or_cut_download_is_refused_and_removed(served_mnist, tmp_path, monkeypatch,
                                                        corrupt):
    files = [corrupt(file) if file.name.startswith("t10k-images") else file
             for file in served_mnist]
    monkeypatch.setattr(mnist_input, "OFFICIAL_FILES", files)
    folder = tmp_path / "MNIST_data"
    with pytest.raises(UserError) as error:
        mnist_input.MNISTData(str(folder))
    message = str(error.value)
    assert "\n" not in message and "the download failed" in message
    assert leftovers(folder) == []


def test_offline_the_error_names_the_folder_and_files(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_input, "OFFICIAL_FILES", [
        OfficialFile(file.name, "http://127.0.0.1:9/" + file.name, file.size, file.sha256)
        for file in mnist_input.OFFICIAL_FILES])
    with pytest.raises(UserError) as error:
        mnist_input.MNISTData(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and "download failed" in message
    for name in mnist_input.FILES.values():
        assert name in message
    assert leftovers(tmp_path) == []


def test_cifar10_unpacks_the_official_archive(file_server, cifar_data, tmp_path, monkeypatch):
    served, url = file_server
    # Left uncompressed (gzip takes seconds); the loader opens either kind.
    with tarfile.open(served / "cifar-10-python.tar.gz", "w") as archive:
        for name in sorted(os.listdir(cifar_data)):
            archive.add(os.path.join(cifar_data, name), f"cifar-10-batches-py/{name}")
    monkeypatch.setattr(cifar10_input, "ARCHIVE", official(
        served / "cifar-10-python.tar.gz", url + "cifar-10-python.tar.gz"))
    folder = tmp_path / "cifar10_data"
    cifar = cifar10_input.CIFAR10Data(str(folder))
    needed = cifar10_input.TRAIN_FILES + [cifar10_input.TEST_FILE, cifar10_input.META_FILE]
    assert leftovers(folder) == sorted(needed)
    for name in needed:
        assert (folder / name).read_bytes() == open(os.path.join(cifar_data, name), "rb").read()
    assert cifar.test_labels[:4].tolist() == [3, 8, 8, 0]


def test_cifar10_offline_names_the_folder_and_files(tmp_path, monkeypatch):
    archive = cifar10_input.ARCHIVE
    monkeypatch.setattr(cifar10_input, "ARCHIVE", OfficialFile(
        archive.name, "http://127.0.0.1:9/cifar.tar.gz", archive.size, archive.sha256))
    with pytest.raises(UserError) as error:
        cifar10_input.CIFAR10Data(str(tmp_path))
    for name in ["data_batch_1", "data_batch_5", "test_batch", "batches.meta", str(tmp_path)]:
        assert name in str(error.value)
