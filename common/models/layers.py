"""Conv2D and Dense layers for models that run on CPUs: the values of Keras' own layers, with
two input gradients computed by other, equal products that TensorFlow's CPU kernels run faster.

On GPUs, cuDNN's and cuBLAS's own kernels are the ones to trust, so `layer_classes(on_cpu)` gives
these layers only where the model runs on CPUs, and Keras' own elsewhere. Both have the same
weights under the same names, so a checkpoint fits either. The timings behind the choices are in
benchmarks/README.md.
"""

import keras
import tensorflow as tf

# Below this many input channels, Conv2DBackpropInput beat the forward-convolution form on CPU.
_MIN_CHANNELS_FOR_CONVOLUTION_GRADIENT = 8


def _flipped_transposed(kernel):
    """The kernel flipped in space with input and output channels swapped."""
    return tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])


@tf.custom_gradient
def _same_convolution(inputs, kernel):
    def gradient(output_gradient):
        input_gradient = tf.nn.conv2d(output_gradient, _flipped_transposed(kernel), 1, "SAME")
        kernel_gradient = tf.raw_ops.Conv2DBackpropFilter(
            input=inputs, filter_sizes=tf.shape(kernel), out_backprop=output_gradient,
            strides=[1, 1, 1, 1], padding="SAME")
        return input_gradient, kernel_gradient

    return tf.nn.conv2d(inputs, kernel, 1, "SAME"), gradient


class Conv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D whose input gradient runs as a forward convolution.

    For stride 1, 'same' padding and odd kernel sizes, the gradient with respect to the input is
    the convolution of the output gradient with the flipped, channel-swapped kernel. On CPU that
    convolution beat Conv2DBackpropInput from 8 input channels up and lost below, so layers with
    fewer input channels, and other settings, keep Keras' own path.
    """

    def convolution_op(self, inputs, kernel):
        if not self._gradient_as_convolution(kernel):
            return super().convolution_op(inputs, kernel)
        return _same_convolution(inputs, tf.convert_to_tensor(kernel))

    def _gradient_as_convolution(self, kernel):
        return (tuple(self.strides) == (1, 1) and self.padding == "same"
                and tuple(self.dilation_rate) == (1, 1) and self.groups == 1
                and self.data_format == "channels_last"
                and all(size % 2 == 1 for size in self.kernel_size)
                and kernel.shape[2] >= _MIN_CHANNELS_FOR_CONVOLUTION_GRADIENT)


@tf.custom_gradient
def _matmul(inputs, kernel):
    def gradient(output_gradient):
        input_gradient = tf.transpose(tf.matmul(kernel, output_gradient, transpose_b=True))
        kernel_gradient = tf.matmul(inputs, output_gradient, transpose_a=True)
        return input_gradient, kernel_gradient

    return tf.matmul(inputs, kernel), gradient


class Dense(keras.layers.Dense):
    """keras.layers.Dense whose input gradient is computed as (kernel @ gradient^T)^T, which
    TensorFlow's CPU kernels ran faster than its own gradient @ kernel^T."""

    def call(self, inputs, training=None):
        outputs = _matmul(inputs, tf.convert_to_tensor(self.kernel))
        if self.bias is not None:
            outputs = outputs + self.bias
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


def layer_classes(on_cpu):
    """(Conv2D, Dense) for a model: this module's on CPUs, Keras' own on GPUs."""
    if on_cpu:
        return Conv2D, Dense
    return keras.layers.Conv2D, keras.layers.Dense
