"""fetch_model against zips built here and served on 127.0.0.1: the original's lines, digests,
unsafe archives refused whole, and interrupted or killed downloads leaving nothing behind."""

import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
from helpers import REPO, assert_one_error_line, script_environment

from common.io import download, fetch
from common.runtime.errors import UserError


def _model_zip(served, mnist_fixture, name="natural.zip"):
    with zipfile.ZipFile(served / name, "w", zipfile.ZIP_DEFLATED) as archive:
        for file_name in sorted(os.listdir(mnist_fixture)):
            if file_name.startswith("checkpoint"):
                archive.write(os.path.join(mnist_fixture, file_name),
                              f"models/natural/{file_name}")
    return served / name


def _fetch(url, destination, digests=None, expected=None):
    fetch.fetch_model(["fetch_model.py", "natural"], {"natural": url}, digests or {},
                      str(destination), expected)


def _leftovers(destination):
    """Everything in `destination` but the downloaded zip itself."""
    return sorted(name for name in os.listdir(destination) if name != "natural.zip")


@pytest.mark.slow
def test_downloads_prints_the_original_lines_and_unzips(file_server, tmp_path, mnist_fixture,
                                                        capsys):
    served, url = file_server
    digest = download.sha256_of(_model_zip(served, mnist_fixture))
    destination = tmp_path / "challenge"
    _fetch(url + "natural.zip", destination, expected=digest.upper())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == ["Downloading models", f"SHA256 hash: {digest}", "Extracting model",
                     f"Extracted model in {destination}/models/natural/checkpoint"]
    with zipfile.ZipFile(served / "natural.zip") as archive:
        for name in archive.namelist():
            assert (destination / name).read_bytes() == archive.read(name)
    assert _leftovers(destination) == ["models"]


@pytest.mark.parametrize("digests, expected, message", [
    ({"natural": "00"}, None, "the published one is 00; removed it"),
    ({}, "ab", "the one given by --sha256 is ab; removed it"),
])
def test_a_digest_mismatch_is_refused_and_removed(file_server, tmp_path, mnist_fixture, digests,
                                                  expected, message):
    served, url = file_server
    _model_zip(served, mnist_fixture)
    with pytest.raises(UserError, match=message):
        _fetch(url + "natural.zip", tmp_path, digests, expected)
    assert os.listdir(tmp_path) == ["served"]


# fetch_model.py of the MNIST challenge, with the released models' address replaced.
FETCH_FROM = ("import dataclasses, sys; sys.path.insert(0, sys.argv[1]); "
              "from common.scripts import drivers; from mnist_challenge.challenge import MNIST; "
              "url, folder = sys.argv[2:4]; sys.argv = ['fetch_model.py', *sys.argv[4:]]; "
              "drivers.fetch_model(dataclasses.replace(MNIST, folder=folder, "
              "model_urls={'natural': url}))")


def fetch_script(url, destination, *args):
    return subprocess.run([sys.executable, "-c", FETCH_FROM, REPO, url, str(destination), *args],
                          capture_output=True, text=True, timeout=300,
                          env=script_environment())


@pytest.mark.slow
def test_the_sha256_flag_reaches_the_check(file_server, tmp_path, mnist_fixture):
    served, url = file_server
    _model_zip(served, mnist_fixture)
    destination = tmp_path / "challenge"
    other = "f" * 64
    result = fetch_script(url + "natural.zip", destination, "natural", f"--sha256={other}")
    assert_one_error_line(result, f"the one given by --sha256 is {other}; removed it")
    assert _leftovers(destination) == []
    digest = download.sha256_of(served / "natural.zip")
    result = fetch_script(url + "natural.zip", destination, "natural", f"--sha256={digest}")
    assert result.returncode == 0, result.stderr
    assert f"SHA256 hash: {digest}" in result.stdout
    assert _leftovers(destination) == ["models"]


def _symlink_entry(archive):
    link = zipfile.ZipInfo("models/natural/checkpoint")
    link.external_attr = 0o120777 << 16
    archive.writestr(link, "/etc/passwd")


@pytest.mark.parametrize("add_entries, message", [
    (lambda archive: archive.writestr("../escaped.txt", "no"), "'../escaped.txt': it leaves"),
    (lambda archive: archive.writestr("models/../../escaped.txt", "no"), "it leaves"),
    (lambda archive: archive.writestr("/tmp/escaped.txt", "no"), "'/tmp/escaped.txt': it leaves"),
    (_symlink_entry, "'models/natural/checkpoint': it is not a plain file or folder"),
    (lambda archive: archive.writestr("models/natural/bomb", b"\0" * (60 << 20)),
     "refusing the archive: its"),
])
def test_unsafe_archives_are_refused_whole(file_server, tmp_path, add_entries, message):
    served, url = file_server
    with zipfile.ZipFile(served / "natural.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("models/natural/checkpoint-1.index", "first, a harmless entry")
        add_entries(archive)
    destination = tmp_path / "challenge"
    with pytest.raises(UserError, match=message):
        _fetch(url + "natural.zip", destination)
    assert _leftovers(destination) == []
    assert not (tmp_path / "escaped.txt").exists()


def test_a_file_that_is_not_a_zip_is_refused(file_server, tmp_path):
    served, url = file_server
    (served / "natural.zip").write_text("<html>rate limited</html>")
    with pytest.raises(UserError, match="is not a valid zip file of a model"):
        _fetch(url + "natural.zip", tmp_path / "challenge")
    assert _leftovers(tmp_path / "challenge") == []


@pytest.mark.slow
def test_a_download_cut_short_leaves_nothing(file_server, tmp_path, mnist_fixture):
    served, url = file_server
    _model_zip(served, mnist_fixture)
    destination = tmp_path / "challenge"
    with pytest.raises(UserError, match="cannot download .*natural.zip"):
        _fetch(url + "cut/natural.zip", destination)
    assert os.listdir(destination) == []


@pytest.mark.slow
def test_a_killed_download_leaves_nothing_a_later_run_could_use(file_server, tmp_path):
    _, url = file_server
    destination = tmp_path / "challenge"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from common.io import fetch; "
            "fetch.fetch_model(['fetch_model.py', 'natural'], {'natural': sys.argv[2]}, {}, "
            "sys.argv[3])")
    process = subprocess.Popen([sys.executable, "-c", code, REPO, url + "slow/natural.zip",
                                str(destination)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "Downloading models"
    deadline = time.monotonic() + 60
    while not destination.exists() or not any(name.endswith(".partial")
                                              for name in os.listdir(destination)):
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    names = os.listdir(destination)
    assert "natural.zip" not in names and "models" not in names
    assert all(name.startswith(".natural.zip.") for name in names), names

