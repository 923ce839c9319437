"""Can the MNIST model's robust accuracy be trusted? Diagnoses the model in `model_dir` on the
first `num_eval_examples` test images within the config's `epsilon` (`--norm=L2|L1` with
`--epsilon`): the config's PGD, AutoAttack, and the indicators of a failed attack or a masked
gradient. Writes diagnosis.md, diagnosis.json, accuracy_vs_epsilon.png and attack_loss.png to
`--out_dir` (model_dir/diagnosis by default); see docs/diagnose.md."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import diagnosing
from mnist_challenge.challenge import MNIST

if __name__ == "__main__":
    diagnosing.diagnose_script(MNIST)
