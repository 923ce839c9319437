"""Conv2D and Dense layers for models that run on CPUs: the values of Keras' own layers, with
two input gradients computed by other, equal products that TensorFlow's CPU kernels run faster.

On GPUs, cuDNN's and cuBLAS's own kernels are the ones to trust, so `layer_classes(on_cpu)` gives
these layers only where the model runs on CPUs, and Keras' own elsewhere. Both have the same
weights under the same names, so a checkpoint fits either. The timings behind the choices are in
benchmarks/README.md. Inside an attack's steps these layers take their kernels as read once
before the steps (`weights_read_once`).
"""

import contextlib
import threading

import keras
import tensorflow as tf

from common.runtime import devices

# From this many input channels the input gradient runs as one forward convolution; below it,
# where that convolution would have a handful of output channels, as a depthwise convolution on
# CPUs with AVX-512 and as TensorFlow's own Conv2DBackpropInput on others.
MIN_CHANNELS_FOR_CONVOLUTION_GRADIENT = 8


def depthwise_gradient_wins(features=None):
    """The rule for layers with few input channels: the depthwise form where the CPU has AVX-512,
    where it beat Conv2DBackpropInput, TensorFlow's own kernel elsewhere, where it beat the
    depthwise form (figures in benchmarks/README.md). `python benchmarks/layers.py` measures
    both on any CPU."""
    return "avx512f" in (devices.cpu_features() if features is None else features)


def input_gradient_form(input_channels, features=None):
    """How the CPU-tuned Conv2D computes the input gradient of a stride-1 'same' convolution with
    `input_channels` input channels on a CPU with `features` (this one's by default):
    "convolution", "depthwise" or "tensorflow" (Conv2DBackpropInput)."""
    if input_channels >= MIN_CHANNELS_FOR_CONVOLUTION_GRADIENT:
        return "convolution"
    return "depthwise" if depthwise_gradient_wins(features) else "tensorflow"


def flipped_transposed(kernel):
    """The kernel flipped in space with input and output channels swapped: the kernel of the
    input gradient's forms."""
    return tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])


def _kernel_gradient(inputs, kernel, output_gradient):
    return tf.raw_ops.Conv2DBackpropFilter(
        input=inputs, filter_sizes=tf.shape(kernel), out_backprop=output_gradient,
        strides=[1, 1, 1, 1], padding="SAME")


def convolution_input_gradient(output_gradient, flipped):
    """The input gradient of a stride-1 'same' convolution with an odd kernel, as a forward
    convolution of the output gradient with the kernel `flipped` (`flipped_transposed`)."""
    return tf.nn.conv2d(output_gradient, flipped, 1, "SAME")


def depthwise_input_gradient(output_gradient, flipped):
    """The same input gradient as one depthwise convolution, each output channel's gradient with
    its slices of `flipped` ([height, width, out, in]), giving (output channel, input channel)
    pairs, then summed over the output channels."""
    pairs = tf.nn.depthwise_conv2d(output_gradient, flipped, [1, 1, 1, 1], "SAME")
    shape = tf.shape(pairs)
    pairs = tf.reshape(pairs, tf.concat([shape[:3], tf.shape(flipped)[2:]], 0))
    return tf.reduce_sum(pairs, axis=3)


def _same_convolution(inputs, kernel, *, input_gradient, flipped=None):
    """A stride-1 'same' convolution whose input gradient is `input_gradient(g, flipped)`, the
    flipped kernel made from `kernel` where the gradient is taken unless given."""

    @tf.custom_gradient
    def convolution(inputs, kernel):
        def gradient(output_gradient):
            flipped_kernel = flipped_transposed(kernel) if flipped is None else flipped
            return (input_gradient(output_gradient, flipped_kernel),
                    _kernel_gradient(inputs, kernel, output_gradient))

        return tf.nn.conv2d(inputs, kernel, 1, "SAME"), gradient

    return convolution(inputs, kernel)


# The forms of `input_gradient_form` other than TensorFlow's own, by name.
INPUT_GRADIENTS = {"convolution": convolution_input_gradient,
                   "depthwise": depthwise_input_gradient}

# Per thread (each replica of a strategy traces in its own), what `weights_read_once` read:
# {id(layer): (the kernel in the compute dtype, the form its input gradient takes or None)}.
_read_once = threading.local()


