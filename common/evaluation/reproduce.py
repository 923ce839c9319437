"""The paper's tables and figures for any model (reproduce.py), as Markdown, JSON and PNG.

Each artifact is a list of jobs: a table row, a point of the epsilon sweep, the loss traces or
the loss histogram of one example. A job's results go to the artifact's state file in the
output folder, rewritten whole after every batch, so that a killed run keeps what it has done
and goes on from there; the artifact's files are written once all its jobs are done. Over a
cluster (a MultiWorkerMirroredStrategy) every worker reads the state files and the chief alone
writes them and the artifacts.
"""

import dataclasses
import json
import os
import platform
import time

import keras
import numpy as np
import tensorflow as tf
import tqdm

from common.attacks import pgd
from common.evaluation import figures, robustness
from common.evaluation.paper import CITATION, Row
from common.io.files import keyed_path, read_state, written_in_place
from common.runtime import cluster, devices, seeds
from common.runtime.batching import batch_bounds
from common.runtime.errors import UserError

TRACE_RESTARTS = 20  # Figure 1's random restarts per example
LANDSCAPE_EXAMPLES = 5  # the first test images of Figures 1 and 2


def package_versions():
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__}


def artifact_list(text, paper, source_model_dir):
    """The artifacts the `--artifacts` flag names (None: all of this challenge's, transfer only
    with a source model)."""
    available = paper.artifacts
    if text is None:
        return tuple(name for name in available if name != "transfer" or source_model_dir)
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in available]
    if unknown or len(set(names)) != len(names):
        raise UserError(f"--artifacts must name each artifact once, from {', '.join(available)}; "
                        f"got {text!r}")
    if "transfer" in names and not source_model_dir:
        raise UserError("the transfer artifact needs --source_model_dir, the model the attacks "
                        "are crafted on")
    return names


@dataclasses.dataclass
class Ledger:
    """An artifact's state file: finished results by job key, and per job under way its
    progress; it belongs to one run's `settings` and refuses another's. Where not `writes` (a
    worker of a cluster other than the chief), it is read and kept up to date, never written."""

    path: str
    settings: dict
    results: dict = dataclasses.field(default_factory=dict)
    partial: dict = dataclasses.field(default_factory=dict)
    writes: bool = True

    @classmethod
    def open(cls, path, settings, writes=True):
        settings = json.loads(json.dumps(settings))
        if not os.path.exists(path):
            return cls(path, settings, writes=writes)

        def read(path):
            with open(path) as source:
                saved = json.load(source)
            return cls(path, saved["settings"], saved["results"], saved["partial"], writes)

        return read_state(path, settings, read=read, what="state file",
                          instead="give another --out_dir")

    def remove(self):
        """Ends the run: its results are written, so another run starts afresh."""
        if self.writes and os.path.exists(self.path):
            os.remove(self.path)

    def save(self):
        if not self.writes:
            return
        with written_in_place(self.path, "w") as target:
            json.dump({"settings": self.settings, "results": self.results,
                       "partial": self.partial}, target)

    def finish(self, key, result):
        self.results[key] = result
        self.partial.pop(key, None)
        self.save()


@dataclasses.dataclass(frozen=True)
class Job:
    """Work that stores its result under `key`: `run(ledger)`, of `gradients` input gradients."""

    key: str
    gradients: int
    run: object


