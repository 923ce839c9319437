"""The evaluation scripts as a 2-worker cluster on 127.0.0.1 (TF_CONFIG,
MultiWorkerMirroredStrategy) give what one process gives: pgd_attack.py's stored examples,
eval.py's accuracies and summaries and reproduce.py's accuracy against epsilon, with the chief
alone printing and writing. (autoattack.py on a cluster, killed and resumed, is in
test_cluster_eval.py; diagnose.py, which reuses its file's single-process run, in
test_diagnose.py.)"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from helpers import run_cluster, run_script, writable_copy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow

# Two batches of two: each worker attacks one image of every batch.
SMALL = ("--num_eval_examples=4", "--eval_batch_size=2", "--epsilon=0.05", "--k=10", "--a=0.01")


def on_cluster_and_alone(script, args_in):
    """Runs `script` on a 2-worker cluster with the arguments `args_in("cluster")`, then in one
    process with `args_in("single")`; returns the chief's stdout and the single process's."""
    cluster = run_cluster(script, *args_in("cluster"))
    for returncode, _, err in cluster:
        assert returncode == 0, err[-3000:]
    (_, chief_out, _), (_, worker_out, _) = cluster
    assert worker_out == ""
    single = run_script(script, *args_in("single"))
    assert single.returncode == 0, single.stderr[-3000:]
    return chief_out, single.stdout


def test_pgd_attack_stores_the_same_examples(tmp_path, mnist_fixture, mnist_data):
    def args_in(name):
        (tmp_path / name).mkdir()
        return (f"--model_dir={mnist_fixture}", f"--data_path={mnist_data}", *SMALL,
                "--restarts=2", f"--store_adv_path={tmp_path / name / 'adv.npy'}")

    on_cluster_and_alone("mnist_challenge/pgd_attack.py", args_in)
    assert os.listdir(tmp_path / "cluster") == ["adv.npy"]
    stored = np.load(tmp_path / "cluster" / "adv.npy")
    np.testing.assert_array_equal(stored, np.load(tmp_path / "single" / "adv.npy"))
    assert stored.shape == (4, 784)


def _summaries(model_dir):
    events = EventAccumulator(os.path.join(model_dir, "eval"), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: [(event.step, float(tf.make_ndarray(event.tensor_proto)))
                  for event in events.Tensors(tag)] for tag in events.Tags()["tensors"]}


def test_eval_prints_and_summarizes_the_same_accuracies(tmp_path, mnist_fixture, mnist_data):
    folders = {}

    def args_in(name):
        folders[name] = writable_copy(mnist_fixture, tmp_path / name)
        return (f"--model_dir={folders[name]}", f"--data_path={mnist_data}", *SMALL, "--once")

    (tmp_path / "cluster").mkdir()
    (tmp_path / "single").mkdir()
    chief_out, single_out = on_cluster_and_alone("mnist_challenge/eval.py", args_in)
    lines = [line for line in chief_out.splitlines()
             if line.startswith(("natural: ", "adversarial: ", "avg nat loss: ", "avg adv loss: "))]
    assert len(lines) == 4 and all(line in single_out.splitlines() for line in lines), chief_out
    found, expected = (_summaries(folders[name]) for name in ("cluster", "single"))
    assert sorted(found) == sorted(expected) and "accuracy adv eval" in found
    for tag in found:  # the losses are means summed in another order over the workers
        steps, values = zip(*found[tag])
        assert steps == tuple(step for step, _ in expected[tag]), tag
        np.testing.assert_allclose(values, [value for _, value in expected[tag]],
                                   rtol=0 if tag.startswith("accuracy") else 1e-6, err_msg=tag)


def test_reproduce_writes_the_same_curves(tmp_path, mnist_fixture, mnist_data):
    def args_in(name):
        return (f"--model_dir={mnist_fixture}", f"--data_path={mnist_data}", *SMALL[:2],
                f"--out_dir={tmp_path / name}", "--artifacts=eps_sweep")

    on_cluster_and_alone("mnist_challenge/reproduce.py", args_in)
    assert sorted(os.listdir(tmp_path / "cluster")) == sorted(os.listdir(tmp_path / "single"))
    cluster, single = (json.load(open(tmp_path / name / "eps_sweep.json"))
                       for name in ("cluster", "single"))
    assert cluster["curves"] == single["curves"]
    assert cluster["curves"]["PGD"][0] == 1 > cluster["curves"]["PGD"][-1]  # it falls
