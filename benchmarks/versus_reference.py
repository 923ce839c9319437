"""The project's AutoAttack against the reference implementation (PyTorch,
github.com/fra31/auto-attack) on the same CPU, the same MNIST model and the same test images:
standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) at epsilon 0.3, each side in its own
process with every CPU thread, the sides taking turns for --pairs pairs.

Prints the CPU, then per process the robust accuracy and cumulative seconds after each attack
(both sides log the same lines), and at the end each attack's seconds on both sides, the
speedup (reference seconds / port seconds, medians over the pairs), and on how many images the
two sides' robust flags agree.

The reference is not part of this project and nothing here installs it: clone it
(`git clone https://github.com/fra31/auto-attack`) and install PyTorch's CPU build beside the
project (`pip install torch`), then name the clone: `python benchmarks/versus_reference.py
--reference_path=../auto-attack --model_dir=mnist_challenge/models/fast`. The model is read
from the newest checkpoint of --model_dir (a robust model, since AutoAttack's time is spent on
the images it cannot break) and copied into the same network in PyTorch, whose logits must
match the Keras model's. `--precision=mixed_bfloat16` runs the port's side in bfloat16 (reported
robustness stays float32 in the scripts; this measures what bfloat16 would buy).
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from benchmarks import cli, peak  # noqa: E402

SIDES = ("port", "reference")
ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
RESULT_MARK = "RESULT "
REPORTED = re.compile(r"robust accuracy after ([A-Z-]+): ([0-9.]+)% \(total time ([0-9.]+) s\)")

REFERENCE = flags.DEFINE_string("reference_path", None, "a checkout of fra31/auto-attack "
                                "(the folder holding the autoattack package)")
MODEL_DIR = flags.DEFINE_string("model_dir", "mnist_challenge/models/fast",
                                "the MNIST model, by the newest checkpoint in this folder")
DATA_PATH = flags.DEFINE_string("data_path", "mnist_challenge/MNIST_data", "the MNIST files")
EXAMPLES = flags.DEFINE_integer("examples", 200, "the first test images attacked",
                                lower_bound=1)
BATCH = flags.DEFINE_integer("batch", 200, "images per batch on both sides", lower_bound=1)
EPSILON = flags.DEFINE_float("epsilon", 0.3, "the L-infinity radius", lower_bound=0.0)
PRECISION = flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"],
                              "the port's precision (the reference computes in float32)")
PAIRS = flags.DEFINE_integer("pairs", 1, "processes of each side, alternating", lower_bound=1)
SIDE = flags.DEFINE_enum("side", None, SIDES, "(internal) run one side in this process")
OUT = flags.DEFINE_string("out", None, "(internal) the folder a side writes its flags to")


def keras_model():
    from common.io import checkpoints
    from mnist_challenge import model as mnist_model

    network = mnist_model.Model()
    checkpoints.require_latest_weights(network, MODEL_DIR.value, mnist_model.tf1_variables,
                                       f"no checkpoint in --model_dir={MODEL_DIR.value}")
    return network


def test_images():
    from mnist_challenge.mnist_input import MNISTData

    data = MNISTData(DATA_PATH.value)
    return data.test_images[:EXAMPLES.value], data.test_labels[:EXAMPLES.value].astype("int64")


def torch_network(torch, network):
    """The same network in PyTorch holding `network`'s weights: NCHW images, flattened in the
    NHWC order the Keras network flattens in."""
    nn = torch.nn

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
            self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
            self.fc1 = nn.Linear(7 * 7 * 64, 1024)
            self.fc2 = nn.Linear(1024, 10)

        def forward(self, x):
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = torch.relu(self.fc1(x.permute(0, 2, 3, 1).flatten(1)))
            return self.fc2(x)

    copy = Network()
    with torch.no_grad():
        for name in ("conv1", "conv2", "fc1", "fc2"):
            layer = network.get_layer(name)
            kernel = layer.kernel.numpy()
            kernel = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
            getattr(copy, name).weight.copy_(torch.from_numpy(kernel.copy()))
            getattr(copy, name).bias.copy_(torch.from_numpy(layer.bias.numpy()))
    return copy.eval()


def run_port(x, y, log):
    from common.attacks import AutoAttack
    from common.runtime import precision

    precision.set_precision(PRECISION.value)
    network = keras_model()
    result = AutoAttack(network, epsilon=EPSILON.value, seed=0, log=log).evaluate(
        x, y, batch_size=BATCH.value)
    return result.robust


def run_reference(x, y, log):
    import numpy as np
    import torch

    sys.path.insert(0, os.path.abspath(REFERENCE.value))
    from autoattack import AutoAttack

    network = keras_model()
    copy = torch_network(torch, network)
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).copy())
    with torch.no_grad():
        clean = copy(images)
    difference = np.abs(clean.numpy() - network(x).numpy()).max()
    if difference > 1e-3:
        cli.fail(f"the PyTorch copy's logits differ from the Keras model's by {difference:.3g}")
    log_path = os.path.join(OUT.value, "reference.log")
    adversary = AutoAttack(copy, norm="Linf", eps=EPSILON.value, version="standard", seed=0,
                           device="cpu", log_path=log_path)
    labels = torch.from_numpy(y)
    x_adv = adversary.run_standard_evaluation(images, labels, bs=BATCH.value)
    with open(log_path) as lines:
        for line in lines:
            log(line.strip())
    with torch.no_grad():
        return ((clean.argmax(1) == labels) & (copy(x_adv).argmax(1) == labels)).numpy()


def run_side():
    """One side: its report lines on stdout, its robust flags in --out, one RESULT line."""
    import numpy as np

    x, y = test_images()
    lines = []

    def log(line):
        lines.append(line)
        print(line, flush=True)

    start = time.perf_counter()
    robust = (run_port if SIDE.value == "port" else run_reference)(x, y, log)
    seconds = time.perf_counter() - start
    np.save(os.path.join(OUT.value, f"{SIDE.value}.npy"), robust)
    after = {match[1].lower(): (float(match[2]), float(match[3]))
             for match in map(REPORTED.search, lines) if match}
    print(RESULT_MARK + json.dumps({"seconds": seconds, "after": after}), flush=True)


def side_process(side, out):
    """Runs one side in its own process; its RESULT."""
    args = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--out={out}",
            f"--reference_path={REFERENCE.value}", f"--model_dir={MODEL_DIR.value}",
            f"--data_path={DATA_PATH.value}", f"--examples={EXAMPLES.value}",
            f"--batch={BATCH.value}", f"--epsilon={EPSILON.value}",
            f"--precision={PRECISION.value}"]
    completed = subprocess.run(args, capture_output=True, text=True)
    results = [line[len(RESULT_MARK):] for line in completed.stdout.splitlines()
               if line.startswith(RESULT_MARK)]
    if completed.returncode != 0 or not results:
        last = (completed.stderr or completed.stdout).strip().splitlines()[-1:]
        cli.fail(f"the {side} side failed: {' '.join(last)}")
    return json.loads(results[0])


def check_flags():
    """One error line, before anything runs, for a reference, PyTorch or model not there."""
    import importlib.util

    from common.io import checkpoints

    if REFERENCE.value is None or not os.path.isdir(os.path.join(REFERENCE.value,
                                                                 "autoattack")):
        cli.fail("--reference_path must name a checkout of fra31/auto-attack (a folder holding "
                 f"autoattack/). Received: --reference_path={REFERENCE.value}")
    if importlib.util.find_spec("torch") is None:
        cli.fail("the reference needs PyTorch, which is not installed: pip install torch")
    if checkpoints.latest_checkpoint(MODEL_DIR.value) is None:
        cli.fail(f"no checkpoint in --model_dir={MODEL_DIR.value}")


def compare():
    import numpy as np

    check_flags()
    print(peak.cpu_description())
    runs = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as out:
        for pair in range(PAIRS.value):
            order = SIDES if pair % 2 == 0 else SIDES[::-1]
            for side in order:
                result = side_process(side, out)
                runs[side].append(result)
                accuracies = ", ".join(f"{name} {accuracy:.2f}% ({seconds:.1f} s)"
                                       for name, (accuracy, seconds) in result["after"].items())
                print(f"pair {pair + 1} {side:9s} {result['seconds']:8.1f} s with the model's "
                      f"loading: {accuracies}",
                      flush=True)
        agree = np.mean(np.load(os.path.join(out, "port.npy")) ==
                        np.load(os.path.join(out, "reference.npy")))
    print(f"{'attack':8s} {'port s':>9s} {'reference s':>12s} {'speedup':>8s}  accuracy after "
          "(port / reference)")
    # An attack with nothing left to break is skipped: compare those both sides ran.
    ran = [name for name in ATTACKS
           if all(name in run["after"] for side in SIDES for run in runs[side])]
    previous = {side: 0.0 for side in SIDES}
    for name in ran:
        seconds = {}
        for side in SIDES:
            seconds[side] = statistics.median(
                run["after"][name][1] for run in runs[side]) - previous[side]
            previous[side] += seconds[side]
        accuracy = {side: runs[side][-1]["after"][name][0] for side in SIDES}
        print(f"{name:8s} {seconds['port']:9.1f} {seconds['reference']:12.1f} "
              f"{seconds['reference'] / seconds['port']:7.2f}x  "
              f"{accuracy['port']:.2f}% / {accuracy['reference']:.2f}%")
    print(f"{'all':8s} {previous['port']:9.1f} {previous['reference']:12.1f} "
          f"{previous['reference'] / previous['port']:7.2f}x  robust flags agree on {agree:.1%} "
          f"of {EXAMPLES.value} images")


def main():
    if SIDE.value:
        run_side()
    else:
        compare()


if __name__ == "__main__":
    cli.run(main)
