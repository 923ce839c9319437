"""The JSON config of each challenge: loading, `--KEY=VALUE` overrides and validation.

Each challenge keeps the original's `config.json` beside its scripts. That file fixes which keys
exist and their types (keys starting with `_`, like the original's `_comment`, are notes and
ignored); every script takes `--config=PATH` and one absl flag per key, so any value
can be changed on the command line. Everything is checked before any work starts.
"""

import json
import os

from absl import flags

from common.attacks.losses import PGD_LOSSES
from common.runtime import precision
from common.runtime.errors import UserError
from common.training import overfitting
from common.training.schedules import SHAPES as SCHEDULE_SHAPES
from common.training.steps import METHODS as TRAINING_METHODS

FLAGS = flags.FLAGS

PATH_KEYS = ("model_dir", "data_path", "store_adv_path")
TEST_SET_SIZE = 10000
# The keys that fix the network's shape: a checkpoint loads only into the architecture it was
# trained with, so the config.json that training saves in model_dir decides them.
ARCHITECTURE_KEYS = ("filters",)
# What the help of a list flag shows as an example.
EXAMPLES = {"filters": [16, 16, 32, 64], "step_size_schedule": [[0, 0.1], [40000, 0.01]],
            "training_attack": [3, 0.2]}


def _non_empty(value):
    return None if value else "must not be empty"


def _at_least(lowest):
    def check(value):
        return None if value >= lowest else f"must be at least {lowest}, got {value}"

    return check


def _between(lowest, highest):
    def check(value):
        if lowest <= value <= highest:
            return None
        return f"must be between {lowest} and {highest}, got {value}"

    return check


def _one_of(*choices):
    def check(value):
        shown = ", ".join(choice or '""' for choice in choices)
        return None if value in choices else f"must be one of {shown}, got {value!r}"

    return check


def _step_size_schedule(schedule):
    """[[0, lr0], [step1, lr1], ...]: steps whole, rising from 0; rates not negative, one of
    them positive (the cyclic schedule starts and ends at 0)."""
    if not schedule or not all(isinstance(pair, list) and len(pair) == 2 for pair in schedule):
        return "must be a non-empty list of [step, learning_rate] pairs"
    steps = [pair[0] for pair in schedule]
    if any(not _is_int(step) for step in steps) or steps[0] != 0:
        return "must start at step 0 and use whole step numbers"
    if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        return "must have rising step boundaries"
    if any(not _is_number(pair[1]) or pair[1] < 0 for pair in schedule):
        return "must have learning rates that are not negative"
    if not any(pair[1] > 0 for pair in schedule):
        return "must have a positive learning rate"
    return None


def _positive(value):
    return None if value > 0 else f"must be positive, got {value}"


def _training_attack(pair):
    """[] or [steps, step_size]."""
    if not pair:
        return None
    if len(pair) != 2 or not _is_int(pair[0]) or pair[0] < 0 or not _is_number(pair[1]) \
            or pair[1] < 0:
        return f"must be [] or [steps, step_size], not negative, got {pair}"
    return None


def _filters(widths):
    if len(widths) != 4 or not all(_is_int(width) and width > 0 for width in widths):
        return f"must be four positive whole numbers, got {widths}"
    return None


SEED = _between(0, 2**32 - 1)

