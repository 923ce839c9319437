"""Downloads a released CIFAR-10 challenge model, prints its SHA256 hash and unzips it into
`models/` beside this script: `python fetch_model.py natural|adv_trained|secret`
(`--sha256=HEX` refuses a zip of another digest)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from cifar10_challenge.challenge import CIFAR10

if __name__ == "__main__":
    drivers.fetch_model(CIFAR10)
