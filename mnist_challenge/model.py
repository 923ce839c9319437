"""The MNIST challenge model: two conv/max-pool layers and two dense layers, as the original.

It is the convolutional network of the TensorFlow "Deep MNIST" tutorial: input [None, 784] in
[0, 1], weights drawn from a normal truncated at 2 sigma (stddev 0.1), biases 0.1.
`from model import Model; model = Model()` works as with the original (a Keras model mapping
flat images to logits). `summary.py` prints the Keras summary.
"""

import os
import sys

# `from model import Model` inside this folder, as with the original, needs the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import keras
from keras import layers

from common.runtime import devices
from common.models.layers import layer_classes

# The released TF1 checkpoints hold unnamed variables, in the order the original created them.
TF1_VARIABLES = {
    "Variable": ("conv1", "kernel"),
    "Variable_1": ("conv1", "bias"),
    "Variable_2": ("conv2", "kernel"),
    "Variable_3": ("conv2", "bias"),
    "Variable_4": ("fc1", "kernel"),
    "Variable_5": ("fc1", "bias"),
    "Variable_6": ("fc2", "kernel"),
    "Variable_7": ("fc2", "bias"),
}


class Model(keras.Model):
    """The original network. `on_cpu` picks the CPU-tuned layers (common/models/layers.py); by
    default they are used where no GPU is visible."""

    def __init__(self, on_cpu=None):
        Conv2D, Dense = layer_classes(devices.runs_on_cpu() if on_cpu is None else on_cpu)
        weights = {
            "kernel_initializer": keras.initializers.TruncatedNormal(stddev=0.1),
            "bias_initializer": keras.initializers.Constant(0.1),
        }
        images = keras.Input((784,), name="x_input")
        x = layers.Reshape((28, 28, 1), name="x_image")(images)
        x = Conv2D(32, 5, padding="same", activation="relu", name="conv1", **weights)(x)
        x = layers.MaxPooling2D(2, padding="same", name="pool1")(x)
        x = Conv2D(64, 5, padding="same", activation="relu", name="conv2", **weights)(x)
        x = layers.MaxPooling2D(2, padding="same", name="pool2")(x)
        x = layers.Flatten(name="flatten")(x)
        x = Dense(1024, activation="relu", name="fc1", **weights)(x)
        logits = Dense(10, name="fc2", dtype="float32", **weights)(x)
        super().__init__(images, logits, name="mnist_challenge_model")


def tf1_variables(model):
    """Maps the TF1 checkpoint's variable names to this model's variables."""
    return {name: getattr(model.get_layer(layer), weight)
            for name, (layer, weight) in TF1_VARIABLES.items()}