@dataclasses.dataclass(kw_only=True)
class Reproduction:
    """One reproduce.py run: the model (and the transfer's source), the first test images, and
    the config's attack (`attack_settings`), batch size, seed and XLA choice. Built in one call,
    with keywords."""

    challenge: object
    attack_settings: object  # the config's PGD (common.attacks.pgd.AttackSettings)
    batch_size: int
    seed: int
    jit_compile: bool
    model_dir: str
    model: object
    strategy: object
    out_dir: str
    checkpoint: str
    landscape_restarts: int
    images: np.ndarray  # the first num_eval_examples test images, and their labels
    labels: np.ndarray
    source: object = None  # the transfer's source model
    source_model_dir: str = None
    source_checkpoint: str = None
    source_name: str = None

    @property
    def paper(self):
        return self.challenge.paper

    def attack(self, model, settings, restarts=1):
        return pgd.PGD.from_settings(model, settings, restarts=restarts, seed=self.seed,
                                     jit_compile=self.jit_compile, strategy=self.strategy)

    def row_settings(self, row, epsilon=None, step_size=None):
        epsilon = self.attack_settings.epsilon if epsilon is None else epsilon
        step_size = self.attack_settings.step_size if step_size is None else step_size
        return row.settings(epsilon, step_size, self.challenge.pixel_range)

    def settings(self, artifact):
        """What the artifact's results depend on: a state file of other settings is refused."""
        settings = {"artifact": artifact, "challenge": self.challenge.name,
                    "checkpoint": self.checkpoint, "num_examples": len(self.labels),
                    "batch_size": self.batch_size, "seed": self.seed,
                    "epsilon": self.attack_settings.epsilon,
                    "step_size": self.attack_settings.step_size}
        if artifact == "transfer":
            settings.update(source=self.source_name, source_checkpoint=self.source_checkpoint)
        if artifact == "loss_landscape":
            settings.update(restarts=self.landscape_restarts,
                            attack=dataclasses.asdict(self.landscape_settings()))
        return settings

    def landscape_settings(self):
        """The config's PGD on the cross-entropy, from random starts."""
        return dataclasses.replace(self.attack_settings, loss="xent", random_start=True)


def accuracy_under_attack(ledger, key, *, attack, score, x, y, batch_size):
    """Stores the accuracy on `x, y` under `attack` (None: natural), batch by batch as
    pgd_attack.py attacks them; the state file gains the count after every batch."""
    bounds = batch_bounds(len(x), batch_size)
    progress = ledger.partial.setdefault(key, {"batches_done": 0, "correct": 0, "seconds": 0.0})
    done = progress["batches_done"]
    if attack is not None:
        for first, end in bounds[:done]:
            attack.skip(x[first:end])
    bar = tqdm.tqdm(total=len(bounds), initial=done, desc=key, unit="batch", leave=False)
    for first, end in bounds[done:]:
        started = time.perf_counter()
        x_batch, y_batch = x[first:end], y[first:end]
        if attack is not None:
            x_batch = attack.perturb(x_batch, y_batch).astype(np.float32)
        _, correct = score(x_batch, y_batch)
        progress["correct"] += int(np.sum(correct))
        progress["batches_done"] += 1
        progress["seconds"] += time.perf_counter() - started
        ledger.save()
        bar.update(1)
    bar.close()
    ledger.finish(key, {"accuracy": progress["correct"] / len(x),
                        "seconds": progress["seconds"]})


def _row_job(run, key, row, *, attack):
    """The accuracy of run.model under `row`'s attack, made when the job runs by `attack()`
    (None: natural)."""
    score = robustness.scoring_function(run.model, run.strategy)

    def compute(ledger):
        accuracy_under_attack(ledger, key, attack=attack(), score=score, x=run.images,
                              y=run.labels, batch_size=run.batch_size)

    return Job(key, row.gradients * len(run.labels), compute)


def _crafted_on(run, row, attacked_model):
    """What makes `row`'s attack at the config's settings, crafted on `attacked_model`."""
    settings = run.row_settings(row)
    return lambda: None if settings is None else run.attack(attacked_model, settings,
                                                            row.restarts)


def table_jobs(run):
    return [_row_job(run, row.name, row, attack=_crafted_on(run, row, run.model))
            for row in run.paper.table]


def transfer_jobs(run):
    return [_row_job(run, row.name, row, attack=_crafted_on(run, row, run.source))
            for row in run.paper.transfer[run.source_name]]


def sweep_jobs(run):
    """FGSM and PGD at every epsilon of the grid, each row's attack the one at the grid's
    largest epsilon, scaled (PGD.scaled: one trace per row for the whole grid)."""
    largest = max(run.paper.epsilon_grid)
    rows = (Row("FGSM"), Row("PGD", run.paper.sweep_steps))
    scalable = {row.method: run.attack(run.model, run.row_settings(
        row, largest, run.paper.sweep_step_size(largest)), row.restarts) for row in rows}
    return [_row_job(run, f"{row.method} epsilon={epsilon:g}", row,
                     attack=lambda row=row, factor=epsilon / largest:
                     scalable[row.method].scaled(factor))
            for epsilon in run.paper.epsilon_grid for row in rows]


