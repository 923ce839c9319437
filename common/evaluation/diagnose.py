"""Can an attack's robust accuracy be trusted? `diagnose` runs the reported attack, AutoAttack
and the checks that reveal a failed attack or a masked gradient (Carlini et al. 2019, "On
Evaluating Adversarial Robustness"; Pintor et al. 2022, "Indicators of Attack Failure"), and
returns a `Diagnosis`: the worst-case robust accuracy over every attack it ran and one verdict
per indicator (indicators.py).

Every attack is one of the library's (PGD, APGD, Square, AutoAttack), so each spreads over the
`strategy` it is given. The costly checks run on the examples that matter: 10 times the steps
only on what the reported attack left robust, the epsilon grid only on the examples classified
correctly.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import tqdm

from common.attacks import APGD, PGD, AutoAttack, Square, checks, pgd
from common.attacks.autoattack import CLEAN, EOT_ITERATIONS
from common.attacks.threat_model import ThreatModel
from common.evaluation.indicators import Diagnosis, indicator
from common.runtime import devices, seeds
from common.runtime.batching import batch_bounds

# The grid of accuracy_rises_with_epsilon, in multiples of epsilon.
EPSILON_FACTORS = (0.25, 0.5, 1.0, 1.5, 2.0)
# The default reported attack: the MNIST challenge's PGD, 40 steps of 0.01 at epsilon 0.3,
# the step scaled with epsilon.
REPORTED_STEPS = 40
REPORTED_STEP = 0.01 / 0.3
# more_iterations_help: the steps multiplied by this, and this many restarts.
STRONGER = 10
# zero_gradients looks at the clean point and at this many random starts in the ball, for each
# loss the attacks maximise.
GRADIENT_STARTS = 4
GRADIENT_LOSSES = ("xent", "cw", "dlr")
# Their starts draw from the attack-starts stream at this index, apart from PGD's own.
GRADIENT_STARTS_INDEX = 1
# Two passes differ where a logit moves by more than this times 1 + its size.
RANDOM_TOLERANCE = 1e-5
# loss_not_increasing: a loss that never rises more than this times 1 + its start stalls.
STALL_TOLERANCE = 1e-6
# The log of a probability is taken at least at this.
PROBABILITY_FLOOR = 1e-30
STAGES = ("reported attack", "AutoAttack", "more iterations", "unbounded attack",
          "epsilon grid", "gradients")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Run:
    """What every stage shares: the model attacked (logits), the examples, the ball."""

    model: object
    x: np.ndarray
    y: np.ndarray
    threat: ThreatModel
    seed: int
    strategy: object
    image_shape: tuple
    batch_size: int
    randomized: bool
    # The model's logits, traced once: a random op then draws anew at each call (a function
    # traced anew under a global seed would draw the same values again).
    predict: object

    @property
    def eot(self):
        return EOT_ITERATIONS["rand"] if self.randomized else 1

    def logits(self, x):
        return _batched(self.predict, x, batch_size=self.batch_size)

    def misclassified(self, x_adv, indices):
        """Whether the model misclassifies `x_adv`, the adversarial examples of `indices`."""
        return np.argmax(self.logits(x_adv), axis=1) != self.y[indices]

    def broken_by(self, perturb, indices):
        """Which of the examples `indices` `perturb(x, y)` breaks (all False where none)."""
        broken = np.zeros(len(self.y), bool)
        if len(indices):
            x_adv = _batched(perturb, self.x[indices], self.y[indices],
                             batch_size=self.batch_size)
            broken[indices] = self.misclassified(x_adv, indices)
        return broken


def _batched(function, *arrays, batch_size):
    """`function` on `batch_size` examples of `arrays` at a time, its outputs (an array or a
    tuple of them) concatenated."""
    parts = [function(*(array[first:end] for array in arrays))
             for first, end in batch_bounds(len(arrays[0]), batch_size)]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(outputs) for outputs in zip(*parts))
    return np.concatenate(parts)


def _share(mask):
    return float(np.mean(mask))


def default_attack(model, *, threat, seed=0, strategy=None):
    """The reported attack by default: the MNIST challenge's PGD-40 (steps of 0.01 at epsilon
    0.3) scaled to the threat model's epsilon, from a random start, on the cross-entropy."""
    return PGD(model, epsilon=threat.epsilon, norm=threat.norm, steps=REPORTED_STEPS,
               step_size=REPORTED_STEP * threat.epsilon, pixel_range=threat.pixel_range,
               seed=seed, strategy=strategy)


