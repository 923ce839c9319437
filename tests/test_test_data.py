"""The test data on a machine without ../shared: the datasets' official files fetched by the data
readers' own downloader from a server on 127.0.0.1 into a cache, checked, and fetched once; a
wrong file refused by name and URL, with nothing wrong left under its name; ../shared/data used
as it is where it exists."""

import gzip
import hashlib
import os
import subprocess
import sys
import tarfile

import pytest
from helpers import (
    DATA_CACHE_VARIABLE,
    REPO,
    SHARED,
    data_cache,
    free_port,
    official_base_urls,
    resolve_data,
    serve_folder,
    shared_path,
)

from cifar10_challenge import cifar10_input
from common.io import download
from common.io.download import OfficialFile
from mnist_challenge import mnist_input

MNIST_NAMES = sorted(file.name for file in mnist_input.OFFICIAL_FILES)
CIFAR10_NAMES = sorted(cifar10_input.TRAIN_FILES + [cifar10_input.TEST_FILE,
                                                    cifar10_input.META_FILE])


def served_as(path, file):
    """The OfficialFile `file` as the local copy `path` has it (size and sha256 read here):
    what the server on 127.0.0.1 serves in place of the official file."""
    content = open(path, "rb").read()
    return OfficialFile(file.name, file.url, len(content), hashlib.sha256(content).hexdigest())


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def server(tmp_path):
    """An HTTP server of tmp_path/served on 127.0.0.1; yields (folder, base URL, requests)."""
    served = tmp_path / "served"
    served.mkdir()
    http_server, url = serve_folder(served)
    yield served, url, http_server.requests
    http_server.shutdown()


@pytest.fixture
def machine(tmp_path):
    """(shared, cache) of a machine without ../shared: a missing folder and an empty one."""
    cache = tmp_path / "cache"
    cache.mkdir()
    return str(tmp_path / "no-shared"), str(cache)


@pytest.fixture
def served_mnist(server, mnist_data, monkeypatch):
    """The MNIST files served locally, as the reader's official files: their content is the
    official one, their gzip wrapping may not be, so the sizes and sha256 the transfer is
    checked against are the copies'; the content is checked against the official md5s."""
    served, url, requests = server
    files = []
    for file in mnist_input.OFFICIAL_FILES:
        (served / file.name).write_bytes(open(os.path.join(mnist_data, file.name), "rb").read())
        files.append(served_as(served / file.name, file))
    monkeypatch.setattr(mnist_input, "OFFICIAL_FILES", files)
    return served, {"mnist": url}, requests


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.slow
def test_mnist_lands_in_the_cache_checked_and_is_downloaded_once(served_mnist, machine):
    served, urls, requests = served_mnist
    shared, cache = machine
    folder = resolve_data("mnist", shared, cache, urls)
    assert folder == os.path.join(cache, "mnist")
    assert listing(folder) == MNIST_NAMES  # no partial or staging file left beside them
    for file in mnist_input.OFFICIAL_FILES:
        path = os.path.join(folder, file.name)
        assert sha256(path) == file.sha256 == sha256(served / file.name)
        # The official checksums of MNIST's content, on its real files.
        assert download.gunzipped_md5(path) == download.MNIST_CONTENT_MD5[file.name]
    assert sorted(requests) == sorted(f"GET /{name}" for name in MNIST_NAMES)
    # A second session finds the cache filled: nothing is requested.
    assert resolve_data("mnist", shared, cache, urls) == folder
    assert len(requests) == len(MNIST_NAMES)
    assert mnist_input.MNISTData(folder).test_labels[:5].tolist() == [7, 2, 1, 0, 4]


def seed_cache(cache, source, names):
    folder = os.path.join(cache, "mnist")
    os.makedirs(folder, exist_ok=True)
    for name in names:
        with open(os.path.join(folder, name), "wb") as copy:
            copy.write(open(os.path.join(source, name), "rb").read())
    return folder


LABELS = "t10k-labels-idx1-ubyte.gz"


def cut(path):
    with open(path, "r+b") as cached:
        cached.truncate(100)


