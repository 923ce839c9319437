"""The paper's Table 2 and figures for the CIFAR-10 model in `model_dir` (Madry et al., 2018):
the white-box table, the transfer rows (attacks crafted on `--source_model_dir`, a copy A' or a
naturally trained A_nat), accuracy against epsilon and the loss landscape PGD explores.

Writes Markdown, JSON and PNG files to `--out_dir` (model_dir/paper by default); prints a time
estimate first, shows progress, and resumes a killed run from the state files it keeps there.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from cifar10_challenge.challenge import CIFAR10

if __name__ == "__main__":
    drivers.reproduce(CIFAR10)
