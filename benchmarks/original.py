"""The original's way of running, as a baseline for the port's speed: the challenge networks as
TensorFlow 1 graphs of raw ops (`tf.compat.v1`), one `session.run` with a feed_dict per PGD step,
the iterate kept in float64 numpy with numpy's sign and clipping, and the training step as the
original's train.py runs it (the attack, then one `session.run` of Adam). Written here from the
facts of the original code (the porting notes), not copied from it.

Variables are created in the original's order and under its names, so that the port's weights can
be loaded into the graph (`load`) and the two compared on the same numbers.
"""

import numpy as np
import tensorflow as tf

v1 = tf.compat.v1
LEAKINESS = 0.1
BATCH_NORM_EPSILON = 1e-3
UNITS_PER_STAGE = 5


class Graph:
    """A TF1 graph of a challenge network with its session: placeholders `x` and `y`, `logits`,
    the summed cross-entropy `xent`, and the input gradient `gradient`."""

    def __init__(self, build, x_shape, threads=0):
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.x = v1.placeholder(tf.float32, (None, *x_shape))
            self.y = v1.placeholder(tf.int64, (None,))
            self.logits = build(self.x)
            self.xent = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=self.y, logits=self.logits))
            self.gradient = tf.gradients(self.xent, self.x)[0]
            self.variables = {variable.op.name: variable for variable in v1.global_variables()}
            self.train_op = v1.train.AdamOptimizer(1e-4).minimize(self.xent)
            initialize = v1.global_variables_initializer()
        config = v1.ConfigProto(intra_op_parallelism_threads=threads,
                                inter_op_parallelism_threads=threads)
        self.session = v1.Session(graph=self.graph, config=config)
        self.session.run(initialize)

    def load(self, values):
        """Assigns variables by TF1 name (the released checkpoints' names)."""
        with self.graph.as_default():
            for name, value in values.items():
                self.variables[name].load(np.asarray(value), self.session)

    def predict(self, x):
        return self.session.run(self.logits, {self.x: x})

    def perturb(self, x_nat, y, epsilon, steps, step_size, pixel_range, rng):
        """The original LinfPGDAttack.perturb: a uniform random start, then `steps` signed
        gradient steps, clipped to the epsilon ball and the pixel range, in float64 numpy."""
        low, high = pixel_range
        x = np.clip(x_nat + rng.uniform(-epsilon, epsilon, x_nat.shape), low, high)
        for _ in range(steps):
            gradient = self.session.run(self.gradient, {self.x: x, self.y: y})
            x = x + step_size * np.sign(gradient)
            x = np.clip(np.clip(x, x_nat - epsilon, x_nat + epsilon), low, high)
        return x

    def train_step(self, x_adv, y):
        self.session.run(self.train_op, {self.x: x_adv, self.y: y})


def _weight(shape, stddev=0.1):
    return v1.Variable(v1.truncated_normal(shape, stddev=stddev))


def _bias(shape):
    return v1.Variable(tf.constant(0.1, shape=shape))


def mnist_network(x):
    """The MNIST challenge network: two 5x5 convolutions with 2x2 max pools, a 1024-unit dense
    layer, 10 logits (variables Variable, Variable_1, ... in this order)."""
    image = tf.reshape(x, (-1, 28, 28, 1))
    conv1_w, conv1_b = _weight((5, 5, 1, 32)), _bias((32,))
    h = tf.nn.relu(tf.nn.conv2d(image, conv1_w, [1, 1, 1, 1], "SAME") + conv1_b)
    h = tf.nn.max_pool2d(h, 2, 2, "SAME")
    conv2_w, conv2_b = _weight((5, 5, 32, 64)), _bias((64,))
    h = tf.nn.relu(tf.nn.conv2d(h, conv2_w, [1, 1, 1, 1], "SAME") + conv2_b)
    h = tf.nn.max_pool2d(h, 2, 2, "SAME")
    fc1_w, fc1_b = _weight((7 * 7 * 64, 1024)), _bias((1024,))
    h = tf.nn.relu(tf.matmul(tf.reshape(h, (-1, 7 * 7 * 64)), fc1_w) + fc1_b)
    fc2_w, fc2_b = _weight((1024, 10)), _bias((10,))
    return tf.matmul(h, fc2_w) + fc2_b


def _leaky_relu(x):
    return tf.where(tf.less(x, 0.0), LEAKINESS * x, x)


def _batch_norm(x, scope):
    """Batch norm in eval mode (moving averages), as the attack scripts run it."""
    channels = x.shape[-1]
    with v1.variable_scope(scope):
        beta = v1.get_variable("beta", (channels,), initializer=v1.zeros_initializer())
        gamma = v1.get_variable("gamma", (channels,), initializer=v1.ones_initializer())
        mean = v1.get_variable("moving_mean", (channels,), initializer=v1.zeros_initializer(),
                               trainable=False)
        variance = v1.get_variable("moving_variance", (channels,),
                                   initializer=v1.ones_initializer(), trainable=False)
    y, _, _ = v1.nn.fused_batch_norm(x, gamma, beta, mean, variance, BATCH_NORM_EPSILON,
                                     is_training=False)
    return y


def _conv(x, out_filters, stride, scope):
    in_filters = x.shape[-1]
    with v1.variable_scope(scope):
        kernel = v1.get_variable(
            "DW", (3, 3, in_filters, out_filters),
            initializer=v1.random_normal_initializer(stddev=np.sqrt(2.0 / (9 * out_filters))))
    return tf.nn.conv2d(x, kernel, [1, stride, stride, 1], "SAME")


def _residual(x, out_filters, stride, activate_before_residual, scope):
    in_filters = x.shape[-1]
    if activate_before_residual:
        x = _leaky_relu(_batch_norm(x, f"{scope}/shared_activation/BatchNorm"))
        shortcut = x
    else:
        shortcut = x
        x = _leaky_relu(_batch_norm(x, f"{scope}/residual_only_activation/BatchNorm"))
    x = _conv(x, out_filters, stride, f"{scope}/sub1/conv1")
    x = _leaky_relu(_batch_norm(x, f"{scope}/sub2/BatchNorm"))
    x = _conv(x, out_filters, 1, f"{scope}/sub2/conv2")
    if in_filters != out_filters:
        shortcut = tf.nn.avg_pool2d(shortcut, stride, stride, "VALID")
        pad = (out_filters - in_filters) // 2
        shortcut = tf.pad(shortcut, [[0, 0], [0, 0], [0, 0], [pad, pad]])
    return x + shortcut


def cifar10_network(filters):
    """The CIFAR-10 challenge's residual network with `filters` in eval mode, standardizing each
    image with a map_fn as the original does."""

    def build(x):
        h = tf.map_fn(tf.image.per_image_standardization, x)
        h = _conv(h, filters[0], 1, "input/init_conv")
        for stage, (stride, out_filters) in enumerate(zip((1, 2, 2), filters[1:]), start=1):
            for unit in range(UNITS_PER_STAGE):
                h = _residual(h, out_filters, stride if unit == 0 else 1,
                              stage == 1 and unit == 0, f"unit_{stage}_{unit}")
        h = _leaky_relu(_batch_norm(h, "unit_last/BatchNorm"))
        h = tf.reduce_mean(h, [1, 2])
        with v1.variable_scope("logit"):
            kernel = v1.get_variable("DW", (h.shape[-1], 10),
                                     initializer=v1.uniform_unit_scaling_initializer(1.0))
            bias = v1.get_variable("biases", (10,), initializer=v1.zeros_initializer())
        return tf.matmul(h, kernel) + bias

    return build
