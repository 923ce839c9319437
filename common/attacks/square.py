"""The Square attack (Andriushchenko et al., ECCV 2020) in the L-infinity norm, with the parameters
AutoAttack runs it with (5000 queries, p_init 0.8, the margin loss, no rescaled schedule).

A score-based attack: it uses the model's logits only, never its gradients, so it finds what
gradient masking hides from APGD and FAB. It starts from vertical stripes of +-epsilon and at
each query tries one square window, the same for every example of the batch, set to +-2 epsilon
per channel and projected back into the ball, keeping it where the margin loss falls or the
example becomes misclassified. The queries run in one `tf.function` and stop when every example
of the batch is broken.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from common.attacks import losses
from common.attacks.threat_model import ThreatModel
from common.runtime import devices

# The fraction of the image a square covers, halved at these query counts (the reference's
# schedule, without rescaling to the number of queries).
HALVING_QUERIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@dataclasses.dataclass(frozen=True)
class SquareSettings:
    threat_model: ThreatModel
    num_queries: int = 5000
    p_init: float = 0.8


def square_fraction(query, p_init):
    """The fraction of the image that the square of `query` covers."""
    return p_init / 2 ** sum(query > halving for halving in HALVING_QUERIES)


def square_sizes(settings, height, width):
    """The side of each query's square, in pixels."""
    return [max(int(round(np.sqrt(square_fraction(query, settings.p_init) * height * width))), 1)
            for query in range(settings.num_queries)]


def square_queries(predict, x_nat, labels, settings, seed):
    """Square's queries on images `x_nat` (NHWC); `predict(images)` gives logits. Returns the
    best images found and their margins (negative: broken)."""
    low, high = settings.threat_model.pixel_range
    epsilon = settings.threat_model.epsilon
    height, width, channels = x_nat.shape[1:]
    sizes = tf.constant(square_sizes(settings, height, width), tf.int32)
    lower = tf.maximum(x_nat - epsilon, low)
    upper = tf.minimum(x_nat + epsilon, high)
    stripes = tf.sign(tf.random.stateless_uniform(
        (tf.shape(x_nat)[0], 1, width, channels), [seed, -1], -1.0, 1.0))
    x_best = tf.clip_by_value(x_nat + epsilon * stripes, low, high)
    margin_best = losses.logit_margin(predict(x_best), labels)
    rows, columns = tf.range(height)[:, None], tf.range(width)[None, :]
    query = tf.constant(0)
    while query < settings.num_queries and tf.reduce_any(margin_best > 0):
        side = sizes[query]
        corner = tf.random.stateless_uniform((2,), [seed, query], 0, 2**30, tf.int32)
        # As the reference, the last position of the window is never drawn.
        top = corner[0] % tf.maximum(height - side, 1)
        left = corner[1] % tf.maximum(width - side, 1)
        window = tf.logical_and(tf.logical_and(rows >= top, rows < top + side),
                                tf.logical_and(columns >= left, columns < left + side))
        signs = tf.sign(tf.random.stateless_uniform((channels,), [seed, query + 2**20],
                                                    -1.0, 1.0))
        delta = tf.cast(window, tf.float32)[:, :, None] * (2 * epsilon) * signs
        x_new = tf.clip_by_value(x_best + delta, lower, upper)
        new_margin = losses.logit_margin(predict(x_new), labels)
        accept = tf.logical_and(margin_best > 0, new_margin < margin_best)
        x_best = tf.where(accept[:, None, None, None], x_new, x_best)
        margin_best = tf.where(accept, new_margin, margin_best)
        query += 1
    return x_best, margin_best


class Square:
    """Square on a Keras model or callable: `attack(x, y)` returns the adversarial examples (the
    clean image where the attack failed, in the shape of `x`) and which examples stayed robust.

    The windows are squares of an image: `image_shape` (HWC) says how one input is one; by
    default an input of rank 3 is that image, and any other (a flat vector, say) is read as an
    image of one row and one channel."""

    def __init__(self, model, settings, seed=0, strategy=None, image_shape=None):
        if settings.threat_model.norm != "Linf":
            raise ValueError("the Square attack here runs in the L-infinity norm only")
        self.settings = settings

        def run(x, y):
            shape = image_shape or _as_image(x.shape[1:])
            images = tf.reshape(x, (-1, *shape))

            def predict(candidates):
                return tf.cast(devices.call_model(model, tf.reshape(candidates, tf.shape(x))),
                               tf.float32)

            x_adv, margins = square_queries(predict, images, y, settings, seed)
            return tf.reshape(x_adv, tf.shape(x)), margins

        self._spread = devices.Spread(strategy, run)

    def attack(self, x, y):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
        x_adv, margins = self._spread(x, y)
        robust = margins > 0
        return np.where(robust.reshape((-1,) + (1,) * (x.ndim - 1)), x, x_adv), robust


def _as_image(example_shape):
    if len(example_shape) == 3:
        return tuple(example_shape)
    return (1, int(np.prod(example_shape)), 1)
