"""Prints the Keras summary of the config's model: 45,901,914 trainable parameters for the wide
filters, 464,154 with `--filters=[16,16,32,64]`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from cifar10_challenge.challenge import CIFAR10

if __name__ == "__main__":
    drivers.summary(CIFAR10)
