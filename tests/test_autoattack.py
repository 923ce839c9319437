"""AutoAttack's evaluation: the versions and attack lists, the logits check, each attack run on
the examples still robust, a killed run resumed to the same end, and the script on the
MNIST TF1 fixture against PGD, its printed lines, report and submission."""

import json

import numpy as np
import pytest
from helpers import run_script, writable_copy

from common.attacks import AutoAttack, autoattack, checks, pgd
from common.attacks.threat_model import ThreatModel
from common.io import checkpoints
from common.runtime.errors import UserError
from mnist_challenge import mnist_input
from mnist_challenge import model as mnist_model


@pytest.mark.parametrize("version, attacks, expected", [
    ("standard", None, ("standard", ("apgd-ce", "apgd-t", "fab-t", "square"))),
    ("plus", None, ("plus", ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"))),
    ("rand", None, ("rand", ("apgd-ce", "apgd-dlr"))),
    ("standard", ["apgd-ce", "apgd-t"], ("custom", ("apgd-ce", "apgd-t"))),
])
def test_versions_and_attack_lists(version, attacks, expected):
    attack = AutoAttack(lambda x: x, epsilon=0.1, version=version, attacks=attacks)
    assert (attack.version, attack.attacks) == expected


@pytest.mark.parametrize("version, attacks, message", [
    ("strong", None, "unknown AutoAttack version 'strong'"),
    ("standard", ["apgd-ce", "pgd"], "name each attack once"),
    ("standard", ["apgd-ce", "apgd-ce"], "name each attack once"),
])
def test_bad_versions_and_lists_are_refused(version, attacks, message):
    with pytest.raises(ValueError, match=message):
        AutoAttack(lambda x: x, epsilon=0.1, version=version, attacks=attacks)


def test_outputs_must_be_logits_of_two_classes_or_more():
    assert checks.check_logits(np.random.default_rng(0).normal(size=(4, 3))) == 3
    with pytest.raises(ValueError, match="Received: outputs of shape \\(1,\\) per example"):
        checks.check_logits(np.zeros((4, 1)))
    probabilities = np.full((4, 10), 0.1)
    with pytest.raises(ValueError, match="not probabilities"):
        checks.check_logits(probabilities)


class Threshold:
    """A model that misclassifies x once its first coordinate passes `threshold`, and an
    'attack' that moves the first coordinate by `reach` (logits: 1 for the label, 2 elsewhere)."""

    def __init__(self, threshold):
        self.threshold = threshold

    def predict(self, x):
        logits = np.ones((len(x), 10))
        logits[:, 1] = np.where(x[:, 0] > self.threshold, 2.0, 0.0)
        return logits

    def attack(self, reach, calls=None):
        def run(x, y):
            if calls is not None:
                calls.append(len(x))
                if len(calls) == 3:
                    raise KeyboardInterrupt("killed")
            moved = x.copy()
            moved[:, 0] += reach
            robust = moved[:, 0] <= self.threshold
            return np.where(robust[:, None], x, moved)
        return run


def evaluation(tmp_path, attacks, name="state.npz", settings=None):
    model = Threshold(1.0)
    x = np.linspace(0, 1, 50)[:, None].repeat(3, axis=1).astype(np.float32)
    y = np.zeros(50, np.int64)
    return autoattack.run_attacks(attacks, x, y, predict=model.predict,
                                  threat=ThreatModel(epsilon=1.0),
                                  settings=settings or {"run": 1}, batch_size=8,
                                  state_path=str(tmp_path / name), log=print), x


def test_each_attack_runs_on_what_the_ones_before_left_robust(tmp_path, capsys):
    model = Threshold(1.0)
    state, x = evaluation(tmp_path, {"apgd-ce": model.attack(0.1), "apgd-t": model.attack(0.05),
                                     "square": model.attack(0.3)})
    accuracies = [result["robust_accuracy"] for result in state.results]
    np.testing.assert_allclose(accuracies, [np.mean(x[:, 0] + 0.1 <= 1)] * 2
                               + [np.mean(x[:, 0] + 0.3 <= 1)])
    assert set(state.broken_by[x[:, 0] + 0.1 > 1]) == {"apgd-ce"}
    assert set(state.broken_by[(x[:, 0] + 0.3 > 1) & (x[:, 0] + 0.1 <= 1)]) == {"square"}
    assert np.all(np.abs(state.x_adv - x).max(axis=1) <= 0.3 + 1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "initial accuracy: 100.00%"
    assert lines[1].startswith(f"robust accuracy after APGD-CE: {100 * accuracies[0]:.2f}% ")
    assert lines[-2].startswith("max Linf perturbation: 0.30000, nan in tensor: 0, max: ")
    assert lines[-1] == f"robust accuracy: {100 * accuracies[2]:.2f}%"


def test_a_killed_run_resumes_to_the_same_end(tmp_path):
    model = Threshold(1.0)
    whole, _ = evaluation(tmp_path, {"apgd-ce": model.attack(0.1), "square": model.attack(0.3)},
                          "whole.npz")
    calls = []
    with pytest.raises(KeyboardInterrupt):
        evaluation(tmp_path, {"apgd-ce": model.attack(0.1),
                              "square": model.attack(0.3, calls)}, "killed.npz")
    saved = autoattack.State.load(str(tmp_path / "killed.npz"), {"run": 1})
    assert [result["attack"] for result in saved.results] == ["apgd-ce"]
    assert saved.batches_done == 2 and len(saved.todo) == 45  # robust after APGD-CE
    resumed_calls = []
    resumed, _ = evaluation(tmp_path, {"apgd-ce": model.attack(0.1, resumed_calls),
                                       "square": model.attack(0.3)}, "killed.npz")
    assert resumed_calls == [], "the finished attack is not run again"
    np.testing.assert_array_equal(resumed.x_adv, whole.x_adv)
    np.testing.assert_array_equal(resumed.broken_by, whole.broken_by)
    with pytest.raises(UserError, match="belongs to another run"):
        evaluation(tmp_path, {}, "killed.npz", settings={"run": 2})


SCRIPT_EXAMPLES = 20


@pytest.mark.slow
def test_the_script_on_the_mnist_fixture(tmp_path, mnist_data, mnist_fixture):
    model_dir = writable_copy(mnist_fixture, tmp_path)
    store = tmp_path / "aa" / "attack.npy"
    store.parent.mkdir()
    args = (f"--model_dir={model_dir}", f"--data_path={mnist_data}",
            f"--num_eval_examples={SCRIPT_EXAMPLES}", f"--eval_batch_size={SCRIPT_EXAMPLES // 2}",
            "--epsilon=0.05", f"--store_adv_path={store}")
    result = run_script("mnist_challenge/autoattack.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("\r")[-1].strip() for line in result.stdout.splitlines()]
    assert lines[0] == "using standard version including apgd-ce, apgd-t, fab-t, square."
    after = [line for line in lines if line.startswith("robust accuracy after ")]
    assert [line.split(":")[0] for line in after] == [
        f"robust accuracy after {name}" for name in ("APGD-CE", "APGD-T", "FAB-T", "SQUARE")]
    report = json.load(open(tmp_path / "aa" / "attack.json"))  # named after --store_adv_path
    accuracies = [entry["robust_accuracy"] for entry in report["attacks"]]
    assert accuracies == sorted(accuracies, reverse=True)
    assert f"robust accuracy: {100 * report['robust_accuracy']:.2f}%" in lines

    data = mnist_input.MNISTData(mnist_data)
    x, y = data.test_images[:SCRIPT_EXAMPLES], data.test_labels[:SCRIPT_EXAMPLES]
    x_adv = np.load(store)
    assert x_adv.shape == (SCRIPT_EXAMPLES, 784) and np.abs(x_adv - x).max() <= 0.05 + 1e-6
    model = mnist_model.Model(on_cpu=False)
    checkpoints.load_weights(model, f"{model_dir}/checkpoint-300", mnist_model.tf1_variables)
    robust = np.argmax(model.predict(x_adv, verbose=0), axis=1) == y
    assert np.mean(robust) == report["robust_accuracy"]
    assert [name is None for name in report["broken_by"]] == robust.tolist()
    x_pgd = pgd.LinfPGDAttack(model, 0.05, 40, 0.01, True, "xent", seed=0).perturb(x, y)
    pgd_accuracy = np.mean(np.argmax(model.predict(x_pgd.astype(np.float32), verbose=0),
                                     axis=1) == y)
    assert report["robust_accuracy"] <= pgd_accuracy

    # The submission run_attack.py checks and scores: these rows, then the clean images.
    full = data.test_images.copy()
    full[:SCRIPT_EXAMPLES] = x_adv
    np.save(tmp_path / "full.npy", full)
    scored = run_script("mnist_challenge/run_attack.py", f"--model_dir={model_dir}",
                        f"--data_path={mnist_data}", "--epsilon=0.05",
                        f"--store_adv_path={tmp_path}/full.npy", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    rest = np.argmax(model.predict(data.test_images[SCRIPT_EXAMPLES:], verbose=0), axis=1) == \
        data.test_labels[SCRIPT_EXAMPLES:]
    expected = (robust.sum() + rest.sum()) / 10000
    assert f"Accuracy: {100 * expected:.2f}%" in scored.stdout

    # The state a rerun would resume from (resuming is tested above, in-process) is gone once
    # the run finished, so that a run with other settings starts afresh.
    assert sorted(path.name for path in store.parent.iterdir()) == ["attack.json", "attack.npy"]
