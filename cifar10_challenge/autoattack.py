"""Evaluates the CIFAR-10 model in `model_dir` (evaluation mode) with AutoAttack, the standard
ensemble of APGD-CE, APGD-T, FAB-T and Square, on the first `num_eval_examples` test images
within `epsilon` on the [0, 255] scale (8 by default, the reference's 8/255).

Prints the robust accuracy after each attack; writes the adversarial examples to
`store_adv_path` and autoattack.json beside it; resumes a killed run from its state file.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from cifar10_challenge.challenge import CIFAR10

if __name__ == "__main__":
    drivers.autoattack(CIFAR10)
