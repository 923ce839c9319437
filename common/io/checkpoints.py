"""Checkpoints: the ones training writes (`checkpoint-<step>`, 3 kept) and the released TF1 ones.

Training saves model, optimizer and global step as a TF2 object checkpoint, so a run resumes
where it stopped. Evaluation and attack scripts also accept a folder holding a checkpoint of the
original TF1 code (the released challenge models): its variables are read by name through a
mapping each model provides, with a clear error when a name or a shape does not match.
"""

import glob
import hashlib
import os
import re

import tensorflow as tf

from common.runtime.errors import UserError

MAX_TO_KEEP = 3
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
GLOBAL_STEP_KEY = "global_step/.ATTRIBUTES/VARIABLE_VALUE"
# What reading a removed, truncated or corrupt checkpoint raises (IndexError: a short data file).
READ_ERRORS = (tf.errors.OpError, IndexError)


class CheckpointUnreadable(UserError):
    """A checkpoint that cannot be read: removed by rotation, half-written or corrupt."""


def is_complete(path):
    """True where the checkpoint's index and every data shard it names are on disk."""
    shards = [re.search(r"\.data-\d{5}-of-(\d{5})$", name)
              for name in glob.glob(glob.escape(path) + ".data-*-of-*")]
    shards = [shard for shard in shards if shard]
    if not os.path.exists(path + ".index") or not shards:
        return False
    count = int(shards[0].group(1))
    return all(os.path.exists(f"{path}.data-{shard:05d}-of-{count:05d}") for shard in range(count))


def _readable(path):
    try:
        _reader(path)
    except CheckpointUnreadable:
        return False
    return True


def latest_checkpoint(model_dir):
    """The newest complete checkpoint prefix in `model_dir`, or None.

    Follows the `checkpoint` state file, which TensorFlow rewrites atomically once a checkpoint is
    whole. Where the file is missing or names a path that is not there (a zip made on another
    machine holds absolute paths), the highest-numbered `*-<step>` that is complete and readable
    wins, so a checkpoint half-written when a run was killed is never chosen.
    """
    path = tf.train.latest_checkpoint(model_dir)
    if path and is_complete(path):
        return path
    steps = []
    for index_file in glob.glob(os.path.join(glob.escape(model_dir), "*-*.index")):
        match = re.search(r"-(\d+)\.index$", index_file)
        if match:
            steps.append((int(match.group(1)), index_file[: -len(".index")]))
    for _, path in sorted(steps, reverse=True):
        if is_complete(path) and _readable(path):
            return path
    return None


def _unreadable(path, error):
    reason = str(error).strip().splitlines()[0]
    return CheckpointUnreadable(f"cannot read checkpoint {path}: {reason}")


def _reader(path):
    try:
        return tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as error:
        raise _unreadable(path, error) from error


def is_tf1_checkpoint(path):
    """True for checkpoints of the original TF1 code, which have no object graph."""
    return OBJECT_GRAPH_KEY not in _reader(path).get_variable_to_shape_map()


def fingerprint(path):
    """The SHA-256 (hex) of the checkpoint's variable values, each as its dtype, shape and bytes,
    in the order of their names: the same weights give the same fingerprint whatever the files
    are called or wherever they are."""
    reader = _reader(path)
    digest = hashlib.sha256()
    for name in sorted(reader.get_variable_to_shape_map()):
        if name == OBJECT_GRAPH_KEY:
            continue
        try:
            value = reader.get_tensor(name)
        except READ_ERRORS as error:
            raise _unreadable(path, error) from error
        digest.update(f"{value.dtype.str}{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def training_checkpoint(model, optimizer, global_step, **state):
    """What a training run saves and resumes from; `state` names what else it must keep (free
    training's perturbation, the overfitting guard's memory)."""
    return tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=global_step,
                               **state)


def checkpoint_manager(checkpoint, model_dir):
    """Writes `model_dir/checkpoint-<step>`, keeping the newest three like the original Saver."""
    return tf.train.CheckpointManager(checkpoint, model_dir, max_to_keep=MAX_TO_KEEP,
                                      checkpoint_name="checkpoint")


def global_step_of(path):
    """The global step stored in a checkpoint of either kind (0 where there is none)."""
    reader = _reader(path)
    for key in (GLOBAL_STEP_KEY, "global_step"):
        if reader.has_tensor(key):
            try:
                return int(reader.get_tensor(key))
            except READ_ERRORS as error:
                raise _unreadable(path, error) from error
    return 0


def load_tf1_weights(path, variables_by_name):
    """Assigns each Keras variable the value of the TF1 variable of the given name."""
    reader = _reader(path)
    shapes = reader.get_variable_to_shape_map()
    for name, variable in variables_by_name.items():
        if name not in shapes:
            raise UserError(f"TF1 checkpoint {path} has no variable '{name}' for {variable.path}")
        if tuple(shapes[name]) != tuple(variable.shape):
            raise UserError(
                f"TF1 checkpoint {path}: variable '{name}' has shape {tuple(shapes[name])}, "
                f"the model's {variable.path} needs {tuple(variable.shape)}")
        try:
            variable.assign(reader.get_tensor(name))
        except READ_ERRORS as error:
            raise _unreadable(path, error) from error


def load_weights(model, path, tf1_variables):
    """Loads the model's weights from a checkpoint written by training here or by the TF1 code.

    `tf1_variables(model)` maps TF1 variable names to the model's variables.
    """
    if is_tf1_checkpoint(path):
        load_tf1_weights(path, tf1_variables(model))
        return
    try:
        status = tf.train.Checkpoint(model=model).read(path).expect_partial()
        status.assert_existing_objects_matched()
    except READ_ERRORS as error:
        raise _unreadable(path, error) from error
    except (AssertionError, ValueError) as error:
        raise UserError(f"checkpoint {path} does not fit this model: {_mismatch(error)}") \
            from error


def _mismatch(error):
    """What TensorFlow's long error for a weight of the wrong shape says, in one short line
    (its message goes on to print the weight's every value)."""
    text = str(error)
    shapes = re.search(r"variable\.shape=(\(.*?\)), Received: value\.shape=(\(.*?\))", text)
    name = re.search(r"<Variable path=([^,]+),", text)
    if not shapes:
        return text.strip().splitlines()[0][:300]
    where = f"{name.group(1)} " if name else "a weight "
    return (f"{where}has shape {shapes.group(1)} in the model, {shapes.group(2)} in the "
            "checkpoint; was it trained with other architecture settings (filters)?")


def load_latest_weights(model, model_dir, tf1_variables):
    """Loads the newest checkpoint of `model_dir`; returns its path, or None where there is none."""
    path = latest_checkpoint(model_dir)
    if path is not None:
        load_weights(model, path, tf1_variables)
    return path


def require_latest_weights(model, model_dir, tf1_variables, message):
    """Loads the newest checkpoint of `model_dir`, or raises UserError(message) where none is."""
    path = load_latest_weights(model, model_dir, tf1_variables)
    if path is None:
        raise UserError(message)
    return path
