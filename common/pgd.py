"""L-infinity projected gradient descent (PGD), the attack of Madry et al., for any Keras model.

All `k` steps run inside one `tf.function`. As in the original's numpy loop, the iterate is kept
in float64 and the model sees it cast to float32: a float32 iterate drifts from the original on a
few percent of pixels over 40 steps.
"""

import numpy as np
import tensorflow as tf
import tqdm

from common import devices, precision
from common.batching import batch_bounds

LOSS_FUNCTIONS = ("xent", "cw")
CW_CONFIDENCE = 50.0


def per_example_loss(logits, labels, loss_func):
    """The attack's objective per example: cross-entropy, or the CW margin loss of the original."""
    if loss_func == "xent":
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    label_mask = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    correct_logit = tf.reduce_sum(label_mask * logits, axis=1)
    wrong_logit = tf.reduce_max((1 - label_mask) * logits - 1e4 * label_mask, axis=1)
    return -tf.nn.relu(correct_logit - wrong_logit + CW_CONFIDENCE)


def input_gradient(model, x, labels, loss_func, training=False):
    """Gradient of the loss summed over the batch with respect to the float32 input `x`.

    Under a float16 policy the loss is scaled first, which keeps the sign of small gradients;
    a gradient that overflows to NaN there is taken as 0 (no step on that pixel).
    """
    scale = precision.FLOAT16_ATTACK_LOSS_SCALE if precision.computes_in_float16() else 1.0
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(model(x, training=training), tf.float32)
        loss = tf.reduce_sum(per_example_loss(logits, labels, loss_func)) * scale
    gradient = tape.gradient(loss, x)
    if scale == 1.0:
        return gradient
    return tf.where(tf.math.is_nan(gradient), tf.zeros_like(gradient), gradient)


def random_start(x_nat, noise, pixel_range):
    """The original's random start: `x_nat + U(-eps, eps)` noise, clipped to the pixel range."""
    return tf.clip_by_value(tf.cast(x_nat, tf.float64) + noise, *pixel_range)


def pgd_steps(model, x_nat, labels, x_start, epsilon, num_steps, step_size, pixel_range,
              loss_func, training=False):
    """`num_steps` signed-gradient steps from `x_start` (float64), kept within `epsilon` of `x_nat`.

    The arithmetic is the original numpy loop's: the iterate is float64, while the step
    `a * sign(grad)` and the bounds `x_nat +- epsilon` are float32, as numpy computes a float32
    array with a Python float. Clipping to the epsilon ball and then to the pixel range equals
    one clip to the intersection of the two, computed once here.

    With `training`, batch norm updates its averages and, over several replicas, synchronizes
    its statistics, which TensorFlow cannot do inside a graph loop: the steps are then unrolled.
    """
    x_nat = tf.cast(x_nat, tf.float32)
    lower = tf.maximum(tf.cast(x_nat - epsilon, tf.float64), pixel_range[0])
    upper = tf.minimum(tf.cast(x_nat + epsilon, tf.float64), pixel_range[1])
    x = x_start
    for _ in range(num_steps) if training else tf.range(num_steps):
        grad = input_gradient(model, tf.cast(x, tf.float32), labels, loss_func, training)
        x = tf.clip_by_value(x + tf.cast(step_size * tf.sign(grad), tf.float64), lower, upper)
    return x


