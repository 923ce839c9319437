"""What makes a challenge itself: each of mnist_challenge/ and cifar10_challenge/ describes itself
once in its `challenge.py` with a `Challenge`, and the shared drivers
(common/scripts/drivers.py) do the rest from that description."""

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from common.attacks.pgd import AttackSettings


@dataclasses.dataclass(frozen=True)
class Challenge:
    """One challenge: its model, data, pixel range, config keys, training objective and
    released models."""

    name: str
    folder: str  # holds config.json; fetch_model.py unzips the released models here
    pixel_range: tuple
    image_shape: tuple  # of one image, for summaries (the model's input may be flat)
    # create_model(config, on_cpu): the network, with the CPU-tuned layers where `on_cpu`.
    create_model: Callable[[dict, bool], Any]
    # tf1_variables(model): the released TF1 checkpoints' variable names -> the model's variables.
    tf1_variables: Callable[[Any], dict]
    load_data: Callable[[str], Any]  # data_path -> the dataset
    test_set: Callable[[Any], tuple]  # dataset -> (float32 images, int64 labels), file order
    # training_batch(dataset, step, batch_size, seed) -> the global batch (x, y) of `step`.
    training_batch: Callable[[Any, int, int, int], tuple]
    # held_out(dataset) -> (images, labels) the overfitting guard attacks, in the model's input.
    held_out: Callable[[Any], tuple]
    attack_keys: tuple  # the config keys of (steps, step size)
    seed_keys: tuple  # the config keys of (initial weights seed, data and random-starts seed)
    # loss(config, num_replicas) -> loss_fn(labels, logits, model) of one replica.
    loss: Callable[[dict, int], Callable]
    optimizer: Callable[[dict], Any]  # config -> the training optimizer
    attack_training: Callable[[dict], bool]  # config -> does training's attack use train mode
    submission_shape_text: str  # how run_attack.py prints the expected shape
    prediction_batch_size: int  # run_attack.py's batch
    model_urls: dict  # released model name -> zip URL
    published_sha256: dict  # released model name -> sha256 of its zip, where published
    paper: Any  # the paper's tables and figures for this challenge (common.evaluation.paper.Paper)

    @property
    def config_path(self):
        return os.path.join(self.folder, "config.json")

    def attack_settings(self, config):
        """The config's PGD attack."""
        steps_key, step_size_key = self.attack_keys
        return AttackSettings(config["epsilon"], config[steps_key], config[step_size_key],
                              config["random_start"], config["loss_func"], self.pixel_range)

    def training_attack_settings(self, config):
        """The attack that training_method trains on: the config's PGD, or its steps and step
        size from `training_attack`; one step of fgsm_step_size from a random start; for free
        training, the config's epsilon ball."""
        settings = self.attack_settings(config)
        if config["training_method"] == "fgsm_rs":
            return dataclasses.replace(settings, num_steps=1,
                                       step_size=config["fgsm_step_size"], random_start=True)
        if config["training_method"] == "pgd" and config["training_attack"]:
            steps, step_size = config["training_attack"]
            return dataclasses.replace(settings, num_steps=steps, step_size=float(step_size))
        return settings

    def weights_seed(self, config):
        return config[self.seed_keys[0]]

    def data_seed(self, config):
        return config[self.seed_keys[1]]

    def summary_images(self, x):
        """Images in [0, 1], NHWC, for TensorBoard."""
        low, high = self.pixel_range
        return (tf.reshape(x, (-1, *self.image_shape)) - low) / (high - low)
