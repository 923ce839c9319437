"""The MNIST challenge, described once for the shared scripts in common/scripts/drivers.py."""

import os

import keras

from common.scripts.challenge import Challenge
from common.evaluation.paper import Paper, Row
from mnist_challenge import mnist_input, model

MODELS_URL = "https://github.com/MadryLab/mnist_challenge_models/raw/master/"


class MNISTChallenge(Challenge):
    """MNIST: the original's network, flat images in [0, 1], Adam on the summed cross-entropy."""

    def create_model(self, config, on_cpu):
        return model.Model(on_cpu)

    def tf1_variables(self, network):
        return model.tf1_variables(network)

    def load_data(self, data_path):
        return mnist_input.MNISTData(data_path)

    def training_batch(self, data, step, batch_size, seed):
        indices = mnist_input.batch_indices(step, batch_size, len(data.train_labels), seed)
        return data.train_images[indices], data.train_labels[indices]

    def held_out(self, data, examples):
        return data.validation_images[:examples], data.validation_labels[:examples]

    def optimizer(self, config):
        # Adam with TF1's defaults (Keras' own epsilon is 1e-7); the original's rate is 1e-4.
        return keras.optimizers.Adam(learning_rate=self.learning_rate(config), epsilon=1e-8)


MNIST = MNISTChallenge(
    name="MNIST",
    folder=os.path.dirname(os.path.abspath(__file__)),
    pixel_range=(0.0, 1.0),
    image_shape=(28, 28, 1),
    attack_keys=("k", "a"),
    seed_keys=("random_seed", "random_seed"),
    submission_shape_text="(10000,784)",
    prediction_batch_size=64,
    model_urls={name: f"{MODELS_URL}{name}.zip" for name in ("natural", "adv_trained", "secret")},
    published_sha256={
        "secret": "14eea09c72092db5c2eb5e34cd105974f42569281d2f34826316e356d057f96d"},
    # Table 1 of the paper: its adversarially trained model, 10,000 test images, epsilon 0.3,
    # PGD steps of 0.01. Sources: A itself, A' an independently trained copy, B the network of
    # Tramer et al. (2017); the paper has no MNIST rows from a naturally trained A_nat.
    paper=Paper(
        table_name="Table 1",
        table=(Row("Natural", published=98.8), Row("FGSM", published=95.6),
               Row("PGD", 40, published=93.2), Row("PGD", 100, published=91.8),
               Row("PGD", 40, 20, published=90.4), Row("PGD", 100, 20, published=89.3),
               Row("Targeted", 40, published=92.7), Row("CW", 40, published=94.0),
               Row("CW+", 40, published=93.9)),
        transfer={
            "A'": (Row("FGSM", published=96.8), Row("PGD", 40, published=96.0),
                   Row("PGD", 100, 20, published=95.7), Row("CW", 40, published=97.0),
                   Row("CW+", 40, published=96.4)),
            "B": (Row("FGSM", published=95.4), Row("PGD", 40, published=96.4),
                  Row("CW+", 40, published=95.7)),
            "A_nat": (Row("FGSM"), Row("PGD", 40), Row("PGD", 100, 20), Row("CW", 40),
                      Row("CW+", 40)),
        },
        epsilon_grid=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4),
        sweep_steps=40,
        first_layer="Variable",
    ),
)