def _trace_job(run, index, trace):
    """Figure 1: the cross-entropy over the PGD steps from TRACE_RESTARTS random starts."""
    settings = run.landscape_settings()

    def compute(ledger):
        started = time.perf_counter()
        x = np.repeat(run.images[index:index + 1], TRACE_RESTARTS, axis=0)
        y = np.repeat(run.labels[index:index + 1], TRACE_RESTARTS)
        start = pgd.start_point(x, settings, seeds.generator(run.seed, seeds.LANDSCAPE, index, 0))
        ledger.finish(f"trace {index}", {"losses": trace(x, y, start).tolist(),
                                         "seconds": time.perf_counter() - started})

    return Job(f"trace {index}", TRACE_RESTARTS * settings.steps, compute)


def _histogram_job(run, index, *, attack, score):
    """Figure 2: the cross-entropy at the end of PGD from many random starts."""
    settings = run.landscape_settings()

    def compute(ledger):
        started = time.perf_counter()
        rng = seeds.generator(run.seed, seeds.LANDSCAPE, index, 1)
        x, y = run.images[index:index + 1], run.labels[index:index + 1]
        losses = []
        for first, end in tqdm.tqdm(batch_bounds(run.landscape_restarts, run.batch_size),
                                    desc=f"histogram {index}", unit="batch", leave=False):
            x_batch, y_batch = np.repeat(x, end - first, axis=0), np.repeat(y, end - first)
            start = pgd.start_point(x_batch, settings, rng)
            x_adv = attack.perturb(x_batch, y_batch, start=start).astype(np.float32)
            losses.append(score(x_adv, y_batch)[0])
        ledger.finish(f"histogram {index}", {"losses": np.concatenate(losses).tolist(),
                                             "seconds": time.perf_counter() - started})

    return Job(f"histogram {index}", run.landscape_restarts * settings.steps, compute)


def landscape_jobs(run):
    """Figures 1 and 2 on the first LANDSCAPE_EXAMPLES test images, one job per image each."""
    settings = run.landscape_settings()
    trace = devices.Spread(run.strategy, lambda x_nat, y, start: tf.transpose(
        pgd.loss_trace(run.model, x_nat, y, start, settings)))
    attack = run.attack(run.model, settings)
    score = robustness.scoring_function(run.model, run.strategy)
    examples = range(min(LANDSCAPE_EXAMPLES, len(run.labels)))
    return [_trace_job(run, index, trace) for index in examples] + \
        [_histogram_job(run, index, attack=attack, score=score) for index in examples]


JOBS = {"table": table_jobs, "transfer": transfer_jobs, "eps_sweep": sweep_jobs,
        "loss_landscape": landscape_jobs, "filters": lambda run: []}


def gradients_per_second(run):
    """The model's input gradients per second here: a 5-step PGD on one batch, timed after a
    first call that traces it."""
    settings = dataclasses.replace(run.landscape_settings(), steps=5)
    attack = run.attack(run.model, settings)
    x, y = run.images[:run.batch_size], run.labels[:run.batch_size]
    attack.perturb(x, y)
    started = time.perf_counter()
    attack.perturb(x, y)
    return 5 * len(x) / (time.perf_counter() - started)


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} seconds"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def reproduce(run, names):
    """Computes the artifacts `names` for `run`, resuming from their state files, printing a time
    estimate first, and writes each artifact's files once its jobs are done (over a cluster,
    the chief writes; every worker checks it resumed from the same state files)."""
    chief = devices.is_chief(run.strategy)
    ledgers = {name: Ledger.open(keyed_path(os.path.join(run.out_dir, f"{name}.state.json"),
                                            run.settings(name)), run.settings(name),
                                 writes=chief)
               for name in names}
    cluster.check_same_state(
        run.strategy, [count for ledger in ledgers.values() for count in (
            len(ledger.results),
            sum(progress["batches_done"] for progress in ledger.partial.values()))],
        path=run.out_dir)
    jobs = {name: JOBS[name](run) for name in names}
    todo = {name: [job for job in jobs[name] if job.key not in ledgers[name].results]
            for name in names}
    gradients = {name: sum(job.gradients for job in todo[name]) for name in names}
    if sum(gradients.values()):
        rate = gradients_per_second(run)
        print(f"About {sum(gradients.values()):,} input gradients to compute, at "
              f"{rate:,.0f} per second measured here: about "
              f"{_duration(sum(gradients.values()) / rate)}.")
        for name in names:
            done = len(jobs[name]) - len(todo[name])
            if todo[name]:
                print(f"  {name}: {len(todo[name])} jobs to run ({done} done), about "
                      f"{_duration(gradients[name] / rate)}")
    for name in names:
        for job in todo[name]:
            job.run(ledgers[name])
            result = ledgers[name].results[job.key]
            accuracy = f": {100 * result['accuracy']:.2f}%" if "accuracy" in result else ""
            print(f"{name}, {job.key}{accuracy} ({result['seconds']:.1f} s)")
        if chief:
            paths = WRITERS[name](run, ledgers[name].results)
            print(f"{name} written: {', '.join(paths)}")
        ledgers[name].remove()


