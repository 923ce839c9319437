"""Downloads: the datasets' official files and the released model zips."""

import hashlib
import os

import keras

from common.errors import UserError


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as downloaded:
        for block in iter(lambda: downloaded.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url, folder, file_name):
    """Downloads `url` as `folder/file_name` (with keras' progress bar); returns the path.

    keras' `get_file` removes a partial file when the download fails.
    """
    os.makedirs(folder, exist_ok=True)
    return keras.utils.get_file(file_name, url, cache_dir=folder, cache_subdir="")


def fetch_missing(folder, base_url, file_names, dataset):
    """Downloads whichever of `file_names` are not yet in `folder` from `base_url`."""
    missing = [name for name in file_names if not os.path.exists(os.path.join(folder, name))]
    for name in missing:
        try:
            download(base_url + name, folder, name)
        except Exception as error:
            raise UserError(
                f"{dataset} data not found in {os.path.abspath(folder)} and the download failed "
                f"({error}); put these files there: {', '.join(missing)}") from error
