"""The documentation as a reader uses it: README.md's commands name scripts, files and flags
that exist (its quick start runs, shortened), the Python version it asks for is the one the
package requires, and every relative link of README.md and docs/*.md points to a file, and to a
heading, that exists."""

import ast
import glob
import json
import os
import re
import shlex
import sys
import tomllib

import pytest
from helpers import REPO, run_script, run_side_by_side

README = os.path.join(REPO, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))

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


def anchors(lines):
    """The anchors of a page's headings; GitHub gives a repeated one the suffix -1, -2, ..."""
    seen, result = {}, set()
    for _, _, text in _headings(lines):
        key = slug(text)
        result.add(f"{key}-{seen[key]}" if key in seen else key)
        seen[key] = seen.get(key, 0) + 1
    return result


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


def test_readme_asks_for_the_python_that_the_package_requires():
    _, section = _section(_read(README), "Install")
    asked = re.findall(r"Python\W{0,3}(\d+\.\d+)", "\n".join(section))
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as pyproject:
        required = tomllib.load(pyproject)["project"]["requires-python"]
    assert asked and set(asked) == {required.removeprefix(">=")}, (asked, required)


def _commands(page):
    """(line number, arguments) of each command in the page's bash blocks: continuations and
    quoted strings over several lines joined, comments dropped, `a && b` split into two."""
    for language, first, block in _code_blocks(_read(page)):
        if language != "bash":
            continue
        text, start = "", first
        for number, line in enumerate(block, first):
            text += line
            if line.endswith("\\"):
                text = text[:-1] + " "
                continue
            try:
                words = shlex.split(text, comments=True)
            except ValueError:  # a quoted string that goes on on the next line
                text += "\n"
                continue
            command = []
            for word in words + ["&&"]:
                if word == "&&":
                    if command:
                        yield start, command
                    command = []
                else:
                    command.append(word)
            text, start = "", number + 1


def _python_commands():
    """(page, line number, script, its flags' names) of every `python SCRIPT ...` of the pages,
    `python -m` left out."""
    for page in PAGES:
        for number, command in _commands(page):
            if command[0] == "python" and not command[1].startswith("-"):
                names = [word.strip("[]").lstrip("-").split("=")[0] for word in command[2:]
                         if word.strip("[").startswith("--")]
                yield page, number, command[1], names


def test_every_documented_command_names_files_that_exist():
    """`python SCRIPT`, `pip install -r FILE`, `pip install -e .` and `pytest FILE` read files of
    the checkout: a renamed script or test file leaves a command that fails."""
    missing = []
    for page in PAGES:
        for number, command in _commands(page):
            paths = []
            if command[0] == "python" and not command[1].startswith("-"):
                paths.append(command[1] + ("__main__.py" if command[1].endswith("/") else ""))
            if command[:3] == ["python", "-m", "pytest"]:
                paths += [word for word in command[3:] if word.startswith("tests/")]
            if command[:4] == ["python", "-m", "pip", "install"]:
                paths += [command[index + 1] for index, word in enumerate(command)
                          if word == "-r"]
                paths += ["pyproject.toml" for word in command if word == "-e"]
            missing += [(_relative(page), number, path) for path in paths
                        if not os.path.exists(os.path.join(REPO, path))]
    assert not missing, f"commands naming missing files (page, line, path): {missing}"


@pytest.mark.slow
def test_every_documented_flag_is_one_the_script_takes():
    """Each `--flag` the pages give a script is among those its --helpfull lists (config keys
    included), so no documented command ends with an unknown-flag error."""
    used = {}
    for page, number, script, names in _python_commands():
        for name in names:
            used.setdefault(script, set()).add((name, f"{_relative(page)}:{number}"))
    results = run_side_by_side([(script, ("--helpfull",), None) for script in sorted(used)])
    unknown = []
    for script, result in zip(sorted(used), results):
        # absl's --helpfull ends with exit status 1; what counts is the list it prints.
        listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", result.stdout, re.M))
        listed |= {"help", "helpshort", "helpfull"}  # absl's own, which --helpfull leaves out
        unknown += [(script, *where) for where in sorted(used[script]) if where[0] not in listed]
    assert len(used) >= 10 and not unknown, f"flags a script does not take: {unknown}"


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
            if anchor not in anchors(_read(resolved)):
                broken.append((number, target, "no such heading"))
    assert not broken, f"{_relative(page)}: broken links (line, target, why): {broken}"


