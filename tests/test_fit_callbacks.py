"""AdversarialModel with Keras' own callbacks: ModelCheckpoint's full and weights-only saves
load back as the user's model, EarlyStopping restores the best epoch's weights, and a fit raises
no retracing warning from the attack."""

import logging

import keras
import numpy as np
import pytest
from test_fit import EPSILON, data, small_model

from common.attacks import PGD
from common.training import fit


def trained(method="pgd", callbacks=(), epochs=2, count=32, **options):
    x, y = data(count)
    model = small_model()
    adversarial = fit.AdversarialModel(model, PGD(model, epsilon=EPSILON, steps=2),
                                       method=method, **options)
    adversarial.compile(optimizer=keras.optimizers.SGD(0.5),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    adversarial.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
                    validation_data=data(16, seed=2), callbacks=list(callbacks))
    return model, adversarial


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_a_full_checkpoint_loads_back_as_the_users_model(tmp_path, method):
    path = str(tmp_path / "model.keras")
    model, _ = trained(method, [keras.callbacks.ModelCheckpoint(path)], beta=3.0)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, fit.AdversarialModel) and loaded.method == method
    assert loaded.context.beta == 3.0 and loaded.settings == loaded.attack.settings
    assert loaded.settings.epsilon == EPSILON and loaded.settings.steps == 2
    x, _ = data(8, seed=3)
    np.testing.assert_allclose(loaded.model(x).numpy(), model(x).numpy(), atol=1e-6)
    for mine, other in zip(loaded.model.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(mine, other)


def test_a_weights_only_checkpoint_loads_into_the_users_model(tmp_path):
    path = str(tmp_path / "model.weights.h5")
    model, _ = trained(callbacks=[keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
    mine = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(3)])
    fit.AdversarialModel(mine, PGD(mine, epsilon=EPSILON)).load_weights(path)
    for restored, expected in zip(mine.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(restored, expected)


def test_a_full_save_with_a_callable_loss_is_refused_before_its_file_is_written(tmp_path):
    model = small_model()
    attack = PGD(model, epsilon=EPSILON, loss=lambda logits, labels: -logits[:, 0])
    path = tmp_path / "model.keras"
    with pytest.raises(TypeError, match="Received: loss=") as error:
        fit.AdversarialModel(model, attack).save(str(path))
    assert "\n" not in str(error.value) and not path.exists()


def test_early_stopping_puts_back_the_best_epochs_weights():
    history = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            history.append((logs["val_loss"], self.model.model.get_weights()))

    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=1,
                                         restore_best_weights=True)
    model, _ = trained(callbacks=[Record(), stop], epochs=6)
    best = min(range(len(history)), key=lambda epoch: history[epoch][0])
    assert best < len(history) - 1, [loss for loss, _ in history]
    for restored, expected in zip(model.get_weights(), history[best][1]):
        np.testing.assert_array_equal(restored, expected)


@pytest.mark.parametrize("method", ["pgd", "trades", "free"])
@pytest.mark.slow
def test_fit_raises_no_retracing_warning(caplog, method):
    options = {"batch_size": 8} if method == "free" else {}
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # a last batch of 6: one more shape to trace
            trained(method, epochs=3, count=30, **options)
    assert "retracing" not in caplog.text


@pytest.mark.parametrize("options, message", [
    ({"attack": "pgd"}, "Received: attack='pgd'"),
    ({"method": "trades", "beta": -0.5}, "Received: beta=-0.5"),
    ({"replays": 0}, "Received: replays=0"),
])
def test_bad_arguments_are_refused_in_one_line(options, message):
    model = small_model()
    arguments = {"attack": PGD(model, epsilon=EPSILON), **options}
    with pytest.raises((ValueError, TypeError), match=message) as error:
        fit.AdversarialModel(model, **arguments)
    assert "\n" not in str(error.value)
