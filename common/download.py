"""Downloads: the datasets' official files and the released model zips.

A download goes to a temporary file that takes its real name only when every byte has arrived,
so an interrupted one leaves nothing that a later run could take for data or a model.
"""

import hashlib
import os
import urllib.request

import tqdm

from common.errors import UserError
from common.files import written_in_place

BLOCK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as downloaded:
        for block in iter(lambda: downloaded.read(BLOCK_BYTES), b""):
            digest.update(block)
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
