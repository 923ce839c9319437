"""PGD attack on the MNIST challenge model. Running this file attacks the first
`num_eval_examples` test images of the model in `model_dir` and stores them in `store_adv_path`.

The original's `LinfPGDAttack` (its constructor and `perturb(x_nat, y)`) is importable from
here as before. Beyond the original: `--restarts=N` random restarts per example.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from common.attacks.pgd import LinfPGDAttack  # noqa: F401 (the original's import path)
from mnist_challenge.challenge import MNIST

if __name__ == "__main__":
    drivers.attack(MNIST)
