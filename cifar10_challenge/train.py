"""Trains the CIFAR-10 challenge model with PGD adversarial training, saving checkpoints and
TensorBoard summaries in `model_dir` along the way, and resuming from the newest checkpoint."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from cifar10_challenge.challenge import CIFAR10

if __name__ == "__main__":
    drivers.train(CIFAR10)
