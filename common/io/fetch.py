"""Fetching a released model: download, print its sha256, check it, unzip it safely.

The zip is untrusted input. It is checked whole before anything is extracted: every entry must
be a plain file or folder landing inside the destination, and the archive may not expand to far
more than its size suggests. It is extracted into a hidden folder beside the destination and
moved into place only when complete, so an interrupted fetch leaves no partial model.
"""

import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile

from common.io import download, files
from common.runtime.errors import UserError

# Checkpoints hardly compress; an archive expanding to more than this many times its size, plus
# a margin for small files, is refused as a zip bomb.
MAX_EXPANSION = 20
EXPANSION_MARGIN_BYTES = 10 << 20


def is_sha256(text):
    """True for None or 64 hexadecimal digits (an expected digest, the `--sha256` flag)."""
    return text is None or re.fullmatch(r"[0-9a-fA-F]{64}", text) is not None


def _check_entry(member, destination):
    name = member.filename
    kind = stat.S_IFMT(member.external_attr >> 16)
    if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        raise UserError(f"refusing zip entry {name!r}: it leaves {destination}")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UserError(f"refusing zip entry {name!r}: it is not a plain file or folder")
    root = os.path.realpath(destination)
    if os.path.commonpath([root, os.path.realpath(os.path.join(root, name))]) != root:
        raise UserError(f"refusing zip entry {name!r}: it leaves {destination}")


def _check_archive(archive, archive_bytes, destination):
    """Refuses the whole archive if any entry is unsafe, before anything is extracted."""
    for member in archive.infolist():
        _check_entry(member, destination)
    expanded = sum(member.file_size for member in archive.infolist())
    if expanded > MAX_EXPANSION * archive_bytes + EXPANSION_MARGIN_BYTES:
        raise UserError(f"refusing the archive: its {archive_bytes} bytes expand to {expanded}")


def _move_into_place(staging, destination):
    """Moves each top-level entry of `staging` into `destination`, replacing an older copy."""
    for name in os.listdir(staging):
        target = os.path.join(destination, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)
        os.replace(os.path.join(staging, name), target)


def extract(path, destination):
    """Extracts the zip at `path` into `destination` safely; returns its first entry's name."""
    try:
        with zipfile.ZipFile(path) as archive:
            _check_archive(archive, os.path.getsize(path), destination)
            staging = tempfile.mkdtemp(dir=destination, prefix=".extracting-")
            try:
                archive.extractall(staging)
                _move_into_place(staging, destination)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return archive.namelist()[0]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, IndexError) as error:
        raise UserError(f"{path} is not a valid zip file of a model: {error}") from error


def _check_digest(path, digest, expected, source):
    if expected is not None and digest != expected.lower():
        os.remove(path)
        raise UserError(f"{path} has sha256 {digest}, {source} is {expected}; removed it")


def fetch_model(argv, urls, digests, destination, expected_sha256=None):
    """The original `fetch_model.py NAME`: `urls` and published `digests` by model name, plus an
    optional expected digest (the `--sha256` flag)."""
    if len(argv) != 2 or argv[1] not in urls:
        print(f"Usage: python fetch_model.py [{', '.join(urls)}]")
        sys.exit(1)
    name = argv[1]
    files.check_writable_folder(destination, "model folder")
    print("Downloading models")
    url = urls[name]
    try:
        path = download.download(url, destination, url.split("/")[-1])
    except OSError as error:
        raise UserError(f"cannot download {url}: {error}") from error
    digest = download.sha256_of(path)
    print(f"SHA256 hash: {digest}")
    _check_digest(path, digest, digests.get(name), "the published one")
    _check_digest(path, digest, expected_sha256, "the one given by --sha256")
    print("Extracting model")
    first_entry = extract(path, destination)
    print(f"Extracted model in {os.path.join(destination, first_entry)}")
