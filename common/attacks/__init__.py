"""Attacks on any Keras model: one threat model (a ball around the clean input, intersected with
the pixel range) shared by PGD, APGD, FAB and Square, each built with the same keywords and
answering `perturb(x, y)`, and AutoAttack over them. May import `common.runtime` and
`common.io`; prints nothing and writes a file only where asked."""

from common.attacks.apgd import APGD
from common.attacks.autoattack import AutoAttack, Result
from common.attacks.fab import FAB
from common.attacks.pgd import PGD, LinfPGDAttack
from common.attacks.square import Square
from common.attacks.threat_model import ThreatModel

__all__ = ["APGD", "FAB", "PGD", "AutoAttack", "LinfPGDAttack", "Result", "Square",
           "ThreatModel"]
