"""The machine's fp32 matrix-multiply peak as TensorFlow reaches it, measured in this process."""

import time

import tensorflow as tf

SIZE = 2048


def matmul_peak_gflops(repeats=5, products=10):
    """Best GFLOP/s over `repeats` runs of `products` chained 2048x2048 float32 products.

    Each product takes the previous one's result, so none can be merged or skipped; the factor is
    scaled to keep the values finite.
    """
    a = tf.random.normal((SIZE, SIZE))
    b = tf.random.normal((SIZE, SIZE)) / SIZE**0.5

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
    return 2 * SIZE**3 * products / best / 1e9