def _header(run, artifact, results):
    return {"artifact": artifact, "source": CITATION, "challenge": run.challenge.name,
            "model_dir": run.model_dir, "checkpoint": run.checkpoint,
            "num_examples": len(run.labels), "batch_size": run.batch_size, "seed": run.seed,
            "epsilon": run.attack_settings.epsilon, "versions": package_versions(),
            "seconds": sum(result.get("seconds", 0.0) for result in results.values())}


def _write(run, name, *, report, markdown):
    """Writes name.json and name.md into the output folder; returns their paths."""
    json_path = os.path.join(run.out_dir, f"{name}.json")
    markdown_path = os.path.join(run.out_dir, f"{name}.md")
    with written_in_place(json_path, "w") as target:
        json.dump(report, target, indent=1)
    with written_in_place(markdown_path, "w") as target:
        target.write(markdown)
    return [markdown_path, json_path]


def _percent(value):
    return "" if value is None else f"{value:.1f}%"


def _intro(run, title, report):
    return (f"# {title}\n\n{run.challenge.name}, model `{report['checkpoint']}`, the first "
            f"{report['num_examples']} test images, epsilon {report['epsilon']:g}, seed "
            f"{report['seed']}; computed in {_duration(report['seconds'])} with TensorFlow "
            f"{report['versions']['tensorflow']}.\n\n")


def _rows_report(run, artifact, *, rows, results, source):
    report = _header(run, artifact, results)
    report["rows"] = []
    for row in rows:
        settings = run.row_settings(row)
        report["rows"].append({
            "attack": row.name, "method": row.method, "steps": settings and settings.steps,
            "restarts": row.restarts, "source": source,
            "settings": settings and dataclasses.asdict(settings),
            "accuracy": results[row.name]["accuracy"], "published": row.published})
    return report


def _rows_markdown(run, title, *, report, rows, column):
    lines = [f"| attack | source | settings | accuracy | {column} |",
             "| --- | --- | --- | ---: | ---: |"]
    for entry, row in zip(report["rows"], rows):
        lines.append(f"| {entry['attack']} | {entry['source']} | "
                     f"{row.describe(run.row_settings(row))} | {100 * entry['accuracy']:.2f}% | "
                     f"{_percent(entry['published'])} |")
    return _intro(run, title, report) + "\n".join(lines) + "\n"


def write_table(run, results):
    rows = run.paper.table
    report = _rows_report(run, "table", rows=rows, results=results, source="A (white-box)")
    title = f"{run.paper.table_name}: white-box attacks"
    column = f"paper ({run.paper.table_name}, model A)"
    return _write(run, "table", report=report,
                  markdown=_rows_markdown(run, title, report=report, rows=rows, column=column))


def write_transfer(run, results):
    rows = run.paper.transfer[run.source_name]
    report = _rows_report(run, "transfer", rows=rows, results=results,
                          source=f"{run.source_name} ({run.source_model_dir})")
    report["source_checkpoint"] = run.source_checkpoint
    title = f"{run.paper.table_name}: black-box attacks crafted on {run.source_name}"
    column = f"paper ({run.paper.table_name}, source {run.source_name})"
    return _write(run, "transfer", report=report,
                  markdown=_rows_markdown(run, title, report=report, rows=rows, column=column))


