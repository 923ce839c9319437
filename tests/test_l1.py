"""L1 attacks ("Mind the box", Croce & Hein 2021) against closed forms and the reference: FAB's
projection onto a hyperplane against every order of filling the coordinates, AutoAttack and PGD
on a linear model whose smallest L1 perturbation within the box is known exactly, and the
standard L1 AutoAttack against fra31/auto-attack's recorded results."""

import itertools
import json

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_one_error_line, run_script, shared_path
from test_attacks_api import FIXTURE, reference_mlp

from common.attacks import PGD, AutoAttack, fab, threat_model
from mnist_challenge.mnist_input import MNISTData


def smallest_step_over_orders(point, weight, needed, pixel_range):
    """The smallest L1 step onto w.(p + d) = w.p + needed within the range, as the minimum over
    the LP's vertices: every order of moving whole coordinates to their bound, the last one
    partly. None if even all of them do not reach."""
    low, high = pixel_range
    way = np.sign(weight) * np.sign(needed)
    room = np.where(way > 0, high - point, point - low) * (way != 0)
    best = None
    for order in itertools.permutations(range(len(point))):
        step, left = np.zeros_like(point), abs(needed)
        for i in order:
            if left <= 0:
                break
            move = min(room[i], left / abs(weight[i])) if weight[i] else 0.0
            step[i], left = way[i] * move, left - abs(weight[i]) * move
        if left <= 1e-9 and (best is None or np.abs(step).sum() < np.abs(best).sum()):
            best = step
    return best


def test_fabs_l1_projection_is_the_smallest_step_onto_the_hyperplane_in_the_box():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (40, 5))
    weights = rng.normal(size=(40, 5))
    weights[:5, 1] = 0
    biases = (weights * points).sum(1) + rng.normal(0, 0.8, 40)
    steps = fab.project_onto_hyperplane(tf.constant(points), tf.constant(weights),
                                        tf.constant(biases), pixel_range=(0.0, 1.0),
                                        ball=threat_model.ball("L1")).numpy()
    assert (points + steps).min() >= 0 and (points + steps).max() <= 1
    reached = 0
    for point, weight, bias, step in zip(points, weights, biases, steps):
        smallest = smallest_step_over_orders(point, weight, bias - weight @ point, (0.0, 1.0))
        if smallest is None:  # out of reach: every coordinate goes to its bound that way
            assert weight @ (point + step) != pytest.approx(bias)
            continue
        reached += 1
        assert weight @ (point + step) == pytest.approx(bias, abs=1e-9)
        assert np.abs(step).sum() == pytest.approx(np.abs(smallest).sum(), rel=1e-9)
    assert reached >= 25


def smallest_l1_to_boundary(x, label, kernel, bias):
    """For a linear model, the smallest L1 perturbation within [0, 1] that makes another class's
    logit reach the label's: per other class, the coordinates of the largest weight difference
    move all the way to their bound first (a fractional knapsack)."""
    logits = x @ kernel + bias
    distances = []
    for other in range(kernel.shape[1]):
        if other == label:
            continue
        weight = kernel[:, other] - kernel[:, label]
        gap = logits[label] - logits[other]
        room = np.where(weight > 0, 1 - x, x)
        distance, left = 0.0, gap
        for i in np.argsort(-np.abs(weight)):
            if left <= 0 or weight[i] == 0:
                break
            move = min(room[i], left / abs(weight[i]))
            distance, left = distance + move, left - abs(weight[i]) * move
        distances.append(distance if left <= 1e-12 else np.inf)
    return min(distances)


