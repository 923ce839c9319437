"""Attacks on any Keras model: one threat model (L-infinity or L2 ball and pixel range) shared by
PGD, APGD, FAB and Square, and AutoAttack over them. May import `common.runtime` and `common.io`;
prints nothing and writes a file only where asked."""

from common.attacks.autoattack import AutoAttack, Result
from common.attacks.pgd import PGD, LinfPGDAttack
from common.attacks.threat_model import ThreatModel

__all__ = ["PGD", "AutoAttack", "LinfPGDAttack", "Result", "ThreatModel"]
