"""Trains the CIFAR-10 challenge model with PGD adversarial training, saving checkpoints and
TensorBoard summaries in `model_dir` along the way, and resuming from the newest checkpoint."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cli

cli.quiet_tensorflow()

import keras
import tensorflow as tf

from cifar10_challenge import cifar10_input, model as cifar_model
from common import config as config_lib, precision, training
from common.momentum import TF1Momentum
from common.pgd import LinfPGDAttack


def learning_rate_schedule(step_size_schedule):
    """TF1's piecewise_constant on the global step: the old rate holds at a boundary."""
    boundaries = [step for step, _ in step_size_schedule[1:]]
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [rate for _, rate in step_size_schedule])


def original_loss(weight_decay, global_batch_size, num_replicas):
    """Mean cross-entropy of the global batch plus `weight_decay * sum(w**2) / 2` over the conv
    and dense kernels, split so that the replicas' losses add up to it (decay added once)."""

    def loss(labels, logits, model):
        xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        decay = tf.add_n([tf.nn.l2_loss(kernel) for kernel in cifar_model.decayed_kernels(model)])
        return tf.reduce_sum(xent) / global_batch_size + weight_decay * decay / num_replicas

    return loss


def main(argv):
    config = config_lib.load_config()
    precision.set_precision(config)
    keras.utils.set_random_seed(config["tf_random_seed"])
    cifar = cifar10_input.CIFAR10Data(config["data_path"])
    batch_size = config["training_batch_size"]
    seed = config["np_random_seed"]

    strategy = training.make_strategy()
    with strategy.scope():
        model = cifar_model.create_model(config["filters"])
        optimizer = precision.training_optimizer(TF1Momentum(
            learning_rate_schedule(config["step_size_schedule"]), config["momentum"]))
    attack = LinfPGDAttack(model, config["epsilon"], config["num_steps"], config["step_size"],
                           config["random_start"], config["loss_func"], pixel_range=(0.0, 255.0))
    loss = original_loss(config["weight_decay"], batch_size, strategy.num_replicas_in_sync)
    train_step = training.TrainStep(strategy, model, optimizer, attack, loss,
                                    attack_training=config["attack_batch_norm"] == "train",
                                    jit_compile=config["jit_compile"])
    training.train(config, train_step,
                   lambda step: cifar10_input.training_batch(cifar, step, batch_size, seed), seed,
                   to_images=lambda x: x / 255.0)


if __name__ == "__main__":
    cli.run(main, __file__)
