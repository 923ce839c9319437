"""Code shared by the MNIST and CIFAR-10 challenges.

Importing it hides TensorFlow's start-up chatter (unless TF_CPP_MIN_LOG_LEVEL is already set), so
that the scripts, which import `common` before TensorFlow, print the original's lines alone.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
