"""Scores a submitted attack (`store_adv_path`) against the CIFAR-10 model in `model_dir`:
prints `Accuracy: xx.xx%` and saves the predictions as `pred.npy` in the current directory."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cli

cli.quiet_tensorflow()

from cifar10_challenge import cifar10_input, model as cifar_model
from common import checkpoints, config as config_lib, devices, precision, submission


PREDICTION_BATCH_SIZE = 100


def main(argv):
    config = config_lib.load_config()
    precision.set_precision(config)
    strategy = devices.local_strategy()
    with strategy.scope():
        model = cifar_model.create_model(config["filters"])
    checkpoints.require_latest_weights(model, config["model_dir"], cifar_model.tf1_variables,
                                       "No checkpoint found")
    cifar = cifar10_input.CIFAR10Data(config["data_path"])
    x_adv = submission.load_and_check(config["store_adv_path"], cifar.test_images,
                                      config["epsilon"], (0.0, 255.0), "(10000, 32, 32, 3)")
    accuracy, predictions = submission.score(model, x_adv, cifar.test_labels,
                                             PREDICTION_BATCH_SIZE, strategy)
    submission.report_score(accuracy, predictions)


if __name__ == "__main__":
    cli.run(main, __file__)
