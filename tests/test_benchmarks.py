"""The benchmark scripts' command lines: `--help` lists exactly the flags each script defines
and measures nothing (TensorFlow is not even loaded), a bad flag ends with one `Error:` line, and
the smallest sizes run end to end and print their figures. The flags expected come from the
scripts' own DEFINE_* calls (read with ast), not from a list kept here."""

import ast
import glob
import os
import re
import subprocess
import sys

import pytest
from helpers import shared_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")

# A figure the scripts print: a number, then its unit.
MEASUREMENT = re.compile(r"\d\s*(examples|GFLOP/s|MFLOP)")
# A flag in absl's help: `  --name: ...`, or `  --[no]name: ...` for a boolean.
HELP_FLAG = re.compile(r"^\s+--(?:\[no\])?(\w+):", re.M)
# Runs a script as `python SCRIPT ARGS...` does, then says on stderr whether it loaded TensorFlow.
PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
print("tensorflow loaded:", "tensorflow" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


def _calls(tree, name):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr.startswith(name)]


def _tree(path):
    with open(path) as source:
        return ast.parse(source.read())


def _scripts():
    """The benchmark scripts (those that call cli.run), as a user names them on the command
    line: `benchmarks/NAME.py`, and `benchmarks/` for __main__.py."""
    scripts = []
    for path in sorted(glob.glob(os.path.join(BENCHMARKS, "*.py"))):
        if any(isinstance(call.func.value, ast.Name) and call.func.value.id == "cli"
               for call in _calls(_tree(path), "run")):
            name = os.path.basename(path)
            scripts.append("benchmarks/" if name == "__main__.py" else f"benchmarks/{name}")
    return scripts


def defined_flags(script):
    """{name: (DEFINE_ kind, literal keywords)} of the flags the script defines, with those of
    the modules whose key flags it adopts; and the names given a validator."""
    path = os.path.join(REPO, script) + ("__main__.py" if script.endswith("/") else "")
    found, validated, paths = {}, set(), [path]
    while paths:
        tree = _tree(paths.pop())
        for call in _calls(tree, "DEFINE_"):
            keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords
                        if keyword.arg in ("lower_bound", "upper_bound")}
            found[ast.literal_eval(call.args[0])] = (call.func.attr[len("DEFINE_"):], keywords)
        validated.update(ast.literal_eval(call.args[0])
                         for call in _calls(tree, "register_validator"))
        paths += [os.path.join(BENCHMARKS, f"{call.args[0].id}.py")
                  for call in _calls(tree, "adopt_module_key_flags")]
    return found, validated


def bad_arguments(script):
    """A bad command line per kind of flag the script defines (a value below an integer's bound,
    not a number, outside a list's validator or an enum, not a boolean), an unknown flag and a
    stray argument."""
    found, validated = defined_flags(script)
    bad = {"integer": lambda keywords: (str(keywords["lower_bound"] - 1)
                                        if "lower_bound" in keywords else None),
           "list": lambda keywords: "-1", "enum": lambda keywords: "nope",
           "bool": lambda keywords: "maybe"}
    arguments, kinds = [["--no_such_flag=1"], ["200"]], set()
    for name, (kind, keywords) in sorted(found.items()):
        if kind in kinds or kind not in bad or (kind == "list" and name not in validated):
            continue
        value = bad[kind](keywords)
        if value is not None:
            kinds.add(kind)
            arguments.append([f"--{name}={value}"])
            if kind == "integer":
                arguments.append([f"--{name}=many"])
    return arguments


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def test_the_flag_reader_finds_each_kind_and_the_adopted_flags():
    """What the tests below expect is read from the scripts: a script that adopts peak's flags
    has them, and every kind of bad value is tried somewhere."""
    found, validated = defined_flags("benchmarks/mnist.py")
    assert {"attack_batch", "peak_size"} <= set(found)
    assert found["attack_batch"] == ("integer", {"lower_bound": 1})
    assert "benchmarks" in defined_flags("benchmarks/")[1]
    tried = {argument.split("=")[0] for script in _scripts()
             for (argument,) in bad_arguments(script)}
    assert {"--quick", "--precision", "--batches", "--no_such_flag", "200"} <= tried
    assert len(_scripts()) >= 9


