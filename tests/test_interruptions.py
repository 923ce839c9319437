"""Real MNIST scripts under kills and rotation: a training run killed with SIGKILL at random
moments resumes and ends exactly as an uninterrupted one; eval.py reads a folder whose
checkpoints the trainer is rotating; broken data and model folders are named."""

import glob
import os
import random
import subprocess
import sys
import time

import numpy as np
from conftest import REPO, run_script
from test_mnist_training import checkpoint_values

MAX_STEPS = 12
TRAINING = ("--epsilon=0.1", "--k=5", "--a=0.02", "--training_batch_size=20",
            f"--max_num_training_steps={MAX_STEPS}", "--num_checkpoint_steps=2",
            "--num_output_steps=1000", "--num_summary_steps=4")


def training_command(model_dir, mnist_data, *extra):
    return [sys.executable, os.path.join(REPO, "mnist_challenge/train.py"),
            f"--model_dir={model_dir}", f"--data_path={mnist_data}", *TRAINING, *extra]


def checkpoint_steps(model_dir):
    return sorted(int(path.rsplit("-", 1)[1][: -len(".index")])
                  for path in glob.glob(os.path.join(model_dir, "checkpoint-*.index")))


def wait_for_new_checkpoint(process, model_dir, known, timeout=120):
    deadline = time.monotonic() + timeout
    while not set(checkpoint_steps(model_dir)) - set(known):
        assert process.poll() is None, "the run ended before writing a new checkpoint"
        assert time.monotonic() < deadline, "no new checkpoint"
        time.sleep(0.05)


def test_a_run_killed_at_random_moments_ends_as_an_uninterrupted_one(tmp_path, mnist_data):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    subprocess.run(training_command(whole, mnist_data), check=True, capture_output=True)
    rng = random.Random()
    kills = []
    for _ in range(3):
        process = subprocess.Popen(training_command(killed, mnist_data),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_new_checkpoint(process, killed, checkpoint_steps(killed))
        delay = rng.uniform(0, 0.6)
        time.sleep(delay)
        process.kill()
        process.wait()
        kills.append((round(delay, 2), checkpoint_steps(killed)))
    assert len(kills) == 3 and kills[-1][1][-1] < MAX_STEPS, kills
    final = subprocess.run(training_command(killed, mnist_data), capture_output=True, text=True)
    assert final.returncode == 0, (kills, final.stderr)
    assert "Resuming from " in final.stdout, kills
    expected = checkpoint_values(f"{whole}/checkpoint-{MAX_STEPS}")
    resumed = checkpoint_values(f"{killed}/checkpoint-{MAX_STEPS}")
    assert int(resumed["global_step/.ATTRIBUTES/VARIABLE_VALUE"]) == MAX_STEPS
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=f"{name} {kills}")


def test_eval_once_reads_a_folder_the_trainer_is_rotating(tmp_path, mnist_data):
    model_dir = str(tmp_path / "run")
    trainer = subprocess.Popen(
        training_command(model_dir, mnist_data, "--num_checkpoint_steps=1",
                         "--max_num_training_steps=400", "--k=1", "--training_batch_size=10"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_new_checkpoint(trainer, model_dir, [0])
        for _ in range(2):
            result = run_script("mnist_challenge/eval.py", f"--model_dir={model_dir}",
                                f"--data_path={mnist_data}", "--once", "--k=1",
                                "--num_eval_examples=20", "--eval_batch_size=20")
            assert result.returncode == 0, result.stderr
            assert ", evaluating ..." in result.stdout and "adversarial: " in result.stdout
        assert trainer.poll() is None, "the trainer stopped rotating before the evaluations ended"
        assert len(checkpoint_steps(model_dir)) <= 4
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
    assert result.returncode == 1
    assert "t10k-images-idx3-ubyte.gz" in result.stderr and "Traceback" not in result.stderr


def test_a_model_folder_with_no_usable_checkpoint_is_named(tmp_path, mnist_data, mnist_fixture):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in os.listdir(mnist_fixture):
        content = open(os.path.join(mnist_fixture, name), "rb").read()
        (model_dir / name).write_bytes(content[:1000] if ".data-" in name else content)
    result = run_script("mnist_challenge/pgd_attack.py", f"--model_dir={model_dir}",
                        f"--data_path={mnist_data}", "--num_eval_examples=10")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors and f"cannot read checkpoint {model_dir}/checkpoint-300" in errors[0], \
        result.stderr
