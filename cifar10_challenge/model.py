"""The CIFAR-10 challenge model: the original's wide residual network (w28-10 style, 5 units per
stage), with per-image standardization inside the model so that attack gradients flow through it.

Input [None, 32, 32, 3] in [0, 255]; `filters` [16, 160, 320, 640] (wide, 45,901,914 trainable
parameters) or [16, 16, 32, 64] (the paper's "simple" network, 464,154). Layer names are the TF1
variable scopes with '/' written '.', so the released checkpoints map by name.
`from model import Model; model = Model('train')` works as with the original (`mode` 'train' or
'eval', the wide filters by default). `summary.py` prints the Keras summary.
"""

import os
import sys

# `from model import Model` inside this folder, as with the original, needs the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import keras
import tensorflow as tf
from keras import layers

from common.runtime import devices
from common.models.batch_norm import BatchNorm
from common.models.layers import layer_classes

WIDE_FILTERS = (16, 160, 320, 640)
SIMPLE_FILTERS = (16, 16, 32, 64)
UNITS_PER_STAGE = 5
LEAKINESS = 0.1


class PadChannels(layers.Layer):
    """Zero-pads the channels by `padding` on each side (the shortcut of a widening unit)."""

    def __init__(self, padding, **kwargs):
        super().__init__(**kwargs)
        self.padding = padding

    def call(self, inputs):
        return tf.pad(inputs, [[0, 0], [0, 0], [0, 0], [self.padding, self.padding]])

    def get_config(self):
        return {**super().get_config(), "padding": self.padding}


class PerImageStandardization(layers.Layer):
    """`(x - mean) / max(std, 1/sqrt(pixels))` per image, as the original's first op."""

    def call(self, inputs):
        return tf.image.per_image_standardization(inputs)


def _conv(Conv2D, filters, strides, name):
    return Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=name,
                  kernel_initializer=keras.initializers.VarianceScaling(
                      2.0, mode="fan_out", distribution="untruncated_normal"))


def _activation(x, batch_norm_name):
    x = BatchNorm(name=batch_norm_name)(x)
    return layers.LeakyReLU(negative_slope=LEAKINESS)(x)


def _residual_unit(Conv2D, x, in_filters, out_filters, stride, activate_before_residual, scope):
    if activate_before_residual:
        x = _activation(x, f"{scope}.shared_activation.BatchNorm")
        shortcut = x
    else:
        shortcut = x
        x = _activation(x, f"{scope}.residual_only_activation.BatchNorm")
    x = _conv(Conv2D, out_filters, stride, f"{scope}.sub1.conv1")(x)
    x = _activation(x, f"{scope}.sub2.BatchNorm")
    x = _conv(Conv2D, out_filters, 1, f"{scope}.sub2.conv2")(x)
    if in_filters != out_filters:
        shortcut = layers.AveragePooling2D(stride, stride, padding="valid")(shortcut)
        shortcut = PadChannels((out_filters - in_filters) // 2)(shortcut)
    return layers.Add()([x, shortcut])


class Model(keras.Model):
    """The original network mapping images in [0, 255] to logits.

    `mode` 'train' or 'eval' is the mode a call runs in when it does not pass `training` (the
    original built one graph per mode). `on_cpu` picks the CPU-tuned convolutions
    (common/models/layers.py); by default they are used where no GPU is visible.
    """

    def __init__(self, mode="eval", filters=WIDE_FILTERS, on_cpu=None):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        Conv2D, _ = layer_classes(devices.runs_on_cpu() if on_cpu is None else on_cpu)
        images = keras.Input((32, 32, 3), name="x_input")
        x = PerImageStandardization(name="input.standardization", dtype="float32")(images)
        x = _conv(Conv2D, filters[0], 1, "input.init_conv")(x)
        in_filters = filters[0]
        for stage, (stride, out_filters) in enumerate(zip((1, 2, 2), filters[1:]), start=1):
            for unit in range(UNITS_PER_STAGE):
                x = _residual_unit(Conv2D, x, in_filters, out_filters,
                                   stride if unit == 0 else 1, stage == 1 and unit == 0,
                                   f"unit_{stage}_{unit}")
                in_filters = out_filters
        x = _activation(x, "unit_last.BatchNorm")
        x = layers.GlobalAveragePooling2D()(x)
        logits = layers.Dense(10, name="logit", dtype="float32",
                              kernel_initializer=keras.initializers.VarianceScaling(
                                  1.0, mode="fan_in", distribution="uniform"))(x)
        super().__init__(images, logits, name="cifar10_challenge_model")
        self.mode = mode

    def call(self, inputs, training=None, mask=None):
        if training is None:
            training = self.mode == "train"
        return super().call(inputs, training=training, mask=mask)


def tf1_variables(model):
    """Maps the TF1 checkpoint's variable names to this model's variables."""
    variables = {}
    for layer in model.layers:
        scope = layer.name.replace(".", "/")
        if isinstance(layer, BatchNorm):
            for weight in ("beta", "gamma", "moving_mean", "moving_variance"):
                variables[f"{scope}/{weight}"] = getattr(layer, weight)
        elif isinstance(layer, layers.Conv2D):
            variables[f"{scope}/DW"] = layer.kernel
        elif isinstance(layer, layers.Dense):
            variables[f"{scope}/DW"] = layer.kernel
            variables[f"{scope}/biases"] = layer.bias
    return variables


def decayed_kernels(model):
    """The kernels the original's weight decay covers: those named DW (convs and the dense)."""
    return [layer.kernel for layer in model.layers
            if isinstance(layer, (layers.Conv2D, layers.Dense))]