def flip_a_byte(path):
    content = bytearray(open(path, "rb").read())
    content[len(content) // 2] ^= 0xFF
    open(path, "wb").write(bytes(content))


def test_only_the_missing_files_are_downloaded(served_mnist, machine, mnist_data):
    served, urls, requests = served_mnist
    shared, cache = machine
    seed_cache(cache, mnist_data, [name for name in MNIST_NAMES if name != LABELS])
    folder = resolve_data("mnist", shared, cache, urls)
    assert listing(folder) == MNIST_NAMES
    assert requests == [f"GET /{LABELS}"]


def test_a_corrupted_download_is_refused_by_name_and_url(served_mnist, machine, mnist_data):
    served, urls, requests = served_mnist
    shared, cache = machine
    folder = seed_cache(cache, mnist_data, [name for name in MNIST_NAMES if name != LABELS])
    flip_a_byte(served / LABELS)  # same size, another sha256
    with pytest.raises(pytest.fail.Exception) as failure:
        resolve_data("mnist", shared, cache, urls)
    message = failure.value.msg
    assert "\n" not in message, message
    assert urls["mnist"] + LABELS in message and folder in message, message
    assert listing(folder) == sorted(set(MNIST_NAMES) - {LABELS})  # nothing under its name


def test_a_copy_that_is_not_the_official_content_is_refused(served_mnist, machine, monkeypatch):
    """A file that passes the transfer's check (its sha256 is the one expected) but whose content
    is not MNIST's is refused by the official content md5s, and removed."""
    served, urls, requests = served_mnist
    shared, cache = machine
    labels = bytearray(gzip.decompress((served / LABELS).read_bytes()))
    labels[8] = (labels[8] + 1) % 10  # the first test label, changed
    (served / LABELS).write_bytes(gzip.compress(bytes(labels), mtime=0))
    monkeypatch.setattr(mnist_input, "OFFICIAL_FILES", [
        served_as(served / file.name, file) for file in mnist_input.OFFICIAL_FILES])
    with pytest.raises(pytest.fail.Exception) as failure:
        resolve_data("mnist", shared, cache, urls)
    folder = os.path.join(cache, "mnist")
    assert urls["mnist"] + LABELS in failure.value.msg and folder in failure.value.msg
    assert listing(folder) == sorted(set(MNIST_NAMES) - {LABELS})


@pytest.mark.parametrize("damage", [cut, flip_a_byte])
def test_a_wrong_cached_file_is_downloaded_anew(served_mnist, machine, mnist_data, damage):
    served, urls, requests = served_mnist
    shared, cache = machine
    folder = seed_cache(cache, mnist_data, MNIST_NAMES)
    damage(os.path.join(folder, LABELS))
    assert download.gunzipped_md5(os.path.join(folder, LABELS)) is None
    resolve_data("mnist", shared, cache, urls)
    assert requests == [f"GET /{LABELS}"]
    assert download.gunzipped_md5(os.path.join(folder, LABELS)) == \
        download.MNIST_CONTENT_MD5[LABELS]


def test_the_official_checksums_refuse_other_bytes(server, machine, mnist_data):
    """Served with the readers' own (official) sizes and sha256, a recompressed copy of the
    official content is refused: the message names the URL and the cache, and nothing is left."""
    served, url, requests = server
    shared, cache = machine
    for name in MNIST_NAMES:
        content = gzip.decompress(open(os.path.join(mnist_data, name), "rb").read())
        (served / name).write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    with pytest.raises(pytest.fail.Exception) as failure:
        resolve_data("mnist", shared, cache, {"mnist": url})
    message = failure.value.msg
    first = mnist_input.OFFICIAL_FILES[0]
    assert f"{url}{first.name} is not the official {first.name}" in message, message
    assert os.path.join(cache, "mnist") in message and "\n" not in message
    assert listing(os.path.join(cache, "mnist")) == []


def test_an_unreachable_server_fails_naming_the_url_and_the_cache(machine):
    shared, cache = machine
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(pytest.fail.Exception) as failure:  # a failure, not a skip
        resolve_data("mnist", shared, cache, {"mnist": url})
    message = failure.value.msg
    assert url + mnist_input.OFFICIAL_FILES[0].name in message, message
    assert os.path.join(cache, "mnist") in message and DATA_CACHE_VARIABLE in message
    assert listing(os.path.join(cache, "mnist")) == []


def test_shared_data_is_used_as_it_is(server, tmp_path):
    served, url, requests = server
    shared = tmp_path / "shared"
    (shared / "data" / "mnist").mkdir(parents=True)
    cache = tmp_path / "cache"
    urls = {"mnist": url, "cifar10": url}
    assert resolve_data("mnist", str(shared), str(cache), urls) == \
        str(shared / "data" / "mnist")
    assert requests == [] and not cache.exists()


def test_the_suite_uses_shared_where_it_exists_else_the_cache():
    own = os.path.join(SHARED, "data", "mnist")
    expected = own if os.path.isdir(own) else os.path.join(data_cache(), "mnist")
    assert shared_path("data", "mnist") == expected


def test_the_cache_folder_is_chosen_by_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_CACHE_VARIABLE, str(tmp_path))
    assert data_cache() == str(tmp_path)
    monkeypatch.delenv(DATA_CACHE_VARIABLE)
    assert data_cache() == os.path.join(os.path.expanduser("~"), ".cache", "madry-challenges")


