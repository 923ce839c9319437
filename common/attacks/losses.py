"""The losses attacks maximise, one registry for every attack, each per example from float32
logits: cross-entropy, the CW margin losses, and the Difference of Logits Ratio of AutoAttack.

Names: `xent` (cross-entropy); `cw` (the original's CW margin loss, confidence 50: the paper's
CW+); `margin` (the same with confidence 0: the paper's CW); `targeted` (minus the cross-entropy
of the target class); `dlr` and `dlr-targeted` (Croce & Hein 2020).

The DLR losses divide by a gap between ranked logits that needs at least 3 classes (untargeted)
or 4 (targeted). With fewer, where the reference implementation fails, the gap uses the lowest
rank there is (the targeted loss on 3 classes divides by z_1 - z_3), and with 2 classes the
divisor is 1: the loss is then the plain margin between the two logits.
"""

import tensorflow as tf

LOSSES = ("xent", "cw", "margin", "targeted", "dlr", "dlr-targeted")
CW_CONFIDENCE = 50.0
DENOMINATOR_FLOOR = 1e-12


def _take(logits, classes):
    return tf.gather(logits, classes, axis=1, batch_dims=1)


def xent(logits, labels):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def logit_margin(logits, labels):
    """The label's logit minus the highest other one: negative once misclassified (the
    original's masking: other logits below -1e4 are not seen)."""
    label_mask = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    correct_logit = tf.reduce_sum(label_mask * logits, axis=1)
    wrong_logit = tf.reduce_max((1 - label_mask) * logits - 1e4 * label_mask, axis=1)
    return correct_logit - wrong_logit


def wrong_classes(logits, labels, count):
    """Per example, the `count` classes other than the label with the highest logits, most
    likely first: PGD's target (count 1) and AutoAttack's target classes."""
    others = tf.where(tf.one_hot(labels, tf.shape(logits)[-1]) > 0,
                      tf.constant(-float("inf"), logits.dtype), logits)
    return tf.cast(tf.math.top_k(others, k=count).indices, tf.int64)


def _ranked(logits, ranks):
    """The top `ranks` logits, in decreasing order, or as many as there are classes."""
    return tf.math.top_k(logits, k=min(ranks, logits.shape[-1])).values


def dlr(logits, labels):
    """-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), pi the logits in decreasing order: the same
    under any shift and positive scaling of the logits."""
    ranked = _ranked(logits, 3)
    divisor = 1.0 if ranked.shape[-1] < 3 else ranked[:, 0] - ranked[:, 2] + DENOMINATOR_FLOOR
    return -logit_margin(logits, labels) / divisor


def dlr_targeted(logits, labels, targets):
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    ranked = _ranked(logits, 4)
    classes = ranked.shape[-1]
    if classes < 3:
        divisor = 1.0
    else:
        lower = ranked[:, 2] if classes == 3 else 0.5 * (ranked[:, 2] + ranked[:, 3])
        divisor = ranked[:, 0] - lower + DENOMINATOR_FLOOR
    return -(_take(logits, labels) - _take(logits, targets)) / divisor


def per_example_loss(logits, labels, loss, targets=None):
    """The loss named `loss` per example; `targets` for the targeted ones."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    if loss == "xent":
        return xent(logits, labels)
    if loss == "targeted":
        return -xent(logits, targets)
    if loss == "dlr":
        return dlr(logits, labels)
    if loss == "dlr-targeted":
        return dlr_targeted(logits, labels, targets)
    confidence = CW_CONFIDENCE if loss == "cw" else 0.0
    return -tf.nn.relu(logit_margin(logits, labels) + confidence)
