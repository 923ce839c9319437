"""Hosts the MNIST challenge: participants upload attacks (`attack.npy`) over HTTP or a web form,
scorers check and score them as `run_attack.py` does, on the model in `model_dir` (never served),
and `/` shows the leaderboard.

    python mnist_challenge/serve.py --model_dir=DIR --state_dir=DIR [--port=8000]
    python mnist_challenge/serve.py --state_dir=DIR --add_participant=NAME

See docs/serving.md.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.scripts import serving
from mnist_challenge.challenge import MNIST

if __name__ == "__main__":
    serving.serve(MNIST)
