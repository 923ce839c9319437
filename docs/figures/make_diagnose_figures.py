"""The figures of docs/diagnose.md: the diagnosis of three of the models tests/test_diagnose.py
diagnoses (tests/failure_modes.py: a linear model trained for two short epochs, its input
quantised to 4 levels under tf.stop_gradient, its logits times 10^4) on the first 30 MNIST test
images at epsilon 0.3, with the same reported attack (PGD, 10 steps of epsilon / 4). Writes
docs/images/diagnose/<model>_accuracy_vs_epsilon.png and <model>_attack_loss.png with the
library's figures and prints each diagnosis. Run from the repository root:
`python docs/figures/make_diagnose_figures.py`.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from common.attacks import PGD
from common.evaluation import figures
from common.evaluation.diagnose import diagnose
from mnist_challenge import mnist_input
from tests.failure_modes import WRAPPERS, linear_model

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
EPSILON = 0.3
EXAMPLES = 30
OUT_DIR = os.path.join(REPO, "docs", "images", "diagnose")
MODELS = ("natural", "quantised", "scaled")


def write_figures(name, diagnosis):
    """The diagnosis's two figures, named after the model."""
    figures.accuracy_against_epsilon(
        diagnosis.epsilons, diagnosis.curves, f"{name} model",
        os.path.join(OUT_DIR, f"{name}_accuracy_vs_epsilon.png"))
    figures.loss_quartiles(diagnosis.loss_traces,
                           os.path.join(OUT_DIR, f"{name}_attack_loss.png"))


def main():
    data = mnist_input.MNISTData(os.path.join(REPO, "..", "shared", "data", "mnist"))
    x, y = data.test_images[:EXAMPLES], data.test_labels[:EXAMPLES].astype(np.int64)
    natural = linear_model(data)
    os.makedirs(OUT_DIR, exist_ok=True)
    for name in MODELS:
        model = WRAPPERS[name](natural)
        attack = PGD(model, epsilon=EPSILON, steps=10, step_size=EPSILON / 4, seed=0)
        diagnosis = diagnose(model, x, y, epsilon=EPSILON, attack=attack,
                             image_shape=(28, 28, 1), progress=True)
        write_figures(name, diagnosis)
        print(f"## {name}\n\n{diagnosis.to_markdown()}")
        print("curves:", {method: np.round(curve, 3).tolist()
                          for method, curve in diagnosis.curves.items()})
        print("median loss:", {method: np.round(np.median(trace, axis=0), 3).tolist()
                               for method, trace in diagnosis.loss_traces.items() if len(trace)})


if __name__ == "__main__":
    main()
