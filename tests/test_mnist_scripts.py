"""The MNIST scripts as a user runs them: attack, score, evaluate, fetch (on the TF1 fixture)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import (
    REPO,
    PicklePayload,
    assert_one_error_line,
    run_script,
    run_side_by_side,
    script_environment,
    writable_copy,
)

from common.io import checkpoints
from mnist_challenge import mnist_input
from mnist_challenge import model as mnist_model

pytestmark = pytest.mark.slow

EPSILON = 0.3


@pytest.fixture
def model_dir(tmp_path, mnist_fixture):
    return writable_copy(mnist_fixture, tmp_path)


def _args(model_dir, mnist_data, *extra):
    return (f"--model_dir={model_dir}", f"--data_path={mnist_data}", *extra)


def test_model_summary_prints_the_parameter_count():
    result = run_script("mnist_challenge/summary.py")
    assert result.returncode == 0, result.stderr
    assert "Total params: 3,274,634" in result.stdout


def test_pgd_attack_stores_the_attack_from_inside_the_folder(model_dir, mnist_data, tmp_path):
    store = tmp_path / "attack.npy"
    result = run_script("mnist_challenge/pgd_attack.py",
                        *_args(model_dir, mnist_data, "--num_eval_examples=25",
                               "--eval_batch_size=10", "--k=5", f"--store_adv_path={store}"),
                        cwd=os.path.join(REPO, "mnist_challenge"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Iterating over 3 batches"
    assert [line for line in lines if line.startswith("batch size")] == \
        ["batch size: 10", "batch size: 10", "batch size: 5"]
    assert lines[-2:] == ["Storing examples", f"Examples stored in {store}"]
    x_adv = np.load(store)
    assert x_adv.shape == (25, 784) and x_adv.dtype == np.float32
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_attack_without_a_model_says_so(tmp_path, mnist_data):
    result = run_script("mnist_challenge/pgd_attack.py", *_args(tmp_path, mnist_data))
    assert result.returncode == 1
    # The whole stderr: TensorFlow's start-up lines are hidden, the folder is named.
    assert result.stderr.strip() == f"Error: No model found in {tmp_path}"


def independent_predictions(model_dir, x):
    """The fixture model's predictions, computed here: Keras' own layers, one plain call."""
    model = mnist_model.Model(on_cpu=False)
    checkpoints.load_weights(model, f"{model_dir}/checkpoint-300", mnist_model.tf1_variables)
    return np.argmax(model.predict(x, batch_size=1000, verbose=0), axis=1)


def test_run_attack_scores_a_valid_submission(model_dir, mnist_data, tmp_path):
    test_images = mnist_input.MNISTData(mnist_data).test_images
    signs = np.random.default_rng(0).choice([-1.0, 1.0], test_images.shape)
    submission = np.clip(test_images + EPSILON * signs, 0, 1).astype(np.float64)
    np.save(tmp_path / "attack.npy", submission)
    result = run_script("mnist_challenge/run_attack.py",
                        *_args(model_dir, mnist_data, f"--store_adv_path={tmp_path}/attack.npy"),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    accuracy_line, saved_line = result.stdout.strip().splitlines()[-2:]
    assert saved_line == "Output saved at pred.npy"
    predictions = np.load(tmp_path / "pred.npy")
    assert predictions.shape == (10000,) and predictions.dtype == np.int64
    labels = mnist_input.MNISTData(mnist_data).test_labels
    expected = independent_predictions(model_dir, submission.astype(np.float32))
    np.testing.assert_array_equal(predictions, expected)
    assert accuracy_line == f"Accuracy: {100 * np.mean(expected == labels):.2f}%"
    assert 0.05 < np.mean(expected == labels) < 0.9


def test_the_original_run_attack_function_and_imports_from_inside_the_folder(model_dir,
                                                                             mnist_data, tmp_path):
    """`from model import Model`, `from pgd_attack import LinfPGDAttack` and
    `from run_attack import run_attack` work as in the original, with the challenge folder on
    the path; `run_attack` scores an array and refuses an invalid one."""
    config = json.load(open(os.path.join(REPO, "mnist_challenge", "config.json")))
    config.update(data_path=mnist_data)
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = (
        "import sys, numpy as np\n"
        "from model import Model\n"
        "from pgd_attack import LinfPGDAttack\n"
        "import run_attack, mnist_challenge.challenge as challenge, dataclasses\n"
        "mnist = dataclasses.replace(challenge.MNIST, folder=sys.argv[2])\n"
        "import inspect; print(inspect.signature(run_attack.run_attack))\n"
        "run = run_attack.drivers.run_attack_function(mnist)\n"
        "model = Model()\n"
        "attack = LinfPGDAttack(model, 0.3, 1, 0.01, True, 'xent')\n"
        "x = np.load(sys.argv[1])\n"
        "print('returned', run(sys.argv[3], x, 0.3))\n"
        "run(sys.argv[3], x + 0.5, 0.3)\n")
    test_images = mnist_input.MNISTData(mnist_data).test_images
    np.save(tmp_path / "x.npy", test_images)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path),
                             f"{model_dir}/checkpoint-300"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env=script_environment(PYTHONPATH=f"{REPO}/mnist_challenge"))
    lines = result.stdout.splitlines()
    expected = np.mean(independent_predictions(model_dir, test_images)
                       == mnist_input.MNISTData(mnist_data).test_labels)
    assert lines[:4] == ["(checkpoint, x_adv, epsilon)", f"Accuracy: {100 * expected:.2f}%",
                         "Output saved at pred.npy", f"returned {expected}"], result.stderr[-2000:]
    assert "UserError: Invalid pixel range. Expected [0, 1]" in result.stderr


def test_pgd_attack_restarts_only_strengthen_the_attack(model_dir, mnist_data, tmp_path):
    """The first restart is the single run's start (the same seeded stream), and each example
    keeps its strongest restart, so what one start breaks, three break too."""
    stored = {restarts: tmp_path / f"attack{restarts}.npy" for restarts in (1, 3)}
    results = run_side_by_side([
        ("mnist_challenge/pgd_attack.py",
         _args(model_dir, mnist_data, "--num_eval_examples=200", "--k=3", "--a=0.01",
               "--epsilon=0.05", f"--restarts={restarts}", f"--store_adv_path={path}"), None)
        for restarts, path in stored.items()])
    assert all(result.returncode == 0 for result in results), [r.stderr for r in results]
    labels = mnist_input.MNISTData(mnist_data).test_labels[:200]
    wrong = {restarts: independent_predictions(model_dir, np.load(path)) != labels
             for restarts, path in stored.items()}
    assert np.all(wrong[3] >= wrong[1])
    assert wrong[3].sum() > wrong[1].sum()


def _save(mutate):
    return lambda path, images: np.save(path, mutate(images))


def _huge_header(path, images):
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (10**13, 784)})


def _pickled_payload(path, images):
    payload = np.empty(2, dtype=object)
    payload[:] = [PicklePayload(str(path.parent / "pwned"))] * 2
    np.save(path, payload, allow_pickle=True)


BAD_SUBMISSIONS = [
    (_save(lambda x: x[:9999]), "Invalid shape: expected (10000,784), found (9999, 784)"),
    (_save(lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x)),
     "Invalid pixel value: nan at index (0, 5)"),
    (_save(lambda x: np.clip(x + 0.31, 0, 1)), "maximum perturbation found: 0.31"),
    (_huge_header, "Invalid shape: expected (10000,784), found (10000000000000, 784)"),
    (lambda path, images: (np.save(path, images), os.truncate(path, 4_000_000)),
     "is truncated: its header needs 31360000 bytes of data"),
    (_pickled_payload, "holds Python objects (it would need pickle): refused"),
]


def test_run_attack_refuses_bad_submissions(model_dir, mnist_data, tmp_path):
    """Each bad submission in a folder of its own, the script runs side by side."""
    test_images = mnist_input.MNISTData(mnist_data).test_images
    folders = []
    for index, (write, _) in enumerate(BAD_SUBMISSIONS):
        folders.append(tmp_path / str(index))
        folders[-1].mkdir()
        write(folders[-1] / "attack.npy", test_images)

    results = run_side_by_side([
        ("mnist_challenge/run_attack.py",
         _args(model_dir, mnist_data, f"--store_adv_path={folder}/attack.npy"), folder)
        for folder in folders])
    for (_, message), result, folder in zip(BAD_SUBMISSIONS, results, folders):
        assert_one_error_line(result, message, context=message)
        assert not (folder / "pred.npy").exists()
        assert not (folder / "pwned").exists()


def test_eval_once_evaluates_the_newest_checkpoint(model_dir, mnist_data):
    result = run_script("mnist_challenge/eval.py",
                        *_args(model_dir, mnist_data, "--once", "--num_eval_examples=100",
                               "--eval_batch_size=50", "--k=5"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"Checkpoint {model_dir}/checkpoint-300, evaluating ..." in out
    for prefix in ("natural: ", "adversarial: ", "avg nat loss: ", "avg adv loss: "):
        assert any(line.startswith(prefix) for line in out.splitlines()), out
    natural = float(out.split("natural: ")[1].split("%")[0])
    adversarial = float(out.split("adversarial: ")[1].split("%")[0])
    assert natural > 80 and adversarial < natural
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(model_dir, "eval"))
    events.Reload()
    assert set(events.Tags()["tensors"]) == {"xent adv eval", "xent adv", "xent nat",
                                             "accuracy adv eval", "accuracy adv", "accuracy nat"}
    assert events.Tensors("accuracy nat")[0].step == 300


def test_eval_once_without_checkpoint_is_an_error(tmp_path, mnist_data):
    result = run_script("mnist_challenge/eval.py", *_args(tmp_path, mnist_data, "--once"))
    assert result.returncode == 1
    assert f"Error: No checkpoint found in {tmp_path}" in result.stderr


def test_fetch_model_usage_line():
    result = run_script("mnist_challenge/fetch_model.py", "robust")
    assert result.returncode == 1
    assert result.stdout.strip() == "Usage: python fetch_model.py [natural, adv_trained, secret]"


def test_eval_restarts_only_lower_the_adversarial_accuracy(model_dir, mnist_data):
    results = run_side_by_side([
        ("mnist_challenge/eval.py",
         _args(model_dir, mnist_data, "--once", "--num_eval_examples=200", "--k=3", "--a=0.01",
               "--epsilon=0.05", f"--restarts={restarts}"), None)
        for restarts in (1, 4)])
    assert all(result.returncode == 0 for result in results), [r.stderr for r in results]
    one, four = (float(result.stdout.split("adversarial: ")[1].split("%")[0])
                 for result in results)
    assert four < one, (one, four)
