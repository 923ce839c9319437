"""Attacks on any Keras model: one threat model (L-infinity or L2 ball and pixel range) shared by
PGD, APGD, FAB and Square, and AutoAttack over them. May import `common.runtime` and `common.io`;
prints nothing and writes a file only where asked."""
