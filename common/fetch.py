"""Fetching a released model: download, print its sha256, check it, unzip it."""

import os
import sys
import zipfile

from common import download
from common.errors import UserError


def _safe_members(archive, destination):
    """The archive's entries, refusing any that would land outside `destination`."""
    root = os.path.realpath(destination)
    for member in archive.infolist():
        target = os.path.realpath(os.path.join(root, member.filename))
        if os.path.isabs(member.filename) or os.path.commonpath([root, target]) != root:
            raise UserError(f"refusing zip entry {member.filename!r}: it leaves {destination}")
    return archive.infolist()


def fetch_model(argv, urls, digests, destination):
    """The original `fetch_model.py NAME`: `urls` and published `digests` by model name."""
    if len(argv) != 2 or argv[1] not in urls:
        print(f"Usage: python fetch_model.py [{', '.join(urls)}]")
        sys.exit(1)
    name = argv[1]
    print("Downloading models")
    url = urls[name]
    try:
        path = download.download(url, destination, url.split("/")[-1])
    except Exception as error:
        raise UserError(f"cannot download {url}: {error}") from error
    digest = download.sha256_of(path)
    print(f"SHA256 hash: {digest}")
    if name in digests and digest != digests[name]:
        os.remove(path)
        raise UserError(f"{path} has sha256 {digest}, the published one is {digests[name]}")
    print("Extracting model")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(destination, members=_safe_members(archive, destination))
            first_entry = archive.namelist()[0]
    except zipfile.BadZipFile as error:
        raise UserError(f"{path} is not a valid zip file: {error}") from error
    print(f"Extracted model in {os.path.join(destination, first_entry)}")
