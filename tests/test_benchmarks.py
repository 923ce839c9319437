"""The benchmark scripts' command lines: `--help` answers at once without measuring, bad flags
end with one `Error:` line, and the smallest sizes run end to end in seconds."""

import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each script, and flags that its --help must list.
SCRIPTS = {
    "benchmarks/mnist.py": ("--attack_batch", "--training_batch", "--steps", "--repeats",
                            "--peak_size"),
    "benchmarks/cifar10.py": ("--simple_batch", "--wide_batch", "--networks", "--steps",
                              "--repeats", "--wide_repeats", "--peak_size"),
    "benchmarks/autoattack.py": ("--batch", "--pgd_steps", "--iterations", "--queries",
                                 "--rounds", "--peak_size"),
    "benchmarks/training_methods.py": ("--batches", "--pgd_steps", "--replays", "--rounds",
                                       "--peak_size"),
    "benchmarks/peak.py": ("--peak_size", "--peak_products", "--peak_repeats"),
    "benchmarks/layers.py": ("--batch", "--rounds", "--peak_size"),
    "benchmarks/flops.py": ("--networks", "--mnist_steps", "--cifar10_steps"),
    "benchmarks/versus_original.py": ("--workloads", "--pairs", "--baseline_checkout",
                                      "--mnist_batch", "--training_batch", "--cifar10_batch",
                                      "--cifar10_filters", "--peak_size"),
    "benchmarks/": ("--benchmarks", "--quick"),
}

# A figure the scripts print: a number, then its unit.
MEASUREMENT = re.compile(r"\d\s*(examples|GFLOP/s|MFLOP)")