@contextlib.contextmanager
def weights_read_once(model):
    """While an attack's steps are traced: the CPU-tuned layers of `model` take their kernel,
    cast to their compute dtype, and the form of it their input gradient takes (a convolution's
    flipped kernel, a dense layer's transposed one) as computed here, once, rather than reading,
    casting and flipping them again in every step, which the weights, the same throughout an
    attack, do not need (the gains are in benchmarks/README.md). Other layers, and models that
    are not Keras models, read their weights as always."""
    previous = getattr(_read_once, "weights", {})
    _read_once.weights = {**previous, **{id(layer): layer.weights_for_steps()
                                         for layer in _tuned_layers(model)}}
    try:
        yield
    finally:
        _read_once.weights = previous


def _tuned_layers(model):
    """The built layers of this module in `model`, those of nested models included."""
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, (Conv2D, Dense)):
            if layer.built:
                yield layer
        else:
            yield from _tuned_layers(layer)


def _weights_read_once(layer):
    return getattr(_read_once, "weights", {}).get(id(layer))


class Conv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D whose input gradient runs as other, equal convolutions.

    For stride 1, 'same' padding and odd kernel sizes, the gradient with respect to the input is
    the convolution of the output gradient with the flipped, channel-swapped kernel. On CPU that
    convolution beat Conv2DBackpropInput from 8 input channels up. Below, it has only a few
    output channels and ran no faster; there, on CPUs with AVX-512, a depthwise convolution of
    the output gradient summed over its channels beat Conv2DBackpropInput, while on AVX2 it lost
    (`depthwise_gradient_wins`; the figures are in benchmarks/README.md). Other settings keep
    Keras' own path.
    """

    def convolution_op(self, inputs, kernel):
        kernel, flipped = _weights_read_once(self) or (kernel, None)
        form = self._input_gradient_form()
        if form not in INPUT_GRADIENTS:
            return super().convolution_op(inputs, kernel)
        return _same_convolution(inputs, tf.convert_to_tensor(kernel),
                                 input_gradient=INPUT_GRADIENTS[form], flipped=flipped)

    def weights_for_steps(self):
        """(the kernel in the compute dtype, its flipped kernel where this layer's input
        gradient takes one, else None), for `weights_read_once`."""
        kernel = tf.cast(tf.convert_to_tensor(self.kernel), self.compute_dtype)
        flipped = flipped_transposed(kernel) if self._input_gradient_form() in INPUT_GRADIENTS \
            else None
        return kernel, flipped

    def _input_gradient_form(self):
        if not self._same_odd_unit_stride():
            return None
        return input_gradient_form(self.kernel.shape[2])

    def _same_odd_unit_stride(self):
        return (tuple(self.strides) == (1, 1) and self.padding == "same"
                and tuple(self.dilation_rate) == (1, 1) and self.groups == 1
                and self.data_format == "channels_last"
                and all(size % 2 == 1 for size in self.kernel_size))


def dense_input_gradient(output_gradient, kernel):
    """The input gradient of `inputs @ kernel` as (kernel @ gradient^T)^T."""
    return tf.transpose(tf.matmul(kernel, output_gradient, transpose_b=True))


def _product(inputs, kernel, *, transposed=None):
    """`inputs @ kernel`, whose input gradient is gradient @ `transposed` (the kernel transposed
    beforehand) where given, else `dense_input_gradient`."""

    @tf.custom_gradient
    def product(inputs, kernel):
        def gradient(output_gradient):
            if transposed is None:
                input_gradient = dense_input_gradient(output_gradient, kernel)
            else:
                input_gradient = tf.matmul(output_gradient, transposed)
            return input_gradient, tf.matmul(inputs, output_gradient, transpose_a=True)

        return tf.matmul(inputs, kernel), gradient

    return product(inputs, kernel)


class Dense(keras.layers.Dense):
    """keras.layers.Dense whose input gradient is computed as (kernel @ gradient^T)^T, which
    TensorFlow's CPU kernels ran faster than its own gradient @ kernel^T; inside an attack's
    steps as gradient @ kernel^T against the kernel transposed once before them
    (`weights_read_once`), faster still in float32."""

    def call(self, inputs, training=None):
        kernel, transposed = _weights_read_once(self) or (tf.convert_to_tensor(self.kernel), None)
        outputs = _product(inputs, kernel, transposed=transposed)
        if self.bias is not None:
            outputs = outputs + self.bias
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def weights_for_steps(self):
        """(the kernel in the compute dtype, the kernel transposed), for `weights_read_once`."""
        kernel = tf.cast(tf.convert_to_tensor(self.kernel), self.compute_dtype)
        return kernel, tf.transpose(kernel)


def layer_classes(on_cpu):
    """(Conv2D, Dense) for a model: this module's on CPUs, Keras' own on GPUs."""
    if on_cpu:
        return Conv2D, Dense
    return keras.layers.Conv2D, keras.layers.Dense
