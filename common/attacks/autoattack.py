"""AutoAttack (Croce & Hein, ICML 2020): the standard robustness evaluation, an ensemble of
parameter-free attacks, each run on the points that all the attacks before it failed to break.

`standard` runs APGD-CE, APGD-T, FAB-T and Square; `plus` adds APGD-DLR and untargeted FAB with
5 restarts each; `rand` (for models with random outputs) runs APGD-CE and APGD-DLR with gradients
averaged over 20 passes; a custom list runs the named attacks with the reference's constructor
defaults. A point is robust only if every attack fails on it.

The evaluation keeps a state file, rewritten whole after every batch, so that a killed run
resumes where it stopped: the attacks done, the batches done of the attack under way, and every
adversarial example found.
"""

import dataclasses
import json
import os
import time

import numpy as np
import tqdm

from common.attacks.apgd import APGD, APGDSettings
from common.attacks.fab import FAB, FABSettings
from common.attacks.square import Square, SquareSettings
from common.io.files import written_in_place
from common.runtime.batching import batch_bounds
from common.runtime.errors import UserError

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
TARGET_CLASSES = 9
NUM_CLASSES = 10
# Restarts of APGD-CE, APGD-DLR and FAB, and gradient passes of APGD, per version; a custom list
# takes the reference's constructor defaults (5 restarts).
RESTARTS = {"standard": 1, "plus": 5, "rand": 1, "custom": 5}
EOT_ITERATIONS = {"rand": 20}
CLEAN, ROBUST = "clean", ""


def attack_list(version, attacks):
    """(version, attack names) from the `--version` and `--attacks` flags (None where unset)."""
    if version is not None and attacks is not None:
        raise UserError("give either --version or --attacks, not both")
    if attacks is None:
        version = version or "standard"
        if version not in VERSIONS:
            raise UserError(f"unknown AutoAttack version {version!r}: use one of "
                            f"{', '.join(VERSIONS)}")
        return version, VERSIONS[version]
    names = tuple(name.strip() for name in attacks.split(","))
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names or len(set(names)) != len(names):
        raise UserError(f"--attacks must name each of its attacks once, from "
                        f"{', '.join(ATTACKS)}; got {attacks!r}")
    return "custom", names


def check_logits(logits):
    """Refuses model outputs that are not the logits of 10 classes."""
    if logits.ndim != 2 or logits.shape[1] != NUM_CLASSES:
        raise UserError(f"the model's outputs have shape {logits.shape[1:]}: AutoAttack needs "
                        f"the logits of {NUM_CLASSES} classes")
    if np.all(logits >= 0) and np.allclose(logits.sum(axis=1), 1, atol=1e-4):
        raise UserError("the model's outputs are probabilities (they sum to 1): AutoAttack "
                        "needs logits")


