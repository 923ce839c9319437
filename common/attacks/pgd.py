"""L-infinity projected gradient descent (PGD), the attack of Madry et al., for any Keras model.

All steps run inside one `tf.function`. As in the original's numpy loop, the iterate is kept in
float64 and the model sees it cast to float32: a float32 iterate drifts from the original on a
few percent of pixels over 40 steps.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import tqdm

from common.io.files import written_in_place
from common.runtime import devices, precision, seeds
from common.runtime.batching import batch_bounds

LOSS_FUNCTIONS = ("xent", "cw", "margin", "targeted")
CW_CONFIDENCE = 50.0


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    """What defines a PGD attack: the same for the attack scripts and for training."""

    epsilon: float
    num_steps: int
    step_size: float
    random_start: bool
    loss_func: str = "xent"
    pixel_range: tuple = (0.0, 1.0)

    def __post_init__(self):
        if self.loss_func not in LOSS_FUNCTIONS:
            raise ValueError(f"unknown loss_func {self.loss_func!r}: use one of {LOSS_FUNCTIONS}")
        for name, kind in (("epsilon", float), ("num_steps", int), ("step_size", float),
                           ("random_start", bool)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "pixel_range", tuple(float(bound) for bound in self.pixel_range))


def per_example_loss(logits, labels, loss_func):
    """The attack's objective per example, which it maximises: `xent`, the cross-entropy; `cw`,
    the original's CW margin loss (confidence 50, the paper's CW+); `margin`, the same with
    confidence 0 (the paper's CW); `targeted`, minus the cross-entropy of `labels`, there the
    target classes (`pgd_steps` gives them)."""
    xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if loss_func == "xent":
        return xent
    if loss_func == "targeted":
        return -xent
    confidence = CW_CONFIDENCE if loss_func == "cw" else 0.0
    label_mask = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    correct_logit = tf.reduce_sum(label_mask * logits, axis=1)
    wrong_logit = tf.reduce_max((1 - label_mask) * logits - 1e4 * label_mask, axis=1)
    return -tf.nn.relu(correct_logit - wrong_logit + confidence)


def most_likely_wrong_class(logits, labels):
    """Per example, the class of the highest logit other than the label's: the target of the
    `targeted` loss, taken on the natural image."""
    label_mask = tf.one_hot(labels, tf.shape(logits)[-1]) > 0
    wrong_logits = tf.where(label_mask, tf.constant(-float("inf"), logits.dtype), logits)
    return tf.argmax(wrong_logits, axis=1)


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


def start_point(x_nat, settings, rng):
    """Where PGD starts, in float64: `x_nat` itself, or with a random start the original's
    `x_nat + U(-epsilon, epsilon)` noise (float64, drawn from `rng`) clipped to the pixel range."""
    x_nat = np.asarray(x_nat, dtype=np.float32).astype(np.float64)
    if not settings.random_start:
        return x_nat
    noise = rng.uniform(-settings.epsilon, settings.epsilon, x_nat.shape)
    return np.clip(x_nat + noise, *settings.pixel_range)


def pgd_steps(model, x_nat, labels, x_start, settings, training=False, scale=None):
    """`settings.num_steps` signed-gradient steps from `x_start` (float64), kept within epsilon
    of `x_nat` and within the pixel range.

    The arithmetic is the original numpy loop's: the iterate is float64, while the step
    `step_size * sign(grad)` and the bounds `x_nat +- epsilon` are float32, as numpy computes a
    float32 array with a Python float. Clipping to the epsilon ball and then to the pixel range
    equals one clip to the intersection of the two, computed once here.

    With `training`, batch norm updates its averages and, over several replicas, synchronizes
    its statistics, which TensorFlow cannot do inside a graph loop: the steps are then unrolled.
    `scale` (a float32 scalar, training's epsilon ramp) multiplies epsilon and the step size.
    The `targeted` loss aims at the most likely wrong class of the natural image.
    """
    low, high = settings.pixel_range
    epsilon, step_size = settings.epsilon, settings.step_size
    if scale is not None:
        epsilon, step_size = epsilon * scale, step_size * scale
    x_nat = tf.cast(x_nat, tf.float32)
    lower = tf.maximum(tf.cast(x_nat - epsilon, tf.float64), low)
    upper = tf.minimum(tf.cast(x_nat + epsilon, tf.float64), high)
    if settings.loss_func == "targeted":
        logits = tf.cast(model(x_nat, training=False), tf.float32)
        labels = most_likely_wrong_class(logits, labels)
    x = x_start
    for _ in range(settings.num_steps) if training else tf.range(settings.num_steps):
        grad = input_gradient(model, tf.cast(x, tf.float32), labels, settings.loss_func, training)
        step = tf.cast(step_size * tf.sign(grad), tf.float64)
        x = tf.clip_by_value(x + step, lower, upper)
    return x


def loss_trace(model, x_nat, labels, x_start, settings):
    """The cross-entropy of each example at `x_start` and after each of the PGD steps of
    `settings` (shape: steps + 1, batch), for the paper's Figure 1."""
    def xent(x):
        logits = tf.cast(model(tf.cast(x, tf.float32), training=False), tf.float32)
        return per_example_loss(logits, labels, "xent")

    one_step = dataclasses.replace(settings, num_steps=1)
    losses = tf.TensorArray(tf.float32, size=settings.num_steps + 1)
    x = x_start
    for step in tf.range(settings.num_steps):
        losses = losses.write(step, xent(x))
        x = pgd_steps(model, x_nat, labels, x, one_step)
    return losses.write(settings.num_steps, xent(x)).stack()


class LinfPGDAttack:
    """PGD with the original's constructor and `perturb(x_nat, y)`; no session is needed.

    `k` steps of size `a` within `epsilon` of `x_nat`, from a random start when `random_start`.
    Beyond the original: `pixel_range` (MNIST [0, 1], CIFAR-10 [0, 255]); `restarts`, keeping per
    example the restart that is misclassified, or else has the highest loss; `seed` for the random
    starts, so a run is reproducible; `jit_compile` to compile the steps with XLA; `strategy` to
    spread each batch over its replicas (a local MirroredStrategy: every GPU); and
    `perturb(..., start=...)` to begin from a given point. `LinfPGDAttack.from_settings` builds
    one from an `AttackSettings`.
    """

    def __init__(self, model, epsilon, k, a, random_start, loss_func, pixel_range=(0.0, 1.0),
                 restarts=1, seed=None, jit_compile=False, strategy=None):
        settings = AttackSettings(epsilon, k, a, random_start, loss_func, pixel_range)
        if restarts < 1:
            raise ValueError(f"restarts must be at least 1, got {restarts}")
        self.model = model
        self.settings = settings
        self.restarts = int(restarts)
        self.rng = np.random.default_rng() if seed is None else \
            seeds.generator(seed, seeds.ATTACK_STARTS)
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

    @classmethod
    def from_settings(cls, model, settings, **options):
        """The attack of `settings` (an AttackSettings); `options` as the constructor's."""
        return cls(model, settings.epsilon, settings.num_steps, settings.step_size,
                   settings.random_start, settings.loss_func, settings.pixel_range, **options)

    # The original's attribute names.
    epsilon = property(lambda self: self.settings.epsilon)
    k = property(lambda self: self.settings.num_steps)
    a = property(lambda self: self.settings.step_size)
    rand = property(lambda self: self.settings.random_start)
    loss_func = property(lambda self: self.settings.loss_func)

    def _attack_batch(self, x_nat, labels, x_start):
        return pgd_steps(self.model, x_nat, labels, x_start, self.settings)

    def _score_batch(self, x, labels):
        """Per example, the loss restarts compare (for a targeted attack, the cross-entropy of
        the label) and whether it is misclassified."""
        logits = self.model(x, training=False)
        misclassified = tf.not_equal(tf.argmax(logits, axis=1), labels)
        loss_func = "xent" if self.settings.loss_func == "targeted" else self.settings.loss_func
        return per_example_loss(logits, labels, loss_func), misclassified

    def start_point(self, x_nat):
        """A fresh start for `x_nat`, drawn from this attack's seeded generator."""
        return start_point(x_nat, self.settings, self.rng)

    def skip(self, x_nat):
        """Draws the random starts that `perturb(x_nat, y)` draws, without attacking, so that a
        resumed run attacks its next batches from the starts an uninterrupted run would."""
        for _ in range(self.restarts):
            self.start_point(x_nat)

    def perturb(self, x_nat, y, *session, start=None):
        """Adversarial examples for `(x_nat, y)` within epsilon of `x_nat` (float64 numpy array).

        With `start`, the first restart begins there instead of at a drawn start point.
        """
        if session:
            raise TypeError("perturb(x_nat, y) takes no session: TensorFlow 2 runs the attack "
                            "itself; pass a start point as perturb(x_nat, y, start=...)")
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
    """Saves the attack as `path`, written whole or not at all, with the original's lines."""
    print("Storing examples")
    with written_in_place(path) as target:
        np.save(target, x_adv)
    print(f"Examples stored in {path}")
