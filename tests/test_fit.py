"""Adversarial training through `fit` (common/training/fit.py): each method's step equals the
challenge loop's step on the same batch and start, two replicas take one device's step, the
overfitting guard stops a run and puts back the weights of its last check, and
BackupAndRestore resumes a killed run to the same end."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.attacks import PGD
from common.training import fit, loop, objectives, steps

EPSILON = 0.1


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(3)])


def labelling_model():
    """small_model with weights that classify by the largest of the first three inputs, as
    `data` makes the labels."""
    model = small_model()
    kernel, bias, head, head_bias = (np.zeros_like(w) for w in model.get_weights())
    kernel[:3, :3], head[:3, :3] = 10 * np.eye(3), np.eye(3)
    model.set_weights([kernel, bias, head, head_bias])
    return model


def data(count=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (count, 12)).astype(np.float32)
    return x, (x[:, :3].argmax(axis=1)).astype(np.int64)


def mean_xent(labels, logits, model):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                                         logits=logits))


def compiled(model, attack, method, **options):
    adversarial = fit.AdversarialModel(model, attack, method=method, **options)
    adversarial.compile(optimizer=keras.optimizers.SGD(0.5),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return adversarial


@pytest.mark.parametrize("method", ["pgd", "trades"])
@pytest.mark.parametrize("options", [{"alignment": 2.0}, {"weight_perturbation": 0.5}])
def test_the_loops_step_with_gradalign_or_awp_equals_fits(method, options):
    by_fit, by_loop, without = fit_and_loop_weights(method, **options)
    for mine, other in zip(by_fit, by_loop):
        np.testing.assert_allclose(mine, other, atol=1e-6)
    assert not np.allclose(by_loop[0], without[0], atol=1e-4)  # the option changes the step


def fit_and_loop_weights(method, **options):
    """After one step on `data()`: the weights fit trains by `method` with `options` (an
    AdversarialModel option that TrainStep takes too), and those the loop's step trains on the
    same batch and start with the options and without them."""
    x, y = data()
    model = small_model()
    adversarial = compiled(model, PGD(model, epsilon=EPSILON, steps=2, step_size=0.05), method,
                           seed=5, **options)
    adversarial.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    by_loop = []
    for loop_options in (options, {}):
        theirs = small_model()
        step = loop.TrainStep(tf.distribute.get_strategy(), theirs, keras.optimizers.SGD(0.5),
                              settings=adversarial.settings, loss_fn=objectives.Xent(divisor=32),
                              method=method, **loop_options)
        step(x, y, adversarial.start_points(x, 0).numpy(), report=False, step=0, seed=5)
        by_loop.append(theirs.get_weights())
    return model.get_weights(), *by_loop


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs", "nfgsm"])
@pytest.mark.slow
def test_a_fit_step_equals_the_challenge_loop_step(method):
    x, y = data()
    attack = PGD(small_model(), epsilon=EPSILON, steps=3, step_size=0.04)
    adversarial = compiled(small_model(), attack, method)
    adversarial.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)

    theirs = small_model()
    settings = steps.training_settings(attack.settings, method)
    step = loop.TrainStep(tf.distribute.get_strategy(), theirs, keras.optimizers.SGD(0.5),
                          method=method, settings=settings, loss_fn=mean_xent)
    step(x, y, adversarial.start_points(x, 0).numpy(), report=False)
    for mine, other in zip(adversarial.model.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(mine, other, atol=1e-6)
    assert not np.allclose(adversarial.model.get_weights()[0], small_model().get_weights()[0])


def test_a_free_fit_step_equals_the_challenge_loops_replays():
    x, y = data()
    attack = PGD(small_model(), epsilon=EPSILON, steps=1)
    adversarial = compiled(small_model(), attack, "free", replays=3, batch_size=32)
    adversarial.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)

    theirs = small_model()
    step = loop.FreeTrainStep(tf.distribute.get_strategy(), theirs, keras.optimizers.SGD(0.5),
                              settings=attack.settings, loss_fn=mean_xent, replays=3,
                              batch_size=32)
    for _ in range(3):
        step(x, y, report=False)
    for mine, other in zip(adversarial.model.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(mine, other, atol=1e-6)
    np.testing.assert_allclose(adversarial.perturbation.numpy(), step.perturbation.numpy(),
                               atol=1e-6)


@pytest.mark.parametrize("method, options", [("pgd", {}),
                                             ("free", {"replays": 2, "batch_size": 32}),
                                             ("pgd", {"weight_perturbation": 0.5})])
@pytest.mark.slow
def test_two_replicas_take_the_step_of_one_device(two_replicas, method, options):
    x, y = data()
    one = compiled(small_model(),
                   PGD(small_model(), epsilon=EPSILON, steps=3, random_start=False),
                   method, **options)
    one.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    with two_replicas.scope():
        model = small_model()
        two = compiled(model, PGD(model, epsilon=EPSILON, steps=3, random_start=False), method,
                       **options)
    two.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    for mine, other in zip(two.model.get_weights(), one.model.get_weights()):
        np.testing.assert_allclose(mine, other, atol=1e-5)


def test_the_guard_stops_a_collapse_and_puts_back_the_last_good_weights():
    x, y = data(64)
    model = labelling_model()
    adversarial = fit.AdversarialModel(model, PGD(model, epsilon=EPSILON, steps=3),
                                       method="fgsm_rs")
    adversarial.compile(optimizer=keras.optimizers.SGD(1e-4),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = fit.OverfittingGuardCallback(data(40, seed=1), PGD(model, epsilon=0.01), every=2)
    kept = {}

    class Collapse(keras.callbacks.Callback):
        """Turns the classifier around after step 3, as catastrophic overfitting wrecks it."""

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step == 2:
                kept["weights"] = model.get_weights()
            if step == 3:
                model.set_weights([-w for w in model.get_weights()])

    adversarial.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                    callbacks=[Collapse(), guard])
    assert guard.stopped_at == 4, guard.accuracies
    assert [step for step, _ in guard.accuracies] == [2]
    assert guard.accuracies[0][1] > 0.8
    for restored, expected in zip(model.get_weights(), kept["weights"]):
        np.testing.assert_array_equal(restored, expected)


@pytest.mark.slow
def test_backup_and_restore_resumes_a_killed_run_to_the_same_end(tmp_path):
    x, y = data(32)

    def run(callbacks=()):
        model = small_model()
        adversarial = compiled(model, PGD(model, epsilon=EPSILON, steps=2), "pgd")
        adversarial.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                        callbacks=list(callbacks))
        return model.get_weights()

    class Kill(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt("killed")

    backup = str(tmp_path / "backup")
    whole = run()
    with pytest.raises(KeyboardInterrupt):
        run([keras.callbacks.BackupAndRestore(backup), Kill()])
    resumed = run([keras.callbacks.BackupAndRestore(backup)])
    for mine, other in zip(resumed, whole):
        np.testing.assert_allclose(mine, other, atol=1e-6)


def test_the_guard_attacks_only_the_first_examples_of_its_held_out_batch():
    """The held-out labels past the fifth are wrong: a guard of 5 examples never sees them."""
    model = labelling_model()
    held_x, held_y = data(40, seed=1)
    held_y[5:] = (held_y[5:] + 1) % 3
    adversarial = compiled(model, PGD(model, epsilon=EPSILON, steps=2), "pgd")
    attack = PGD(model, epsilon=1e-4)
    five = fit.OverfittingGuardCallback((held_x, held_y), attack, every=1, examples=5)
    adversarial.fit(*data(8), batch_size=8, epochs=1, verbose=0, callbacks=[five])
    assert five.accuracies == [(1, 1.0)]
    with pytest.raises(ValueError, match="Received: examples=0"):
        adversarial.fit(*data(8), batch_size=8, epochs=1, verbose=0, callbacks=[
            fit.OverfittingGuardCallback((held_x, held_y), attack, examples=0)])


def test_the_guard_callback_refuses_a_bad_max_drop_when_made():
    with pytest.raises(ValueError, match="Received: max_drop=1.5"):
        fit.OverfittingGuardCallback(data(8), PGD(small_model(), epsilon=EPSILON), max_drop=1.5)


def test_bad_methods_and_a_free_run_without_its_batch_size_are_refused():
    attack = PGD(small_model(), epsilon=EPSILON)
    with pytest.raises(ValueError, match="Received: method='fast'"):
        fit.AdversarialModel(small_model(), attack, method="fast")
    with pytest.raises(ValueError, match="Received: batch_size=None"):
        fit.AdversarialModel(small_model(), attack, method="free")
