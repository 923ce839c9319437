"""The losses attacks maximise, one registry for every attack, each per example from float32
logits: cross-entropy, the CW margin losses, and the Difference of Logits Ratio of AutoAttack.

Names: `xent` (cross-entropy); `cw` (the original's CW margin loss, confidence 50: the paper's
CW+); `margin` (the same with confidence 0: the paper's CW); `targeted` (minus the cross-entropy
of the target class); `dlr` and `dlr-targeted` (Croce & Hein 2020).

The DLR losses divide by a gap between ranked logits that needs at least 3 classes (untargeted)
or 4 (targeted). With fewer, where the reference implementation fails, the gap uses the lowest
rank there is (the targeted loss on 3 classes divides by z_1 - z_3), and with 2 classes the
divisor is 1: the loss is then the plain margin between the two logits.

A loss is a registered name or a callable `(logits, labels) -> per-example loss`; the targeted
losses (TARGETED) take the target classes as a third argument, as does a callable given to a
targeted attack (APGD-T): `(logits, labels, targets) -> per-example loss`.

`gradient` takes every attack's gradient with respect to its input: where the model's output
does not depend on the input through differentiable ops (a `tf.stop_gradient`, a rounding), the
gradient is zero rather than None, so that the attacks run on and a diagnosis can say what
happened.
"""

import tensorflow as tf

CW_CONFIDENCE = 50.0
DENOMINATOR_FLOOR = 1e-12


def gradient(tape, target, x, *, per_example=False):
    """The gradient of `target` with respect to the input `x` recorded on `tape`, zero where
    `target` does not depend on `x`; with `per_example`, the Jacobian of each example's outputs
    (`tape.batch_jacobian`), as FAB takes it."""
    zero = tf.UnconnectedGradients.ZERO
    if per_example:
        return tape.batch_jacobian(target, x, unconnected_gradients=zero)
    return tape.gradient(target, x, unconnected_gradients=zero)


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


def cw(logits, labels):
    """The original's CW margin loss: -relu(margin + 50)."""
    return -tf.nn.relu(logit_margin(logits, labels) + CW_CONFIDENCE)


def margin(logits, labels):
    """The paper's CW loss: -relu(margin)."""
    return -tf.nn.relu(logit_margin(logits, labels))


def targeted_xent(logits, labels, targets):
    """Minus the cross-entropy of the target class: rises as the target becomes likely."""
    return -xent(logits, targets)


LOSSES = {"xent": xent, "cw": cw, "margin": margin, "targeted": targeted_xent, "dlr": dlr,
          "dlr-targeted": dlr_targeted}
TARGETED = ("targeted", "dlr-targeted")
# The registered losses each attack maximises (any callable loss too).
PGD_LOSSES = ("xent", "cw", "margin", "targeted")
APGD_LOSSES = ("xent", "dlr", "targeted", "dlr-targeted")


def check_loss(loss, supported=tuple(LOSSES)):
    """`loss` if it is one of the `supported` names or a callable; ValueError or TypeError
    otherwise."""
    if callable(loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a name or a callable (logits, labels) -> per-example "
                        f"loss. Received: loss={loss!r}")
    if loss not in supported:
        raise ValueError(f"unknown loss: use one of {', '.join(supported)} or a callable. "
                         f"Received: loss={loss!r}")
    return loss


def per_example_loss(logits, labels, loss, targets=None):
    """The loss `loss` (a registered name or a callable) per example; `targets` for the
    targeted ones (a callable gets them as its third argument where they are given)."""
    if callable(loss):
        return loss(logits, labels) if targets is None else loss(logits, labels, targets)
    if loss in TARGETED:
        return LOSSES[check_loss(loss)](logits, labels, targets)
    return LOSSES[check_loss(loss)](logits, labels)