@pytest.mark.slow
def test_l1_autoattack_and_pgd_on_a_linear_model_break_exactly_what_the_box_allows():
    """AutoAttack breaks exactly the examples whose smallest L1 perturbation within the box
    is below epsilon; PGD never breaks one above it."""
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(12, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    x = rng.uniform(0, 1, (300, 12)).astype(np.float32)
    y = np.argmax(x @ kernel + bias, axis=1)
    epsilon = 0.6
    distances = np.array([smallest_l1_to_boundary(x[i].astype(np.float64), y[i],
                                                  kernel.astype(np.float64), bias)
                          for i in range(len(x))])
    clear = np.abs(distances - epsilon) > 0.05 * epsilon
    x, y, distances = x[clear][:40], y[clear][:40], distances[clear][:40]
    assert 10 <= np.sum(distances < epsilon) <= 30

    def model(inputs):
        return tf.matmul(inputs, kernel) + bias

    result = AutoAttack(model, norm="L1", epsilon=epsilon).evaluate(x, y)
    np.testing.assert_array_equal(result.robust, distances > epsilon)
    sizes = np.abs(result.x_adv - x).sum(1)
    assert sizes.max() <= epsilon * (1 + 1e-5)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    x_pgd = PGD(model, epsilon=epsilon, steps=10, norm="L1").perturb(x, y)
    assert np.abs(x_pgd - x).sum(1).max() <= epsilon * (1 + 1e-5)
    assert x_pgd.min() >= 0 and x_pgd.max() <= 1
    broken = np.argmax(model(x_pgd).numpy(), axis=1) != y
    assert not np.any(broken & (distances > epsilon))
    assert np.mean(broken[distances < epsilon / 2]) >= 0.9


@pytest.mark.slow
def test_standard_l1_autoattack_agrees_with_the_reference():
    """fra31/auto-attack's standard L1 evaluation of the fixture's MLP on its 200 images
    (tests/fixtures/README.md): robust accuracy within 1 point after each attack. Marked slow:
    the whole standard evaluation of 200 images takes minutes on a CPU."""
    with np.load(FIXTURE, allow_pickle=False) as saved:
        saved = dict(saved)
    epsilon = float(saved["l1_eps"])
    attacks = saved.get("l1_attacks", saved["attacks"])
    result = AutoAttack(reference_mlp(saved), norm="L1", epsilon=epsilon).evaluate(
        saved["x"], saved["y"], batch_size=200)
    reference = dict(zip((str(name) for name in attacks), saved["l1_accuracy_after"]))
    assert list(result.accuracy_after) == list(reference)
    examples = len(saved["x"])
    for name in reference:  # 1 point: 2 of the 200 examples, counted without round-off
        assert abs(round((result.accuracy_after[name] - reference[name]) * examples)) \
            <= examples // 100, name
    assert np.mean(result.robust == saved["l1_robust"]) >= 0.97
    sizes = np.abs(result.x_adv - saved["x"]).reshape(len(saved["x"]), -1).sum(1)
    assert sizes.max() <= epsilon * (1 + 1e-5)


@pytest.mark.slow
def test_autoattack_py_in_l1_needs_its_epsilon_and_reports_in_l1(tmp_path):
    """--norm=L1 without --epsilon is one error line (the config's epsilon is the L-infinity
    radius); with it, the report's settings and largest perturbation are in L1."""
    model = (f"--model_dir={shared_path('fixtures', 'tf1_checkpoints', 'mnist')}",
             f"--data_path={shared_path('data', 'mnist')}")
    assert_one_error_line(run_script("mnist_challenge/autoattack.py", *model, "--norm=L1"),
                          "--norm=L1 needs --epsilon")
    store = tmp_path / "aa.npy"
    result = run_script("mnist_challenge/autoattack.py", *model, "--norm=L1", "--epsilon=15",
                        "--attacks=apgd-ce", "--num_eval_examples=4", f"--store_adv_path={store}")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.load(open(tmp_path / "aa.json"))
    assert report["settings"]["norm"] == "L1" and report["settings"]["epsilon"] == 15
    sizes = np.abs(np.load(store) - MNISTData(shared_path("data", "mnist")).test_images[:4]).sum(1)
    assert 1 < report["max_perturbation"] == pytest.approx(sizes.max(), rel=1e-5)
    assert sizes.max() <= 15 * (1 + 1e-5)