# key: (type, check or None, help). A config's keys are those of the challenge's own config.json.
RULES = {
    "model_dir": (str, _non_empty, "Folder of the checkpoints and summaries; the other scripts "
                  "read the model there (their own checkpoints or a released TF1 one)."),
    "data_path": (str, _non_empty, "Folder of the dataset's official files; missing ones are "
                  "downloaded there."),
    "store_adv_path": (str, _non_empty, "The attack file (.npy) pgd_attack.py writes and "
                       "run_attack.py checks and scores."),
    "random_seed": (int, SEED, "Seeds the initial weights, the data order and the random "
                    "starts."),
    "tf_random_seed": (int, SEED, "Seeds the initial weights."),
    "np_random_seed": (int, SEED, "Seeds the data order, the augmentation and the random "
                       "starts."),
    "max_num_training_steps": (int, _at_least(0), "Training steps."),
    "num_output_steps": (int, _at_least(1), "Steps between printed training reports."),
    "num_summary_steps": (int, _at_least(1), "Steps between TensorBoard summaries."),
    "num_checkpoint_steps": (int, _at_least(1), "Steps between checkpoints (3 kept)."),
    "training_batch_size": (int, _at_least(1), "Global training batch, split over the "
                            "devices."),
    "num_eval_examples": (int, _between(1, TEST_SET_SIZE), "Test examples that eval.py and "
                          "pgd_attack.py attack (the first ones, in file order)."),
    "eval_batch_size": (int, _at_least(1), "Batch size of eval.py and pgd_attack.py."),
    "eval_on_cpu": (bool, None, "eval.py runs on the CPU, leaving the GPUs to training."),
    "epsilon": (float, _at_least(0), "L-infinity radius of the attack, in pixel units."),
    "k": (int, _at_least(0), "PGD steps."),
    "num_steps": (int, _at_least(0), "PGD steps."),
    "a": (float, _at_least(0), "PGD step size."),
    "step_size": (float, _at_least(0), "PGD step size."),
    "random_start": (bool, None, "PGD starts at a uniformly random point of the epsilon ball."),
    "loss_func": (str, _one_of(*PGD_LOSSES), "Attack loss: xent (cross-entropy), cw (the "
                  "CW margin loss, confidence 50), margin (the same, confidence 0) or targeted "
                  "(towards the most likely wrong class)."),
    "weight_decay": (float, _at_least(0), "Weight decay on the conv and dense kernels."),
    "momentum": (float, _between(0, 1), "Momentum of TF1's MomentumOptimizer."),
    "step_size_schedule": (list, _step_size_schedule, "Learning rates as [[0, rate], [step, "
                           "rate], ...], read as learning_rate_schedule says."),
    "learning_rate_schedule": (str, _one_of(*SCHEDULE_SHAPES), "How step_size_schedule is "
                               "read: piecewise_constant (each rate holds up to and including "
                               "the next step) or piecewise_linear (rates interpolated between "
                               "the steps, the last one held)."),
    "training_method": (str, _one_of(*TRAINING_METHODS), "pgd (the original: train on the "
                        "config's PGD attack), fgsm_rs (one step of fgsm_step_size from a "
                        "random start), nfgsm (de Jorge et al., 2022: one step of "
                        "fgsm_step_size from a start twice epsilon wide, not projected back "
                        "onto the epsilon ball), free (each batch replayed replay_m times, the "
                        "perturbation carried over) or trades (Zhang et al., 2019: the loss on "
                        "the clean batch plus trades_beta times the KL divergence at the "
                        "config's PGD steps)."),
    "training_attack": (list, _training_attack, "[steps, step_size] of the PGD that "
                        "training_method pgd (or trades) trains on, for a few-step attack in "
                        "training while the scripts evaluate with the config's own; [] trains "
                        "on the config's own attack, as the original."),
    "fgsm_step_size": (float, _positive, "Step size of fgsm_rs and nfgsm, in pixel units "
                       "(Wong et al.: 1.25 epsilon for fgsm_rs; de Jorge et al.: epsilon for "
                       "nfgsm)."),
    "trades_beta": (float, _at_least(0), "Weight of the KL term of training_method trades "
                    "(Zhang et al.: 6.0)."),
    "gradalign_weight": (float, _at_least(0), "Weight of GradAlign's penalty (Andriushchenko "
                         "& Flammarion, 2020: 1 - cos of the input gradients at the clean "
                         "batch and at a uniform point of the epsilon ball) added to the "
                         "training loss of any training_method but free; 0 turns it off."),
    "awp_gamma": (float, _at_least(0), "Size of AWP's weight perturbation (Wu et al., 2020: "
                  "each kernel moved by this fraction of its norm along the training loss's "
                  "gradient before the update's gradient is taken; their TRADES-AWP: 0.005) "
                  "for any training_method; 0 turns it off."),
    "replay_m": (int, _at_least(1), "Replays of each batch in free training; "
                 "max_num_training_steps counts replays."),
    "epsilon_ramp_steps": (int, _at_least(0), "Training's epsilon, and its step sizes, rise "
                           "linearly from 0 to epsilon over these first steps (0: none)."),
    "overfitting_check_steps": (int, _at_least(0), "Steps between the catastrophic-overfitting "
                                f"checks (PGD-{overfitting.STEPS} on a held-out batch; a drop "
                                f"of more than {overfitting.MAX_DROP} stops training and keeps "
                                "the weights of the check before); 0 turns them off."),
    "overfitting_check_examples": (int, _at_least(1), "Held-out images each overfitting "
                                   "check attacks, a multiple of the replicas."),
    "filters": (list, _filters, "The four widths of the residual network: [16, 160, 320, 640] "
                "(wide) or [16, 16, 32, 64] (simple)."),
    "attack_batch_norm": (str, _one_of("train", "eval"), "Batch norm during the training "
                          "attack: train (batch statistics, as the original) or eval (moving "
                          "averages)."),
    "jit_compile": (bool, None, "Compile the attack and the training step with XLA."),
    "precision": (str, _one_of(*precision.POLICIES), "float32, mixed_float16 or mixed_bfloat16."),
    "training_precision": (str, _one_of("", *precision.POLICIES, precision.AUTO),
                           "What train.py alone computes in: empty (as precision), float32, "
                           "mixed_float16, mixed_bfloat16, or auto (mixed_bfloat16 on CPUs where "
                           "it beats float32: AMX, or AVX512_BF16 on AMD; precision elsewhere)."),
}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed(key, value):
    """Returns `value` as the key's type (an int is a fine float), or raises UserError."""
    kind = RULES[key][0]
    if kind is float and _is_number(value):
        return float(value)
    if kind is int and _is_int(value):
        return value
    if kind in (bool, str, list) and type(value) is kind:
        return value
    raise UserError(f"config key '{key}' must be of type {kind.__name__}, got {value!r}")


