"""Keras layers that compute the same values as Keras' own, faster in the attack's hot loop.

The attack spends its time on input gradients, and TensorFlow's CPU kernels for two of them are
slow for the shapes of these networks. Each layer below computes the same gradient by another
product; the timings quoted were measured on the 2-core CPU development machine.
"""

import keras
import tensorflow as tf

# Below this many input channels, Conv2DBackpropInput beat the forward-convolution form.
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
    the convolution of the output gradient with the flipped, channel-swapped kernel. With 8 or more
    input channels, TensorFlow's Conv2DBackpropInput ran 1.5x to 5x slower than that convolution
    (MNIST conv2, batch 200: 96 ms against 36 ms); with fewer it was faster (MNIST conv1: 15 ms
    against 24 ms), so those layers, and other settings, keep Keras' own path.
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
    """keras.layers.Dense whose input gradient is computed as (kernel @ gradient^T)^T.

    TensorFlow computes gradient @ kernel^T, which on CPU ran 3x slower for MNIST fc1 (batch 200:
    32 ms against 10 ms for the same product with the transposes moved outside).
    """

    def call(self, inputs, training=None):
        outputs = _matmul(inputs, tf.convert_to_tensor(self.kernel))
        if self.bias is not None:
            outputs = outputs + self.bias
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs
