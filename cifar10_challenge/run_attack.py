"""Checks a submitted CIFAR-10 attack (`store_adv_path`: float32, (10000, 32, 32, 3), in
[0, 255], within `epsilon` of the test images) and scores the model in `model_dir` on it:
prints `Accuracy: xx.xx%` and saves the predictions as `pred.npy` in the current directory.
`run_attack(checkpoint, x_adv, epsilon)` is the original's function, for an array."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from cifar10_challenge.challenge import CIFAR10

run_attack = drivers.run_attack_function(CIFAR10)

if __name__ == "__main__":
    drivers.score(CIFAR10)
