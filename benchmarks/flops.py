"""Counts the floating-point operations behind the benchmarks' GFLOP/s figures: 2 x the
multiply-adds of every Conv2D and Dense layer (elementwise work is not counted). Per example, an
attack step is a forward pass and an input gradient of the same cost, and an adversarial
training step is the attack, then a forward pass and a backward pass (input and weight
gradients); TRADES' and GradAlign's steps are counted the same way, pass by pass. Run as a
script, it prints these counts for the MNIST network and the simple and wide CIFAR-10 networks
(nothing is timed): `python benchmarks/flops.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from absl import flags

from benchmarks import cli

NETWORKS = ("mnist", "simple", "wide")


def forward_flops_per_example(model):
    """2 x multiply-adds of every Conv2D and Dense layer (elementwise work is not counted)."""
    total = 0
    for layer in model.layers:
        kind = type(layer).__mro__
        if any(cls.__name__ == "Conv2D" for cls in kind):
            output_area = np.prod(layer.output.shape[1:3])
            kernel = np.prod(layer.kernel.shape)
            total += 2 * output_area * kernel
        elif any(cls.__name__ == "Dense" for cls in kind):
            total += 2 * np.prod(layer.kernel.shape)
    return int(total)


def attack_flops_per_example(model, steps):
    """Each step is a forward pass and an input gradient of the same cost."""
    return 2 * steps * forward_flops_per_example(model)


def training_flops_per_example(model, steps):
    """The attack, then a forward pass and a backward pass (input and weight gradients)."""
    return attack_flops_per_example(model, steps) + 3 * forward_flops_per_example(model)


def trades_flops_per_example(model, steps):
    """TRADES: the clean forward pass the attack's KL starts from, the attack, then forward
    passes at the clean and the attacked batch and a backward pass through both."""
    return (attack_flops_per_example(model, steps) + 7 * forward_flops_per_example(model))


def gradalign_flops_per_example(model):
    """GradAlign's penalty: an input gradient at the clean batch (a forward pass and an input
    gradient), one at the uniform point, and the backward pass through that forward pass and
    input gradient (input and weight gradients of both)."""
    return 8 * forward_flops_per_example(model)


def awp_flops_per_example(model, method):
    """AWP's perturbation: the method's loss again (for trades forward passes at the clean and
    the attacked batch; else at the attacked batch) and its backward pass for the weights'
    gradient (counted as input and weight gradients)."""
    return (6 if method == "trades" else 3) * forward_flops_per_example(model)


def _define_flags():
    flags.DEFINE_list("networks", list(NETWORKS),
                      f"the networks to count, of {', '.join(NETWORKS)}")
    flags.DEFINE_integer("mnist_steps", 40, "attack steps of the MNIST training step counted",
                         lower_bound=1)
    flags.DEFINE_integer("cifar10_steps", 10, "attack steps of the CIFAR-10 training steps "
                         "counted", lower_bound=1)
    flags.register_validator("networks", cli.choices_validator(NETWORKS),
                             f"give one or more of {', '.join(NETWORKS)}, separated by commas")


def _model(network):
    if network == "mnist":
        from mnist_challenge import model as mnist_model

        return mnist_model.Model()
    from cifar10_challenge import model as cifar_model

    filters = cifar_model.SIMPLE_FILTERS if network == "simple" else cifar_model.WIDE_FILTERS
    return cifar_model.Model("eval", filters)


def main():
    values = flags.FLAGS
    for network in values.networks:
        model = _model(network)
        steps = values.mnist_steps if network == "mnist" else values.cifar10_steps
        forward = forward_flops_per_example(model)
        print(f"{network:6s} forward pass {forward / 1e6:10.2f} MFLOP per example, attack step "
              f"{2 * forward / 1e6:10.2f} MFLOP, training step with a {steps}-step attack "
              f"{training_flops_per_example(model, steps) / 1e9:8.3f} GFLOP")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
