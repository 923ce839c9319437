"""What APGD, FAB and Square share: runs one after another, each on the examples still robust,
and the targeted runs of APGD-T and FAB-T, one per target class in the order of the clean
logits."""

import dataclasses

import numpy as np

from common.attacks import losses
from common.runtime import seeds


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: its target class per example (the labels where untargeted), the index that
    seeds its random start, and which restart it is (0: the first)."""

    targets: np.ndarray
    index: int
    restart: int


def untargeted_runs(labels, restarts):
    """The runs of an untargeted attack: `restarts` of them, run i seeded by i."""
    return [Run(labels, restart, restart) for restart in range(restarts)]


def ranked_target_runs(logits, labels, *, count, restarts=1):
    """The runs of a targeted attack as the reference makes them: towards the most likely wrong
    class of the clean image (`logits`), `restarts` times, then towards the next, ... `count`
    classes. The first restart towards the k-th class is seeded by k."""
    classes = logits.shape[-1]
    if count > classes - 1:
        raise ValueError(f"targets must be at most {classes - 1}, the wrong classes of a model "
                         f"of {classes} classes. Received: targets={count}")
    targets = losses.wrong_classes(logits, labels, count).numpy()
    return [Run(targets[:, rank - 1], rank + restart * count, restart)
            for rank in range(1, count + 1) for restart in range(restarts)]


def planned_runs(logits, labels, *, targets, restarts):
    """The runs of APGD or FAB: untargeted where `targets` is None, else towards the `targets`
    most likely wrong classes of the clean image (`logits`)."""
    if targets is None:
        return untargeted_runs(labels, restarts)
    return ranked_target_runs(logits, labels, count=targets, restarts=restarts)


def start_noise(threat, *, seed, stream, run, shape):
    """The noise of the random start of `run` (a restart or target index) of the attack whose
    starts draw from `stream` of `seed`, drawn by the threat model as the reference draws it."""
    return threat.noise(seeds.generator(seed, stream, run), shape)


def correct(logits, labels):
    """Which examples the model classifies correctly."""
    return np.argmax(logits, axis=1) == labels


def on_robust_examples(x, runs, attack, robust):
    """Runs `attack(todo, run)` for each of `runs` on the indices `todo` of the examples still
    robust, starting from those `robust`; it returns the adversarial examples of `x[todo]` and
    which of them are broken. An example takes the adversarial example of the run that breaks
    it, and keeps its clean image where none does. Returns the adversarial examples."""
    x_adv, robust = np.array(x, np.float32), np.array(robust, bool)
    for run in runs:
        todo = np.flatnonzero(robust)
        if not len(todo):
            break
        adversarial, broken = attack(todo, run)
        x_adv[todo[broken]] = adversarial[broken]
        robust[todo[broken]] = False
    return x_adv
