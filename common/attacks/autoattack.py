"""AutoAttack (Croce & Hein, ICML 2020): the standard robustness evaluation, an ensemble of
parameter-free attacks, each run on the points that all the attacks before it failed to break,
for any Keras model or callable that returns logits, in the L-infinity, L2 or L1 norm.

`standard` runs APGD-CE, APGD-T, FAB-T and Square; `plus` adds APGD-DLR and untargeted FAB with
5 restarts each; `rand` (for models with random outputs) runs APGD-CE and APGD-DLR with gradients
averaged over 20 passes; a custom list runs the named attacks with the reference's constructor
defaults. A point is robust only if every attack fails on it. The targeted attacks aim at the
min(9, classes - 1) most likely wrong classes. In L1 the standard version is the one of "Mind
the box" (Croce & Hein, ICML 2021): APGD-CE with 5 restarts and APGD-T towards 5 classes, both
with the large-reps schedule (see STANDARD_BY_BALL).

With a state path, the evaluation keeps a state file, rewritten whole after every batch, so that
a killed run resumes where it stopped: the attacks done, the batches done of the attack under
way, and every adversarial example found. Nothing is written or printed otherwise.

Under a MultiWorkerMirroredStrategy (in scope, or given), every worker calls `evaluate` on the
same data: each attacks its replicas' share of every batch, all receive the whole result, and
the chief alone logs, shows progress and writes the state file, which every worker reads to
resume (so it must be on storage all of them read). The random starts are drawn for the whole
batch and then sliced, so the results are those of one process.
"""

import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf
import tqdm

from common.attacks import checks, threat_model
from common.attacks.apgd import APGD
from common.attacks.fab import FAB
from common.attacks.square import Square
from common.attacks.threat_model import ThreatModel
from common.io.files import read_state, written_in_place
from common.runtime import cluster, devices
from common.runtime.batching import batch_bounds

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
MAX_TARGET_CLASSES = 9
# Restarts of APGD-CE, APGD-DLR and FAB, and gradient passes of APGD, per version; a custom list
# takes the reference's constructor defaults (5 restarts).
RESTARTS = {"standard": 1, "plus": 5, "rand": 1, "custom": 5}
# What the standard version changes per ball, keyed by the ball's class: in L1 the reference
# ("Mind the box") runs APGD with the large-reps schedule, APGD-CE with 5 restarts and APGD-T
# towards 5 target classes (FAB-T still 9).
STANDARD_BY_BALL = {threat_model.L1Ball: {"restarts": 5, "apgd_targets": 5, "large_reps": True}}
EOT_ITERATIONS = {"rand": 20}
CLEAN, ROBUST = "clean", ""


def check_attacks(attacks):
    """The attack names of a custom list, each once; ValueError otherwise."""
    names = tuple(attacks)
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"name each attack once, from {', '.join(ATTACKS)}. Received: "
                         f"attacks={list(names)}")
    return names


@dataclasses.dataclass
class Result:
    """What an evaluation found: `robust` per example, `x_adv` (float32, the shape of x; the
    clean image where every attack failed), the accuracy after each attack in the order run
    (`clean` first), and per example the attack that broke it (`clean`: misclassified without
    attack; the empty string: none)."""

    robust: np.ndarray
    x_adv: np.ndarray
    accuracy_after: dict
    broken_by: np.ndarray
    seconds: float

    @property
    def robust_accuracy(self):
        return float(np.mean(self.robust))

    @property
    def clean_accuracy(self):
        return self.accuracy_after[CLEAN]


