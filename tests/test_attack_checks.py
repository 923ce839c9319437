"""The API's edges, for every attack: inputs outside the pixel range, labels that are not class
indices of the model's classes, a model returning probabilities, each refused with one
ValueError line before any work; a callable loss; no retracing warnings from the attacks."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.attacks import APGD, FAB, PGD, AutoAttack, Square

EPSILON = 0.1
ATTACKS = {
    "PGD": lambda model: PGD(model, epsilon=EPSILON, steps=2).perturb,
    "APGD": lambda model: APGD(model, epsilon=EPSILON, steps=2).perturb,
    "APGD-T": lambda model: APGD(model, epsilon=EPSILON, steps=2, targets=2).perturb,
    "FAB": lambda model: FAB(model, epsilon=EPSILON, steps=2).perturb,
    "FAB-T": lambda model: FAB(model, epsilon=EPSILON, steps=2, targets=2).perturb,
    "Square": lambda model: Square(model, epsilon=EPSILON, steps=2).perturb,
    "AutoAttack": lambda model: lambda x, y: AutoAttack(
        model, epsilon=EPSILON, attacks=["apgd-ce"]).evaluate(x, y),
}


class Counting:
    """A model of 4 classes on 6 inputs, counting its calls: a refused batch calls it at most
    once (the check of its outputs)."""

    def __init__(self, activation=None):
        keras.utils.set_random_seed(0)
        self.model = keras.Sequential([keras.Input((6,)),
                                       keras.layers.Dense(4, activation=activation)])
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return self.model(x)


def batch(count=8):
    x = np.random.default_rng(0).uniform(0, 1, (count, 6)).astype(np.float32)
    return x, np.arange(count) % 4


EDGES = {
    "0..255 images": (lambda x, y: (255 * x, y),
                      r"x must lie within pixel_range=\(0, 1\).*Received: x with values from"),
    "NaN": (lambda x, y: (np.where(x > 0.5, np.nan, x), y), "x must be finite"),
    "one-hot labels": (lambda x, y: (x, np.eye(4)[y]),
                       r"vector of class indices .*Received: y with shape \(8, 4\)"),
    "float labels": (lambda x, y: (x, y.astype(np.float32)),
                     "integer class indices. Received: y of dtype float32"),
    "labels out of range": (lambda x, y: (x, y + 1),
                            "from 0 to 3, the model's classes. Received: y with labels from 1 "
                            "to 4"),
    "negative labels": (lambda x, y: (x, y - 1), "Received: y with labels from -1 to 2"),
    "another count": (lambda x, y: (x, y[:5]),
                      r"one label per example of x \(8\). Received: y with 5 labels"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("edge", list(EDGES))
def test_bad_inputs_and_labels_are_one_value_error_before_any_work(attack, edge):
    model = Counting()
    change, message = EDGES[edge]
    x, y = change(*batch())
    with pytest.raises(ValueError, match=message) as error:
        ATTACKS[attack](model)(x, y)
    assert "\n" not in str(error.value)
    assert model.calls <= 1


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_model_returning_probabilities_is_refused(attack):
    model = Counting(activation="softmax")
    with pytest.raises(ValueError, match="must return logits, not probabilities"):
        ATTACKS[attack](model)(*batch())
    assert model.calls == 1


@pytest.mark.parametrize("attack", [PGD, APGD])
@pytest.mark.slow
def test_a_callable_loss_equals_the_registered_one_it_writes_by_hand(attack):
    """The cross-entropy written here, -log softmax(logits)[label], takes the same steps as the
    registered `xent`."""

    def cross_entropy(logits, labels):
        log_probabilities = logits - tf.reduce_logsumexp(logits, axis=1, keepdims=True)
        return -tf.gather(log_probabilities, labels, axis=1, batch_dims=1)

    model = Counting().model
    x, _ = batch(32)
    y = np.argmax(model(x).numpy(), axis=1)
    by_name = attack(model, epsilon=EPSILON, steps=5, loss="xent", seed=1).perturb(x, y)
    by_hand = attack(model, epsilon=EPSILON, steps=5, loss=cross_entropy, seed=1).perturb(x, y)
    np.testing.assert_allclose(by_hand, by_name, atol=1e-6)
    assert np.abs(by_name - x).max() > EPSILON / 2


def test_a_callable_targeted_loss_takes_each_runs_targets():
    """APGD-T with minus the target's cross-entropy written here, a callable of (logits, labels,
    targets), takes the same steps as the registered `targeted` loss."""

    def towards_target(logits, labels, targets):
        log_probabilities = logits - tf.reduce_logsumexp(logits, axis=1, keepdims=True)
        return tf.gather(log_probabilities, targets, axis=1, batch_dims=1)

    model = Counting().model
    x, _ = batch(32)
    y = np.argmax(model(x).numpy(), axis=1)
    options = {"epsilon": EPSILON, "steps": 5, "targets": 2, "seed": 1}
    by_name = APGD(model, loss="targeted", **options).perturb(x, y)
    by_hand = APGD(model, loss=towards_target, **options).perturb(x, y)
    np.testing.assert_allclose(by_hand, by_name, atol=1e-6)
    assert np.any(by_name != x)


def test_bad_keywords_are_refused_naming_the_value():
    model = Counting().model
    with pytest.raises(TypeError, match="^epsilon must be a number. Received: epsilon='a'$"):
        PGD(model, epsilon="a")
    with pytest.raises(ValueError, match="unknown loss: .*Received: loss=.hinge."):
        PGD(model, epsilon=EPSILON, loss="hinge")
    with pytest.raises(TypeError, match="Received: loss=3"):
        APGD(model, epsilon=EPSILON, loss=3)
    with pytest.raises(ValueError, match="Received: loss='dlr-targeted', targets=None"):
        APGD(model, epsilon=EPSILON, loss="dlr-targeted")
    with pytest.raises(ValueError, match="steps must be at least 1. Received: steps=0"):
        FAB(model, epsilon=EPSILON, steps=0)
    with pytest.raises(ValueError, match="Received: p_init=0"):
        Square(model, epsilon=EPSILON, p_init=0)
    with pytest.raises(ValueError, match="targets must be at most 3.*Received: targets=9"):
        APGD(model, epsilon=EPSILON, targets=9).perturb(*batch())
    with pytest.raises(ValueError, match="Received: version='strong'"):
        AutoAttack(model, epsilon=EPSILON, version="strong")


@pytest.mark.slow
def test_no_retracing_warning_from_attacks_on_batches_of_other_sizes():
    """Each attack on batches of three sizes, and one PGD per epsilon of a sweep: TensorFlow
    logs no retracing warning."""
    model = Counting().model
    x, _ = batch(12)
    y = np.argmax(model(x).numpy(), axis=1)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = tf.get_logger()
    logger.addHandler(handler)
    try:
        for name in ("PGD", "APGD", "FAB", "Square"):
            perturb = ATTACKS[name](model)
            for size in (12, 5, 3):
                perturb(x[:size], y[:size])
        for epsilon in (0.01, 0.02, 0.03, 0.04, 0.05, 0.06):
            PGD(model, epsilon=epsilon, steps=1).perturb(x, y)
    finally:
        logger.removeHandler(handler)
    assert not [record for record in records if "retracing" in record.getMessage()]
