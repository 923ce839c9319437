"""diagnose on models with known failure modes (failure_modes.py), built from a linear MNIST
model trained in a few seconds: its input quantised under tf.stop_gradient (zero gradients),
random noise on its input (random outputs), its logits times 10^4 (a saturated cross-entropy),
a softmax on top (probabilities), the model itself, and the TF1 MNIST fixture (diagnose.py in one
process and as a 2-worker cluster, which agree). Each broken one triggers its indicator, the
natural ones none; the worst case never exceeds AutoAttack's."""

import json

import numpy as np
import pytest
import tensorflow as tf
from failure_modes import WRAPPERS, linear_model, quantised
from helpers import assert_one_error_line, run_cluster, run_script, shared_path, writable_copy

from common.attacks import APGD, FAB, PGD, AutoAttack, Square, losses
from common.evaluation import indicators
from common.evaluation.diagnose import diagnose
from common.io import checkpoints
from mnist_challenge import mnist_input
from mnist_challenge import model as mnist_model

EPSILON = 0.3
EXAMPLES = 10
FIXTURE_EPSILON = 0.1


@pytest.fixture(scope="module")
def data():
    return mnist_input.MNISTData(shared_path("data", "mnist"))


@pytest.fixture(scope="module")
def natural(data):
    return linear_model(data)


@pytest.fixture(scope="module")
def examples(data):
    return data.test_images[:EXAMPLES], data.test_labels[:EXAMPLES].astype(np.int64)


def _reported(model):
    """A 10-step PGD (steps of epsilon / 4): what a user reports, cheaper than PGD-40."""
    return PGD(model, epsilon=EPSILON, steps=10, step_size=EPSILON / 4, seed=0)


@pytest.fixture(scope="module")
def diagnoses(natural, examples):
    """name -> the diagnosis of that wrapper of `natural`, computed once when first asked."""
    found = {}

    def diagnosis(name):
        if name not in found:
            model = WRAPPERS[name](natural)
            found[name] = diagnose(model, *examples, epsilon=EPSILON, attack=_reported(model),
                                   image_shape=(28, 28, 1))
        return found[name]

    return diagnosis


def _triggered(diagnosis):
    return {item.name: item for item in diagnosis.indicators if item.triggered}


@pytest.mark.slow
def test_a_quantised_input_triggers_zero_gradients_and_square_breaks_it(diagnoses):
    diagnosis = diagnoses("quantised")
    triggered = _triggered(diagnosis)
    assert triggered["zero_gradients"].value == 1.0  # every example, every loss, every start
    assert "black_box_beats_white_box" in triggered
    assert not diagnosis.trustworthy
    assert diagnosis.robust_accuracy < diagnosis.reported_accuracy


@pytest.mark.slow
def test_random_outputs_trigger_randomized_outputs_and_eot(diagnoses):
    diagnosis = diagnoses("noisy")
    assert _triggered(diagnosis)["randomized_outputs"].value == 1.0
    assert any("EOT" in note for note in diagnosis.notes)


@pytest.mark.slow
def test_a_saturated_cross_entropy_is_not_a_zero_gradient_but_the_reported_number_is_wrong(
        diagnoses, examples):
    diagnosis = diagnoses("scaled")
    triggered = _triggered(diagnosis)
    assert "zero_gradients" not in triggered  # the margin and DLR losses still have gradients
    assert {"reported_overestimates", "loss_not_increasing"} <= set(triggered)
    assert triggered["reported_overestimates"].value == pytest.approx(
        diagnosis.reported_accuracy - diagnosis.robust_accuracy)


@pytest.mark.slow
def test_probabilities_are_attacked_through_their_logarithm(diagnoses):
    diagnosis = diagnoses("probabilities")
    assert "probability_outputs" in _triggered(diagnosis)
    # The logarithm restores the logits' attack: as broken as the model itself.
    assert diagnosis.robust_accuracy == diagnoses("natural").robust_accuracy


