"""The CIFAR-10 challenge, described once for the shared scripts in common/scripts/drivers.py."""

import os

from cifar10_challenge import cifar10_input, model
from common.training import objectives, overfitting, schedules
from common.scripts.challenge import Challenge
from common.evaluation.paper import Paper, Row
from common.training.momentum import TF1Momentum

MODELS_URL = "https://github.com/MadryProj/cifar10_challenge_models/raw/master/"


def loss(config, num_replicas):
    """Mean cross-entropy plus weight decay on the kernels named DW, as the original."""
    return objectives.xent_with_weight_decay(config["weight_decay"], config["training_batch_size"],
                                         num_replicas, model.decayed_kernels)


CIFAR10 = Challenge(
    name="CIFAR-10",
    folder=os.path.dirname(os.path.abspath(__file__)),
    pixel_range=(0.0, 255.0),
    image_shape=(32, 32, 3),
    create_model=lambda config, on_cpu: model.Model("eval", config["filters"], on_cpu),
    tf1_variables=model.tf1_variables,
    load_data=cifar10_input.CIFAR10Data,
    test_set=lambda data: (data.test_images.astype("float32"), data.test_labels),
    training_batch=cifar10_input.training_batch,
    # CIFAR-10 has no validation split: the guard attacks the first training images, as they
    # are (Wong et al. check a training batch too).
    held_out=lambda data: (data.train_images[:overfitting.EXAMPLES].astype("float32"),
                           data.train_labels[:overfitting.EXAMPLES]),
    attack_keys=("num_steps", "step_size"),
    seed_keys=("tf_random_seed", "np_random_seed"),
    loss=loss,
    optimizer=lambda config: TF1Momentum(schedules.learning_rate(config), config["momentum"]),
    attack_training=lambda config: config["attack_batch_norm"] == "train",
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
