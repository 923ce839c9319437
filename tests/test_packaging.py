"""`pip install -e .` from the clone: `common` imports from any folder, and a wheel built from
the checkout holds every subpackage and the server's templates. Offline: pip builds with the
installed setuptools and installs no dependency (the venv sees the system's TensorFlow)."""

import glob
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from helpers import REPO

# What the import checks from another folder: where `common` came from, and that its server
# finds its templates.
PROBE = ("import os, common, common.serving.web as web; "
         "print(os.path.dirname(common.__file__)); "
         "print(sorted(os.listdir(web.TEMPLATES)))")


def _pip(python, *args, cwd):
    result = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args,
                             "--no-deps", "--no-build-isolation", "-q"], cwd=cwd,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


def _checkout_copy(folder):
    """What packaging reads (pyproject.toml, README.md, common/), copied so that the build's own
    files (build/, *.egg-info) land outside the checkout."""
    shutil.copy(os.path.join(REPO, "pyproject.toml"), folder)
    shutil.copy(os.path.join(REPO, "README.md"), folder)
    shutil.copytree(os.path.join(REPO, "common"), os.path.join(folder, "common"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return str(folder)


def _packages():
    """The checkout's packages: every folder of common/ with an __init__.py, dotted."""
    return {os.path.relpath(os.path.dirname(path), REPO).replace(os.sep, ".")
            for path in glob.glob(os.path.join(REPO, "common", "**", "__init__.py"),
                                  recursive=True)}


@pytest.mark.slow
def test_an_editable_install_imports_common_from_any_folder(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = subprocess.run([python, "-c", "import common"], cwd=elsewhere, capture_output=True,
                            text=True, timeout=60)
    assert before.returncode != 0, "common imports before the install: the test proves nothing"

    _pip(python, "install", "-e", REPO, cwd=elsewhere)
    result = subprocess.run([python, "-c", PROBE], cwd=elsewhere, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    folder, templates = result.stdout.splitlines()
    assert os.path.samefile(folder, os.path.join(REPO, "common"))
    assert "base.html" in templates


@pytest.mark.slow
def test_the_wheel_holds_every_package_and_the_templates(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    _pip(sys.executable, "wheel", "-w", str(tmp_path / "wheels"), _checkout_copy(source),
         cwd=tmp_path)
    (wheel,) = glob.glob(str(tmp_path / "wheels" / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    packed = {os.path.dirname(name).replace("/", ".") for name in names
              if name.endswith("/__init__.py")}
    assert packed == _packages()
    templates = sorted(os.listdir(os.path.join(REPO, "common", "serving", "templates")))
    assert sorted(name.rsplit("/", 1)[1] for name in names
                  if name.startswith("common/serving/templates/")) == templates
    metadata = zipfile.ZipFile(wheel).read(
        next(name for name in names if name.endswith("/METADATA"))).decode()
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as pyproject:
        extras = tomllib.load(pyproject)["project"]["optional-dependencies"]
    assert set(extras) == {"serve", "test"}
    for extra in extras:
        assert f"Provides-Extra: {extra}" in metadata, metadata


def test_the_core_dependencies_allow_the_pinned_versions():
    """requirements.txt (the versions the suite passes with) satisfies pyproject's ranges."""
    from packaging.requirements import Requirement

    with open(os.path.join(REPO, "requirements.txt")) as requirements:
        pins = dict(line.split("#")[0].strip().split("==") for line in requirements
                    if "==" in line.split("#")[0])
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as pyproject:
        project = tomllib.load(pyproject)["project"]
    wanted = [Requirement(text) for text in project["dependencies"]]
    wanted += [Requirement(text) for group in project["optional-dependencies"].values()
               for text in group]
    for requirement in wanted:
        assert requirement.name in pins, requirement.name
        assert requirement.specifier.contains(pins[requirement.name]), (requirement,
                                                                       pins[requirement.name])
