"""Evaluates the checkpoints of `model_dir` as they appear: natural and adversarial accuracy and
average losses, printed and written as TensorBoard summaries to `model_dir/eval`.
`--once` evaluates the newest checkpoint and exits."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cli

cli.quiet_tensorflow()

from absl import flags

from common import checkpoints, config as config_lib, devices, evaluation, precision
from common.pgd import LinfPGDAttack
from mnist_challenge import mnist_input, model as mnist_model


def main(argv):
    config = config_lib.load_config()
    precision.set_precision(config)
    mnist = mnist_input.MNISTData(config["data_path"])
    strategy = devices.local_strategy(cpu_only=config["eval_on_cpu"])
    with strategy.scope():
        model = mnist_model.create_model()
        attack = LinfPGDAttack(model, config["epsilon"], config["k"], config["a"],
                               config["random_start"], config["loss_func"],
                               seed=config["random_seed"], jit_compile=config["jit_compile"],
                               strategy=strategy)
        evaluation.eval_loop(
            config["model_dir"],
            lambda path: checkpoints.load_weights(model, path, mnist_model.tf1_variables),
            lambda: evaluation.evaluate(model, attack, mnist.test_images, mnist.test_labels,
                                        config["num_eval_examples"], config["eval_batch_size"]),
            once=flags.FLAGS.once)


if __name__ == "__main__":
    flags.DEFINE_boolean("once", False, "Evaluate the newest checkpoint and exit.")
    cli.run(main, __file__)
