"""What makes a challenge itself: each of mnist_challenge/ and cifar10_challenge/ describes itself
once in its `challenge.py` with a `Challenge`, and the shared drivers
(common/scripts/drivers.py) do the rest from that description."""

import dataclasses
import os
from typing import Any

import tensorflow as tf

from common.attacks.pgd import AttackSettings
from common.training import objectives, schedules, steps


@dataclasses.dataclass(frozen=True)
class Challenge:
    """One challenge: its facts as fields, its model, data and training as methods. Each
    challenge is a subclass that overrides the methods whose default does not fit it."""

    name: str
    folder: str  # holds config.json; fetch_model.py unzips the released models here
    pixel_range: tuple
    image_shape: tuple  # of one image, for summaries and Square (the model's input may be flat)
    attack_keys: tuple  # the config keys of (steps, step size)
    seed_keys: tuple  # the config keys of (initial weights seed, data and random-starts seed)
    submission_shape_text: str  # how run_attack.py prints the expected shape
    prediction_batch_size: int  # run_attack.py's batch
    model_urls: dict  # released model name -> zip URL
    published_sha256: dict  # released model name -> sha256 of its zip, where published
    paper: Any  # the paper's tables and figures for this challenge (common.evaluation.paper)

    def create_model(self, config, on_cpu):
        """The network of `config`, with the CPU-tuned layers where `on_cpu`."""
        raise NotImplementedError

    def tf1_variables(self, model):
        """The released TF1 checkpoints' variable names -> the model's variables."""
        raise NotImplementedError

    def load_data(self, data_path):
        """The dataset in `data_path` (its official files, downloaded where missing)."""
        raise NotImplementedError

    def training_batch(self, data, step, batch_size, seed):
        """The global training batch (x, y) of `step`."""
        raise NotImplementedError

    def held_out(self, data, examples):
        """The first `examples` (images, labels) the overfitting guard attacks, in the model's
        input shape."""
        raise NotImplementedError

    def optimizer(self, config):
        """The training optimizer."""
        raise NotImplementedError

    def test_set(self, data):
        """(float32 images, int64 labels) of the test set, in file order."""
        return data.test_images.astype("float32"), data.test_labels

    def loss(self, config, num_replicas):
        """loss_fn(labels, logits, model) of one replica; by default the cross-entropy summed
        over the batch (MNIST's objective)."""
        return objectives.summed_xent

    def attack_training(self, config):
        """Whether training's attack runs the model in training mode (its batch norm)."""
        return False

    def learning_rate(self, config):
        """The config's learning rate schedule."""
        return schedules.learning_rate(config["learning_rate_schedule"],
                                       config["step_size_schedule"])

    @property
    def config_path(self):
        return os.path.join(self.folder, "config.json")

    def attack_settings(self, config):
        """The config's PGD attack."""
        steps_key, step_size_key = self.attack_keys
        return AttackSettings(epsilon=config["epsilon"], steps=config[steps_key],
                              step_size=config[step_size_key], random_start=config["random_start"],
                              loss=config["loss_func"], pixel_range=self.pixel_range)

    def training_attack_settings(self, config):
        """The attack that training_method trains on (steps.training_settings): the config's
        PGD, or its steps and step size from `training_attack` (for pgd and trades); one step of
        fgsm_step_size from a random start (fgsm_rs, nfgsm); for free training, the config's
        epsilon ball."""
        return steps.training_settings(self.attack_settings(config), config["training_method"],
                                       fgsm_step_size=config["fgsm_step_size"],
                                       attack_steps=config["training_attack"])

    def weights_seed(self, config):
        return config[self.seed_keys[0]]

    def data_seed(self, config):
        return config[self.seed_keys[1]]

    def summary_images(self, x):
        """Images in [0, 1], NHWC, for TensorBoard."""
        low, high = self.pixel_range
        return (tf.reshape(x, (-1, *self.image_shape)) - low) / (high - low)