def _check_attack(attack, threat):
    if not isinstance(attack, PGD):
        raise TypeError(f"attack must be a PGD (common.attacks.PGD). Received: attack={attack!r}")
    settings = attack.settings
    if (settings.epsilon, settings.norm, settings.pixel_range) != \
            (threat.epsilon, threat.norm, threat.pixel_range):
        raise ValueError(f"attack must be of the diagnosis's epsilon, norm and pixel_range "
                         f"({threat.epsilon:g}, {threat.norm}, {threat.pixel_range}). Received: "
                         f"attack of epsilon={settings.epsilon:g}, norm={settings.norm}, "
                         f"pixel_range={settings.pixel_range}")


def attack_name(settings):
    """How a PGD attack of `settings` is named in reports: PGD-40, PGD-100 (cw), ..."""
    loss = settings.loss if isinstance(settings.loss, str) else "custom loss"
    return f"PGD-{settings.steps}" + ("" if loss == "xent" else f" ({loss})")


def _probability_share(outputs):
    """The share of rows of `outputs` that are non-negative and sum to 1 (checks' rule)."""
    sums = np.sum(outputs, axis=1)
    return _share(np.all(outputs >= 0, axis=1)
                  & (np.abs(sums - 1) <= checks.PROBABILITY_TOLERANCE))


def _random_share(first, second):
    """The share of examples whose logits differ between the two passes `first`, `second`."""
    moved = np.abs(first - second) > RANDOM_TOLERANCE * (1 + np.abs(first))
    return _share(np.any(moved, axis=1))


def log_probabilities(model):
    """`model`, which returns probabilities, as a callable returning their logarithm: logits of
    the same softmax."""
    def logits(x):
        probabilities = tf.cast(devices.call_model(model, x), tf.float32)
        return tf.math.log(tf.maximum(probabilities, PROBABILITY_FLOOR))

    return logits


def largest_epsilon(threat, example_shape):
    """The radius of the threat model's ball that reaches every image of the pixel range: the
    norm of a perturbation of the range's width on every coordinate."""
    low, high = threat.pixel_range
    full = tf.fill((1, int(np.prod(example_shape))), high - low)
    return float(threat.norms(tf.cast(full, tf.float64)).numpy()[0])


def _reported(run, attack):
    """(which examples the reported attack breaks, its loss per example and step)."""
    everything = np.arange(len(run.y))
    x_adv, trace = _batched(attack.perturb_with_losses, run.x, run.y,
                           batch_size=run.batch_size)
    return run.misclassified(x_adv, everything), trace


def _autoattack(run, progress):
    """(which examples AutoAttack's gradient attacks break, which Square alone breaks, its
    accuracy after APGD-CE). With random outputs the rand version (EOT), then Square."""
    version = "rand" if run.randomized else "standard"
    result = AutoAttack(run.model, epsilon=run.threat.epsilon, norm=run.threat.norm,
                        version=version, pixel_range=run.threat.pixel_range, seed=run.seed,
                        strategy=run.strategy, image_shape=run.image_shape,
                        progress=progress).evaluate(run.x, run.y, batch_size=run.batch_size)
    broken = ~result.robust & (result.broken_by != CLEAN)
    by_square = result.broken_by == "square"
    if run.randomized:
        square = Square(run.model, epsilon=run.threat.epsilon, norm=run.threat.norm,
                        pixel_range=run.threat.pixel_range, seed=run.seed,
                        strategy=run.strategy, image_shape=run.image_shape)
        by_square = run.broken_by(square.perturb, np.flatnonzero(result.robust))
    return broken & ~by_square, by_square, result.accuracy_after["apgd-ce"]


def _stronger(run, settings, robust):
    """(which of the examples still `robust` PGD of STRONGER times the steps breaks over
    STRONGER restarts, each restart on those still robust; the first restart's loss trace)."""
    stronger = dataclasses.replace(settings, steps=settings.steps * STRONGER)
    attack = PGD.from_settings(run.model, stronger, seed=run.seed + 1, strategy=run.strategy)
    broken = np.zeros(len(run.y), bool)
    todo = np.flatnonzero(robust)
    trace = np.zeros((0, stronger.steps + 1), np.float32)
    for restart in range(STRONGER):
        if not len(todo):
            break
        if restart == 0:
            x_adv, trace = _batched(attack.perturb_with_losses, run.x[todo], run.y[todo],
                                    batch_size=run.batch_size)
        else:
            x_adv = _batched(attack.perturb, run.x[todo], run.y[todo],
                             batch_size=run.batch_size)
        newly = run.misclassified(x_adv, todo)
        broken[todo[newly]] = True
        todo = todo[~newly]
    return broken, trace


def _unbounded(run, scalable, correct):
    """Which examples classified correctly the PGD `scalable` leaves so with epsilon as large as
    the pixel range allows (its step size scaled alike)."""
    factor = largest_epsilon(run.threat, run.x.shape[1:]) / run.threat.epsilon
    attack = scalable.scaled(factor)
    return correct & ~run.broken_by(attack.perturb, np.flatnonzero(correct))


