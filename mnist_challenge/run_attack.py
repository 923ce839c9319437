"""Scores a submitted attack (`store_adv_path`) against the MNIST model in `model_dir`:
prints `Accuracy: xx.xx%` and saves the predictions as `pred.npy` in the current directory.

The original's function `run_attack(checkpoint, x_adv, epsilon)` is here as before; it checks
and scores an array instead of a file.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from mnist_challenge.challenge import MNIST

run_attack = drivers.run_attack_function(MNIST)

if __name__ == "__main__":
    drivers.score(MNIST)
