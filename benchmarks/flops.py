"""Floating-point operations of a Keras model's forward pass, from its conv and dense layers."""

import numpy as np


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
