"""PGD attack on the MNIST challenge model. Running this file attacks the first
`num_eval_examples` test images of the model in `model_dir` and stores them in `store_adv_path`.

`LinfPGDAttack` (from common/pgd.py) keeps the original's constructor and `perturb(x_nat, y)`.
Beyond the original: `--restarts=N` random restarts per example.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cli

cli.quiet_tensorflow()

from absl import flags

from common import checkpoints, config as config_lib, devices, precision
from common.pgd import LinfPGDAttack, attack_test_set, store_attack
from mnist_challenge import mnist_input, model as mnist_model

__all__ = ["LinfPGDAttack"]


def main(argv):
    config = config_lib.load_config()
    precision.set_precision(config)
    strategy = devices.local_strategy()
    with strategy.scope():
        model = mnist_model.create_model()
    checkpoints.require_latest_weights(model, config["model_dir"], mnist_model.tf1_variables,
                                       "No model found")
    attack = LinfPGDAttack(model, config["epsilon"], config["k"], config["a"],
                           config["random_start"], config["loss_func"],
                           restarts=flags.FLAGS.restarts, seed=config["random_seed"],
                           jit_compile=config["jit_compile"], strategy=strategy)
    mnist = mnist_input.MNISTData(config["data_path"])
    x_adv = attack_test_set(attack, mnist.test_images, mnist.test_labels,
                            config["num_eval_examples"], config["eval_batch_size"])
    store_attack(x_adv, config["store_adv_path"])


if __name__ == "__main__":
    flags.DEFINE_integer("restarts", 1, "Random restarts per example; the strongest one is kept.")
    cli.run(main, __file__)
