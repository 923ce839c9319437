"""Adversarial training: the challenges' faithful loop, the Keras `fit` path for any model, the
training objectives, optimizers and schedules, and the catastrophic-overfitting guard. May import
`common.runtime`, `common.io` and `common.attacks`."""

from common.training.fit import AdversarialModel, OverfittingGuardCallback

__all__ = ["AdversarialModel", "OverfittingGuardCallback"]
