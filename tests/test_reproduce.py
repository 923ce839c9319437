"""reproduce.py, the paper's tables and figures: every artifact on the fixture models, computed
by a run killed half-way and resumed, its rows against pgd_attack.py and run_attack.py, the
figures as valid PNGs, the transfer crafted on the model itself."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import REPO, run_script, script_environment, shared_path
from PIL import Image

from common.attacks import pgd
from common.evaluation.paper import Paper, Row
from common.evaluation.reproduce import Ledger, artifact_list
from common.io import checkpoints
from common.runtime.errors import UserError
from mnist_challenge import mnist_input
from mnist_challenge import model as mnist_model
from mnist_challenge.challenge import MNIST

EPSILON = 0.05  # the fixture model is naturally trained: at 0.3 every attack reaches 0%
COUNT, BATCH, RESTARTS = 6, 3, 8


def _mnist_args(*extra):
    return (f"--model_dir={shared_path('fixtures', 'tf1_checkpoints', 'mnist')}",
            f"--data_path={shared_path('data', 'mnist')}", f"--epsilon={EPSILON}",
            f"--num_eval_examples={COUNT}", f"--eval_batch_size={BATCH}", *extra)


@pytest.fixture(scope="module")
def mnist_out(tmp_path_factory):
    """Every MNIST artifact on the fixture, computed by a run killed once its table's state file
    holds five rows, then resumed: (out_dir, rows done before the kill, the resumed stdout)."""
    out_dir = tmp_path_factory.mktemp("paper")
    args = _mnist_args(f"--out_dir={out_dir}", f"--restarts={RESTARTS}")
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "mnist_challenge/reproduce.py"), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=script_environment())
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        states = list(out_dir.glob("table.state-*.json"))
        if states and len(json.loads(states[0].read_text())["results"]) >= 5:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(json.loads(states[0].read_text())["results"])
    assert 5 <= done < 9 and not (out_dir / "table.json").exists()
    result = run_script("mnist_challenge/reproduce.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retracing" not in result.stderr, result.stderr[-2000:]
    # A finished run leaves no state: the next run, with any settings, starts afresh.
    assert not list(out_dir.glob("*.state*")), list(out_dir.glob("*.state*"))
    return out_dir, done, result.stdout


def _report(out_dir, name):
    with open(os.path.join(out_dir, f"{name}.json")) as source:
        return json.load(source)


def _accuracies(report):
    return {row["attack"]: row["accuracy"] for row in report["rows"]}


def _fixture_model():
    model = mnist_model.Model(on_cpu=False)
    folder = shared_path("fixtures", "tf1_checkpoints", "mnist")
    checkpoints.load_weights(model, os.path.join(folder, "checkpoint-300"),
                             mnist_model.tf1_variables)
    return model


def _test_set():
    data = mnist_input.MNISTData(shared_path("data", "mnist"))
    return data.test_images, data.test_labels


def test_rows_say_what_they_run():
    settings = Row("FGSM").settings(0.3, 0.01, (0.0, 1.0))
    assert (settings.steps, settings.step_size, settings.random_start) == (1, 0.3, False)
    assert Row("Natural").settings(0.3, 0.01, (0.0, 1.0)) is None
    assert [Row(method, 40).settings(0.3, 0.01, (0.0, 1.0)).loss
            for method in ("PGD", "Targeted", "CW", "CW+")] == ["xent", "targeted", "margin", "cw"]
    assert [row.name for row in MNIST.paper.table][4:6] == [
        "PGD 40 steps x 20 restarts", "PGD 100 steps x 20 restarts"]
    assert [row.gradients for row in MNIST.paper.table] == [0, 1, 40, 100, 800, 2000, 40, 40, 40]
    with pytest.raises(ValueError, match="unknown method 'BIM'"):
        Row("BIM", 10)


def test_artifact_lists_and_state_files(tmp_path):
    assert artifact_list(None, MNIST.paper, None) == (
        "table", "eps_sweep", "loss_landscape", "filters")
    assert artifact_list(None, MNIST.paper, "a/model")[:2] == ("table", "transfer")
    for text, message in (("table,filter", "must name each artifact once"),
                          ("table,table", "must name each artifact once"),
                          ("transfer", "needs --source_model_dir")):
        with pytest.raises(UserError, match=message):
            artifact_list(text, MNIST.paper, None)
    no_filters = Paper(table_name="Table 2", table=(), transfer={}, epsilon_grid=(0.0,),
                       sweep_steps=5)
    with pytest.raises(UserError, match="from table, transfer, eps_sweep, loss_landscape;"):
        artifact_list("filters", no_filters, None)
    ledger = Ledger.open(str(tmp_path / "table.state.json"), {"checkpoint": "a"})
    ledger.finish("FGSM", {"accuracy": 0.5, "seconds": 1.0})
    assert Ledger.open(ledger.path, {"checkpoint": "a"}).results == ledger.results
    with pytest.raises(UserError, match="belongs to another run"):
        Ledger.open(ledger.path, {"checkpoint": "b"})


@pytest.mark.slow
def test_the_table_equals_pgd_attack_and_run_attack(mnist_out, tmp_path):
    out_dir, done, stdout = mnist_out
    table = _accuracies(_report(out_dir, "table"))
    images, labels = _test_set()
    x, y = images[:COUNT], labels[:COUNT]
    store = tmp_path / "attack.npy"
    attacked = run_script("mnist_challenge/pgd_attack.py",
                          *_mnist_args("--k=40", "--restarts=20", f"--store_adv_path={store}"))
    assert attacked.returncode == 0, attacked.stderr[-2000:]
    # run_attack.py --num_eval_examples=COUNT (in _mnist_args) scores the first COUNT images.
    scored = run_script("mnist_challenge/run_attack.py", *_mnist_args(f"--store_adv_path={store}"),
                        cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    predictions = np.load(tmp_path / "pred.npy")
    assert predictions.shape == (COUNT,)
    assert table["PGD 40 steps x 20 restarts"] == np.mean(predictions == y)

    model = _fixture_model()
    seed = MNIST.data_seed(json.load(open(MNIST.config_path)))

    def accuracy(x_adv):
        return np.mean(np.argmax(model.predict(np.asarray(x_adv, np.float32), verbose=0),
                                 axis=1) == y)

    for name, k, a, start, loss in (("FGSM", 1, EPSILON, False, "xent"),
                                    ("PGD 40 steps", 40, 0.01, True, "xent"),
                                    ("Targeted 40 steps", 40, 0.01, True, "targeted"),
                                    ("CW 40 steps", 40, 0.01, True, "margin"),
                                    ("CW+ 40 steps", 40, 0.01, True, "cw")):
        attack = pgd.PGD(model, epsilon=EPSILON, steps=k, step_size=a, random_start=start,
                         loss=loss, seed=seed)
        x_adv = np.concatenate([attack.perturb(x[first:first + BATCH], y[first:first + BATCH])
                                for first in range(0, COUNT, BATCH)])
        assert table[name] == accuracy(x_adv), name
    assert table["Natural"] == accuracy(x)
    assert table["PGD 40 steps x 20 restarts"] <= table["PGD 40 steps"]
    assert table["PGD 100 steps x 20 restarts"] <= table["PGD 100 steps"]
    assert max(value for name, value in table.items() if name != "Natural") < table["Natural"]
    rows = MNIST.paper.table
    assert f"table: {9 - done} jobs to run ({done} done)" in stdout
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("table, ")] \
        == [f"table, {row.name}" for row in rows[done:]]
    gradients = COUNT * (sum(row.gradients for row in rows[done:]) + 9 * 41) + \
        5 * 20 * 40 + 5 * RESTARTS * 40
    assert stdout.startswith(f"About {gradients:,} input gradients to compute, at ")


@pytest.mark.slow
def test_the_markdown_json_and_figures(mnist_out):
    out_dir, _, _ = mnist_out
    table = _report(out_dir, "table")
    assert table["num_examples"] == COUNT and table["epsilon"] == EPSILON
    assert table["versions"]["tensorflow"] and table["checkpoint"].endswith("checkpoint-300")
    # Table 1 of the paper (PORTING_NOTES), and the fixture model's own natural accuracy.
    published = [98.8, 95.6, 93.2, 91.8, 90.4, 89.3, 92.7, 94.0, 93.9]
    assert [row["published"] for row in table["rows"]] == published
    markdown = [line for line in open(os.path.join(out_dir, "table.md")).read().splitlines()
                if "| A (white-box) |" in line]
    assert [line.split("|")[1].strip() for line in markdown] == [
        row.name for row in MNIST.paper.table]
    assert [line.split("|")[-2].strip() for line in markdown] == [f"{value:.1f}%"
                                                                  for value in published]
    data = mnist_input.MNISTData(shared_path("data", "mnist"))
    natural = np.mean(np.argmax(_fixture_model().predict(data.test_images[:COUNT], verbose=0),
                                axis=1) == data.test_labels[:COUNT])
    assert f"| {100 * natural:.2f}% |" in markdown[0]

    white_box = _accuracies(table)
    assert not os.path.exists(os.path.join(out_dir, "transfer.json"))

    sweep = _report(out_dir, "eps_sweep")
    assert sweep["epsilons"][0] == 0.0 and sweep["epsilons"][-1] == 0.4
    assert sweep["curves"]["FGSM"][0] == sweep["curves"]["PGD"][0] == white_box["Natural"]
    assert sweep["curves"]["PGD"][-1] < sweep["curves"]["PGD"][1] < white_box["Natural"]

    landscape = _report(out_dir, "loss_landscape")
    traces = np.array(landscape["traces"])
    assert traces.shape == (5, 20, 41) and np.all(traces[:, :, -1] > traces[:, :, 0])
    assert np.array(landscape["final_losses"]).shape == (5, RESTARTS)

    filters = _report(out_dir, "filters")
    assert filters["kernel_shape"] == [5, 5, 1, 32]
    assert sum(filters["weights"]["histogram_counts"]) == 5 * 5 * 32

    sizes = {}
    for report in (sweep, landscape, filters):
        sizes.update(report["figures"])
    assert sorted(sizes) == ["eps_sweep.png", "filters.png", "filters_histogram.png",
                             "loss_histogram.png", "loss_landscape.png"]
    for name, size in sizes.items():
        with Image.open(os.path.join(out_dir, name)) as image:
            image.verify()
        with Image.open(os.path.join(out_dir, name)) as image:
            assert image.format == "PNG" and list(image.size) == size, name
    assert sizes["loss_landscape.png"] == [1600, 320]


@pytest.mark.slow
def test_cifar10_table_and_transfer_from_a_natural_model(tmp_path):
    fixture = shared_path("fixtures", "tf1_checkpoints", "cifar10_simple")
    result = run_script("cifar10_challenge/reproduce.py", f"--model_dir={fixture}",
                        f"--data_path={shared_path('data', 'cifar10')}", "--filters=[16,16,32,64]",
                        "--num_eval_examples=10", "--eval_batch_size=10", "--epsilon=2",
                        f"--out_dir={tmp_path}", "--artifacts=table,transfer",
                        f"--source_model_dir={fixture}", "--source_name=A_nat")
    assert result.returncode == 0, result.stderr[-3000:]
    table = _report(tmp_path, "table")
    assert [row["attack"] for row in table["rows"]] == [
        "Natural", "FGSM", "PGD 7 steps", "PGD 20 steps", "CW 30 steps"]
    assert [row["settings"] and row["settings"]["step_size"] for row in table["rows"]] == [
        None, 2.0, 2.0, 2.0, 2.0]
    accuracies = _accuracies(table)
    assert max(list(accuracies.values())[1:]) < accuracies["Natural"]
    transfer = _report(tmp_path, "transfer")
    assert [(row["attack"], row["published"]) for row in transfer["rows"]] == [
        ("FGSM", 85.6), ("PGD 7 steps", 86.0)]
    assert _accuracies(transfer) == {name: accuracies[name] for name in ("FGSM", "PGD 7 steps")}
    assert "paper (Table 2, source A_nat)" in open(tmp_path / "transfer.md").read()
