"""Measures the machine's fp32 matrix-multiply peak as TensorFlow reaches it: the best GFLOP/s
over --peak_repeats timed runs (after one untimed tracing run) of --peak_products chained
float32 products of --peak_size x --peak_size matrices. Each product takes the previous one's
result, so none can be merged or skipped.

The other benchmarks measure this peak in their own process, with the same flags, and report
their GFLOP/s as a fraction of it. Run from the repository root: `python benchmarks/peak.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import time

from absl import flags

from benchmarks import cli

SIZE = flags.DEFINE_integer("peak_size", 2048, "side of the square float32 matrices of the "
                            "peak measurement", lower_bound=1)
PRODUCTS = flags.DEFINE_integer("peak_products", 10, "chained matrix products in each timed "
                                "run of the peak measurement", lower_bound=1)
REPEATS = flags.DEFINE_integer("peak_repeats", 5, "timed runs of the peak measurement (the best "
                               "counts)", lower_bound=1)

# The vector extensions that matter to TensorFlow's CPU kernels, named where the CPU is described.
EXTENSIONS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
              "amx_tile")


def matmul_peak_gflops(repeats=5, products=10, size=2048):
    """Best GFLOP/s over `repeats` runs of `products` chained `size` x `size` float32 products;
    the factor is scaled to keep the values finite."""
    import tensorflow as tf

    a = tf.random.normal((size, size))
    b = tf.random.normal((size, size)) / size**0.5

    @tf.function
    def chain(a, b):
        for _ in range(products):
            a = tf.matmul(a, b)
        return a

    chain(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        chain(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * products / best / 1e9


def flagged_peak_gflops():
    """The peak measured with the sizes of the --peak_* flags."""
    return matmul_peak_gflops(REPEATS.value, PRODUCTS.value, SIZE.value)


def cpu_description():
    """The CPU's model name and its vector extensions that matter to TensorFlow's kernels (the
    flags the port's speed rules read, `devices.cpu_features`)."""
    from common.runtime import devices

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info
                          if line.startswith("model name")), model)
    except OSError:
        pass
    extensions = [name for name in EXTENSIONS if name in devices.cpu_features()]
    return f"{model}, {os.cpu_count()} logical CPUs, extensions: {' '.join(extensions)}"


def describe(gflops):
    """The line that reports a peak."""
    return (f"fp32 matmul peak ({SIZE.value}x{SIZE.value}, {PRODUCTS.value} products, best of "
            f"{REPEATS.value}): {gflops:.1f} GFLOP/s")


def main():
    print(describe(flagged_peak_gflops()))


if __name__ == "__main__":
    cli.run(main)
