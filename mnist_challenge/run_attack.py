"""Scores a submitted attack (`store_adv_path`) against the MNIST model in `model_dir`:
prints `Accuracy: xx.xx%` and saves the predictions as `pred.npy` in the current directory."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cli

cli.quiet_tensorflow()

from common import checkpoints, config as config_lib, devices, precision, submission
from mnist_challenge import mnist_input, model as mnist_model


PREDICTION_BATCH_SIZE = 64


def main(argv):
    config = config_lib.load_config()
    precision.set_precision(config)
    strategy = devices.local_strategy()
    with strategy.scope():
        model = mnist_model.create_model()
    checkpoints.require_latest_weights(model, config["model_dir"], mnist_model.tf1_variables,
                                       "No checkpoint found")
    mnist = mnist_input.MNISTData(config["data_path"])
    x_adv = submission.load_and_check(config["store_adv_path"], mnist.test_images,
                                      config["epsilon"], (0.0, 1.0), "(10000,784)")
    accuracy, predictions = submission.score(model, x_adv, mnist.test_labels,
                                             PREDICTION_BATCH_SIZE, strategy)
    submission.report_score(accuracy, predictions)


if __name__ == "__main__":
    cli.run(main, __file__)
