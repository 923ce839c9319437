"""Prints the Keras summary of the config's model (3,274,634 parameters)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from mnist_challenge.challenge import MNIST

if __name__ == "__main__":
    drivers.summary(MNIST)
