"""Finding checkpoints in folders that runs were killed in or that rotation empties under us."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.evaluation import robustness
from common.io import checkpoints


def small_model():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])


@pytest.fixture
def run(tmp_path):
    """A model and a manager writing `checkpoint-<step>` into tmp_path, keeping one."""
    model = small_model()
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(model=model, global_step=step)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=1,
                                         checkpoint_name="checkpoint")

    def save(number):
        step.assign(number)
        model.get_layer("dense").kernel.assign(np.full((3, 2), float(number)))
        return manager.save(checkpoint_number=number)

    return save


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path):
    model = small_model()
    manager = checkpoints.checkpoint_manager(tf.train.Checkpoint(model=model), str(tmp_path))
    older, newer = manager.save(4), manager.save(8)
    assert checkpoints.latest_checkpoint(str(tmp_path)) == newer
    data = newer + ".data-00000-of-00001"
    os.rename(data, data + ".moved")
    assert checkpoints.latest_checkpoint(str(tmp_path)) == older
    os.rename(data + ".moved", data)
    os.remove(os.path.join(tmp_path, "checkpoint"))
    with open(newer + ".index", "r+b") as index:
        index.truncate(10)
    assert checkpoints.latest_checkpoint(str(tmp_path)) == older
    os.remove(older + ".index")
    assert checkpoints.latest_checkpoint(str(tmp_path)) is None


def _loader(model):
    return lambda path: checkpoints.load_weights(model, path, lambda _: {})


def test_eval_once_moves_on_when_rotation_removes_the_checkpoint(tmp_path, run, capsys):
    first = run(1)
    model = small_model()
    rotated = []

    def load_while_rotating(path):
        if not rotated:
            rotated.append(run(2))
        _loader(model)(path)

    robustness.eval_loop(str(tmp_path), load_while_rotating, lambda: dict.fromkeys(
        ("avg_xent_nat", "avg_xent_adv", "acc_nat", "acc_adv"), 0.5), once=True)
    out = capsys.readouterr().out
    assert f"Checkpoint {first} was removed while being read, moving to the newest" in out
    assert f"Checkpoint {rotated[0]}, evaluating ..." in out
    np.testing.assert_array_equal(model.get_layer("dense").kernel.numpy(), np.full((3, 2), 2.0))


def _corrupt(path):
    with open(path + ".data-00000-of-00001", "wb") as data:
        data.write(b"not a tensor")


def test_eval_once_names_a_corrupt_newest_checkpoint(tmp_path, run):
    path = run(3)
    _corrupt(path)
    with pytest.raises(checkpoints.CheckpointUnreadable, match=f"cannot read checkpoint {path}"):
        robustness.eval_loop(str(tmp_path), _loader(small_model()), dict, once=True)


class _Stop(Exception):
    pass


def test_the_endless_loop_waits_past_an_unreadable_checkpoint(tmp_path, run, capsys,
                                                              monkeypatch):
    path = run(5)
    _corrupt(path)
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise _Stop

    monkeypatch.setattr(robustness.time, "sleep", sleep)
    with pytest.raises(_Stop):
        robustness.eval_loop(str(tmp_path), _loader(small_model()), dict)
    out = capsys.readouterr().out
    assert f"cannot read checkpoint {path}" in out and "; waiting for the next checkpoint" in out
    assert "Waiting for the next checkpoint ..." in out