def test_the_official_addresses_are_the_readers():
    urls = official_base_urls()
    assert all(urls["mnist"] + file.name == file.url for file in mnist_input.OFFICIAL_FILES)
    assert urls["cifar10"] + cifar10_input.ARCHIVE.name == cifar10_input.ARCHIVE.url
    # The readers' official sizes and sha256 (those TFDS and Keras register).
    assert [(file.name, file.size, file.sha256[:8]) for file in mnist_input.OFFICIAL_FILES] == [
        ("train-images-idx3-ubyte.gz", 9912422, "440fcabf"),
        ("train-labels-idx1-ubyte.gz", 28881, "3552534a"),
        ("t10k-images-idx3-ubyte.gz", 1648877, "8d422c7b"),
        ("t10k-labels-idx1-ubyte.gz", 4542, "f7ae60f9")]
    assert (cifar10_input.ARCHIVE.size, cifar10_input.ARCHIVE.sha256[:8]) == \
        (170498071, "6d958be0")


def test_cifar10_unpacks_the_archive_into_the_cache_once(server, machine, monkeypatch,
                                                         tmp_path):
    """A small archive laid out as the official one (the real one is 170 MB), with the sha256
    this test gives: the reader's own download and unpacking, through the same resolution."""
    served, url, requests = server
    shared, cache = machine
    archive = served / cifar10_input.ARCHIVE.name
    members = tmp_path / "members"
    members.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name in CIFAR10_NAMES:
            (members / name).write_bytes(f"content of {name}".encode())
            tar.add(members / name, f"{cifar10_input.ARCHIVE_FOLDER}/{name}")
    monkeypatch.setattr(cifar10_input, "ARCHIVE", served_as(archive, cifar10_input.ARCHIVE))
    folder = resolve_data("cifar10", shared, cache, {"cifar10": url})
    assert folder == os.path.join(cache, "cifar10")
    assert listing(folder) == CIFAR10_NAMES
    for name in CIFAR10_NAMES:
        assert open(os.path.join(folder, name), "rb").read() == f"content of {name}".encode()
    assert requests == [f"GET /{cifar10_input.ARCHIVE.name}"]
    assert resolve_data("cifar10", shared, cache, {"cifar10": url}) == folder
    assert len(requests) == 1


RESOLVE = """
import hashlib, os, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from helpers import resolve_data
from common.io.download import OfficialFile
from mnist_challenge import mnist_input
served = {served!r}
mnist_input.OFFICIAL_FILES = [
    OfficialFile(f.name, f.url, os.path.getsize(os.path.join(served, f.name)),
                 hashlib.sha256(open(os.path.join(served, f.name), "rb").read()).hexdigest())
    for f in mnist_input.OFFICIAL_FILES]
print(resolve_data("mnist", {shared!r}, {cache!r}, {{"mnist": {url!r}}}))
"""


def test_test_processes_sharing_the_cache_download_once(served_mnist, machine):
    """Two processes (as pytest-xdist's workers) filling one cache at the same time: one
    downloads, the other waits for it and finds the files there."""
    served, urls, requests = served_mnist
    shared, cache = machine
    code = RESOLVE.format(repo=REPO, tests=os.path.join(REPO, "tests"), served=str(served),
                          shared=shared, cache=cache, url=urls["mnist"])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
    results = [process.communicate(timeout=120) for process in processes]
    for process, (out, err) in zip(processes, results):
        assert process.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == os.path.join(cache, "mnist")
    assert sorted(requests) == sorted(f"GET /{name}" for name in MNIST_NAMES)
    assert listing(os.path.join(cache, "mnist")) == MNIST_NAMES