class AutoAttack:
    """AutoAttack on `model` (a Keras model or a callable returning logits) within `epsilon` in
    `norm`, inputs in `pixel_range`: `evaluate(x, y)` returns a Result. The inputs, labels and
    model are checked first, as every attack checks them (ValueError).

    Args:
        model: a Keras model or a callable returning logits.
        epsilon: the radius of the ball.
        norm: the ball's norm, "Linf", "L2" or "L1".
        version: standard, plus or rand.
        attacks: a list of attack names (from ATTACKS) run instead of a version's, with the
            reference's constructor defaults.
        pixel_range: (low, high), the range of valid inputs.
        seed: seeds every random start.
        strategy: spreads each batch over its replicas (by default the one in scope, else every
            local GPU); a MultiWorkerMirroredStrategy spreads it over the workers of a cluster.
        image_shape: (height, width, channels) of one input, for Square, where the input is not
            an image already (flat MNIST: (28, 28, 1)).
        log: a callable taking a line, where given, receives the reference's report lines.
        progress: shows a progress bar per attack.
    """

    def __init__(self, model, *, epsilon, norm="Linf", version="standard", attacks=None,
                 pixel_range=(0.0, 1.0), seed=0, strategy=None, image_shape=None, log=None,
                 progress=False):
        if attacks is not None:
            version, names = "custom", check_attacks(attacks)
        elif version in VERSIONS:
            names = VERSIONS[version]
        else:
            raise ValueError(f"unknown AutoAttack version {version!r}: use one of "
                             f"{', '.join(VERSIONS)}. Received: version={version!r}")
        self.model = model
        self.threat_model = ThreatModel(epsilon=epsilon, norm=norm, pixel_range=pixel_range)
        self.version, self.attacks = version, names
        self.seed = seed
        self.strategy = strategy or devices.default_strategy()
        self.image_shape = image_shape
        self.log = log or (lambda line: None)
        self.progress = progress
        self._logits = devices.spread_logits(model, self.strategy)
        self._built = {}

    @property
    def settings(self):
        """What defines a run: a state file of other settings is refused."""
        return {"norm": self.threat_model.norm, "epsilon": self.threat_model.epsilon,
                "pixel_range": list(self.threat_model.pixel_range), "version": self.version,
                "attacks": list(self.attacks), "seed": self.seed}

    def _attack(self, name, classes):
        """The attack `name` as a function (x, y) -> adversarial examples, built once per
        evaluation's number of classes."""
        if (name, classes) not in self._built:
            by_ball = STANDARD_BY_BALL.get(type(self.threat_model.ball), {}) \
                if self.version == "standard" else {}
            restarts = by_ball.get("restarts", RESTARTS[self.version])
            eot = EOT_ITERATIONS.get(self.version, 1)
            targets = min(MAX_TARGET_CLASSES, classes - 1)
            apgd_targets = min(by_ball.get("apgd_targets", MAX_TARGET_CLASSES), classes - 1)
            shared = {"epsilon": self.threat_model.epsilon, "norm": self.threat_model.norm,
                      "pixel_range": self.threat_model.pixel_range, "seed": self.seed,
                      "strategy": self.strategy}
            apgd = {"eot_iterations": eot, "large_reps": by_ball.get("large_reps", False),
                    **shared}
            build = {
                "apgd-ce": lambda: APGD(self.model, loss="xent", restarts=restarts, **apgd),
                "apgd-dlr": lambda: APGD(self.model, loss="dlr", restarts=restarts, **apgd),
                "apgd-t": lambda: APGD(self.model, targets=apgd_targets, **apgd),
                "fab": lambda: FAB(self.model, restarts=restarts, **shared),
                "fab-t": lambda: FAB(self.model, targets=targets, **shared),
                "square": lambda: Square(self.model, image_shape=self.image_shape, **shared),
            }
            self._built[(name, classes)] = build[name]().perturb
        return self._built[(name, classes)]

    def evaluate(self, x, y, *, batch_size=500, state_path=None, run_info=None):
        """Runs the attacks on `x` (any shape, batch first) and labels `y`, `batch_size` examples
        at a time. With `state_path`, resumes from the state file there where it holds a run of
        the same settings (and `run_info`, a JSON-able dict the caller adds to them)."""
        x, y, logits = checks.checked_with_model(
            x, y, pixel_range=self.threat_model.pixel_range,
            logits_of=lambda checked: self._logits(checked[:batch_size]))
        classes = logits.shape[1]
        attacks = {name: self._attack(name, classes) for name in self.attacks}
        settings = {**self.settings, **(run_info or {})}
        state = run_attacks(attacks, x, y, predict=self._logits, threat=self.threat_model,
                            settings=settings, batch_size=batch_size, state_path=state_path,
                            log=self.log, progress=self.progress, strategy=self.strategy)
        accuracy_after = {CLEAN: float(np.mean(state.broken_by != CLEAN))}
        accuracy_after.update((result["attack"], result["robust_accuracy"])
                              for result in state.results)
        return Result(robust=state.robust, x_adv=state.x_adv, accuracy_after=accuracy_after,
                      broken_by=state.broken_by.astype(str), seconds=state.seconds)


@dataclasses.dataclass
class State:
    """Where an evaluation stands; `broken_by` names, per example, the attack that broke it
    (CLEAN: misclassified without attack; ROBUST, the empty string: none yet)."""

    settings: dict
    x_adv: np.ndarray
    broken_by: np.ndarray
    results: list = dataclasses.field(default_factory=list)  # per finished attack
    todo: np.ndarray = None  # the examples the attack under way started with
    batches_done: int = 0
    seconds: float = 0.0

    @property
    def robust(self):
        return self.broken_by == ROBUST

    def save(self, path):
        meta = {"settings": self.settings, "results": self.results,
                "batches_done": self.batches_done, "seconds": self.seconds}
        with written_in_place(path) as target:
            np.savez(target, meta=np.array(json.dumps(meta)), x_adv=self.x_adv,
                     broken_by=self.broken_by.astype(str),
                     todo=np.array([] if self.todo is None else self.todo, np.int64),
                     has_todo=np.array(self.todo is not None))

    @classmethod
    def load(cls, path, settings):
        """The state saved at `path` if it belongs to a run of `settings`, else the UserError of
        `read_state`."""

        def read(path):
            with np.load(path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["meta"]))
                return cls(settings=meta["settings"], x_adv=saved["x_adv"],
                           broken_by=saved["broken_by"].astype(object), results=meta["results"],
                           todo=saved["todo"] if saved["has_todo"] else None,
                           batches_done=meta["batches_done"], seconds=meta["seconds"])

        return read_state(path, settings, read, "AutoAttack state file", "give another path")


