"""The models with known failure modes that tests/test_diagnose.py diagnoses and
docs/figures/make_diagnose_figures.py draws: a linear MNIST model and its wrappers, each breaking
an attack in its own way. Here once, so that the docs' figures show the models the tests check."""

import keras
import tensorflow as tf


def linear_model(data):
    """A linear model on the flat images, about 90% accurate after two short epochs.

    Args:
        data: an MNISTData, whose first 10000 training images it learns.
    """
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.train_images[:10000], data.train_labels[:10000], epochs=2, batch_size=100,
              verbose=0)
    return model


def quantised(model):
    """The model on its input rounded to 4 levels, the rounding under tf.stop_gradient."""
    return lambda x: model(tf.stop_gradient(tf.round(x * 4) / 4))


def noisy(model):
    return lambda x: model(x + tf.random.normal(tf.shape(x), stddev=0.1))


def scaled(model):
    return lambda x: model(x) * 1e4


def softmax(model):
    return lambda x: tf.nn.softmax(model(x))


WRAPPERS = {"natural": lambda model: model, "quantised": quantised, "noisy": noisy,
            "scaled": scaled, "probabilities": softmax}
