"""Trains the MNIST challenge model with PGD adversarial training, saving checkpoints and
TensorBoard summaries in `model_dir` along the way, and resuming from the newest checkpoint."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cli

cli.quiet_tensorflow()

import keras
import tensorflow as tf

from common import config as config_lib, precision, training
from common.pgd import LinfPGDAttack
from mnist_challenge import mnist_input, model as mnist_model


def summed_xent(labels, logits, model):
    """The original's objective: cross-entropy summed over the batch (Adam takes it as is)."""
    return tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def main(argv):
    config = config_lib.load_config()
    precision.set_precision(config)
    keras.utils.set_random_seed(config["random_seed"])
    mnist = mnist_input.MNISTData(config["data_path"])
    batch_size = config["training_batch_size"]

    def batch_for_step(step):
        indices = mnist_input.batch_indices(step, batch_size, len(mnist.train_labels),
                                            config["random_seed"])
        return mnist.train_images[indices], mnist.train_labels[indices]

    strategy = training.make_strategy()
    with strategy.scope():
        model = mnist_model.create_model()
        optimizer = precision.training_optimizer(
            keras.optimizers.Adam(learning_rate=1e-4, epsilon=1e-8))
    attack = LinfPGDAttack(model, config["epsilon"], config["k"], config["a"],
                           config["random_start"], config["loss_func"])
    train_step = training.TrainStep(strategy, model, optimizer, attack, summed_xent,
                                    jit_compile=config["jit_compile"])
    training.train(config, train_step, batch_for_step, config["random_seed"],
                   to_images=lambda x: tf.reshape(x, (-1, 28, 28, 1)))


if __name__ == "__main__":
    cli.run(main, __file__)
