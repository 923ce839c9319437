"""Trains the MNIST challenge model with PGD adversarial training, saving checkpoints and
TensorBoard summaries in `model_dir` along the way, and resuming from the newest checkpoint."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from mnist_challenge.challenge import MNIST

if __name__ == "__main__":
    drivers.train(MNIST)