@pytest.mark.slow
@pytest.mark.parametrize("script, spelling", [(script, "--help") for script in _scripts()] + [
    ("benchmarks/mnist.py", spelling) for spelling in ("-h", "--helpshort", "--helpfull")])
def test_help_lists_the_defined_flags_and_measures_nothing(script, spelling):
    result = run("-c", PROBE, script, spelling, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "tensorflow loaded: False" in result.stderr, result.stderr
    assert not MEASUREMENT.search(result.stdout), result.stdout
    assert not error_lines(result)
    listed = set(HELP_FLAG.findall(result.stdout))
    if spelling == "--helpfull":  # every flag absl knows, the script's among them
        assert set(defined_flags(script)[0]) < listed
    else:
        assert listed == set(defined_flags(script)[0]), result.stdout
        assert "(default: " in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script, args", [
    pytest.param(script, args, id=f"{script} {args[0]}") for script, args in
    [(script, args) for script in _scripts() for args in bad_arguments(script)] + [
        ("benchmarks/versus_original.py", ["--baseline_checkout=/nonexistent/checkout"]),
        ("benchmarks/versus_original.py", ["--baseline_checkout="]),
        ("benchmarks/versus_reference.py", ["--reference_path=/nonexistent/auto-attack"])]])
def test_a_bad_flag_gives_one_error_line(script, args):
    result = run(script, *args, timeout=60)
    assert result.returncode != 0
    assert len(error_lines(result)) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not MEASUREMENT.search(result.stdout)


@pytest.mark.slow
def test_the_smallest_mnist_benchmark_runs_through_python_benchmarks():
    result = run("benchmarks/", "--quick", "--benchmarks=mnist")
    assert result.returncode == 0, result.stderr
    assert "== mnist.py --attack_batch=2" in result.stdout
    assert re.search(r"^fp32 matmul peak .*: \d+\.\d GFLOP/s$", result.stdout, re.M)
    for name in ("attack \\(1 steps, batch 2\\)", "training step \\(1-step attack, batch 2\\)"):
        assert re.search(rf"^{name} +\d+\.\d\d examples/s +\d+\.\d GFLOP/s +\d+\.\d% of peak$",
                         result.stdout, re.M), result.stdout


@pytest.mark.slow
def test_flops_prints_the_counts_that_the_readme_gives():
    result = run("benchmarks/flops.py")
    assert result.returncode == 0, result.stderr
    forward = {line.split()[0]: float(line.split()[3]) for line in result.stdout.splitlines()}
    with open(os.path.join(REPO, "benchmarks", "README.md")) as readme:
        text = " ".join(readme.read().split())
    assert f"{forward['mnist']:.1f} MFLOP for MNIST" in text
    assert f"{forward['simple'] / 1e3:.3f} GFLOP for the simple" in text
    assert f"{forward['wide'] / 1e3:.2f} GFLOP for the wide" in text


