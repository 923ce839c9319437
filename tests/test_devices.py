"""The attack and scoring scripts spread each batch over the local devices (two logical CPUs
here) and give what one device gives."""

import numpy as np
import tensorflow as tf

from common import checkpoints, devices, evaluation, pgd, submission
from mnist_challenge import mnist_input
from mnist_challenge import model as mnist_model


def test_each_replica_takes_a_consecutive_slice(two_replicas):
    slice_size = tf.function(lambda x: tf.fill(tf.shape(x), tf.shape(x)[0]),
                             input_signature=[tf.TensorSpec((None,), tf.int32)])
    spread = devices.Spread(two_replicas, slice_size)
    np.testing.assert_array_equal(spread(np.arange(7, dtype=np.int32)), [3, 3, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(spread(np.arange(4, dtype=np.int32)), [2, 2, 2, 2])


def fixture_model(folder, strategy):
    with strategy.scope():
        model = mnist_model.Model()
    checkpoints.load_latest_weights(model, folder, mnist_model.tf1_variables)
    return model


def test_attack_and_scores_over_two_devices_equal_one(two_replicas, mnist_data, mnist_fixture):
    data = mnist_input.MNISTData(mnist_data)
    x, y = data.test_images[:25], data.test_labels[:25]
    results = []
    for strategy in (tf.distribute.get_strategy(), two_replicas):
        model = fixture_model(mnist_fixture, strategy)
        attack = pgd.LinfPGDAttack(model, 0.1, 5, 0.02, True, "xent", seed=0, strategy=strategy)
        x_adv = attack.perturb(x, y).astype(np.float32)
        accuracy, predictions = submission.score(model, x_adv, y, 10, strategy)
        results.append((x_adv, predictions, accuracy,
                        evaluation.evaluate(model, attack, x, y, 25, 10)))
    (one_x, one_predictions, one_accuracy, one_eval), (two_x, two_predictions, two_accuracy,
                                                       two_eval) = results
    assert np.mean(np.abs(one_x - two_x) < 1e-6) >= 0.99
    np.testing.assert_array_equal(one_predictions, two_predictions)
    assert one_accuracy == two_accuracy and one_eval["acc_nat"] == two_eval["acc_nat"]
    assert abs(one_eval["acc_adv"] - two_eval["acc_adv"]) <= 0.04
    np.testing.assert_allclose(one_eval["avg_xent_nat"], two_eval["avg_xent_nat"], rtol=1e-5)
