"""Adversarial training: the per-replica step of each method (steps.py), which both the
challenges' faithful loop and the Keras `fit` path for any model run, the training objectives,
optimizers and schedules, and the catastrophic-overfitting guard. May import `common.runtime`,
`common.io` and `common.attacks`."""

from common.training.fit import AdversarialModel, OverfittingGuardCallback

__all__ = ["AdversarialModel", "OverfittingGuardCallback"]
