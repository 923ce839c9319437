"""`python benchmarks/`: runs the benchmarks one after another, each in its own process, at the
sizes each one takes by default (`python benchmarks/NAME.py` runs one, and
`python benchmarks/NAME.py --help` lists its sizes). With --quick, each runs at the smallest sizes
instead: a check that every benchmark works, in seconds, whose figures mean nothing. Stops at the
first benchmark that fails, with its exit status.
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags

from benchmarks import cli

FOLDER = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("versus_original", "layers", "training_methods", "precision", "mnist",
              "autoattack", "cifar10")
# The smallest sizes of each, for --quick.
SMALL_PEAK = ["--peak_size=256", "--peak_products=2", "--peak_repeats=1"]
QUICK = {
    "versus_original": ["--pairs=1", "--mnist_batch=2", "--mnist_batches=1", "--mnist_steps=1",
                        "--training_batch=2", "--training_steps=1", "--cifar10_batch=1",
                        "--cifar10_steps=1", "--cifar10_repeats=1",
                        "--cifar10_filters=16,16,32,64"],
    "layers": ["--batch=2", "--rounds=1"],
    "training_methods": ["--batches=2", "--pgd_steps=1", "--replays=2", "--rounds=1"],
    "precision": ["--training_batch=2", "--training_attack_steps=1", "--attack_batch=2",
                  "--attack_steps=1", "--rounds=1"],
    "mnist": ["--attack_batch=2", "--training_batch=2", "--steps=1", "--repeats=1"],
    "autoattack": ["--batch=2", "--pgd_steps=1", "--iterations=1", "--queries=1", "--rounds=1"],
    "cifar10": ["--simple_batch=2", "--wide_batch=1", "--steps=1", "--repeats=1",
                "--wide_repeats=1"],
}

SELECTED = flags.DEFINE_list("benchmarks", list(BENCHMARKS), "the benchmarks to run, in this "
                             f"order, of {', '.join(BENCHMARKS)}")
QUICK_FLAG = flags.DEFINE_bool("quick", False, "run each benchmark at its smallest sizes (a "
                               "check that it works, not a measurement)")
flags.register_validator("benchmarks", cli.choices_validator(BENCHMARKS),
                         f"give one or more of {', '.join(BENCHMARKS)}, separated by commas")


def command(name, quick):
    """The command line of benchmark `name`."""
    sizes = QUICK[name] + SMALL_PEAK if quick else []
    return [sys.executable, os.path.join(FOLDER, f"{name}.py"), *sizes]


def main():
    for name in SELECTED.value:
        line = command(name, QUICK_FLAG.value)
        print(f"== {' '.join([f'{name}.py', *line[2:]])}", flush=True)
        status = subprocess.run(line).returncode
        if status:
            cli.fail(f"benchmarks/{name}.py exited with status {status}")


if __name__ == "__main__":
    cli.run(main)
