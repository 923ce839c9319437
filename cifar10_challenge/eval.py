"""Evaluates the checkpoints of `model_dir` as they appear, in evaluation mode (batch norm on its
moving averages): natural and adversarial accuracy and average losses, printed and written as
TensorBoard summaries to `model_dir/eval`. `--once` evaluates the newest checkpoint and exits."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from cifar10_challenge.challenge import CIFAR10

if __name__ == "__main__":
    drivers.evaluate(CIFAR10)
