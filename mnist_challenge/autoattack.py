"""AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on the MNIST model in `model_dir`, over the first
`num_eval_examples` test images at the config's `epsilon`: prints the robust accuracy after each
attack, stores the adversarial examples in `store_adv_path` (a submission run_attack.py scores)
and a report in autoattack.json beside it. `--version=plus|rand`, `--attacks=apgd-ce,apgd-t`
and `--seed` as in the reference; a killed run resumes from its state file."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from mnist_challenge.challenge import MNIST

if __name__ == "__main__":
    drivers.autoattack(MNIST)