def build_attacks(names, version, model, epsilon, pixel_range, image_shape, seed, strategy):
    """{name: attack(x, y) -> (adversarial examples, robust)} for the named attacks."""
    restarts = RESTARTS[version]
    eot = EOT_ITERATIONS.get(version, 1)

    def apgd(loss):
        return APGD(model, APGDSettings(epsilon, pixel_range, loss=loss, eot_iterations=eot),
                    seed, strategy)

    fab = FAB(model, FABSettings(epsilon, pixel_range), seed, strategy)
    builders = {
        "apgd-ce": lambda: lambda x, y: apgd("ce").untargeted(x, y, restarts),
        "apgd-dlr": lambda: lambda x, y: apgd("dlr").untargeted(x, y, restarts),
        "apgd-t": lambda: lambda x, y: apgd("dlr-targeted").targeted(x, y, TARGET_CLASSES),
        "fab": lambda: lambda x, y: fab.untargeted(x, y, restarts),
        "fab-t": lambda: lambda x, y: fab.targeted(x, y, TARGET_CLASSES),
        "square": lambda: Square(model, SquareSettings(epsilon, pixel_range), image_shape, seed,
                                 strategy).attack,
    }
    return {name: builders[name]() for name in names}


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
        """The state saved at `path` if it belongs to a run of `settings`, else UserError."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["meta"]))
                state = cls(meta["settings"], saved["x_adv"], saved["broken_by"].astype(object),
                            meta["results"], saved["todo"] if saved["has_todo"] else None,
                            meta["batches_done"], meta["seconds"])
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cannot read the AutoAttack state file {path}: {error}; remove it "
                            "to start again") from error
        if state.settings != settings:
            raise UserError(f"the AutoAttack state file {path} belongs to another run "
                            f"({state.settings}); remove it, or give another store_adv_path")
        return state


def _predictions(predict, x, batch_size):
    return np.concatenate([np.argmax(predict(x[first:end]), axis=1)
                           for first, end in batch_bounds(len(x), batch_size)])


def _run_attack(name, attack, predict, x, y, state, batch_size, state_path):
    """Runs one attack, batch by batch, on the points robust when it started; a point is broken
    where the model misclassifies the example the attack returns, as in the reference."""
    if state.todo is None:
        state.todo, state.batches_done = np.flatnonzero(state.robust), 0
    bounds = batch_bounds(len(state.todo), batch_size)
    progress = tqdm.tqdm(bounds, desc=name, unit="batch", initial=state.batches_done,
                         total=len(bounds), leave=False)
    for first, end in bounds[state.batches_done:]:
        started = time.perf_counter()
        indices = state.todo[first:end]
        adversarial, _ = attack(x[indices], y[indices])
        wrong = np.argmax(predict(adversarial), axis=1) != y[indices]
        broken = indices[wrong]
        state.x_adv[broken] = adversarial[wrong]
        state.broken_by[broken] = name
        state.batches_done += 1
        state.seconds += time.perf_counter() - started
        state.save(state_path)
        progress.update(1)
    progress.close()
    state.results.append({"attack": name, "robust_accuracy": float(np.mean(state.robust)),
                          "seconds_total": state.seconds})
    state.todo = None
    state.save(state_path)


def evaluate(attacks, predict, x, y, settings, batch_size, state_path):
    """Runs the attacks (a dict in order) on `x`, `y`, resuming from `state_path` where it holds
    a run of the same `settings`; prints as the reference does and returns the final State.

    `predict(x)` gives the model's logits. An attack returns the clean image for the points it
    did not break, so `x_adv` holds the clean image wherever every attack failed.
    """
    settings = json.loads(json.dumps(settings))
    if os.path.exists(state_path):
        state = State.load(state_path, settings)
        print(f"resuming from {state_path}: "
              f"{', '.join(result['attack'] for result in state.results) or 'no attack'} done")
    else:
        correct = _predictions(predict, x, batch_size) == y
        state = State(settings, np.array(x, np.float32),
                      np.where(correct, ROBUST, CLEAN).astype(object))
        state.save(state_path)
    print(f"initial accuracy: {np.mean(state.broken_by != CLEAN):.2%}")
    done = [result["attack"] for result in state.results]
    for result in state.results:
        print(f"robust accuracy after {result['attack'].upper()}: "
              f"{result['robust_accuracy']:.2%} (total time {result['seconds_total']:.1f} s)")
    for name, attack in attacks.items():
        if name in done:
            continue
        _run_attack(name, attack, predict, x, y, state, batch_size, state_path)
        print(f"robust accuracy after {name.upper()}: {np.mean(state.robust):.2%} "
              f"(total time {state.seconds:.1f} s)")
    distance = np.abs(state.x_adv - x).reshape(len(x), -1).max(axis=1)
    print(f"max Linf perturbation: {distance.max():.5f}, nan in tensor: "
          f"{int(np.isnan(state.x_adv).sum())}, max: {state.x_adv.max():.5f}, "
          f"min: {state.x_adv.min():.5f}")
    print(f"robust accuracy: {np.mean(state.robust):.2%}")
    return state
