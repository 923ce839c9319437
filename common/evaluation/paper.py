"""What the paper's tables and figures hold (Madry et al., ICLR 2018): the attack of each row,
the value published for it, and the settings of the figures. Each challenge describes its own
`Paper` in its challenge.py; common/evaluation/reproduce.py computes it for any model."""

import dataclasses

from common.attacks.pgd import AttackSettings

# Each method's attack loss; Natural has no attack, FGSM is one step of epsilon.
METHOD_LOSSES = {"Natural": None, "FGSM": "xent", "PGD": "xent", "Targeted": "targeted",
                 "CW": "margin", "CW+": "cw"}
ARTIFACTS = ("table", "transfer", "eps_sweep", "loss_landscape", "filters")
CITATION = "Madry et al., ICLR 2018 (arXiv:1706.06083v4)"


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a table: an attack and the accuracy (percent) the paper published for it."""

    method: str
    steps: int = 0
    restarts: int = 1
    published: float = None

    def __post_init__(self):
        if self.method not in METHOD_LOSSES:
            raise ValueError(f"unknown method {self.method!r}")

    @property
    def name(self):
        if self.method in ("Natural", "FGSM"):
            return self.method
        restarts = f" x {self.restarts} restarts" if self.restarts > 1 else ""
        return f"{self.method} {self.steps} steps{restarts}"

    @property
    def gradients(self):
        """Input gradients per example."""
        return {"Natural": 0, "FGSM": 1}.get(self.method, self.steps * self.restarts)

    def settings(self, epsilon, step_size, pixel_range):
        """The row's AttackSettings at this epsilon and PGD step size (None for Natural):
        FGSM is one step of epsilon from the natural image; the others start at random."""
        if self.method == "Natural":
            return None
        if self.method == "FGSM":
            return AttackSettings(epsilon=epsilon, steps=1, step_size=epsilon, random_start=False,
                                  loss="xent", pixel_range=pixel_range)
        return AttackSettings(epsilon=epsilon, steps=self.steps, step_size=step_size,
                              random_start=True, loss=METHOD_LOSSES[self.method],
                              pixel_range=pixel_range)

    def describe(self, settings):
        """The settings the row ran with, in words."""
        if settings is None:
            return "no attack"
        start = "random start" if settings.random_start else "from the natural image"
        text = (f"{settings.steps} x {settings.step_size:g} within {settings.epsilon:g}, "
                f"{start}, loss {settings.loss}")
        return text + (f", {self.restarts} restarts (worst case)" if self.restarts > 1 else "")


@dataclasses.dataclass(frozen=True)
class Paper:
    """A challenge's tables and figures in the paper."""

    table_name: str  # where the rows come from, e.g. "Table 1"
    table: tuple  # the white-box rows (source A: the model itself)
    transfer: dict  # source name ("A'", "A_nat", "B") -> the black-box rows from that source
    epsilon_grid: tuple  # eps_sweep's epsilons
    sweep_steps: int  # eps_sweep's PGD steps, of 2.5 epsilon / steps each
    first_layer: str = None  # TF1 name of the first-layer kernel, for `filters` (None: none)

    @property
    def artifacts(self):
        return tuple(name for name in ARTIFACTS if name != "filters" or self.first_layer)

    def sweep_step_size(self, epsilon):
        return 2.5 * epsilon / self.sweep_steps
