"""The documentation: README.md as a short front page whose quick start runs, and docs/*.md as
reference pages; every page within the line length, without repeated headings, and with every
relative link pointing to a file (and heading) that exists."""

import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO, script_environment

README = os.path.join(REPO, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
MAX_LINE = 100
README_MAX_LINES = 300
QUICK_START_BY_LINE = 80

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _read(path):
    with open(path, encoding="utf-8") as page:
        return page.read().splitlines()


def _relative(path):
    return os.path.relpath(path, REPO)


def _outside_code(lines):
    """(line number, line) of the lines outside fenced code blocks."""
    inside = False
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def _code_blocks(lines):
    """(language, first line number, block lines) of each fenced code block."""
    blocks, current = [], None
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            if current is None:
                current = (line.strip().strip("`~").strip(), number + 1, [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[2].append(line)
    assert current is None, "a fenced code block is never closed"
    return blocks


def _headings(lines):
    """(line number, level, text) of each heading outside code blocks."""
    result = []
    for number, line in _outside_code(lines):
        match = HEADING.match(line)
        if match:
            result.append((number, len(match.group(1)), match.group(2)))
    return result


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (but `-` and `_`), spaces
    turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _section(lines, title):
    """The lines of the section whose heading contains `title`, up to the next heading of the
    same or a higher level; and the heading's line number."""
    headings = _headings(lines)
    for index, (number, level, text) in enumerate(headings):
        if title in text:
            end = next((later for later, later_level, _ in headings[index + 1:]
                        if later_level <= level), len(lines) + 1)
            return number, lines[number:end - 1]
    pytest.fail(f"README.md has no heading containing {title!r}")


def _quick_start_block():
    """The first bash block of README.md's Quick start section: (first line number, lines)."""
    number, section = _section(_read(README), "Quick start")
    for language, first, block in _code_blocks(section):
        if language == "bash":
            return number + first, block
    pytest.fail("README.md's Quick start section has no ```bash block")


def test_readme_is_a_short_front_page_with_an_early_quick_start():
    lines = _read(README)
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    quick_start = [number for number, _, text in _headings(lines) if "Quick start" in text]
    assert quick_start, "README.md has no Quick start heading"
    assert quick_start[0] <= QUICK_START_BY_LINE, f"Quick start starts at line {quick_start[0]}"
    _, block = _quick_start_block()
    assert any("config_fast.json" in line for line in block), block


def test_readme_install_text_says_python_3_11():
    _, section = _section(_read(README), "Install")
    text = "\n".join(section)
    assert re.search(r"Python\W{0,3}3\.11\b", text), text
    assert "3.10" not in text, text


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_no_line_over_100_characters(page):
    long = [(number, len(line)) for number, line in enumerate(_read(page), 1)
            if len(line) > MAX_LINE and not line.lstrip().startswith("|") and "://" not in line]
    assert not long, f"{_relative(page)}: lines over {MAX_LINE} characters (line, length): {long}"


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_no_heading_twice_in_a_page(page):
    seen, repeated = {}, []
    for number, _, text in _headings(_read(page)):
        key = slug(text)
        if key in seen:
            repeated.append((text, seen[key], number))
        seen.setdefault(key, number)
    assert not repeated, f"{_relative(page)}: repeated headings (text, first, again): {repeated}"


def _links(page):
    for number, line in _outside_code(_read(page)):
        for match in LINK.finditer(CODE_SPAN.sub("code", line)):
            yield number, match.group(1)


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_every_relative_link_resolves(page):
    broken = []
    for number, target in _links(page):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(resolved):
            broken.append((number, target, "no such file"))
        elif anchor and resolved.endswith(".md"):
            anchors = {slug(text) for _, _, text in _headings(_read(resolved))}
            if anchor not in anchors:
                broken.append((number, target, "no such heading"))
    assert not broken, f"{_relative(page)}: broken links (line, target, why): {broken}"


def test_the_link_checker_sees_broken_links(tmp_path):
    """The checks above can fail: a page with a missing file, a missing anchor, a long line and
    a repeated heading is caught by each."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Part\n\n## Part\n\n[a](missing.md) [b](#nowhere) [c](#part)\n"
                    + "x" * 101 + "\n")
    found = list(_links(str(page)))
    assert [target for _, target in found] == ["missing.md", "#nowhere", "#part"]
    for check in (test_every_relative_link_resolves, test_no_heading_twice_in_a_page,
                  test_no_line_over_100_characters):
        with pytest.raises(AssertionError):
            check(str(page))


def _npy_shape(path):
    """The shape in a .npy file's header (read with the standard library)."""
    with open(path, "rb") as npy:
        assert npy.read(6) == b"\x93NUMPY", path
        major = npy.read(2)[0]
        size = int.from_bytes(npy.read(2 if major == 1 else 4), "little")
        return ast.literal_eval(npy.read(size).decode("latin1"))["shape"]


@pytest.mark.slow
def test_the_quick_start_runs(tmp_path, mnist_data):
    """Runs each command of README.md's Quick start block, in order, as written but shortened
    (30 training steps, 100 test images, 5 PGD steps) and writing only into tmp_path: the
    config is a copy of config_fast.json in tmp_path whose store_adv_path is tmp_path/attack.npy,
    so the files the scripts put beside it (autoattack.npy, autoattack.json) land there too."""
    _, block = _quick_start_block()
    commands = [shlex.split(line) for line in "\n".join(block).replace("\\\n", " ").splitlines()
                if line.strip()]
    assert all(command[0] == "python" for command in commands), block
    scripts = [os.path.basename(command[1]) for command in commands]
    assert scripts == ["train.py", "pgd_attack.py", "run_attack.py", "autoattack.py"], scripts

    with open(os.path.join(REPO, "mnist_challenge", "config_fast.json")) as config_file:
        config = json.load(config_file)
    config["store_adv_path"] = "attack.npy"
    config_copy = tmp_path / "config_fast.json"
    config_copy.write_text(json.dumps(config))
    store = tmp_path / "attack.npy"
    overrides = {
        "data_path": mnist_data, "model_dir": str(tmp_path / "model"),
        "store_adv_path": str(store), "max_num_training_steps": "30",
        "num_checkpoint_steps": "30", "num_output_steps": "10", "num_summary_steps": "30",
        "overfitting_check_steps": "0", "num_eval_examples": "100", "k": "5",
        "eval_batch_size": "100",
    }
    results = {}
    for command, script in zip(commands, scripts):
        arguments = []
        for argument in command[2:]:
            name, _, value = argument.lstrip("-").partition("=")
            if name == "config":
                assert value == "mnist_challenge/config_fast.json", command
                arguments.append(f"--config={config_copy}")
            elif name not in overrides:  # each overridden flag given once, the short value
                arguments.append(argument)
        # Given explicitly, AutoAttack's output goes to --store_adv_path itself; without it,
        # autoattack.npy beside the config's store_adv_path, as in the Quick start.
        extra = {name: value for name, value in overrides.items()
                 if not (script == "autoattack.py" and name == "store_adv_path")}
        arguments += [f"--{name}={value}" for name, value in extra.items()]
        result = subprocess.run([sys.executable, os.path.join(REPO, command[1]), *arguments],
                                cwd=tmp_path, capture_output=True, text=True, timeout=600,
                                env=script_environment())
        assert result.returncode == 0, (script, arguments, result.stdout[-2000:],
                                        result.stderr[-3000:])
        results[script] = result
        if script == "pgd_attack.py":
            assert _npy_shape(store) == (100, 784)

    accuracy = [line for line in results["run_attack.py"].stdout.splitlines()
                if line.startswith("Accuracy")]
    assert accuracy, results["run_attack.py"].stdout
    assert (tmp_path / "pred.npy").exists()
    assert (tmp_path / "autoattack.npy").exists(), sorted(os.listdir(tmp_path))
    assert _npy_shape(tmp_path / "autoattack.npy") == (100, 784)
    with open(tmp_path / "autoattack.json") as report:
        assert "robust_accuracy" in json.load(report)