def _read_json(path):
    try:
        with open(path) as config_file:
            values = json.load(config_file)
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror}") from error
    except json.JSONDecodeError as error:
        raise UserError(f"config file {path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a JSON object")
    return {key: value for key, value in values.items() if not key.startswith("_")}


def _read_with_paths(path):
    """A config file's values, its relative paths made relative to the file's folder."""
    values = _read_json(path)
    folder = os.path.dirname(os.path.abspath(path))
    for key in PATH_KEYS:
        if isinstance(values.get(key), str) and values[key]:
            values[key] = os.path.join(folder, values[key])
    return values


def define_flags(default_config_path, flag_values=FLAGS):
    """Defines `--config` and one override flag per key of the challenge's own config.json."""
    flags.DEFINE_string("config", default_config_path, "Path of the JSON config file; keys it "
                        "leaves out take the challenge's config.json values.",
                        flag_values=flag_values)
    for key in _read_json(default_config_path):
        kind, _, meaning = RULES[key]
        if kind is bool:
            flags.DEFINE_boolean(key, None, meaning, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(key, None, meaning, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(key, None, meaning, flag_values=flag_values)
        elif kind is list:
            flags.DEFINE_string(key, None, f"{meaning} Given as JSON, such as "
                                f"--{key}='{json.dumps(EXAMPLES[key])}'.", flag_values=flag_values)
        else:
            flags.DEFINE_string(key, None, meaning, flag_values=flag_values)


def shown_value(key, value):
    """A config value as it is written on the command line."""
    return json.dumps(value) if RULES[key][0] is list else value


def _overrides(keys, flag_values):
    """Config values given as flags. Paths given on the command line are relative to the cwd."""
    values = {}
    for key in keys:
        value = flag_values[key].value
        if value is None:
            continue
        if RULES[key][0] is list:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise UserError(f"--{key} must be a JSON list, got {value!r}") from error
        if key in PATH_KEYS and value:
            value = os.path.abspath(value)
        values[key] = value
    return values


def load_config(flag_values=FLAGS, check=True):
    """The config selected by `--config`, with the flag overrides applied, checked (unless not
    `check`: the values as they come, for `--help`).

    Keys missing from the file take the challenge's defaults; relative paths in the file are
    relative to the file's folder. A `model_dir` holding the config.json that training saved
    there gives the architecture keys (ARCHITECTURE_KEYS).
    """
    defaults = _read_with_paths(flag_values["config"].default)
    path = os.path.abspath(flag_values.config)
    values = _read_with_paths(path)
    for key in values:
        if key not in defaults:
            raise UserError(f"unknown config key '{key}' in {path}")
    overrides = _overrides(defaults, flag_values)
    config = {**defaults, **values, **overrides}
    if not check:
        return config
    return _check_paths(_with_saved_architecture(validate(config), overrides))


def read_config_file(path):
    """A config file's values as they are (paths made relative to its folder), unchecked."""
    return _read_with_paths(path)


def _with_saved_architecture(config, overrides):
    """`config` with the architecture keys of the config.json saved in its model_dir, where there
    is one: the checkpoints there fit no other architecture. A flag giving another value is
    refused."""
    saved_path = os.path.join(config["model_dir"], "config.json")
    if not os.path.isfile(saved_path):
        return config
    saved = _read_json(saved_path)
    for key in ARCHITECTURE_KEYS:
        if key not in config or key not in saved:
            continue
        try:
            value = validate({key: saved[key]})[key]
        except UserError as error:
            raise UserError(f"{saved_path}: {error}") from error
        if key in overrides and overrides[key] != value:
            raise UserError(f"--{key}={shown_value(key, overrides[key])} does not fit the model "
                            f"in {config['model_dir']}: it was trained with {key} "
                            f"{shown_value(key, value)} ({saved_path})")
        config[key] = value
    return config


def default_config(path):
    """The config file at `path` as it is, checked (no flags)."""
    return _check_paths(validate(_read_with_paths(path)))


def _check_paths(config):
    """Refuses a file where a folder belongs and a folder where a file belongs."""
    for key in ("model_dir", "data_path"):
        if os.path.exists(config[key]) and not os.path.isdir(config[key]):
            raise UserError(f"config key '{key}' must name a folder, {config[key]} is a file")
    if os.path.isdir(config["store_adv_path"]):
        raise UserError(f"config key 'store_adv_path' must name a file, "
                        f"{config['store_adv_path']} is a folder")
    return config


def validate(config):
    """Returns the config with each value of its key's type, or raises UserError."""
    checked = {}
    for key, value in config.items():
        if key not in RULES:
            raise UserError(f"unknown config key '{key}'")
        checked[key] = _typed(key, value)
        check = RULES[key][1]
        problem = check(checked[key]) if check else None
        if problem:
            raise UserError(f"config key '{key}' {problem}")
    if checked.get("gradalign_weight") and checked.get("training_method") == "free":
        raise UserError(f"config key 'gradalign_weight' must be 0 with training_method free, "
                        f"whose perturbation is carried over, not drawn; got "
                        f"{checked['gradalign_weight']}")
    return checked