class LinfPGDAttack:
    """PGD with the original's constructor and `perturb(x_nat, y)`; no session is needed.

    `k` steps of size `a` within `epsilon` of `x_nat`, from a random start when `random_start`.
    Beyond the original: `pixel_range` (MNIST [0, 1], CIFAR-10 [0, 255]); `restarts`, keeping per
    example the restart that is misclassified, or else has the highest loss; `seed` for the random
    starts, so a run is reproducible; `jit_compile` to compile the k steps with XLA; `strategy`
    to spread each batch over its replicas (a local MirroredStrategy: every GPU); and
    `perturb(..., start=...)` to begin from a given point.
    """

    def __init__(self, model, epsilon, k, a, random_start, loss_func, pixel_range=(0.0, 1.0),
                 restarts=1, seed=None, jit_compile=False, strategy=None):
        if loss_func not in LOSS_FUNCTIONS:
            raise ValueError(f"unknown loss_func {loss_func!r}: use one of {LOSS_FUNCTIONS}")
        if restarts < 1:
            raise ValueError(f"restarts must be at least 1, got {restarts}")
        self.model = model
        self.epsilon = float(epsilon)
        self.k = int(k)
        self.a = float(a)
        self.rand = bool(random_start)
        self.loss_func = loss_func
        self.pixel_range = tuple(float(bound) for bound in pixel_range)
        self.restarts = int(restarts)
        self.rng = np.random.default_rng(seed)
        image_shape = tuple(model.input_shape[1:])
        self._attack = tf.function(self._attack_batch, input_signature=(
            tf.TensorSpec((None,) + image_shape, tf.float32),
            tf.TensorSpec((None,), tf.int64),
            tf.TensorSpec((None,) + image_shape, tf.float64)), jit_compile=jit_compile)
        self._score = tf.function(self._score_batch, input_signature=(
            tf.TensorSpec((None,) + image_shape, tf.float32),
            tf.TensorSpec((None,), tf.int64)))
        self.strategy = strategy or tf.distribute.get_strategy()
        self._spread_attack = devices.Spread(self.strategy, self._attack)
        self._spread_score = devices.Spread(self.strategy, self._score)

    def _attack_batch(self, x_nat, labels, x_start):
        return pgd_steps(self.model, x_nat, labels, x_start, self.epsilon, self.k, self.a,
                         self.pixel_range, self.loss_func)

    def _score_batch(self, x, labels):
        logits = self.model(x, training=False)
        misclassified = tf.not_equal(tf.argmax(logits, axis=1), labels)
        return per_example_loss(logits, labels, self.loss_func), misclassified

    def start_point(self, x_nat):
        """A fresh start: `x_nat` itself, or a random point of the epsilon ball in float64."""
        x_nat = np.asarray(x_nat, dtype=np.float32)
        if not self.rand:
            return x_nat.astype(np.float64)
        noise = self.rng.uniform(-self.epsilon, self.epsilon, x_nat.shape)
        return np.clip(x_nat + noise, *self.pixel_range)

    def perturb(self, x_nat, y, start=None):
        """Adversarial examples for `(x_nat, y)` within epsilon of `x_nat` (float64 numpy array).

        With `start`, the first restart begins there instead of at a drawn start point.
        """
        x_nat = np.asarray(x_nat, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        start = self.start_point(x_nat) if start is None else np.asarray(start, np.float64)
        best = self._spread_attack(x_nat, y, start)
        if self.restarts == 1:
            return best
        best_loss, best_wrong = self._spread_score(best.astype(np.float32), y)
        for _ in range(self.restarts - 1):
            x_adv = self._spread_attack(x_nat, y, self.start_point(x_nat))
            loss, wrong = self._spread_score(x_adv.astype(np.float32), y)
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best[better] = x_adv[better]
            best_loss = np.where(better, loss, best_loss)
            best_wrong |= wrong
        return best


def attack_test_set(attack, images, labels, num_examples, batch_size):
    """Attacks the first `num_examples` images batch by batch, printing as the original script."""
    bounds = batch_bounds(num_examples, batch_size)
    print(f"Iterating over {len(bounds)} batches")
    x_adv = []
    for first, end in tqdm.tqdm(bounds, unit="batch"):
        tqdm.tqdm.write(f"batch size: {end - first}")
        x_adv.append(attack.perturb(images[first:end], labels[first:end]))
    return np.concatenate(x_adv).astype(np.float32)


def store_attack(x_adv, path):
    print("Storing examples")
    np.save(path, x_adv)
    print(f"Examples stored in {path}")
