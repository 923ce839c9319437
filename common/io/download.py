"""Downloads: the datasets' official files and the released model zips.

The datasets' files go through TensorFlow Datasets' DownloadManager, which checks each against
its published size and sha256. The model zips, whose digests are mostly unpublished, go through
`download`, which prints nothing but a progress bar so that `fetch_model.py` prints the
original's lines and the sha256 itself. Either way a download lands under a temporary name and
takes its real one only when complete and checked, so an interrupted or wrong one leaves nothing
that a later run could take for data or a model.

MNIST's content has a second, independent check, `MNIST_CONTENT_MD5`: the published md5 of each
file uncompressed, which holds for any gzip wrapping of the official files.
"""

import contextlib
import dataclasses
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
import zlib

import tqdm

from common.io.files import written_in_place
from common.runtime.errors import UserError

BLOCK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60
# TFDS retries a failed request 10 times with exponential back-off: offline, that took 204 s
# before the error. Two retries keep a flaky network covered and offline users waiting under 1 s.
TFDS_RETRIES = 2


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as downloaded:
        for block in iter(lambda: downloaded.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


# The official MNIST content: the md5 of each IDX file once uncompressed, by the names of the
# .gz files holding them. These are the widely published values (many MNIST loaders check them),
# recomputed here from ../shared/data/mnist, whose four files have this content in another gzip
# wrapping: recompressed, their .gz sha256 differs from the official files' in
# mnist_input.OFFICIAL_FILES, their content does not.
MNIST_CONTENT_MD5 = {
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}


def gunzipped_md5(path):
    """The md5 of the uncompressed content of the gzip file `path`; None where it is not a
    complete gzip file."""
    digest = hashlib.md5()
    try:
        with gzip.open(path, "rb") as content:
            for block in iter(lambda: content.read(BLOCK_BYTES), b""):
                digest.update(block)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def download(url, folder, file_name):
    """Downloads `url` as `folder/file_name`, with a progress bar; returns the path.

    Raises OSError (urllib's errors included) when the transfer fails or ends early.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file_name)
    with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, \
            written_in_place(path) as target:
        length = response.length
        received = 0
        with tqdm.tqdm(total=length, unit="B", unit_scale=True, desc=file_name) as progress:
            for block in iter(lambda: response.read(BLOCK_BYTES), b""):
                target.write(block)
                received += len(block)
                progress.update(len(block))
        if length is not None and received != length:
            raise OSError(f"the transfer ended after {received} of {length} bytes")
    return path


@dataclasses.dataclass(frozen=True)
class OfficialFile:
    """A dataset file as its publisher serves it: name, address, size and sha256."""

    name: str
    url: str
    size: int
    sha256: str


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class FailedFile(Exception):
    """The download of one file failed; the message names its URL and why, on one line."""


def _tfds_download(files, staging):
    """{name: path} of `files` downloaded by TFDS's DownloadManager into `staging`, each checked
    against its size and sha256; FailedFile naming the URL where one fails or differs."""
    import tensorflow_datasets as tfds  # imported here: it takes seconds, and is rarely needed
    from tensorflow_datasets.core.download import downloader
    from tensorflow_datasets.core.download.checksums import UrlInfo
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    downloader.MAX_RETRIES = TFDS_RETRIES
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # one error line, not one per retry
    manager = tfds.download.DownloadManager(
        download_dir=staging, force_checksums_validation=True,
        url_infos={file.url: UrlInfo(size=file.size, checksum=file.sha256, filename=file.name)
                   for file in files})
    # One file at a time: given several, TFDS downloads them in threads that go on writing
    # after the first failure, into the folder being removed.
    paths = {}
    for file in files:
        try:
            paths[file.name] = os.fspath(manager.download(file.url))
        except NonMatchingChecksumError as error:
            raise FailedFile(f"{file.url} is not the official {file.name}: its size or sha256 "
                             f"differs from {file.size} bytes, {file.sha256}") from error
        except Exception as error:  # TFDS and requests raise many kinds
            raise FailedFile(f"{file.url}: {_first_line(error)}") from error
    return paths


@contextlib.contextmanager
def verified_downloads(folder, files, dataset, needed):
    """Downloads the OfficialFiles `files` into a hidden folder inside `folder` and yields
    {name: path}; the hidden folder is removed afterwards, whatever happens, so a wrong or
    partial download never stays. A failed download raises UserError naming `folder` and the
    `needed` file names to put there by hand."""
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(dir=folder, prefix=".download-")
    try:
        try:
            paths = _tfds_download(files, staging)
        except Exception as error:  # TFDS and requests raise many kinds
            raise UserError(
                f"{dataset} data not found in {os.path.abspath(folder)} and the download failed "
                f"({_first_line(error)}); put these files there: {', '.join(needed)}") from error
        yield paths
    finally:
        shutil.rmtree(staging, ignore_errors=True)
