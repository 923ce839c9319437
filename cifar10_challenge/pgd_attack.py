"""Attacks the first `num_eval_examples` CIFAR-10 test images of the model in `model_dir`
(evaluation mode) with PGD and stores them in `store_adv_path`, float32 in [0, 255];
`--restarts=N` keeps, per example, the strongest of N random starts.
`from pgd_attack import LinfPGDAttack` gives the original's attack class."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from common.attacks.pgd import LinfPGDAttack  # noqa: F401 (the original's import path)
from cifar10_challenge.challenge import CIFAR10

if __name__ == "__main__":
    drivers.attack(CIFAR10)