@pytest.mark.slow
def test_the_port_and_the_original_alternate_in_their_own_processes():
    result = run("benchmarks/", "--quick", "--benchmarks=versus_original", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^CPU: .*, extensions: ", result.stdout, re.M), result.stdout
    for workload in ("mnist_attack", "mnist_training", "cifar10_attack"):
        assert re.search(rf"^{workload}: median ratio \d+\.\d{{3}} ", result.stdout, re.M)
    assert len(re.findall(r"^pair 1 \(port first\): port +\d+\.\d\d, original +\d+\.\d\d "
                          r"examples/s, ratio \d+\.\d{3}$", result.stdout, re.M)) == 3
    assert len(re.findall(r"examples/s in float32, spread \d+\.\d%, \d+\.\d% of peak$",
                          result.stdout, re.M)) == 6
    assert re.search(r"^Precision: the port computes in float32, the original in float32$",
                     result.stdout, re.M), result.stdout


@pytest.mark.slow
def test_a_checkout_takes_the_originals_place_in_the_precision_asked():
    # The port against itself: the same code on both sides, named as the other checkout, both
    # in bfloat16 (each process reports the compute dtype its model was built with).
    result = run("benchmarks/versus_original.py", "--workloads=mnist_attack", "--pairs=1",
                    "--mnist_batch=2", "--mnist_batches=1", "--mnist_steps=1",
                    f"--baseline_checkout={REPO}", "--precision=mixed_bfloat16",
                    "--peak_size=256", "--peak_products=2", "--peak_repeats=1", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(rf"^Baseline: the port in {re.escape(REPO)}( at \S+)?$",
                     result.stdout, re.M), result.stdout
    assert re.search(r"^Precision: both ports compute in mixed_bfloat16$", result.stdout, re.M)
    assert re.search(r"^pair 1 \(port first\): port +\d+\.\d\d, checkout +\d+\.\d\d "
                     r"examples/s, ratio \d+\.\d{3}$", result.stdout, re.M), result.stdout
    for side in ("port", "checkout"):
        assert re.search(rf"^  {side} +median +\d+\.\d\d examples/s in bfloat16, .* of peak$",
                         result.stdout, re.M), result.stdout


@pytest.mark.slow
def test_the_baseline_side_imports_the_other_checkouts_code(tmp_path):
    # A checkout whose package refuses to load: the baseline's process must fail on it, so the
    # port of this checkout was not measured in its place.
    os.makedirs(tmp_path / "common" / "attacks")
    (tmp_path / "common" / "attacks" / "pgd.py").write_text("")
    (tmp_path / "common" / "__init__.py").write_text("raise ImportError('the baseline loaded')\n")
    result = run("benchmarks/versus_original.py", "--side=original",
                    "--workloads=mnist_attack", "--mnist_batch=2", "--mnist_batches=1",
                    "--mnist_steps=1", f"--baseline_checkout={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert "ImportError: the baseline loaded" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_the_layers_benchmark_times_every_form_and_names_the_one_in_use():
    result = run("benchmarks/", "--quick", "--benchmarks=layers")
    assert result.returncode == 0, result.stderr[-2000:]
    forms = {"conv1": {"tensorflow", "convolution", "depthwise"},
             "conv2": {"tensorflow", "convolution"},
             "fc1": {"tensorflow", "transposed product", "pretransposed product"}}
    in_use = {}
    for layer, names in forms.items():
        timed = set(re.findall(rf"^{layer} +(\w+(?: product)?) +\d+\.\d\d ms +\d+\.\d "
                               r"GFLOP/s +\d+\.\d% of peak$", result.stdout, re.M))
        assert timed == names, result.stdout
        used = re.search(rf"^{layer} +fastest: ([\w ]+); the port uses: ([\w ]+)$",
                         result.stdout, re.M)
        assert used and used[1] in names, result.stdout
        in_use[layer] = used[2]
    from common.models import layers  # here, so that the other tests load no TensorFlow

    few_channels = "depthwise" if layers.depthwise_gradient_wins() else "tensorflow"
    assert in_use == {"conv1": few_channels, "conv2": "convolution",
                      "fc1": "pretransposed product"}


@pytest.mark.slow
def test_the_cluster_benchmark_times_each_worker_count_to_the_same_result():
    result = run("benchmarks/cluster.py", "--workers=1,2", "--examples=4", "--attacks=apgd-ce",
                 "--threads=1", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 examples, 1 CPU thread(s) per worker" in result.stdout, result.stdout
    rows = re.findall(r"^ +(\d) +(\d+\.\d\d) +(\d+\.\d\d) +(\d+)% (yes|NO)$", result.stdout, re.M)
    assert [(row[0], row[-1]) for row in rows] == [("1", "yes"), ("2", "yes")], result.stdout
    first, second = rows
    assert first[2] == "1.00" and first[3] == "100"
    assert abs(float(second[2]) / 2 - int(second[3]) / 100) < 0.006  # efficiency: speedup / 2


@pytest.mark.slow
def test_the_serving_benchmark_loads_a_server_and_counts_every_answer():
    result = run("benchmarks/serving.py", "--participants=2", "--uploads=2", "--slow=2",
                 "--examples=10", f"--data_path={shared_path('data', 'mnist')}",
                 f"--model_dir={shared_path('fixtures', 'tf1_checkpoints', 'mnist')}",
                 timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^uploads accepted: 4 of 4 in \d+\.\d\d s: \d+\.\d per second$",
                     result.stdout, re.M), result.stdout
    answered = re.search(r"^leaderboard during the load: (\d+) requests, (\d+) answered 200, "
                         r"p50 \d+ ms, p95 \d+ ms$", result.stdout, re.M)
    assert answered and answered[1] == answered[2], result.stdout
