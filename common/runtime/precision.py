"""The `precision` config key: float32 (the original's), mixed_float16 or mixed_bfloat16.

With mixed precision the layers compute in 16 bits with float32 weights; the logits, the losses
and CIFAR-10's per-image standardization stay float32 (the models give those layers a float32
policy). float16 has a narrow range: training scales its loss (Keras' LossScaleOptimizer), and
the attack scales the loss it differentiates so that small input gradients keep their sign.
"""

import keras

# The attack's gradient sign is the same for any positive multiple of the loss; scaled by 2^10,
# gradients down to about 6e-11 instead of 6e-8 survive float16.
FLOAT16_ATTACK_LOSS_SCALE = 1024.0


def set_precision(name):
    """Makes `name` (float32, mixed_float16 or mixed_bfloat16) the policy of every model built
    from now on."""
    keras.mixed_precision.set_global_policy(name)


def computes_in_float16():
    return keras.mixed_precision.global_policy().compute_dtype == "float16"


def training_optimizer(optimizer):
    """`optimizer`, wrapped in dynamic loss scaling where the policy computes in float16."""
    if computes_in_float16():
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
