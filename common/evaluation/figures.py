"""The paper's figures and the diagnosis's as PNG files, drawn with matplotlib's object interface
(no global state, no display needed). Each function writes its file whole or not at all and
returns its size in pixels, [width, height]."""

import numpy as np
from matplotlib.figure import Figure

from common.io.files import written_in_place

DPI = 100


def _save(figure, path):
    with written_in_place(path) as target:
        figure.savefig(target, format="png", dpi=DPI)
    width, height = figure.get_size_inches() * DPI
    return [int(round(width)), int(round(height))]


def accuracy_against_epsilon(epsilons, curves, challenge_name, path):
    """One accuracy curve per attack over the epsilon grid."""
    figure = Figure(figsize=(6.4, 4.8))
    axes = figure.add_subplot()
    for method, accuracies in curves.items():
        axes.plot(epsilons, 100 * np.asarray(accuracies), marker="o", label=method)
    axes.set(xlabel="epsilon", ylabel="accuracy (%)", ylim=(0, 100),
             title=f"{challenge_name}: accuracy against epsilon")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return _save(figure, path)


def loss_traces(traces, examples, path):
    """Figure 1: per test image, the cross-entropy over the PGD steps, one line per start."""
    figure = Figure(figsize=(3.2 * len(traces), 3.2))
    for column, (trace, index) in enumerate(zip(traces, examples)):
        axes = figure.add_subplot(1, len(traces), column + 1)
        for losses in trace:
            axes.plot(losses, linewidth=0.8, alpha=0.7)
        axes.set(xlabel="PGD step", title=f"test image {index}")
        if column == 0:
            axes.set_ylabel("cross-entropy")
    figure.tight_layout()
    return _save(figure, path)


def loss_histograms(final_losses, examples, path):
    """Figure 2: per test image, the histogram (log counts) of the final cross-entropy over the
    random starts."""
    figure = Figure(figsize=(3.2 * len(final_losses), 3.2))
    for column, (losses, index) in enumerate(zip(final_losses, examples)):
        axes = figure.add_subplot(1, len(final_losses), column + 1)
        axes.hist(losses, bins=40, log=True)
        axes.set(xlabel="final cross-entropy", title=f"test image {index}")
        axes.locator_params(axis="x", nbins=4)
        axes.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        if column == 0:
            axes.set_ylabel("starts (log scale)")
    figure.tight_layout()
    return _save(figure, path)


def filter_grid(kernel, path, columns=8):
    """The first-layer kernels (height, width, 1, filters) as a grid of grey images, each on
    the common scale of all weights."""
    count = kernel.shape[-1]
    rows = -(-count // columns)
    figure = Figure(figsize=(columns, rows))
    bound = np.abs(kernel).max()
    for index in range(count):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(kernel[:, :, 0, index], cmap="gray", vmin=-bound, vmax=bound)
        axes.set_axis_off()
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.98, wspace=0.1, hspace=0.1)
    return _save(figure, path)


def weight_histogram(kernel, path):
    """The histogram of the first-layer weights."""
    figure = Figure(figsize=(6.4, 4.8))
    axes = figure.add_subplot()
    axes.hist(kernel.ravel(), bins=50)
    axes.set(xlabel="weight", ylabel="count", title="first-layer weights")
    figure.tight_layout()
    return _save(figure, path)


def loss_quartiles(traces, path):
    """Per attack, its loss over the iterations: the median over the examples and the band
    between their quartiles (`traces`: attack name -> array, one row per example)."""
    figure = Figure(figsize=(3.6 * max(len(traces), 1), 3.2))
    for column, (name, trace) in enumerate(traces.items()):
        axes = figure.add_subplot(1, len(traces), column + 1)
        axes.set(xlabel="iteration", title=name)
        if column == 0:
            axes.set_ylabel("loss maximised")
        if not len(trace):
            axes.text(0.5, 0.5, "no example attacked", ha="center", transform=axes.transAxes)
            continue
        lower, median, upper = np.percentile(trace, [25, 50, 75], axis=0)
        steps = np.arange(trace.shape[1])
        axes.fill_between(steps, lower, upper, alpha=0.3, label="quartiles")
        axes.plot(steps, median, label="median")
        axes.legend()
    figure.tight_layout()
    return _save(figure, path)