def _predictions(predict, x, batch_size):
    return np.concatenate([np.argmax(predict(x[first:end]), axis=1)
                           for first, end in batch_bounds(len(x), batch_size)])


def _run_attack(name, attack, *, predict, x, y, state, batch_size, save, progress):
    """Runs one attack, batch by batch, on the points robust when it started; a point is broken
    where the model misclassifies the example the attack returns, as in the reference."""
    if state.todo is None:
        state.todo, state.batches_done = np.flatnonzero(state.robust), 0
    bounds = batch_bounds(len(state.todo), batch_size)
    bar = tqdm.tqdm(bounds, desc=name, unit="batch", initial=state.batches_done,
                    total=len(bounds), leave=False, disable=not progress)
    for first, end in bounds[state.batches_done:]:
        started = time.perf_counter()
        indices = state.todo[first:end]
        adversarial = attack(x[indices], y[indices])
        wrong = np.argmax(predict(adversarial), axis=1) != y[indices]
        broken = indices[wrong]
        state.x_adv[broken] = adversarial[wrong]
        state.broken_by[broken] = name
        state.batches_done += 1
        state.seconds += time.perf_counter() - started
        save(state)
        bar.update(1)
    bar.close()
    state.results.append({"attack": name, "robust_accuracy": float(np.mean(state.robust)),
                          "seconds_total": state.seconds})
    state.todo = None
    save(state)


def largest_perturbation(threat, x_adv, x):
    """The largest distance from an example of `x` to its adversarial example in `x_adv`, in the
    norm of the threat model `threat` (computed in float64)."""
    difference = (np.asarray(x_adv) - x).reshape(len(x), -1).astype(np.float64)
    return float(np.max(threat.norms(tf.constant(difference)).numpy()))


def run_attacks(attacks, x, y, *, predict, threat, settings, batch_size, state_path=None,
                log=None, progress=False, strategy=None):
    """Runs the attacks (a dict name -> attack(x, y) returning adversarial examples, in order)
    on `x`, `y`; returns the final
    State. `predict(x)` gives the model's logits; `threat` (a ThreatModel) is the norm the
    largest perturbation is reported in. With `state_path`, resumes from the state file
    there where it holds a run of the same `settings`, and rewrites it after every batch. `log`
    receives the reference's report lines.

    With `strategy` (the one the attacks spread over) spanning a cluster, every worker calls
    this alike; the chief alone logs, shows progress and writes the state file, and every worker
    checks that it resumed from the same state as the others.

    An attack returns the clean image for the points it did not break, so `x_adv` holds the clean
    image wherever every attack failed.
    """
    chief = strategy is None or devices.is_chief(strategy)
    log = log if log is not None and chief else (lambda line: None)
    progress = progress and chief
    settings = json.loads(json.dumps(settings))
    if state_path is not None and os.path.exists(state_path):
        state = State.load(state_path, settings)
        log(f"resuming from {state_path}: "
            f"{', '.join(result['attack'] for result in state.results) or 'no attack'} done")
    else:
        correct = _predictions(predict, x, batch_size) == y
        state = State(settings, np.array(x, np.float32),
                      np.where(correct, ROBUST, CLEAN).astype(object))
    if strategy is not None:
        cluster.check_same_state(strategy, [len(state.results), state.batches_done,
                                            int(np.sum(state.robust))], path=state_path)
    save = (lambda current: current.save(state_path)) if state_path is not None and chief \
        else (lambda current: None)
    save(state)
    log(f"initial accuracy: {np.mean(state.broken_by != CLEAN):.2%}")
    done = [result["attack"] for result in state.results]
    for result in state.results:
        log(f"robust accuracy after {result['attack'].upper()}: "
            f"{result['robust_accuracy']:.2%} (total time {result['seconds_total']:.1f} s)")
    for name, attack in attacks.items():
        if name in done:
            continue
        _run_attack(name, attack, predict=predict, x=x, y=y, state=state, batch_size=batch_size,
                    save=save, progress=progress)
        log(f"robust accuracy after {name.upper()}: {np.mean(state.robust):.2%} "
            f"(total time {state.seconds:.1f} s)")
    log(f"max {threat.norm} perturbation: {largest_perturbation(threat, state.x_adv, x):.5f}, "
        f"nan in tensor: "
        f"{int(np.isnan(state.x_adv).sum())}, max: {state.x_adv.max():.5f}, "
        f"min: {state.x_adv.min():.5f}")
    log(f"robust accuracy: {np.mean(state.robust):.2%}")
    return state
