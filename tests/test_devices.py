"""The attack and scoring scripts spread each batch over the local devices (two logical CPUs
here) and give what one device gives; the chief of a cluster; TF_CONFIG read or refused."""

import json

import numpy as np
import pytest
import tensorflow as tf

from common.attacks import apgd, fab, pgd
from common.attacks.threat_model import ThreatModel
from common.evaluation import robustness, submission
from common.io import checkpoints
from common.runtime import devices
from common.runtime.errors import UserError
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


@pytest.mark.slow
def test_attack_and_scores_over_two_devices_equal_one(two_replicas, mnist_data, mnist_fixture):
    data = mnist_input.MNISTData(mnist_data)
    x, y = data.test_images[:25], data.test_labels[:25]
    results = []
    for strategy in (tf.distribute.get_strategy(), two_replicas):
        model = fixture_model(mnist_fixture, strategy)
        attack = pgd.PGD(model, epsilon=0.1, steps=5, step_size=0.02, loss="xent", seed=0,
                         strategy=strategy)
        x_adv = attack.perturb(x, y)
        accuracy, predictions = submission.score(model, x_adv, y, batch_size=10,
                                                 strategy=strategy)
        results.append((x_adv, predictions, accuracy,
                        robustness.evaluate(model, attack, x, y, num_examples=25,
                                            batch_size=10)))
    (one_x, one_predictions, one_accuracy, one_eval), (two_x, two_predictions, two_accuracy,
                                                       two_eval) = results
    assert np.mean(np.abs(one_x - two_x) < 1e-6) >= 0.99
    np.testing.assert_array_equal(one_predictions, two_predictions)
    assert one_accuracy == two_accuracy and one_eval["acc_nat"] == two_eval["acc_nat"]
    assert abs(one_eval["acc_adv"] - two_eval["acc_adv"]) <= 0.04
    np.testing.assert_allclose(one_eval["avg_xent_nat"], two_eval["avg_xent_nat"], rtol=1e-5)


class _Resolver:
    """What `is_chief` reads of a strategy's cluster resolver."""

    def __init__(self, cluster, task_type, task_id):
        self.task_type, self.task_id = task_type, task_id
        self._cluster = cluster

    def cluster_spec(self):
        return tf.train.ClusterSpec(self._cluster)


class _Strategy:
    def __init__(self, resolver):
        self.cluster_resolver = resolver


WORKERS = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
WITH_CHIEF = {"chief": ["127.0.0.1:3"], **WORKERS}


@pytest.mark.parametrize("cluster, task_type, task_id, chief", [
    (WORKERS, "worker", 0, True),
    (WORKERS, "worker", 1, False),
    (WITH_CHIEF, "chief", 0, True),
    (WITH_CHIEF, "worker", 0, False),
    (WITH_CHIEF, "worker", 1, False),
    ({}, None, None, True),
])
def test_the_chief_is_the_chief_task_or_else_worker_0(cluster, task_type, task_id, chief):
    assert devices.is_chief(_Strategy(_Resolver(cluster, task_type, task_id))) is chief


def test_a_strategy_without_a_cluster_is_its_own_chief(two_replicas):
    assert devices.is_chief(two_replicas) and devices.is_chief(tf.distribute.get_strategy())


@pytest.mark.parametrize("tf_config, size", [
    (None, 0), ("", 0), ('{"task": {"type": "worker", "index": 0}}', 0),
    (json.dumps({"cluster": WITH_CHIEF}), 3),
])
def test_cluster_size_reads_tf_config(monkeypatch, tf_config, size):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    assert devices.cluster_size() == size


@pytest.mark.parametrize("tf_config", ["{not json", "[1, 2]", '{"cluster": ["a", "b"]}',
                                       '{"cluster": {"worker": 3}}'])
def test_a_malformed_tf_config_is_one_clear_error(monkeypatch, tf_config):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(UserError, match="TF_CONFIG is not a JSON object with a cluster"):
        devices.training_strategy()


def _functions_of(concrete):
    """{name: FunctionDef} of a traced function's graph, the graph itself under the name ""."""
    graph_def = concrete.graph.as_graph_def()
    functions = {function.signature.name: function for function in graph_def.library.function}
    functions[""] = graph_def
    return functions


def _nodes(function):
    return function.node_def if hasattr(function, "node_def") else function.node


def _ops(function):
    return {node.op for node in _nodes(function)}


def _loop_bodies(functions):
    return [functions[node.attr["body"].func.name] for function in functions.values()
            for node in _nodes(function) if node.op in ("While", "StatelessWhile")]


def _called(functions, body):
    """The functions that the loop `body` calls, with whether each is marked not to inline."""
    called = [functions[node.attr["f"].func.name] for node in _nodes(body)
              if node.op.endswith("PartitionedCall")]
    return [(function, function.attr["_noinline"].b) for function in called]


def _attack_loops():
    model = mnist_model.Model(on_cpu=True)
    threat = ThreatModel(epsilon=0.3, norm="Linf", pixel_range=(0.0, 1.0))
    labels = tf.constant([3, 7], tf.int64)
    pgd_settings = pgd.AttackSettings(epsilon=0.3, steps=2, step_size=0.1, random_start=False)
    apgd_settings = apgd.APGDSettings(threat_model=threat, num_iterations=2)
    fab_settings = fab.FABSettings(threat_model=threat, num_iterations=2)
    targets = tf.constant([0, 1], tf.int64)
    return {
        "pgd": lambda x: pgd.pgd_steps(model, x, labels, tf.cast(x, tf.float64), pgd_settings),
        "apgd": lambda x: apgd.apgd_steps(model, x, labels, targets=None, noise=x * 0,
                                          settings=apgd_settings),
        "fab": lambda x: fab.fab_steps(model, x, labels, targets=targets, noise=x * 0,
                                       settings=fab_settings),
    }


@pytest.mark.parametrize("attack", ["pgd", "apgd", "fab"])
def test_attack_loops_call_the_models_gradient_as_a_function_of_its_own(attack):
    # On CPUs the max-pool gradient must not lie on the loop's cycle, where oneDNN's layout pass
    # leaves it to TensorFlow's generic kernel in some processes (devices.loop_step): the loop
    # body calls a function, not inlined, that holds it.
    concrete = tf.function(_attack_loops()[attack]).get_concrete_function(
        tf.TensorSpec((2, 784), tf.float32))
    functions = _functions_of(concrete)
    bodies = _loop_bodies(functions)
    gradients = [body for body in bodies
                 if any("MaxPoolGrad" in _ops(called) for called, _ in _called(functions, body))]
    assert gradients, f"no loop body of {attack} calls a function with the max-pool gradient"
    for body in bodies:
        assert "MaxPoolGrad" not in _ops(body)
    for body in gradients:
        assert all(noinline for called, noinline in _called(functions, body)
                   if "MaxPoolGrad" in _ops(called))
