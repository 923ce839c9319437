"""What APGD and FAB share as AutoAttack runs them: runs one after another, each on the examples
still robust."""

import numpy as np


def on_robust_examples(x, runs, attack):
    """Runs `attack(todo, run)` for each of `runs` on the indices `todo` of the examples still
    robust; it returns the adversarial examples of `x[todo]` and which of them are broken. An
    example takes the adversarial example of the run that breaks it, and keeps its clean image
    where none does. Returns (adversarial examples, robust)."""
    x_adv, robust = np.array(x, np.float32), np.ones(len(x), bool)
    for run in runs:
        todo = np.flatnonzero(robust)
        if not len(todo):
            break
        adversarial, broken = attack(todo, run)
        x_adv[todo[broken]] = adversarial[broken]
        robust[todo[broken]] = False
    return x_adv, robust

