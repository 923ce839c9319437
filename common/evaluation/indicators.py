"""The indicators of a failed attack or a masked gradient that `diagnose` measures: each one's
threshold and advice in one table, and the `Indicator` and `Diagnosis` it returns.

Each indicator is triggered when its measured value exceeds its threshold. The thresholds, and
why they are what they are, are documented in docs/diagnose.md.
"""

import dataclasses

import numpy as np

# Accuracies are fractions; a point is 0.01.
POINT = 0.01


@dataclasses.dataclass(frozen=True)
class Rule:
    """What an indicator measures, the threshold its value must exceed to trigger, and what to
    do then."""

    measures: str
    threshold: float
    advice: str


RULES = {
    "randomized_outputs": Rule(
        "share of examples whose logits differ between two passes", 0.0,
        "The outputs are random: the gradient attacks averaged 20 gradients per step (EOT, "
        "AutoAttack's rand version); report robustness under EOT, never a single-pass attack."),
    "probability_outputs": Rule(
        "share of examples whose outputs are non-negative and sum to 1", 0.5,
        "The model returns probabilities, whose cross-entropy saturates: the attacks ran on "
        "their logarithm; remove the final softmax and attack the logits."),
    "zero_gradients": Rule(
        "share of examples whose input gradient is zero for xent, cw and dlr at the clean "
        "point and at random starts", POINT,
        "The gradient vanishes (a stop_gradient, a quantisation, a saturation): gradient attacks "
        "cannot move; trust only gradient-free attacks (Square) or attack a differentiable "
        "approximation (BPDA)."),
    "unbounded_attack_fails": Rule(
        "share of examples still classified correctly by the attack with epsilon as large as "
        "the pixel range allows", 0.0,
        "Even an unbounded attack does not reach every class: the attack, not the model, is "
        "failing; change its loss or step size, or use gradient-free attacks."),
    "accuracy_rises_with_epsilon": Rule(
        "largest rise of an attack's accuracy from one epsilon to a larger one, beyond twice "
        "its standard error (at least one example)", 0.0,
        "A larger ball can only contain more adversarial examples: the attack is unreliable; "
        "tune its step size to epsilon and add restarts."),
    "more_iterations_help": Rule(
        "accuracy the reported attack loses with 10 times the steps and 10 restarts", POINT,
        "The reported attack had not converged: report the stronger attack's accuracy or "
        "AutoAttack's."),
    "black_box_beats_white_box": Rule(
        "share of examples that Square broke and every gradient attack left robust", POINT,
        "A gradient-free attack beats the gradient attacks: the gradients mislead "
        "(gradient masking); trust the gradient-free result and look for the masking."),
    "loss_not_increasing": Rule(
        "share of examples whose loss under the reported attack never rises above its start",
        5 * POINT,
        "The attack's loss does not move (a silent failure, Pintor et al. 2022): the loss "
        "saturates or its gradient is uninformative; use the margin or DLR loss (APGD-DLR)."),
    "reported_overestimates": Rule(
        "reported accuracy minus the worst-case robust accuracy", POINT,
        "The reported attack overestimates robustness: report robust_accuracy, the worst case "
        "over every attack run."),
}


@dataclasses.dataclass(frozen=True)
class Indicator:
    """One indicator's verdict: its `value` exceeded its `threshold` where `triggered`."""

    name: str
    triggered: bool
    value: float
    threshold: float
    advice: str

    def to_dict(self):
        return dataclasses.asdict(self)


def indicator(name, value, threshold=None):
    """The indicator `name` of RULES for the measured `value` (against its own threshold, or
    `threshold` where the threshold depends on the data)."""
    rule = RULES[name]
    threshold = rule.threshold if threshold is None else float(threshold)
    value = float(value)
    return Indicator(name=name, triggered=value > threshold, value=value, threshold=threshold,
                     advice=rule.advice)


@dataclasses.dataclass
class Diagnosis:
    """What `diagnose` found.

    `robust_accuracy` is the worst case per example over every attack run within epsilon;
    `reported_accuracy` the accuracy under the reported attack; `curves` the accuracy of each
    attack at each of `epsilons`; `loss_traces` per attack the loss it maximised per example
    (rows) at each iteration (columns); `notes` what the evaluation changed on the way (EOT, the
    logarithm of probabilities).
    """

    epsilon: float
    norm: str
    examples: int
    clean_accuracy: float
    robust_accuracy: float
    reported_accuracy: float
    reported_attack: str
    indicators: list
    epsilons: list
    curves: dict
    loss_traces: dict
    robust: np.ndarray
    notes: list = dataclasses.field(default_factory=list)

    @property
    def trustworthy(self):
        """Whether no indicator triggered."""
        return not any(item.triggered for item in self.indicators)

    @property
    def triggered(self):
        """The names of the indicators that triggered."""
        return [item.name for item in self.indicators if item.triggered]

    def to_dict(self):
        """Everything but the loss traces, JSON-able (the traces' medians are kept)."""
        return {
            "epsilon": self.epsilon, "norm": self.norm, "examples": self.examples,
            "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
            "reported_accuracy": self.reported_accuracy,
            "reported_attack": self.reported_attack, "trustworthy": self.trustworthy,
            "indicators": [item.to_dict() for item in self.indicators],
            "epsilons": list(self.epsilons),
            "curves": {name: list(values) for name, values in self.curves.items()},
            "median_loss": {name: np.median(trace, axis=0).tolist() if len(trace) else []
                            for name, trace in self.loss_traces.items()},
            "robust": self.robust.tolist(), "notes": list(self.notes),
        }

    def to_markdown(self):
        """A report: the verdict, the accuracies, one table row per indicator, the notes."""
        verdict = "no indicator triggered" if self.trustworthy else \
            f"do not report the attack's number: {', '.join(self.triggered)} triggered"
        lines = [
            f"# Diagnosis: {self.norm} epsilon {self.epsilon:g}, {self.examples} examples", "",
            f"Verdict: {verdict}.", "",
            f"- clean accuracy: {self.clean_accuracy:.2%}",
            f"- reported accuracy ({self.reported_attack}): {self.reported_accuracy:.2%}",
            f"- robust accuracy (worst case over every attack): {self.robust_accuracy:.2%}", "",
            "| indicator | triggered | value | threshold | advice |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {item.name} | {'yes' if item.triggered else 'no'} | {item.value:.4g} | "
                  f"{item.threshold:.4g} | {item.advice if item.triggered else ''} |"
                  for item in self.indicators]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"
