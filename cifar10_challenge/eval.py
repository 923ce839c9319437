"""Evaluates the checkpoints of `model_dir` as they appear: natural and adversarial accuracy and
average losses (evaluation mode), printed and written as TensorBoard summaries to
`model_dir/eval`. `--once` evaluates the newest checkpoint and exits."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cli

cli.quiet_tensorflow()

from absl import flags

from cifar10_challenge import cifar10_input, model as cifar_model
from common import checkpoints, config as config_lib, devices, evaluation, precision
from common.pgd import LinfPGDAttack


def main(argv):
    config = config_lib.load_config()
    precision.set_precision(config)
    cifar = cifar10_input.CIFAR10Data(config["data_path"])
    strategy = devices.local_strategy(cpu_only=config["eval_on_cpu"])
    with strategy.scope():
        model = cifar_model.create_model(config["filters"])
        attack = LinfPGDAttack(model, config["epsilon"], config["num_steps"],
                               config["step_size"], config["random_start"], config["loss_func"],
                               pixel_range=(0.0, 255.0), seed=config["np_random_seed"],
                               jit_compile=config["jit_compile"], strategy=strategy)
        evaluation.eval_loop(
            config["model_dir"],
            lambda path: checkpoints.load_weights(model, path, cifar_model.tf1_variables),
            lambda: evaluation.evaluate(model, attack, cifar.test_images.astype("float32"),
                                        cifar.test_labels, config["num_eval_examples"],
                                        config["eval_batch_size"]),
            once=flags.FLAGS.once)


if __name__ == "__main__":
    flags.DEFINE_boolean("once", False, "Evaluate the newest checkpoint and exit.")
    cli.run(main, __file__)