def write_eps_sweep(run, results):
    report = _header(run, "eps_sweep", results)
    epsilons = list(run.paper.epsilon_grid)
    report["epsilons"] = epsilons
    report["pgd"] = {"steps": run.paper.sweep_steps, "step_size": "2.5 epsilon / steps",
                     "random_start": True}
    report["curves"] = {method: [results[f"{method} epsilon={epsilon:g}"]["accuracy"]
                                 for epsilon in epsilons] for method in ("FGSM", "PGD")}
    png = os.path.join(run.out_dir, "eps_sweep.png")
    report["figures"] = {"eps_sweep.png": figures.accuracy_against_epsilon(
        epsilons, report["curves"], challenge_name=run.challenge.name, path=png)}
    lines = ["| epsilon | FGSM | PGD |", "| ---: | ---: | ---: |"]
    lines += [f"| {epsilon:g} | {100 * fgsm:.2f}% | {100 * pgd_accuracy:.2f}% |"
              for epsilon, fgsm, pgd_accuracy in zip(epsilons, *report["curves"].values())]
    markdown = (_intro(run, "Accuracy against epsilon", report) +
                f"FGSM: one step of epsilon. PGD: {run.paper.sweep_steps} steps of 2.5 epsilon / "
                f"{run.paper.sweep_steps}, from a random start.\n\n" + "\n".join(lines) +
                "\n\n![accuracy against epsilon](eps_sweep.png)\n")
    return _write(run, "eps_sweep", report=report, markdown=markdown) + [png]


def write_loss_landscape(run, results):
    report = _header(run, "loss_landscape", results)
    examples = sorted(int(key.split()[1]) for key in results if key.startswith("trace"))
    settings = run.landscape_settings()
    report["attack"] = dataclasses.asdict(settings)
    report["examples"] = examples
    report["traces"] = [results[f"trace {index}"]["losses"] for index in examples]
    report["final_losses"] = [results[f"histogram {index}"]["losses"] for index in examples]
    trace_png = os.path.join(run.out_dir, "loss_landscape.png")
    histogram_png = os.path.join(run.out_dir, "loss_histogram.png")
    report["figures"] = {
        "loss_landscape.png": figures.loss_traces(report["traces"], examples, trace_png),
        "loss_histogram.png": figures.loss_histograms(report["final_losses"], examples,
                                                      histogram_png)}
    lines = ["| test image | final loss, 20 starts (min / max) | final loss, "
             f"{run.landscape_restarts} starts (min / median / max) |", "| ---: | --- | --- |"]
    for index, trace, final in zip(examples, report["traces"], report["final_losses"]):
        ends = [losses[-1] for losses in trace]
        lines.append(f"| {index} | {min(ends):.3f} / {max(ends):.3f} | {np.min(final):.3f} / "
                     f"{np.median(final):.3f} / {np.max(final):.3f} |")
    markdown = (_intro(run, "The loss landscape PGD explores (Figures 1 and 2)", report) +
                f"PGD: {settings.steps} steps of {settings.step_size:g} on the "
                "cross-entropy, each from a uniformly random start in the epsilon ball.\n\n" +
                "\n".join(lines) + "\n\n![loss over the PGD steps](loss_landscape.png)\n\n"
                "![final loss over many random starts](loss_histogram.png)\n")
    return _write(run, "loss_landscape", report=report, markdown=markdown) + [trace_png,
                                                                             histogram_png]


def write_filters(run, results):
    kernel = run.challenge.tf1_variables(run.model)[run.paper.first_layer].numpy()
    report = _header(run, "filters", results)
    filters_png = os.path.join(run.out_dir, "filters.png")
    histogram_png = os.path.join(run.out_dir, "filters_histogram.png")
    report["kernel_shape"] = list(kernel.shape)
    counts, edges = np.histogram(kernel, bins=50)
    report["weights"] = {"min": float(kernel.min()), "max": float(kernel.max()),
                         "mean": float(kernel.mean()), "histogram_counts": counts.tolist(),
                         "histogram_edges": edges.tolist()}
    report["figures"] = {"filters.png": figures.filter_grid(kernel, filters_png),
                         "filters_histogram.png": figures.weight_histogram(kernel,
                                                                           histogram_png)}
    markdown = (_intro(run, "First-layer filters (Appendix C)", report) +
                f"The {kernel.shape[-1]} first-layer kernels ({kernel.shape[0]}x"
                f"{kernel.shape[1]}), weights from {kernel.min():.3f} to {kernel.max():.3f}.\n\n"
                "![first-layer filters](filters.png)\n\n"
                "![first-layer weights](filters_histogram.png)\n")
    return _write(run, "filters", report=report, markdown=markdown) + [filters_png,
                                                                      histogram_png]


WRITERS = {"table": write_table, "transfer": write_transfer, "eps_sweep": write_eps_sweep,
           "loss_landscape": write_loss_landscape, "filters": write_filters}