def run(*args, timeout=120):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.perf_counter() - start


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_lists_the_flags_and_measures_nothing(script):
    result, seconds = run(script, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert seconds < 20  # TensorFlow is not even loaded
    for flag in SCRIPTS[script]:
        assert flag in result.stdout, (flag, result.stdout)
    assert "(default: " in result.stdout
    assert not MEASUREMENT.search(result.stdout), result.stdout
    assert not error_lines(result)


def test_help_comes_in_every_spelling():
    for spelling in ("-h", "--helpshort", "--helpfull"):
        result, _ = run("benchmarks/mnist.py", spelling, timeout=60)
        assert result.returncode == 0, (spelling, result.stderr)
        assert "--attack_batch" in result.stdout


@pytest.mark.parametrize("script, args", [
    ("benchmarks/mnist.py", ["--attack_batch=-1"]),
    ("benchmarks/mnist.py", ["--training_batch=0"]),
    ("benchmarks/mnist.py", ["--steps=many"]),
    ("benchmarks/mnist.py", ["--no_such_flag=1"]),
    ("benchmarks/mnist.py", ["200"]),
    ("benchmarks/cifar10.py", ["--wide_batch=-8"]),
    ("benchmarks/cifar10.py", ["--networks=resnet"]),
    ("benchmarks/autoattack.py", ["--batch=-200"]),
    ("benchmarks/autoattack.py", ["--rounds=0"]),
    ("benchmarks/training_methods.py", ["--batches=50,-1"]),
    ("benchmarks/training_methods.py", ["--batches="]),
    ("benchmarks/peak.py", ["--peak_size=0"]),
    ("benchmarks/flops.py", ["--networks=resnet"]),
    ("benchmarks/versus_original.py", ["--pairs=0"]),
    ("benchmarks/versus_original.py", ["--workloads=mnist_attack,resnet"]),
    ("benchmarks/versus_original.py", ["--baseline_checkout=/nonexistent/checkout"]),
    ("benchmarks/versus_original.py", ["--baseline_checkout="]),
    ("benchmarks/layers.py", ["--rounds=0"]),
    ("benchmarks/", ["--benchmarks=nope"]),
    ("benchmarks/", ["--quick=maybe"]),
])
def test_a_bad_flag_gives_one_error_line(script, args):
    result, _ = run(script, *args, timeout=60)
    assert result.returncode != 0
    assert len(error_lines(result)) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not MEASUREMENT.search(result.stdout)


@pytest.mark.slow
def test_the_smallest_mnist_benchmark_runs_through_python_benchmarks():
    result, _ = run("benchmarks/", "--quick", "--benchmarks=mnist")
    assert result.returncode == 0, result.stderr
    assert "== mnist.py --attack_batch=2" in result.stdout
    assert re.search(r"^fp32 matmul peak .*: \d+\.\d GFLOP/s$", result.stdout, re.M)
    for name in ("attack \\(1 steps, batch 2\\)", "training step \\(1-step attack, batch 2\\)"):
        assert re.search(rf"^{name} +\d+\.\d\d examples/s +\d+\.\d GFLOP/s +\d+\.\d% of peak$",
                         result.stdout, re.M), result.stdout


@pytest.mark.slow
def test_flops_prints_the_counts_that_the_readme_gives():
    result, _ = run("benchmarks/flops.py")
    assert result.returncode == 0, result.stderr
    forward = {line.split()[0]: float(line.split()[3]) for line in result.stdout.splitlines()}
    with open(os.path.join(REPO, "benchmarks", "README.md")) as readme:
        text = " ".join(readme.read().split())
    assert f"{forward['mnist']:.1f} MFLOP for MNIST" in text
    assert f"{forward['simple'] / 1e3:.3f} GFLOP for the simple" in text
    assert f"{forward['wide'] / 1e3:.2f} GFLOP for the wide" in text


@pytest.mark.slow
def test_the_port_and_the_original_alternate_in_their_own_processes():
    result, _ = run("benchmarks/", "--quick", "--benchmarks=versus_original", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^CPU: .*, extensions: ", result.stdout, re.M), result.stdout
    for workload in ("mnist_attack", "mnist_training", "cifar10_attack"):
        assert re.search(rf"^{workload}: median ratio \d+\.\d{{3}} ", result.stdout, re.M)
    assert len(re.findall(r"^pair 1 \(port first\): port +\d+\.\d\d, original +\d+\.\d\d "
                          r"examples/s, ratio \d+\.\d{3}$", result.stdout, re.M)) == 3
    assert len(re.findall(r"spread \d+\.\d%, \d+\.\d% of peak$", result.stdout, re.M)) == 6


@pytest.mark.slow
def test_a_checkout_takes_the_originals_place():
    # The port against itself: the same code on both sides, named as the other checkout.
    result, _ = run("benchmarks/versus_original.py", "--workloads=mnist_attack", "--pairs=1",
                    "--mnist_batch=2", "--mnist_batches=1", "--mnist_steps=1",
                    f"--baseline_checkout={REPO}", "--peak_size=256", "--peak_products=2",
                    "--peak_repeats=1", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(rf"^Baseline: the port in {re.escape(REPO)}( at \S+)?$",
                     result.stdout, re.M), result.stdout
    assert re.search(r"^pair 1 \(port first\): port +\d+\.\d\d, checkout +\d+\.\d\d "
                     r"examples/s, ratio \d+\.\d{3}$", result.stdout, re.M), result.stdout
    assert re.search(r"^  checkout +median .* of peak$", result.stdout, re.M)


def test_the_baseline_side_imports_the_other_checkouts_code(tmp_path):
    # A checkout whose package refuses to load: the baseline's process must fail on it, so the
    # port of this checkout was not measured in its place.
    os.makedirs(tmp_path / "common" / "attacks")
    (tmp_path / "common" / "attacks" / "pgd.py").write_text("")
    (tmp_path / "common" / "__init__.py").write_text("raise ImportError('the baseline loaded')\n")
    result, _ = run("benchmarks/versus_original.py", "--side=original",
                    "--workloads=mnist_attack", "--mnist_batch=2", "--mnist_batches=1",
                    "--mnist_steps=1", f"--baseline_checkout={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert "ImportError: the baseline loaded" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_the_layers_benchmark_times_every_form_and_names_the_one_in_use():
    result, _ = run("benchmarks/", "--quick", "--benchmarks=layers")
    assert result.returncode == 0, result.stderr[-2000:]
    forms = {"conv1": {"tensorflow", "convolution", "depthwise"},
             "conv2": {"tensorflow", "convolution"}, "fc1": {"tensorflow", "transposed product"}}
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
    assert in_use == {"conv1": few_channels, "conv2": "convolution", "fc1": "transposed product"}
