"""Downloads a released MNIST challenge model, prints its SHA256 hash and unzips it into
`models/` beside this script: `python fetch_model.py natural|adv_trained|secret`
(`--sha256=HEX` refuses a zip of another digest)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import drivers
from mnist_challenge.challenge import MNIST

if __name__ == "__main__":
    drivers.fetch_model(MNIST)