@pytest.mark.slow
def test_the_natural_model_triggers_nothing(diagnoses, natural, examples):
    diagnosis = diagnoses("natural")
    assert diagnosis.trustworthy, diagnosis.to_markdown()
    x, y = examples
    assert diagnosis.clean_accuracy == np.mean(np.argmax(natural(x), axis=1) == y)
    assert diagnosis.curves["APGD-CE"][-1] <= diagnosis.curves["APGD-CE"][0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scaled", "quantised"])
def test_the_worst_case_is_at_most_autoattack(diagnoses, natural, examples, name):
    model = WRAPPERS[name](natural)
    result = AutoAttack(model, epsilon=EPSILON, image_shape=(28, 28, 1)).evaluate(*examples)
    diagnosis = diagnoses(name)
    assert diagnosis.robust_accuracy <= result.robust_accuracy
    assert not np.any(diagnosis.robust & ~result.robust)


@pytest.mark.slow
def test_the_report_holds_every_indicator_and_reads_back_as_json(diagnoses):
    diagnosis = diagnoses("scaled")
    report = json.loads(json.dumps(diagnosis.to_dict()))
    assert [item["name"] for item in report["indicators"]] == list(indicators.RULES)
    assert report["trustworthy"] is False and report["robust_accuracy"] == \
        diagnosis.robust_accuracy
    assert len(report["robust"]) == EXAMPLES
    table = diagnosis.to_markdown()
    for item in diagnosis.indicators:
        assert f"| {item.name} | {'yes' if item.triggered else 'no'} |" in table


# Radii at which the linear model keeps some, not all, of its accuracy (pixels in [0, 1]).
OTHER_NORMS = {"L2": 1.0, "L1": 6.0}


@pytest.mark.slow
@pytest.mark.parametrize("norm", sorted(OTHER_NORMS))
def test_in_l2_and_l1_the_saturated_model_is_caught_and_autoattack_bounds_the_worst_case(
        natural, examples, norm):
    """The same diagnosis in the other balls: the scaled logits (a 10-step PGD of the ball's
    own steps reports too much) trigger what they trigger in L-infinity, and the worst case
    found is never above the ball's AutoAttack."""
    epsilon = OTHER_NORMS[norm]
    x, y = (values[:10] for values in examples)
    model = WRAPPERS["scaled"](natural)
    reported = PGD(model, epsilon=epsilon, norm=norm, steps=10, step_size=epsilon / 4, seed=0)
    diagnosis = diagnose(model, x, y, epsilon=epsilon, norm=norm, attack=reported,
                         image_shape=(28, 28, 1))
    triggered = _triggered(diagnosis)
    assert "zero_gradients" not in triggered and "reported_overestimates" in triggered, \
        diagnosis.to_markdown()
    assert diagnosis.to_dict()["norm"] == norm
    result = AutoAttack(model, norm=norm, epsilon=epsilon, image_shape=(28, 28, 1)).evaluate(x, y)
    assert 0 < result.robust_accuracy < diagnosis.clean_accuracy
    assert not np.any(diagnosis.robust & ~result.robust)


def test_no_attack_crashes_on_a_model_without_gradients(natural, examples):
    model = quantised(natural)
    x, y = examples
    for attack in (PGD(model, epsilon=EPSILON, steps=2), APGD(model, epsilon=EPSILON, steps=2),
                   FAB(model, epsilon=EPSILON, steps=2), FAB(model, epsilon=EPSILON, steps=2,
                                                             targets=2),
                   Square(model, epsilon=EPSILON, steps=20, image_shape=(28, 28, 1))):
        x_adv = attack.perturb(x, y)
        assert np.all(np.isfinite(x_adv)) and np.abs(x_adv - x).max() <= EPSILON + 1e-6


def test_a_gradient_that_does_not_exist_is_zero():
    x = tf.constant(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        rounded = tf.stop_gradient(tf.round(x)) * 2.0
        rounded_total, linear_total = tf.reduce_sum(rounded), tf.reduce_sum(3.0 * x)
    assert np.array_equal(losses.gradient(tape, rounded_total, x), np.zeros((3, 4)))
    assert np.array_equal(losses.gradient(tape, linear_total, x), np.full((3, 4), 3.0))
    jacobian = losses.gradient(tape, rounded, x, per_example=True)
    assert jacobian.shape == (3, 4, 4) and not np.any(jacobian)


def test_pgd_traces_the_loss_it_maximises(natural, examples):
    x, y = examples
    attack = PGD(natural, epsilon=EPSILON, steps=5, loss="cw", seed=3)
    x_adv, trace = attack.perturb_with_losses(x, y)
    assert trace.shape == (len(x), 6)
    assert np.array_equal(x_adv, PGD(natural, epsilon=EPSILON, steps=5, loss="cw",
                                     seed=3).perturb(x, y))
    logits = natural(x_adv).numpy()
    wrong = np.max(np.where(np.eye(10)[y] > 0, -np.inf, logits), axis=1)
    margin = logits[np.arange(len(y)), y] - wrong
    np.testing.assert_allclose(trace[:, -1], -np.maximum(margin + 50, 0), rtol=1e-4, atol=1e-3)


def test_bad_input_is_refused_before_any_attack(natural, examples):
    x, y = examples
    with pytest.raises(ValueError, match="epsilon, norm and pixel_range"):
        diagnose(natural, x, y, epsilon=EPSILON, attack=PGD(natural, epsilon=0.1))
    with pytest.raises(TypeError, match="attack must be a PGD"):
        diagnose(natural, x, y, epsilon=EPSILON, attack="pgd")
    with pytest.raises(ValueError, match="pixel_range"):
        diagnose(natural, x * 255, y, epsilon=EPSILON)
    with pytest.raises(ValueError, match="Unknown norm"):
        diagnose(natural, x, y, epsilon=EPSILON, norm="L3")


def test_an_indicator_triggers_only_beyond_its_threshold():
    at = indicators.indicator("more_iterations_help", indicators.POINT)
    above = indicators.indicator("more_iterations_help", 2 * indicators.POINT)
    assert not at.triggered and above.triggered
    assert above.advice == indicators.RULES["more_iterations_help"].advice


# The fixture's config PGD shortened to 10 steps of 0.025 at epsilon 0.1, on 10 test images in
# batches of 5 (on two workers, 3 and 2 images each).
FIXTURE_ARGS = ("--num_eval_examples=10", "--eval_batch_size=5", "--k=10", "--a=0.025",
                f"--epsilon={FIXTURE_EPSILON}")


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """mnist_challenge/diagnose.py on the TF1 MNIST fixture in one process, with FIXTURE_ARGS:
    (its result, the model folder, the output folder)."""
    folder = tmp_path_factory.mktemp("fixture")
    model_dir = writable_copy(shared_path("fixtures", "tf1_checkpoints", "mnist"), folder)
    out_dir = folder / "out"
    result = run_script("mnist_challenge/diagnose.py", f"--model_dir={model_dir}",
                        f"--data_path={shared_path('data', 'mnist')}", *FIXTURE_ARGS,
                        f"--out_dir={out_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, model_dir, out_dir


@pytest.mark.slow
def test_the_script_on_the_fixture_model_triggers_nothing_and_stays_below_autoattack(
        fixture_run, data):
    result, model_dir, out_dir = fixture_run
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(
        ["diagnosis.md", "diagnosis.json", "accuracy_vs_epsilon.png", "attack_loss.png"])
    report = json.load(open(out_dir / "diagnosis.json"))
    assert report["examples"] == 10 and report["reported_attack"] == "PGD-10"
    assert [item["name"] for item in report["indicators"]] == list(indicators.RULES)
    assert report["trustworthy"], (out_dir / "diagnosis.md").read_text()
    assert (out_dir / "diagnosis.md").read_text() in result.stdout
    for figure in ("accuracy_vs_epsilon.png", "attack_loss.png"):
        assert (out_dir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = mnist_model.Model(on_cpu=True)
    checkpoints.load_weights(model, f"{model_dir}/checkpoint-300", mnist_model.tf1_variables)
    x, y = data.test_images[:10], data.test_labels[:10].astype(np.int64)
    assert report["clean_accuracy"] == np.mean(np.argmax(model(x), axis=1) == y)
    autoattack = AutoAttack(model, epsilon=FIXTURE_EPSILON, image_shape=(28, 28, 1))
    assert report["robust_accuracy"] <= autoattack.evaluate(x, y).robust_accuracy


@pytest.mark.slow
def test_a_two_worker_cluster_writes_the_same_diagnosis(tmp_path, fixture_run):
    """The same command as a 2-worker TF_CONFIG cluster on 127.0.0.1 (new processes, each
    attacking its share of every batch): the chief alone prints and writes, and its report is
    the single process's, the median losses to round-off (a CPU may round an example's logits
    otherwise in a batch of another size: AVX2 with one thread does)."""
    result, model_dir, out_dir = fixture_run
    cluster = run_cluster("mnist_challenge/diagnose.py", f"--model_dir={model_dir}",
                          f"--data_path={shared_path('data', 'mnist')}", *FIXTURE_ARGS,
                          f"--out_dir={tmp_path}")
    for returncode, _, err in cluster:
        assert returncode == 0, err[-3000:]
    (_, chief_out, _), (_, worker_out, _) = cluster
    assert worker_out == "" and (out_dir / "diagnosis.md").read_text() in chief_out
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        path.name for path in out_dir.iterdir())
    spread, single = (json.load(open(folder / "diagnosis.json")) for folder in (tmp_path, out_dir))
    losses = spread.pop("median_loss")
    for attack, values in single.pop("median_loss").items():
        np.testing.assert_allclose(losses.pop(attack), values, rtol=1e-5, err_msg=attack)
    assert spread == single and not losses


@pytest.mark.slow
def test_the_cifar10_script_diagnoses_the_simple_fixture_on_the_255_scale(tmp_path,
                                                                         cifar_fixture,
                                                                         cifar_data):
    """The TF1 CIFAR-10 fixture (the simple network) through cifar10_challenge/diagnose.py on 3
    test images, epsilon 8 of 255 and its config's PGD shortened to 2 steps of 4: the same
    report, its ball on the [0, 255] scale."""
    out_dir = tmp_path / "out"
    result = run_script("cifar10_challenge/diagnose.py",
                        f"--model_dir={writable_copy(cifar_fixture, tmp_path)}",
                        f"--data_path={cifar_data}", "--filters=[16,16,32,64]",
                        "--num_eval_examples=3", "--num_steps=2", "--step_size=4",
                        f"--out_dir={out_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(out_dir / "diagnosis.json"))
    assert (report["examples"], report["epsilon"], report["norm"]) == (3, 8.0, "Linf")
    assert report["reported_attack"] == "PGD-2"
    assert [item["name"] for item in report["indicators"]] == list(indicators.RULES)
    assert report["robust_accuracy"] <= min(report["reported_accuracy"],
                                            report["clean_accuracy"])
    assert (out_dir / "accuracy_vs_epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_script_refuses_a_norm_without_its_epsilon(tmp_path, mnist_fixture):
    result = run_script("mnist_challenge/diagnose.py", f"--model_dir={mnist_fixture}",
                        "--norm=L2")
    assert_one_error_line(result, "--norm=L2 needs --epsilon")
