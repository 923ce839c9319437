"""The `precision` config key: float32 (the original's), mixed_float16 or mixed_bfloat16; and
`training_precision`, which training alone uses, so that a model can train in bfloat16 where
that is fast while the attacks that report its robustness stay float32.

With mixed precision the layers compute in 16 bits with float32 weights; the logits, the losses
and CIFAR-10's per-image standardization stay float32 (the models give those layers a float32
policy). float16 has a narrow range: training scales its loss (Keras' LossScaleOptimizer), and
the attack scales the loss it differentiates so that small input gradients keep their sign.
"""

import keras

from common.runtime import devices

# /proc/cpuinfo's names of the instructions that compute in bfloat16. Without them oneDNN
# emulates bfloat16, at about a quarter of float32's speed (figures in benchmarks/README.md).
BFLOAT16_INSTRUCTIONS = ("avx512_bf16", "amx_bf16")
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
AUTO = "auto"  # training_precision: mixed_bfloat16 on CPUs where it beats float32

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


def cpu_computes_bfloat16(features=None):
    """Whether the CPU (with `features`, this one's by default) has bfloat16 instructions:
    AVX512_BF16 or AMX-BF16."""
    features = devices.cpu_features() if features is None else features
    return any(name in features for name in BFLOAT16_INSTRUCTIONS)


def bfloat16_beats_float32(features=None, vendor=None):
    """Whether mixed_bfloat16 runs faster than float32 on the CPU with `features` made by
    `vendor` (this one's by default): with AMX-BF16, whose tiles multiply bfloat16 matrices, and
    with AVX512_BF16 on AMD's CPUs. Intel's AVX512_BF16 without AMX ran bfloat16 slower than
    float32 (figures in benchmarks/README.md), so there float32 is kept."""
    features = devices.cpu_features() if features is None else features
    vendor = devices.cpu_vendor() if vendor is None else vendor
    return "amx_bf16" in features or ("avx512_bf16" in features and vendor == "AuthenticAMD")


def training_policy(training_precision, precision, *, on_cpu, features=None, vendor=None):
    """The policy training computes in: `training_precision` where set, `precision` where it is
    empty. "auto" is mixed_bfloat16 where training runs on CPUs where it beats float32
    (`bfloat16_beats_float32` of `features` and `vendor`, this CPU's by default) and `precision`
    elsewhere, GPUs included."""
    if training_precision == AUTO:
        fast = on_cpu and bfloat16_beats_float32(features, vendor)
        return "mixed_bfloat16" if fast else precision
    return training_precision or precision