def _grid(run, scalable, correct, reported_broken):
    """Per attack (the reported PGD, scaled from `scalable`; APGD-CE, scaled from one
    attack), which examples it breaks at each of EPSILON_FACTORS times epsilon, attacking only
    those classified correctly."""
    settings, todo = scalable.settings, np.flatnonzero(correct)
    apgd = APGD(run.model, epsilon=run.threat.epsilon, norm=run.threat.norm, loss="xent",
                eot_iterations=run.eot, pixel_range=run.threat.pixel_range, seed=run.seed,
                strategy=run.strategy)
    pgd_broken, apgd_broken = [], []
    for factor in EPSILON_FACTORS:
        if factor == 1.0:
            pgd_broken.append(reported_broken)
        else:
            pgd_broken.append(run.broken_by(scalable.scaled(factor).perturb, todo))
        apgd_broken.append(run.broken_by(apgd.scaled(factor).perturb, todo))
    return {attack_name(settings): pgd_broken, "APGD-CE": apgd_broken}


def _vanishing_gradients(run):
    """Which examples have a zero input gradient for every loss of GRADIENT_LOSSES, at the clean
    point and at GRADIENT_STARTS random starts in the ball."""
    def largest(x, y):
        return tf.reduce_max(tf.stack([
            tf.reduce_max(tf.abs(tf.reshape(pgd.input_gradient(run.model, x, y, loss),
                                            (tf.shape(x)[0], -1))), axis=1)
            for loss in GRADIENT_LOSSES]), axis=0)

    spread = devices.Spread(run.strategy, largest)
    rng = seeds.generator(run.seed, seeds.ATTACK_STARTS, GRADIENT_STARTS_INDEX)
    points = [run.x] + [run.threat.uniform_start(run.x, rng).astype(np.float32)
                        for _ in range(GRADIENT_STARTS)]
    sizes = [_batched(spread, point, run.y, batch_size=run.batch_size) for point in points]
    return np.all(np.stack(sizes) == 0, axis=0)


def _stalled(trace, correct):
    """Which examples classified correctly have a loss that never rises above its start."""
    if trace.shape[1] < 2:
        return np.zeros(len(correct), bool)
    start = trace[:, 0]
    return correct & (np.max(trace[:, 1:], axis=1) <= start + STALL_TOLERANCE * (1 + np.abs(start)))


def _rise_with_epsilon(curves, examples):
    """(the largest rise of an accuracy along a curve from one epsilon to a larger one, the noise
    it must exceed): of all pairs, the one whose rise exceeds its noise most. The noise is twice
    the standard error of the two accuracies' difference, at least one example."""
    best = (-np.inf, 0.0, 0.0)
    for accuracies in curves.values():
        for i, lower in enumerate(accuracies):
            for upper in accuracies[i + 1:]:
                noise = max(2 * np.sqrt((lower * (1 - lower) + upper * (1 - upper)) / examples),
                            1 / examples)
                rise = upper - lower
                best = max(best, (rise - noise, rise, noise))
    return best[1], best[2]


def diagnose(model, x, y, *, epsilon, norm="Linf", pixel_range=(0.0, 1.0), seed=0, attack=None,
             image_shape=None, strategy=None, batch_size=500, progress=False):
    """Diagnoses the robust accuracy of `model` on `(x, y)` within `epsilon` in `norm`: the
    reported attack's accuracy, the worst case over every attack run, and the indicators of a
    failed attack or a masked gradient. Returns a Diagnosis.

    Args:
        model: a Keras model or a callable returning logits (or probabilities: the indicator
            says so and the attacks run on their logarithm).
        x: the inputs, batch first, within `pixel_range`.
        y: their integer labels.
        epsilon: the radius of the ball.
        norm: the ball's norm, "Linf", "L2" or "L1".
        pixel_range: (low, high), the range of valid inputs.
        seed: seeds every attack's random starts.
        attack: the PGD whose accuracy is reported (by default `default_attack`: PGD-40).
        image_shape: (height, width, channels) of one input where it is not an image (flat
            MNIST: (28, 28, 1)), for Square.
        strategy: spreads each attack's batches over its replicas.
        batch_size: examples per attack call.
        progress: shows a progress bar over the stages (and AutoAttack's own).
    """
    threat = ThreatModel(epsilon=epsilon, norm=norm, pixel_range=pixel_range)
    checks.check_keywords(batch_size=(batch_size, 1))
    x = checks.check_inputs(x, threat.pixel_range)
    y = checks.check_labels(y, len(x))
    if attack is not None:
        _check_attack(attack, threat)
    outputs = _batched(devices.spread_logits(model, strategy), x, batch_size=batch_size)
    probabilities = indicator("probability_outputs", _probability_share(outputs))
    attacked = log_probabilities(model) if probabilities.triggered else model
    run = _Run(model=attacked, x=x, y=y, threat=threat, seed=seed, strategy=strategy,
               image_shape=image_shape, batch_size=batch_size, randomized=False,
               predict=devices.spread_logits(attacked, strategy))
    first = run.logits(x)
    checks.check_classes(y, checks.check_logits(first))
    randomized = indicator("randomized_outputs", _random_share(first, run.logits(x)))
    run = dataclasses.replace(run, randomized=randomized.triggered)
    attack = attack or default_attack(attacked, threat=threat, seed=seed, strategy=strategy)
    if probabilities.triggered:
        attack = PGD.from_settings(attacked, attack.settings, restarts=attack.restarts, seed=seed,
                                   strategy=strategy)
    return _diagnosis(run, attack, early=[randomized, probabilities], first_logits=first,
                      progress=progress)


