"""Downloads a released CIFAR-10 challenge model, prints its SHA256 hash and unzips it into
`models/` beside this script: `python fetch_model.py natural|adv_trained|secret`
(`--sha256=HEX` refuses a zip of another digest)."""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cli
from common.fetch import fetch_model

MODELS_URL = "https://github.com/MadryProj/cifar10_challenge_models/raw/master/"
URLS = {name: MODELS_URL + name + ".zip" for name in ("natural", "adv_trained", "secret")}
PUBLISHED_SHA256 = {"secret": "555be6e892372599380c9da5d5f9802f9cbd098be8a47d24d96937a002305fd4"}


def main(argv):
    fetch_model(argv, URLS, PUBLISHED_SHA256, os.path.dirname(os.path.abspath(__file__)),
                flags.FLAGS.sha256)


if __name__ == "__main__":
    cli.run(main)
