"""The MNIST scripts as a user runs them: attack, score, evaluate, fetch (on the TF1 fixture)."""

import http.server
import os
import threading
import zipfile

import numpy as np
import pytest
from conftest import REPO, run_script, writable_copy

from common import download, fetch
from common.errors import UserError

EPSILON = 0.3


@pytest.fixture
def model_dir(tmp_path, mnist_fixture):
    return writable_copy(mnist_fixture, tmp_path)


def _args(model_dir, mnist_data, *extra):
    return (f"--model_dir={model_dir}", f"--data_path={mnist_data}", *extra)


def test_model_summary_prints_the_parameter_count():
    result = run_script("mnist_challenge/model.py")
    assert result.returncode == 0, result.stderr
    assert "Total params: 3,274,634" in result.stdout


def test_pgd_attack_stores_the_attack_from_inside_the_folder(model_dir, mnist_data, tmp_path):
    store = tmp_path / "attack.npy"
    result = run_script("mnist_challenge/pgd_attack.py",
                        *_args(model_dir, mnist_data, "--num_eval_examples=250",
                               "--eval_batch_size=100", "--k=5", f"--store_adv_path={store}"),
                        cwd=os.path.join(REPO, "mnist_challenge"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Iterating over 3 batches"
    assert [line for line in lines if line.startswith("batch size")] == \
        ["batch size: 100", "batch size: 100", "batch size: 50"]
    assert lines[-2:] == ["Storing examples", f"Examples stored in {store}"]
    x_adv = np.load(store)
    assert x_adv.shape == (250, 784) and x_adv.dtype == np.float32
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_attack_without_a_model_says_so(tmp_path, mnist_data):
    result = run_script("mnist_challenge/pgd_attack.py", *_args(tmp_path, mnist_data))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "Error: No model found"


def test_run_attack_scores_a_valid_submission(model_dir, mnist_data, tmp_path):
    from mnist_challenge import mnist_input
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
    assert accuracy_line == f"Accuracy: {100 * np.mean(predictions == labels):.2f}%"


@pytest.mark.parametrize("mutate, message", [
    (lambda x: x[:9999], "Invalid shape: expected (10000,784), found (9999, 784)"),
    (lambda x: x + 2, "Invalid pixel range. Expected [0, 1], found"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x),
     "Invalid pixel value: nan at index (0, 5)"),
    (lambda x: np.clip(x + 0.31, 0, 1), "maximum perturbation found: 0.31"),
])
def test_run_attack_refuses_bad_submissions(model_dir, mnist_data, tmp_path, mutate, message):
    from mnist_challenge import mnist_input
    np.save(tmp_path / "attack.npy", mutate(mnist_input.MNISTData(mnist_data).test_images))
    result = run_script("mnist_challenge/run_attack.py",
                        *_args(model_dir, mnist_data, f"--store_adv_path={tmp_path}/attack.npy"),
                        cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "pred.npy").exists()


def test_run_attack_never_unpickles(model_dir, mnist_data, tmp_path):
    marker = tmp_path / "pwned"
    payload = np.array([{"x": 1}], dtype=object)
    np.save(tmp_path / "attack.npy", payload, allow_pickle=True)
    result = run_script("mnist_challenge/run_attack.py",
                        *_args(model_dir, mnist_data, f"--store_adv_path={tmp_path}/attack.npy"),
                        cwd=tmp_path)
    assert result.returncode == 1
    assert "is not a readable .npy array" in result.stderr
    assert not marker.exists()


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


@pytest.fixture
def zip_server(tmp_path):
    """Serves tmp_path/served over HTTP on 127.0.0.1; yields the base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *args, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_fetch_model_downloads_checks_and_unzips(zip_server, tmp_path, mnist_fixture, capsys):
    served, url = zip_server
    with zipfile.ZipFile(served / "natural.zip", "w") as archive:
        for name in ("checkpoint", "checkpoint-300.index"):
            archive.write(os.path.join(mnist_fixture, name), f"models/natural/{name}")
    destination = tmp_path / "challenge"
    fetch.fetch_model(["fetch_model.py", "natural"], {"natural": url + "natural.zip"}, {},
                      str(destination))
    original_lines = ("Downloading models", "SHA256 hash", "Extracting model", "Extracted model")
    out = [line for line in capsys.readouterr().out.splitlines()
           if line.startswith(original_lines)]
    assert out[0] == "Downloading models" and out[1].startswith("SHA256 hash: ")
    assert out[1] == f"SHA256 hash: {download.sha256_of(served / 'natural.zip')}"
    assert out[2:] == ["Extracting model",
                       f"Extracted model in {destination}/models/natural/checkpoint"]
    assert (destination / "models/natural/checkpoint-300.index").exists()
    with pytest.raises(UserError, match="the published one is 0000"):
        fetch.fetch_model(["fetch_model.py", "natural"], {"natural": url + "natural.zip"},
                          {"natural": "0000"}, str(tmp_path / "other"))


def test_fetch_model_refuses_entries_leaving_the_folder(zip_server, tmp_path):
    served, url = zip_server
    with zipfile.ZipFile(served / "evil.zip", "w") as archive:
        archive.writestr("../escaped.txt", "no")
    with pytest.raises(UserError, match="refusing zip entry '../escaped.txt'"):
        fetch.fetch_model(["fetch_model.py", "evil"], {"evil": url + "evil.zip"}, {},
                          str(tmp_path / "challenge"))
    assert not (tmp_path / "escaped.txt").exists()


def test_fetch_model_usage_line():
    result = run_script("mnist_challenge/fetch_model.py", "robust")
    assert result.returncode == 1
    assert result.stdout.strip() == "Usage: python fetch_model.py [natural, adv_trained, secret]"
