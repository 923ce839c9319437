"""The CIFAR-10 challenge, described once for the shared scripts in common/scripts/drivers.py."""

import os

from cifar10_challenge import cifar10_input, model
from common.training import objectives
from common.scripts.challenge import Challenge
from common.evaluation.paper import Paper, Row
from common.training.momentum import TF1Momentum

MODELS_URL = "https://github.com/MadryProj/cifar10_challenge_models/raw/master/"


class CIFAR10Challenge(Challenge):
    """CIFAR-10: the residual network of `filters`, images in [0, 255], TF1's Momentum on the
    mean cross-entropy with weight decay, batch norm in training mode during training's attack
    (as the original, by default)."""

    def create_model(self, config, on_cpu):
        return model.Model("eval", config["filters"], on_cpu)

    def tf1_variables(self, network):
        return model.tf1_variables(network)

    def load_data(self, data_path):
        return cifar10_input.CIFAR10Data(data_path)

    def training_batch(self, data, step, batch_size, seed):
        return cifar10_input.training_batch(data, step, batch_size, seed)

    def held_out(self, data, examples):
        # CIFAR-10 has no validation split: the guard attacks the first training images, as
        # they are (Wong et al. check a training batch too).
        return data.train_images[:examples].astype("float32"), data.train_labels[:examples]

    def loss(self, config, num_replicas):
        """Mean cross-entropy plus weight decay on the kernels named DW, as the original."""
        return objectives.xent_with_weight_decay(
            config["weight_decay"], config["training_batch_size"], num_replicas,
            model.decayed_kernels)

    def optimizer(self, config):
        return TF1Momentum(self.learning_rate(config), config["momentum"])

    def attack_training(self, config):
        return config["attack_batch_norm"] == "train"


CIFAR10 = CIFAR10Challenge(
    name="CIFAR-10",
    folder=os.path.dirname(os.path.abspath(__file__)),
    pixel_range=(0.0, 255.0),
    image_shape=(32, 32, 3),
    attack_keys=("num_steps", "step_size"),
    seed_keys=("tf_random_seed", "np_random_seed"),
    submission_shape_text="(10000, 32, 32, 3)",
    prediction_batch_size=100,
    model_urls={name: f"{MODELS_URL}{name}.zip" for name in ("natural", "adv_trained", "secret")},
    published_sha256={
        "secret": "555be6e892372599380c9da5d5f9802f9cbd098be8a47d24d96937a002305fd4"},
    # Table 2 of the paper: its adversarially trained wide network, 10,000 test images,
    # epsilon 8, PGD steps of 2. Sources: A itself, A' an independently trained copy, A_nat the
    # same network trained naturally.
    paper=Paper(
        table_name="Table 2",
        table=(Row("Natural", published=87.3), Row("FGSM", published=56.1),
               Row("PGD", 7, published=50.0), Row("PGD", 20, published=45.8),
               Row("CW", 30, published=46.8)),
        transfer={
            "A'": (Row("FGSM", published=67.0), Row("PGD", 7, published=64.2),
                   Row("CW", 30, published=78.7)),
            "A_nat": (Row("FGSM", published=85.6), Row("PGD", 7, published=86.0)),
        },
        epsilon_grid=(0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0),
        sweep_steps=20,
    ),
)
