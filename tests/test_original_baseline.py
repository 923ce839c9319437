"""The original-style baseline of the speed comparison (benchmarks/original.py) is the original's
network and attack: with the TF1 fixtures' weights its logits equal the port's, and its attack
loop takes the steps of the port's attack from the same start. Slow: the baseline builds TF1
graphs, and these check the speed comparison, not the port."""

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import original
from cifar10_challenge import model as cifar_model
from common.attacks import pgd
from common.io import checkpoints
from mnist_challenge import model as mnist_model

pytestmark = pytest.mark.slow


def _tf1_values(path, graph):
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in graph.variables}


def test_the_mnist_baseline_is_the_ports_network_and_attack(mnist_fixture, mnist_data):
    from mnist_challenge import mnist_input

    graph = original.Graph(original.mnist_network, (784,))
    graph.load(_tf1_values(f"{mnist_fixture}/checkpoint-300", graph))
    model = mnist_model.Model()
    checkpoints.load_weights(model, f"{mnist_fixture}/checkpoint-300", mnist_model.tf1_variables)
    data = mnist_input.MNISTData(mnist_data)
    x, y = data.test_images[:100].astype(np.float32), data.test_labels[:100]
    np.testing.assert_allclose(graph.predict(x), model.predict(x, verbose=0), atol=1e-4)

    baseline = graph.perturb(x, y, epsilon=0.3, steps=5, step_size=0.01, pixel_range=(0.0, 1.0),
                             rng=np.random.default_rng(3))
    start = np.clip(x + np.random.default_rng(3).uniform(-0.3, 0.3, x.shape), 0, 1)
    attack = pgd.PGD(model, epsilon=0.3, steps=5, step_size=0.01, loss="xent")
    ours = attack.perturb(x, y, start=start)  # the float64 iterate, rounded to float32
    assert np.mean(baseline.astype(np.float32) == ours) > 0.999  # tiny gradients' signs aside
    assert np.all(np.abs(baseline - x) <= 0.3 + 1e-6)


@pytest.mark.parametrize("filters", [cifar_model.SIMPLE_FILTERS])
def test_the_cifar10_baseline_is_the_ports_network(cifar_fixture, cifar_data, filters):
    from cifar10_challenge import cifar10_input

    path = checkpoints.latest_checkpoint(cifar_fixture)
    graph = original.Graph(original.cifar10_network(filters), (32, 32, 3))
    graph.load(_tf1_values(path, graph))
    model = cifar_model.Model("eval", filters)
    checkpoints.load_weights(model, path, cifar_model.tf1_variables)
    images = cifar10_input.CIFAR10Data(cifar_data).test_images[:20].astype(np.float32)
    np.testing.assert_allclose(graph.predict(images), model.predict(images, verbose=0),
                               rtol=1e-4, atol=1e-3)
