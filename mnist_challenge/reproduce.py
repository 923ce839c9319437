"""The paper's Table 1 and figures for the MNIST model in `model_dir` (Madry et al., 2018):
the white-box table, the transfer rows (attacks crafted on `--source_model_dir`), accuracy
against epsilon, the loss landscape PGD explores, and the first-layer filters.

Writes Markdown, JSON and PNG files to `--out_dir` (model_dir/paper by default); prints a time
estimate first, shows progress, and resumes a killed run from the state files it keeps there.
`--artifacts=table,eps_sweep` picks some; `--num_eval_examples=1000` makes a quick version.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from mnist_challenge.challenge import MNIST

if __name__ == "__main__":
    drivers.reproduce(MNIST)
