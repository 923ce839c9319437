"""The CIFAR-10 scripts as a user runs them, on the TF1 fixture of the simple network."""

import os

import numpy as np
import pytest
from helpers import REPO, assert_one_error_line, run_script, run_side_by_side, writable_copy

from cifar10_challenge import cifar10_input

pytestmark = pytest.mark.slow

SIMPLE = "--filters=[16,16,32,64]"


@pytest.fixture
def model_dir(tmp_path, cifar_fixture):
    return writable_copy(cifar_fixture, tmp_path)


def _args(model_dir, cifar_data, *extra):
    return (f"--model_dir={model_dir}", f"--data_path={cifar_data}", SIMPLE, *extra)


def test_model_summary_prints_the_parameter_counts():
    wide = run_script("cifar10_challenge/summary.py")
    assert wide.returncode == 0, wide.stderr
    assert "Trainable params: 45,901,914" in wide.stdout
    simple = run_script("cifar10_challenge/summary.py", SIMPLE)
    assert "Trainable params: 464,154" in simple.stdout


def test_pgd_attack_then_run_attack(model_dir, cifar_data, tmp_path):
    store = tmp_path / "attack.npy"
    attack = run_script("cifar10_challenge/pgd_attack.py",
                        *_args(model_dir, cifar_data, "--num_eval_examples=6",
                               "--eval_batch_size=4", "--num_steps=3",
                               f"--store_adv_path={store}"),
                        cwd=os.path.join(REPO, "cifar10_challenge"))
    assert attack.returncode == 0, attack.stderr
    assert attack.stdout.splitlines()[0] == "Iterating over 2 batches"
    x_adv = np.load(store)
    assert x_adv.shape == (6, 32, 32, 3) and x_adv.dtype == np.float32
    test_images = cifar10_input.CIFAR10Data(cifar_data).test_images.astype(np.float32)
    assert np.abs(x_adv - test_images[:6]).max() <= 8.0 + 1e-4
    assert x_adv.min() >= 0 and x_adv.max() <= 255

    # scored as stored, on the same first 6 test images (the 10,000-image shape is checked by
    # test_run_attack_refuses_bad_submissions)
    scored = run_script("cifar10_challenge/run_attack.py",
                        *_args(model_dir, cifar_data, f"--store_adv_path={store}",
                               "--num_eval_examples=6"), cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert scored.stdout.strip().splitlines()[-1] == "Output saved at pred.npy"
    assert scored.stdout.strip().splitlines()[-2].startswith("Accuracy: ")
    assert np.load(tmp_path / "pred.npy").shape == (6,)


BAD_SUBMISSIONS = [
    (lambda x: x[:, :16], "Invalid shape: expected (10000, 32, 32, 3), found (10000, 16, 32, 3)"),
    (lambda x: x * 2, "Invalid pixel range. Expected [0, 255], found"),
    (lambda x: np.where(x == x.max(), np.inf, x),
     "Invalid pixel range. Expected [0, 255], found [0.0, inf]"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x),
     "Invalid pixel value: nan at index (0, 0, 2, 1)"),
    (lambda x: np.clip(x + 9, 0, 255), "maximum perturbation found: 9.0"),
]


def test_run_attack_refuses_bad_submissions(model_dir, cifar_data, tmp_path):
    """Each bad submission in a folder of its own, the script runs side by side."""
    test_images = cifar10_input.CIFAR10Data(cifar_data).test_images.astype(np.float32)
    folders = []
    for index, (mutate, _) in enumerate(BAD_SUBMISSIONS):
        folders.append(tmp_path / str(index))
        folders[-1].mkdir()
        np.save(folders[-1] / "attack.npy", mutate(test_images))

    results = run_side_by_side([
        ("cifar10_challenge/run_attack.py",
         _args(model_dir, cifar_data, f"--store_adv_path={folder}/attack.npy"), folder)
        for folder in folders])
    for (_, message), result, folder in zip(BAD_SUBMISSIONS, results, folders):
        assert_one_error_line(result, message, context=message)
        assert not (folder / "pred.npy").exists()


def test_eval_once(model_dir, cifar_data):
    result = run_script("cifar10_challenge/eval.py",
                        *_args(model_dir, cifar_data, "--once", "--num_eval_examples=4",
                               "--eval_batch_size=2", "--num_steps=2"))
    assert result.returncode == 0, result.stderr
    assert f"Checkpoint {model_dir}/checkpoint-30, evaluating ..." in result.stdout
    assert "natural: " in result.stdout and "avg adv loss: " in result.stdout
    assert os.listdir(os.path.join(model_dir, "eval"))


def test_fetch_model_usage_line():
    result = run_script("cifar10_challenge/fetch_model.py")
    assert result.returncode == 1
    assert result.stdout.strip() == "Usage: python fetch_model.py [natural, adv_trained, secret]"
