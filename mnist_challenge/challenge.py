"""The MNIST challenge, described once for the shared scripts in common/scripts.py."""

import os

import keras

from common import losses, schedules
from common.challenge import Challenge
from mnist_challenge import mnist_input, model

MODELS_URL = "https://github.com/MadryLab/mnist_challenge_models/raw/master/"


def training_batch(data, step, batch_size, seed):
    indices = mnist_input.batch_indices(step, batch_size, len(data.train_labels), seed)
    return data.train_images[indices], data.train_labels[indices]


MNIST = Challenge(
    name="MNIST",
    folder=os.path.dirname(os.path.abspath(__file__)),
    pixel_range=(0.0, 1.0),
    image_shape=(28, 28, 1),
    create_model=lambda config, on_cpu: model.Model(on_cpu),
    tf1_variables=model.tf1_variables,
    load_data=mnist_input.MNISTData,
    test_set=lambda data: (data.test_images, data.test_labels),
    training_batch=training_batch,
    held_out=lambda data: (data.validation_images, data.validation_labels),
    attack_keys=("k", "a"),
    seed_keys=("random_seed", "random_seed"),
    loss=lambda config, num_replicas: losses.summed_xent,
    # Adam with TF1's defaults (Keras' own epsilon is 1e-7); the original's rate is 1e-4.
    optimizer=lambda config: keras.optimizers.Adam(
        learning_rate=schedules.learning_rate(config), epsilon=1e-8),
    attack_training=lambda config: False,
    submission_shape_text="(10000,784)",
    prediction_batch_size=64,
    model_urls={name: f"{MODELS_URL}{name}.zip" for name in ("natural", "adv_trained", "secret")},
    published_sha256={
        "secret": "14eea09c72092db5c2eb5e34cd105974f42569281d2f34826316e356d057f96d"},
)
