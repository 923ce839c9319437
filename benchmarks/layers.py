"""The evidence behind the CPU-tuned layers (common/models/layers.py), re-measured on this CPU:
each input gradient of the MNIST network's layers computed TensorFlow's way and by the port's
equal products, the forms taking turns round after round in one process.

- conv1 (one input channel): Conv2DBackpropInput, the forward-convolution form and the
  depthwise form (used below 8 input channels where `layers.depthwise_gradient_wins()`);
- conv2 (32 input channels): Conv2DBackpropInput and the forward-convolution form (used from 8
  input channels on every CPU);
- fc1: gradient @ kernel^T, (kernel @ gradient^T)^T (used on every CPU outside attacks) and
  gradient @ the kernel transposed beforehand (used in attacks' steps).

The convolution forms' flipped kernel and fc1's transposed kernel are made once, before the
rounds, as an attack makes them once before its steps (`layers.weights_read_once`).

Prints, per layer and form, the best milliseconds of --rounds, GFLOP/s and the fraction of the
fp32 matrix-multiply peak, then the fastest form and the form the port uses on this CPU. Run from
the repository root: `python benchmarks/layers.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from benchmarks import cli, peak

BATCH = flags.DEFINE_integer("batch", 200, "examples in each gradient (the attack's batch)",
                             lower_bound=1)
ROUNDS = flags.DEFINE_integer("rounds", 20, "rounds in which every form runs once (the best "
                              "counts)", lower_bound=1)
flags.adopt_module_key_flags(peak)

# (name, input shape without the batch, output channels or units, kernel side or None for dense)
LAYERS = (("conv1", (28, 28, 1), 32, 5), ("conv2", (14, 14, 32), 64, 5),
          ("fc1", (7 * 7 * 64,), 1024, None))


def gradient_forms(batch, input_shape, kernel):
    """{form name: function of the output gradient giving the input gradient} of one layer."""
    import tensorflow as tf

    from common.models import layers

    if len(input_shape) == 1:
        transposed = tf.transpose(kernel)  # as an attack's steps take it, made before them
        return {"tensorflow": lambda g: tf.matmul(g, kernel, transpose_b=True),
                "transposed product": lambda g: layers.dense_input_gradient(g, kernel),
                "pretransposed product": lambda g: tf.matmul(g, transposed)}
    sizes = tf.constant((batch, *input_shape))
    forms = {"tensorflow": lambda g: tf.raw_ops.Conv2DBackpropInput(
        input_sizes=sizes, filter=kernel, out_backprop=g, strides=[1, 1, 1, 1], padding="SAME")}
    flipped = layers.flipped_transposed(kernel)  # as an attack's steps take it, made before them
    few_channels = input_shape[-1] < layers.MIN_CHANNELS_FOR_CONVOLUTION_GRADIENT
    for form, gradient in layers.INPUT_GRADIENTS.items():
        if form != "depthwise" or few_channels:  # the depthwise form only where it may be used
            forms[form] = lambda g, gradient=gradient: gradient(g, flipped)
    return forms


def form_in_use(input_shape):
    """The form the port's CPU-tuned layer takes for this layer on this CPU in an attack's
    steps."""
    from common.models import layers

    if len(input_shape) == 1:
        return "pretransposed product"
    return layers.input_gradient_form(input_shape[-1])


def measure(input_shape, outputs, side, batch, rounds):
    """({form: best seconds}, flops) of one layer's input gradient, the forms taking turns, on
    the CPU even where a GPU is present."""
    import numpy as np
    import tensorflow as tf

    from benchmarks.timing import alternating_best_seconds

    rng = np.random.default_rng(0)
    kernel_shape = (input_shape[0], outputs) if side is None else \
        (side, side, input_shape[-1], outputs)
    flops = 2 * batch * int(np.prod(kernel_shape)) * int(np.prod(input_shape[:-1]))
    with tf.device("/CPU:0"):
        kernel = tf.constant(rng.normal(size=kernel_shape).astype(np.float32))
        gradient = tf.constant(
            rng.normal(size=(batch, *input_shape[:-1], outputs)).astype(np.float32))
        forms = {form: tf.function(function)
                 for form, function in gradient_forms(batch, input_shape, kernel).items()}
        runs = {form: (lambda function=function: function(gradient).numpy())
                for form, function in forms.items()}
        return alternating_best_seconds(runs, rounds), flops


def main():
    print(f"CPU: {peak.cpu_description()}")
    peak_before = peak.flagged_peak_gflops()
    results = [(layer, *measure(*layer[1:], BATCH.value, ROUNDS.value)) for layer in LAYERS]
    peak_gflops = max(peak_before, peak.flagged_peak_gflops())
    print(peak.describe(peak_gflops))
    for (name, input_shape, _, _), seconds, flops in results:
        for form, best in seconds.items():
            gflops = flops / best / 1e9
            print(f"{name:6s} {form:20s} {best * 1e3:8.2f} ms {gflops:7.1f} GFLOP/s "
                  f"{gflops / peak_gflops:6.1%} of peak")
        print(f"{name:6s} fastest: {min(seconds, key=seconds.get)}; the port uses: "
              f"{form_in_use(input_shape)}")


if __name__ == "__main__":
    cli.run(main)
