"""Real MNIST scripts under kills and rotation: a training run killed with SIGKILL mid-run
resumes and ends exactly as an uninterrupted one, for each training method; eval.py reads a
folder whose checkpoints the trainer is rotating; broken data and model folders are named.

The kills happen on checkpoint events, not on timers: each kill waits for a checkpoint chosen by
a seeded generator to appear and kills at once, while the run still has steps and checkpoints
ahead of it, so the test does the same thing on a fast or a slow machine.
"""

import glob
import os
import random
import time

import numpy as np
import pytest
from helpers import assert_one_error_line, checkpoint_values, run_script, start_script

pytestmark = pytest.mark.slow

MAX_STEPS = 16
CHECKPOINT_EVERY = 2
# Kill points: checkpoints at least 8 steps and 4 checkpoints before the end of the run.
KILL_AT = range(CHECKPOINT_EVERY, MAX_STEPS - 8 + 1, CHECKPOINT_EVERY)
KILLS_SEED = 20261123
TRAINING = ("--epsilon=0.1", "--k=5", "--a=0.02", "--training_batch_size=20",
            f"--num_checkpoint_steps={CHECKPOINT_EVERY}", "--num_output_steps=1000",
            "--num_summary_steps=4")


def training_arguments(model_dir, mnist_data, *extra):
    return [f"--model_dir={model_dir}", f"--data_path={mnist_data}", *TRAINING,
            f"--max_num_training_steps={MAX_STEPS}", *extra]


def training_process(model_dir, mnist_data, *extra):
    """train.py started, for a test to kill."""
    with open(os.devnull, "wb") as output:
        return start_script("mnist_challenge/train.py",
                            *training_arguments(model_dir, mnist_data, *extra), output=output)


def checkpoint_steps(model_dir):
    return sorted(int(path.rsplit("-", 1)[1][: -len(".index")])
                  for path in glob.glob(os.path.join(model_dir, "checkpoint-*.index")))


def wait_for_checkpoint(process, model_dir, step, timeout=300):
    """Waits until `model_dir` holds a checkpoint of `step` or later, written by `process`."""
    deadline = time.monotonic() + timeout
    while not any(found >= step for found in checkpoint_steps(model_dir)):
        assert process.poll() is None, f"the run ended before writing checkpoint-{step}"
        assert time.monotonic() < deadline, f"no checkpoint-{step} in {timeout} s"
        time.sleep(0.01)


METHODS = {
    "pgd": (),
    # with the guard, whose memory, and free's perturbation, the checkpoints must keep
    "fgsm_rs": ("--training_method=fgsm_rs", "--fgsm_step_size=0.125", "--epsilon_ramp_steps=6",
                "--overfitting_check_steps=3", "--overfitting_check_examples=60",
                "--learning_rate_schedule=piecewise_linear",
                "--step_size_schedule=[[0,0],[8,0.001],[16,0]]"),
    "free": ("--training_method=free", "--replay_m=3", "--overfitting_check_steps=4",
             "--overfitting_check_examples=60"),
}
# Kills per run: the fast methods share pgd's resume code, and one kill covers what they add.
KILLS = {"pgd": 2, "fgsm_rs": 1, "free": 1}


@pytest.mark.parametrize("method", METHODS)
def test_a_run_killed_mid_run_ends_as_an_uninterrupted_one(method, tmp_path, mnist_data):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    extra = METHODS[method]
    uninterrupted = run_script("mnist_challenge/train.py",
                               *training_arguments(whole, mnist_data, *extra))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    kill_points = sorted(random.Random(KILLS_SEED).sample(list(KILL_AT), KILLS[method]))
    for step in kill_points:
        process = training_process(killed, mnist_data, *extra)
        wait_for_checkpoint(process, killed, step)
        process.kill()
        process.wait()
        assert process.returncode == -9
        assert MAX_STEPS not in checkpoint_steps(killed), "the run ended before the kill"
    final = run_script("mnist_challenge/train.py", *training_arguments(killed, mnist_data, *extra))
    assert final.returncode == 0, (kill_points, final.stderr)
    assert "Resuming from " in final.stdout, kill_points
    expected = checkpoint_values(f"{whole}/checkpoint-{MAX_STEPS}")
    resumed = checkpoint_values(f"{killed}/checkpoint-{MAX_STEPS}")
    assert int(resumed["global_step/.ATTRIBUTES/VARIABLE_VALUE"]) == MAX_STEPS
    assert expected.keys() == resumed.keys()
    assert (method == "free") == ("free_perturbation/.ATTRIBUTES/VARIABLE_VALUE" in expected)
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=f"{name}")


def test_eval_once_reads_a_folder_the_trainer_is_rotating(tmp_path, mnist_data):
    """The trainer writes a checkpoint every step and keeps 3, for as long as the test lasts."""
    model_dir = str(tmp_path / "run")
    trainer = training_process(model_dir, mnist_data, "--num_checkpoint_steps=1",
                               "--max_num_training_steps=1000000", "--k=1",
                               "--training_batch_size=10")
    try:
        wait_for_checkpoint(trainer, model_dir, 1)
        evaluated = []
        for _ in range(2):
            result = run_script("mnist_challenge/eval.py", f"--model_dir={model_dir}",
                                f"--data_path={mnist_data}", "--once", "--k=1",
                                "--num_eval_examples=20", "--eval_batch_size=20")
            assert result.returncode == 0, result.stderr
            assert "adversarial: " in result.stdout
            evaluated.append(int(result.stdout.split(", evaluating ...")[0].rsplit("-", 1)[1]))
        assert trainer.poll() is None, "the trainer died while eval.py read its folder"
        assert len(checkpoint_steps(model_dir)) <= 4
        assert evaluated[1] > evaluated[0] >= 1
        assert min(checkpoint_steps(model_dir)) > evaluated[0], "rotation removed what was read"
    finally:
        trainer.kill()
        trainer.wait()


def test_a_truncated_data_file_is_named(tmp_path, mnist_data):
    data = tmp_path / "mnist"
    data.mkdir()
    for name in os.listdir(mnist_data):
        if name.endswith(".gz"):
            content = open(os.path.join(mnist_data, name), "rb").read()
            (data / name).write_bytes(content[: len(content) // 2]
                                      if name.startswith("t10k-images") else content)
    result = run_script("mnist_challenge/eval.py", f"--data_path={data}", "--once")
    assert_one_error_line(result, "t10k-images-idx3-ubyte.gz")


def test_a_model_folder_with_no_usable_checkpoint_is_named(tmp_path, mnist_data, mnist_fixture):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in os.listdir(mnist_fixture):
        content = open(os.path.join(mnist_fixture, name), "rb").read()
        (model_dir / name).write_bytes(content[:1000] if ".data-" in name else content)
    result = run_script("mnist_challenge/pgd_attack.py", f"--model_dir={model_dir}",
                        f"--data_path={mnist_data}", "--num_eval_examples=10")
    assert_one_error_line(result, f"cannot read checkpoint {model_dir}/checkpoint-300")
