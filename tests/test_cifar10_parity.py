"""The released-checkpoint path for CIFAR-10: the original's TF1 checkpoint of the simple network
(shared/fixtures/tf1_checkpoints/cifar10_simple), read by name, reproduces what it computed."""

import os

import numpy as np
import pytest
import tensorflow as tf

from cifar10_challenge import model as cifar_model
from common.attacks import pgd
from common.io import checkpoints
from common.runtime.errors import UserError


@pytest.fixture(scope="module")
def expected():
    from helpers import shared_path
    return np.load(shared_path("fixtures", "tf1_checkpoints", "cifar10_simple", "expected.npz"))


@pytest.fixture(scope="module")
def model():
    from helpers import shared_path
    model = cifar_model.Model("eval", cifar_model.SIMPLE_FILTERS)
    folder = shared_path("fixtures", "tf1_checkpoints", "cifar10_simple")
    checkpoints.load_weights(model, checkpoints.latest_checkpoint(folder),
                             cifar_model.tf1_variables)
    return model


@pytest.mark.parametrize("filters, count", [(cifar_model.WIDE_FILTERS, 45_901_914),
                                            (cifar_model.SIMPLE_FILTERS, 464_154)])
def test_trainable_parameter_counts(filters, count):
    model = cifar_model.Model("eval", filters)
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == count


def test_every_tf1_variable_is_mapped(cifar_fixture):
    reader = tf.train.load_checkpoint(os.path.join(cifar_fixture, "checkpoint-30"))
    names = {name for name in reader.get_variable_to_shape_map()
             if not name.endswith("/Momentum") and name != "global_step"}
    model = cifar_model.Model("eval", cifar_model.SIMPLE_FILTERS)
    assert set(cifar_model.tf1_variables(model)) == names


def test_eval_mode_logits_match_the_original(model, expected):
    np.testing.assert_allclose(model(expected["x"]).numpy(), expected["logits"], atol=1e-4)


@pytest.mark.parametrize("loss_func", ["xent", "cw"])
def test_input_gradients_match_the_original(model, expected, loss_func):
    """To round-off on 99 of the 100 examples. On one, a leaky ReLU input within round-off of
    zero takes the other slope, which moves a few gradients by 0.2% of the largest."""
    gradient = pgd.input_gradient(model, tf.constant(expected["x"]), tf.constant(expected["y"]),
                                  loss_func).numpy()
    reference = expected[f"grad_{loss_func}"]
    scale = np.abs(reference).max()
    worst = np.abs(gradient - reference).reshape(100, -1).max(axis=1)
    assert np.mean(worst <= 1e-5 * scale) >= 0.99
    assert worst.max() <= 1e-2 * scale


@pytest.mark.slow
def test_attack_matches_the_original_run(model, expected):
    attack = pgd.LinfPGDAttack(model, 8.0, 10, 2.0, True, "xent", pixel_range=(0.0, 255.0))
    x_adv = attack.perturb(expected["x"], expected["y"], start=expected["pgd_start"])
    assert np.all(np.abs(x_adv - expected["x"]) <= 8.0 + 1e-4)
    assert np.mean(np.abs(x_adv - expected["x_adv"]) <= 1e-4) >= 0.95
    predictions = np.argmax(model(x_adv.astype(np.float32)).numpy(), axis=1)
    np.testing.assert_array_equal(predictions, np.argmax(expected["adv_logits"], axis=1))


def test_a_checkpoint_of_other_widths_is_a_clear_error(cifar_fixture):
    wide = cifar_model.Model("eval", cifar_model.WIDE_FILTERS)
    with pytest.raises(UserError, match="unit_1_0/sub1/conv1/DW' has shape .*16, 16.* needs "):
        checkpoints.load_weights(wide, os.path.join(cifar_fixture, "checkpoint-30"),
                                 cifar_model.tf1_variables)
