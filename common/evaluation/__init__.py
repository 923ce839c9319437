"""Measuring robustness: checkpoint evaluation, submission checks and scores, and the paper's
tables and figures. May import `common.runtime`, `common.io` and `common.attacks`."""