def _diagnosis(run, attack, *, early, first_logits, progress):
    """The stages of `diagnose` once the model is known to return logits."""
    settings, examples = attack.settings, len(run.y)
    correct = np.argmax(first_logits, axis=1) == run.y
    bar = tqdm.tqdm(total=len(STAGES), desc="diagnose", unit="stage", disable=not progress,
                    leave=False)

    def stage(index):
        """Shows stage `index` as under way, the ones before as done."""
        bar.update(index - bar.n)
        bar.set_description(f"diagnose: {STAGES[index]}")

    stage(0)
    reported_broken, reported_trace = _reported(run, attack)
    reported_accuracy = _share(~reported_broken)
    stage(1)
    white_broken, square_broken, apgd_accuracy = _autoattack(run, progress)
    stage(2)
    robust_after_reported = correct & ~reported_broken
    stronger_broken, stronger_trace = _stronger(run, settings, robust_after_reported)
    stage(3)
    # One trace serves every epsilon of the reported PGD (one restart) below.
    scalable = PGD.from_settings(run.model, settings, seed=run.seed, strategy=run.strategy)
    left = _unbounded(run, scalable, correct)
    stage(4)
    grid = _grid(run, scalable, correct, reported_broken)
    stage(5)
    vanishing = _vanishing_gradients(run)
    bar.update(len(STAGES) - bar.n)
    bar.close()

    within = [factor <= 1.0 for factor in EPSILON_FACTORS]
    gradient_broken = reported_broken | white_broken | stronger_broken | np.any(
        [broken for curve in grid.values() for broken, inside in zip(curve, within) if inside],
        axis=0)
    robust = correct & ~gradient_broken & ~square_broken
    robust_accuracy = _share(robust)
    curves = {name: [_share(correct & ~broken) for broken in curve] for name, curve in grid.items()}
    rise, noise = _rise_with_epsilon(curves, examples)
    stronger_name = attack_name(dataclasses.replace(settings, steps=settings.steps * STRONGER))
    indicators = early + [
        indicator("zero_gradients", _share(vanishing)),
        indicator("unbounded_attack_fails", _share(left)),
        indicator("accuracy_rises_with_epsilon", rise, threshold=noise),
        indicator("more_iterations_help", _share(stronger_broken)),
        indicator("black_box_beats_white_box", _share(square_broken & ~gradient_broken)),
        indicator("loss_not_increasing", _share(_stalled(reported_trace, correct))),
        indicator("reported_overestimates", reported_accuracy - robust_accuracy),
    ]
    notes = _notes(run, early, apgd_accuracy)
    return Diagnosis(
        epsilon=run.threat.epsilon, norm=run.threat.norm, examples=examples,
        clean_accuracy=_share(correct), robust_accuracy=robust_accuracy,
        reported_accuracy=reported_accuracy, reported_attack=attack_name(settings),
        indicators=indicators,
        epsilons=[run.threat.epsilon * factor for factor in EPSILON_FACTORS], curves=curves,
        loss_traces={attack_name(settings): reported_trace[correct],
                     f"{stronger_name} (first restart)": stronger_trace},
        robust=robust, notes=notes)


def _notes(run, early, apgd_accuracy):
    randomized, probabilities = early
    notes = [f"AutoAttack's APGD-CE alone left {apgd_accuracy:.2%}."]
    if randomized.triggered:
        notes.append(f"The outputs are random: APGD averaged {run.eot} gradients per step "
                     "(EOT, AutoAttack's rand version), and Square ran after it.")
    if probabilities.triggered:
        notes.append("The outputs are probabilities: every attack ran on their logarithm.")
    return notes
