"""PGD attack on the CIFAR-10 challenge model. Running this file attacks the first
`num_eval_examples` test images of the model in `model_dir` (evaluation mode) and stores them in
`store_adv_path`, float32 in [0, 255].

`LinfPGDAttack` (from common/pgd.py) keeps the original's constructor and `perturb(x_nat, y)`.
Beyond the original: `--restarts=N` random restarts per example.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cli

cli.quiet_tensorflow()

from absl import flags

from cifar10_challenge import cifar10_input, model as cifar_model
from common import checkpoints, config as config_lib, devices, precision
from common.pgd import LinfPGDAttack, attack_test_set, store_attack

__all__ = ["LinfPGDAttack"]


PIXEL_RANGE = (0.0, 255.0)


def main(argv):
    config = config_lib.load_config()
    precision.set_precision(config)
    strategy = devices.local_strategy()
    with strategy.scope():
        model = cifar_model.create_model(config["filters"])
    checkpoints.require_latest_weights(model, config["model_dir"], cifar_model.tf1_variables,
                                       "No model found")
    attack = LinfPGDAttack(model, config["epsilon"], config["num_steps"], config["step_size"],
                           config["random_start"], config["loss_func"], pixel_range=PIXEL_RANGE,
                           restarts=flags.FLAGS.restarts, seed=config["np_random_seed"],
                           jit_compile=config["jit_compile"], strategy=strategy)
    cifar = cifar10_input.CIFAR10Data(config["data_path"])
    x_adv = attack_test_set(attack, cifar.test_images.astype("float32"), cifar.test_labels,
                            config["num_eval_examples"], config["eval_batch_size"])
    store_attack(x_adv, config["store_adv_path"])


if __name__ == "__main__":
    flags.DEFINE_integer("restarts", 1, "Random restarts per example; the strongest one is kept.")
    cli.run(main, __file__)