def test_the_checks_see_broken_links_and_missing_files(tmp_path, monkeypatch):
    """The checks above can fail: a missing file, a missing anchor, a missing script and an
    unknown flag are each caught; an anchor to a repeated heading resolves as on GitHub."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Part\n\n## Part\n\n"
                    "[a](missing.md) [b](#nowhere) [c](#part) [d](#part-1)\n\n"
                    "```bash\npython no/such.py --flag=1 \\\n  --other  # a comment\n"
                    "python -m pip install -r nothing.txt && python -m pytest tests/none.py\n"
                    "```\n")
    assert [target for _, target in _links(str(page))] == [
        "missing.md", "#nowhere", "#part", "#part-1"]
    with pytest.raises(AssertionError, match=r"\(7, 'missing.md', 'no such file'\), "
                       r"\(7, '#nowhere', 'no such heading'\)\]"):
        test_every_relative_link_resolves(str(page))
    monkeypatch.setattr(sys.modules[__name__], "PAGES", [str(page)])
    assert list(_python_commands()) == [(str(page), 10, "no/such.py", ["flag", "other"])]
    with pytest.raises(AssertionError) as caught:
        test_every_documented_command_names_files_that_exist()
    for path in ("no/such.py", "nothing.txt", "tests/none.py"):
        assert f"'{path}')" in str(caught.value), caught.value


def _npy_shape(path):
    """The shape in a .npy file's header (read with the standard library)."""
    with open(path, "rb") as npy:
        assert npy.read(6) == b"\x93NUMPY", path
        major = npy.read(2)[0]
        size = int.from_bytes(npy.read(2 if major == 1 else 4), "little")
        return ast.literal_eval(npy.read(size).decode("latin1"))["shape"]


def test_the_readmes_first_command_trains_as_the_quick_start_does():
    """README.md's first block installs and trains: its training command, above the Quick
    start, is the Quick start's first command, so the time and robustness the page gives are
    that command's."""
    quick_start_line, _ = _quick_start_block()
    trains = [(number, command) for number, command in _commands(README)
              if command[0] == "python" and command[1].endswith("/train.py")]
    above = [command for number, command in trains if number < quick_start_line]
    quick_start = [command for number, command in trains if number == quick_start_line]
    assert len(quick_start) == 1 and above[:1] == quick_start, trains


@pytest.mark.slow
def test_the_quick_start_runs(tmp_path, mnist_data):
    """Runs each command of README.md's Quick start block, in order, as written but shortened
    (5 training steps, 20 test images, 5 PGD steps) and writing only into tmp_path: the
    config is a copy of the one the block names, in tmp_path, whose store_adv_path is
    tmp_path/attack.npy, so the files the scripts put beside it (autoattack.npy, autoattack.json)
    land there too."""
    _, block = _quick_start_block()
    commands = [shlex.split(line) for line in "\n".join(block).replace("\\\n", " ").splitlines()
                if line.strip()]
    assert all(command[0] == "python" for command in commands), block
    scripts = [os.path.basename(command[1]) for command in commands]
    assert scripts == ["train.py", "pgd_attack.py", "run_attack.py", "autoattack.py"], scripts

    named = {argument.partition("=")[2] for command in commands for argument in command
             if argument.startswith("--config=")}
    assert len(named) == 1, named  # every command names the same config
    config_path = named.pop()
    with open(os.path.join(REPO, config_path)) as config_file:
        config = json.load(config_file)
    config["store_adv_path"] = "attack.npy"
    config_copy = tmp_path / os.path.basename(config_path)
    config_copy.write_text(json.dumps(config))
    store = tmp_path / "attack.npy"
    overrides = {
        "data_path": mnist_data, "model_dir": str(tmp_path / "model"),
        "store_adv_path": str(store), "max_num_training_steps": "5",
        "num_checkpoint_steps": "5", "num_output_steps": "5", "num_summary_steps": "5",
        "overfitting_check_steps": "0", "num_eval_examples": "20", "k": "5",
        "eval_batch_size": "20",
    }
    results = {}
    for command, script in zip(commands, scripts):
        arguments = []
        for argument in command[2:]:
            name = argument.lstrip("-").partition("=")[0]
            if name == "config":
                arguments.append(f"--config={config_copy}")
            elif name not in overrides:  # each overridden flag given once, the short value
                arguments.append(argument)
        # Given explicitly, AutoAttack's output goes to --store_adv_path itself; without it,
        # autoattack.npy beside the config's store_adv_path, as in the Quick start.
        extra = {name: value for name, value in overrides.items()
                 if not (script == "autoattack.py" and name == "store_adv_path")}
        arguments += [f"--{name}={value}" for name, value in extra.items()]
        result = run_script(command[1], *arguments, cwd=tmp_path)
        assert result.returncode == 0, (script, arguments, result.stdout[-2000:],
                                        result.stderr[-3000:])
        results[script] = result
        if script == "pgd_attack.py":
            assert _npy_shape(store) == (20, 784)

    accuracy = [line for line in results["run_attack.py"].stdout.splitlines()
                if line.startswith("Accuracy")]
    assert accuracy, results["run_attack.py"].stdout
    assert (tmp_path / "pred.npy").exists()
    assert (tmp_path / "autoattack.npy").exists(), sorted(os.listdir(tmp_path))
    assert _npy_shape(tmp_path / "autoattack.npy") == (20, 784)
    with open(tmp_path / "autoattack.json") as report:
        assert "robust_accuracy" in json.load(report)
