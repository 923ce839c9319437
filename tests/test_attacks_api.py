"""The public attack API (common.attacks.PGD and AutoAttack) on models that are not the
challenges': subclassed, functional and Sequential Keras models and a plain callable, L-infinity
and L2, against the reference implementation's recorded results and closed forms."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.attacks import PGD, AutoAttack

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "autoattack_reference.npz")


def reference_mlp(saved):
    """The fixture's MLP as a plain callable: relu(relu(x w1 + b1) w2 + b2) w3 + b3."""
    weights = [tf.constant(saved[name]) for name in ("w1", "b1", "w2", "b2", "w3", "b3")]

    def logits(x):
        hidden = tf.reshape(x, (tf.shape(x)[0], -1))
        for kernel, bias in zip(weights[0:4:2], weights[1:4:2]):
            hidden = tf.nn.relu(tf.matmul(hidden, kernel) + bias)
        return tf.matmul(hidden, weights[4]) + weights[5]

    return logits


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.slow
def test_standard_autoattack_agrees_with_the_reference(norm):
    """fra31/auto-attack's standard evaluation of the same model on the same 200 images
    (tests/fixtures/README.md): robust accuracy within 1 point after each attack."""
    with np.load(FIXTURE, allow_pickle=False) as saved:
        saved = dict(saved)
    prefix = norm.lower() + "_"
    epsilon = float(saved[prefix + "eps"])
    result = AutoAttack(reference_mlp(saved), epsilon=epsilon, norm=norm).evaluate(
        saved["x"], saved["y"], batch_size=200)
    reference = dict(zip((str(name) for name in saved["attacks"]),
                         saved[prefix + "accuracy_after"]))
    assert list(result.accuracy_after) == list(reference)
    for name in reference:
        assert abs(result.accuracy_after[name] - reference[name]) <= 0.01, name
    assert np.mean(result.robust == saved[prefix + "robust"]) >= 0.97
    distances = (result.x_adv - saved["x"]).reshape(len(saved["x"]), -1)
    size = np.abs(distances).max(1) if norm == "Linf" else np.linalg.norm(distances, axis=1)
    assert size.max() <= epsilon * (1 + 1e-5)
    assert result.x_adv.dtype == np.float32 and result.x_adv.shape == saved["x"].shape


class ThreeClasses(keras.Model):
    """A subclassed model on 16x16x3 images in [0, 255]."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3, activation="relu")
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(self.flatten(self.conv(x / 255.0)))


@pytest.mark.slow
def test_a_subclassed_model_on_images_in_0_255():
    keras.utils.set_random_seed(0)
    model = ThreeClasses()
    x = np.random.default_rng(0).uniform(0, 255, (12, 16, 16, 3)).astype(np.float32)
    y = np.argmax(model(x).numpy(), axis=1)
    for norm, epsilon in (("Linf", 8.0), ("L2", 200.0)):
        x_adv = PGD(model, epsilon=epsilon, steps=10, norm=norm,
                    pixel_range=(0, 255)).perturb(x, y)
        assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
        assert x_adv.min() >= 0 and x_adv.max() <= 255
        result = AutoAttack(model, epsilon=epsilon, norm=norm,
                            pixel_range=(0, 255)).evaluate(x, y, batch_size=6)
        assert list(result.accuracy_after) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
        assert 0 <= result.robust_accuracy <= 1 and result.robust.shape == (12,)


@pytest.mark.slow
def test_a_functional_model_of_100_classes_and_a_sequential_one_on_flat_inputs():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 1))
    many = keras.Model(inputs, keras.layers.Dense(100)(keras.layers.Flatten()(inputs)))
    flat = keras.Sequential([keras.Input((20,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(5)])
    rng = np.random.default_rng(1)
    for model, x in ((many, rng.uniform(0, 1, (10, 8, 8, 1))), (flat, rng.uniform(0, 1, (10, 20)))):
        x = x.astype(np.float32)
        y = np.argmax(model(x).numpy(), axis=1)
        result = AutoAttack(model, epsilon=0.1).evaluate(x, y, batch_size=10)
        assert result.x_adv.shape == x.shape
        assert np.abs(result.x_adv - x).max() <= 0.1 + 1e-6


def test_a_missing_epsilon_and_an_unknown_norm_are_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(TypeError, match="epsilon"):
        AutoAttack(model, norm="Linf")
    with pytest.raises(TypeError, match="epsilon"):
        PGD(model, steps=3)
    with pytest.raises(ValueError, match="Received: norm='L3'"):
        PGD(model, epsilon=0.1, norm="L3")


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.slow
def test_a_linear_model_is_broken_exactly_where_a_boundary_is_within_epsilon(norm):
    """Two classes, logits (w.x, -w.x): the smallest perturbation that flips x is |w.x| / ||w||_*
    (the dual norm: L1 for L-infinity, L2 for L2), far from the pixel range's bounds here."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6,)).astype(np.float32)
    x = rng.uniform(-1, 1, (60, 6)).astype(np.float32)
    y = (x @ w < 0).astype(np.int64)
    dual = np.abs(w).sum() if norm == "Linf" else np.linalg.norm(w)
    distance = np.abs(x @ w) / dual
    epsilon = float(np.median(distance))
    keep = np.abs(distance - epsilon) > 0.02 * epsilon  # leave out the ones right at epsilon
    model = lambda inputs: tf.stack([tf.linalg.matvec(inputs, w),  # noqa: E731
                                     -tf.linalg.matvec(inputs, w)], axis=1)
    result = AutoAttack(model, epsilon=epsilon, norm=norm, pixel_range=(-100, 100)).evaluate(
        x, y, batch_size=60)
    np.testing.assert_array_equal(result.robust[keep], distance[keep] > epsilon)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where BackupAndRestore keeps its folder while fit runs
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    section = readme.split("## Use it on your own model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    assert 0 <= namespace["linf"].robust_accuracy <= namespace["linf"].clean_accuracy
    assert namespace["x_adv"].shape == (64, 8, 8, 1)
    assert list(namespace["l2"].accuracy_after) == ["clean", "apgd-ce", "apgd-t", "fab-t",
                                                    "square"]
    assert namespace["trainer"].optimizer.iterations.numpy() == 8  # 2 epochs of 4 batches
    assert not os.listdir(tmp_path), "BackupAndRestore removes its folder after a whole run"
