"""The CIFAR-10 server: cifar10_challenge/serve.py on the simple network's TF1 fixture scores a
submission (pixels in [0, 255], epsilon 8) as cifar10_challenge/run_attack.py does, and refuses
one beyond epsilon with its line. `--num_eval_examples=200` keeps it short."""

import re

import numpy as np
import pytest
from helpers import run_script, shared_path
from serving_helpers import (
    Server,
    add_participant,
    npy_bytes,
    open_database,
    stop_servers_after_each_test,  # noqa: F401 (an autouse fixture)
    upload,
    wait_done,
)

pytestmark = pytest.mark.slow

EXAMPLES = 200


def test_a_cifar10_submission_is_scored_as_run_attack_py_scores_it(tmp_path):
    from cifar10_challenge import cifar10_input

    model = shared_path("fixtures", "tf1_checkpoints", "cifar10_simple")
    data = shared_path("data", "cifar10")
    flags = (f"--model_dir={model}", f"--data_path={data}", "--filters=[16,16,32,64]",
             f"--num_eval_examples={EXAMPLES}")
    server = Server(tmp_path / "state", *flags[2:], script="cifar10_challenge/serve.py",
                    model_dir=model, data_path=data)
    images = cifar10_input.CIFAR10Data(data).test_images[:EXAMPLES].astype(np.float32)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], images.shape)
    attack = tmp_path / "attack.npy"
    np.save(attack, np.clip(images + 8 * signs, 0, 255).astype(np.float32))
    expected = run_script("cifar10_challenge/run_attack.py", *flags,
                          f"--store_adv_path={attack}", cwd=tmp_path)
    assert expected.returncode == 0, expected.stderr
    printed = re.search(r"^Accuracy: (\d+\.\d\d)%$", expected.stdout, re.MULTILINE).group(1)
    server.wait_ready()
    db = open_database(state_dir=tmp_path / "state", challenge="CIFAR-10")
    _, token = add_participant(db)
    answer = upload(server.url, token, attack.read_bytes())
    assert answer.status_code == 202, answer.text
    view = wait_done(server.url, token, answer.json()["id"], servers=[server])
    assert view["status"] == "scored" and f"{100 * view['accuracy']:.2f}" == printed, view
    far = np.clip(images + 8.5 * signs, 0, 255)
    refused = upload(server.url, token, npy_bytes(far), filename="far.npy")
    assert refused.status_code == 400
    assert refused.json()["error"].startswith("maximum perturbation found: 8.5, maximum "
                                              "perturbation allowed: 8.0; the first is")
    wrong = upload(server.url, token, npy_bytes(images[:, :16]), filename="half.npy")
    assert wrong.json() == {"error": f"Invalid shape: expected ({EXAMPLES}, 32, 32, 3), found "
                                     f"({EXAMPLES}, 16, 32, 3)"}
    db.dispose()
