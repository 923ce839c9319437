"""Adversarial training, the loop both challenges share, with three ways to attack the batch.

`pgd` (the original): per step, draw a batch, attack it with the config's PGD, print and write
summaries on their cadence, save a checkpoint on its cadence (before the update, so
`checkpoint-N` holds the model after N updates), then take the optimizer step on the adversarial
batch only. `fgsm_rs` (Wong et al., 2020) is the same with a one-step attack from a random start.
`free` (Shafahi et al., 2019) replays each batch `replay_m` times; each replay is one step, whose
backward pass gives both the weights' update and one signed step of size epsilon on a
perturbation carried over to the next replay and the next batch. The attack runs inside the
replica step under a `tf.distribute` strategy, with `training_batch_size` as the global batch.

Beyond the original: a run resumes from the newest checkpoint in `model_dir` (data order and
random starts are functions of the step, so it continues the same sequence), a last checkpoint
is written at `max_num_training_steps`, a progress bar shows the rate and the time left, and
an optional guard against catastrophic overfitting (common/training/overfitting.py) stops a
run whose robustness collapses.
"""

import collections
import concurrent.futures
import dataclasses
import json
import os
import shutil
import tempfile
import time
from datetime import datetime

import numpy as np
import tensorflow as tf
import tqdm

from common.io import checkpoints
from common.io.files import written_in_place
from common.runtime import devices, seeds
from common.runtime.errors import UserError
from common.training import overfitting, steps

PREFETCH_BATCHES = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopSettings:
    """What the training loop needs of a run's config: where it writes, how long it runs, and
    the cadence of its reports, summaries, checkpoints and overfitting checks (0: none);
    `config_copy` is what it saves as `model_dir/config.json` for later runs to read."""

    model_dir: str
    batch_size: int
    max_steps: int
    output_steps: int
    summary_steps: int
    checkpoint_steps: int
    overfitting_check_steps: int = 0
    config_copy: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, config):
        return cls(model_dir=config["model_dir"], batch_size=config["training_batch_size"],
                   max_steps=config["max_num_training_steps"],
                   output_steps=config["num_output_steps"],
                   summary_steps=config["num_summary_steps"],
                   checkpoint_steps=config["num_checkpoint_steps"],
                   overfitting_check_steps=config["overfitting_check_steps"],
                   config_copy=dict(config))


class TrainStep:
    """One distributed training step on an attacked batch, by a method of
    common/training/steps.py that draws its start (pgd, fgsm_rs, trades); `build_train_step`
    picks this class or FreeTrainStep by the method.

    Args:
        strategy: the tf.distribute strategy the step runs under.
        model: the Keras model trained, returning logits.
        optimizer: its optimizer, built here in the strategy's scope.
        settings: the training attack, a pgd.AttackSettings (see steps.training_settings).
        loss_fn: `loss_fn(labels, logits, model)`, what the replica minimises, scaled so that
            the sum over replicas is the loss of the global batch; for a method whose loss
            `reduces` (trades), one with `reduce` (common/training/objectives.py).
        method: a key of steps.METHODS.
        beta: TRADES' weight of the KL term.
        attack_training: the model runs in training mode during the attack (the CIFAR-10
            original's batch norm).
        alignment: GradAlign's weight of its penalty (steps.misalignment; 0: none), its
            uniform points drawn from the run's seed and the step.
        weight_perturbation: AWP's size of the weights' perturbation relative to each kernel's
            norm (steps.weight_offsets; 0: none).
        epsilon_ramp_steps: epsilon, and the step sizes with it, rise linearly from 0 at step 0
            to `settings.epsilon` at this step (0: no ramp).
        jit_compile: compiles the replica step with XLA.
    """

    replays = 1  # steps per batch

    def __init__(self, strategy, model, optimizer, *, settings, loss_fn, method="pgd",
                 beta=steps.DEFAULT_BETA, attack_training=False, alignment=0.0,
                 weight_perturbation=0.0, epsilon_ramp_steps=0, jit_compile=False):
        self.context = steps.StepContext(model=model, optimizer=optimizer, settings=settings,
                                         method=method, beta=beta,
                                         attack_training=attack_training, alignment=alignment,
                                         weight_perturbation=weight_perturbation)
        rules = steps.training_method(method)
        if rules.carries is not isinstance(self, FreeTrainStep):
            raise ValueError(f"{type(self).__name__} does not run this method. "
                             f"Received: method={method!r}")
        if self.context.needs_reduce and not hasattr(loss_fn, "reduce"):
            raise TypeError(f"{method}{' with GradAlign' if alignment else ''} needs an "
                            f"objective with `reduce` (common.training.objectives.Xent). "
                            f"Received: loss_fn={loss_fn!r}")
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.settings = settings
        self.loss_fn = loss_fn
        self.epsilon_ramp_steps = epsilon_ramp_steps
        with strategy.scope():
            optimizer.build(model.trainable_variables)
        self._replica_function = tf.function(self._replica_step, jit_compile=True) \
            if jit_compile else self._replica_step
        self._step = tf.function(self._distributed_step)

    @property
    def state(self):
        """Variables besides the model's and the optimizer's that a checkpoint must hold."""
        return {}

    def epsilon_scale(self, step):
        """The fraction of epsilon that the attack of `step` uses."""
        if not self.epsilon_ramp_steps:
            return 1.0
        return min(1.0, step / self.epsilon_ramp_steps)

    def start_points(self, x_batch, seed, step):
        """The attack's start points (float64) for the batch of `step`."""
        settings = dataclasses.replace(
            self.settings, epsilon=self.settings.epsilon * self.epsilon_scale(step))
        return training_start(x_batch, settings, seed=seed, step=step,
                              method=self.context.method)

    def _replica_step(self, x_nat, labels, x_start, scale, report, seed):
        x_adv = steps.attack(self.context, x_nat, labels, start=x_start, scale=scale)
        metrics = _natural_metrics(self.model, x_nat, labels, report)
        result = steps.update(self.context, x_nat, labels, x_adv=x_adv, objective=self.loss_fn,
                              seed=steps.replica_seed(seed), scale=scale)
        return {**metrics, **_adversarial_metrics(result.logits, labels)}, x_adv

    def _distributed_step(self, x_nat, labels, x_start, scale, report, seed):
        metrics, x_adv = self.strategy.run(self._replica_function,
                                           args=(x_nat, labels, x_start, scale, report, seed))
        return self._totals(metrics), self.strategy.experimental_local_results(x_adv)[0]

    def _totals(self, metrics):
        return {name: self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for name, value in metrics.items()}

    def __call__(self, x_nat, labels, x_start, *, report=True, step=0, seed=0):
        """Runs the step on a global batch from its start points (float64, see pgd.start_point);
        returns summed metrics and some adversarial images. `seed` (the run's) and `step` seed
        the draws made inside the step (GradAlign's)."""
        batch = (tf.convert_to_tensor(x_nat), tf.convert_to_tensor(labels),
                 tf.convert_to_tensor(x_start, tf.float64))
        return self._step(*devices.split_batch(self.strategy, batch), self._scale(step), report,
                          tf.constant([seed, step], tf.int64))

    def _scale(self, step):
        return tf.constant(self.epsilon_scale(step), tf.float32)


class FreeTrainStep(TrainStep):
    """One replay of free adversarial training (Shafahi et al., 2019): steps.free_replay.

    The perturbation has the shape of the global batch and carries over to the next replay and
    the next batch; it is part of the checkpoint. The weights' update and the input gradient
    come from the same loss (with CIFAR-10's weight decay, which has no input gradient), as in
    their code.

    Args:
        strategy, model, optimizer, settings, loss_fn, weight_perturbation,
            epsilon_ramp_steps, jit_compile: as TrainStep's (of `settings` only the ball is
            used); `alignment` must be 0.
        replays: replays of each batch.
        batch_size: the global batch's size, the perturbation's first dimension.
        method: a key of steps.METHODS whose start is a carried perturbation.
    """

    def __init__(self, strategy, model, optimizer, *, settings, loss_fn, replays, batch_size,
                 method="free", alignment=0.0, weight_perturbation=0.0, epsilon_ramp_steps=0,
                 jit_compile=False):
        super().__init__(strategy, model, optimizer, settings=settings, loss_fn=loss_fn,
                         method=method, alignment=alignment,
                         weight_perturbation=weight_perturbation,
                         epsilon_ramp_steps=epsilon_ramp_steps, jit_compile=jit_compile)
        self.replays = replays
        self.perturbation = tf.Variable(tf.zeros((batch_size, *model.input_shape[1:])),
                                        trainable=False, name="free_perturbation")

    @property
    def state(self):
        return {"free_perturbation": self.perturbation}

    def start_points(self, x_batch, seed, step):
        """An empty array: a replay starts from the perturbation this step carries."""
        return np.zeros((0, *x_batch.shape[1:]))

    def _replica_step(self, x_nat, labels, perturbation, scale, report, seed):
        metrics = _natural_metrics(self.model, x_nat, labels, report)
        x_adv, result, perturbation = steps.free_replay(
            self.context, x_nat, labels, perturbation=perturbation, objective=self.loss_fn,
            scale=scale)
        return {**metrics, **_adversarial_metrics(result.logits, labels)}, x_adv, perturbation

    def _distributed_step(self, x_nat, labels, perturbation, scale, report, seed):
        metrics, x_adv, perturbation = self.strategy.run(
            self._replica_function, args=(x_nat, labels, perturbation, scale, report, seed))
        self.perturbation.assign(self.strategy.gather(perturbation, axis=0))
        return self._totals(metrics), self.strategy.experimental_local_results(x_adv)[0]

    def __call__(self, x_nat, labels, x_start=None, *, report=True, step=0, seed=0):
        """Runs one replay on a global batch; `x_start` and `seed` are not used."""
        batch = (tf.convert_to_tensor(x_nat), tf.convert_to_tensor(labels),
                 tf.convert_to_tensor(self.perturbation))
        return self._step(*devices.split_batch(self.strategy, batch), self._scale(step), report,
                          tf.constant([seed, step], tf.int64))


def _natural_metrics(model, x_nat, labels, report):
    if not report:
        return {}
    return {"nat_correct": _num_correct(model(x_nat, training=True), labels)}


def _adversarial_metrics(logits, labels):
    return {"adv_correct": _num_correct(logits, labels),
            "adv_xent": tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))}


def _num_correct(logits, labels):
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), labels), tf.int64))


def build_train_step(strategy, model, optimizer, *, method="pgd", replays=1, batch_size=None,
                     beta=steps.DEFAULT_BETA, attack_training=False, alignment=0.0, **options):
    """The step of `method`: a FreeTrainStep (with `replays` and `batch_size`) for a method that
    carries its perturbation, else a TrainStep (with `beta`, `attack_training` and
    `alignment`); `options` (settings, loss_fn, weight_perturbation, epsilon_ramp_steps,
    jit_compile) go to either."""
    if steps.training_method(method).carries:
        return FreeTrainStep(strategy, model, optimizer, method=method, replays=replays,
                             batch_size=batch_size, alignment=alignment, **options)
    return TrainStep(strategy, model, optimizer, method=method, beta=beta,
                     attack_training=attack_training, alignment=alignment, **options)


def training_start(x_nat, settings, *, seed, step, method="pgd"):
    """The start points (float64) of a training step's attack by `method`, from the
    training-starts stream."""
    return steps.METHODS[method].start_on_host(
        x_nat, settings, seeds.generator(seed, seeds.TRAINING_STARTS, step))


def _batches(train_step, batch_for_step, *, first_step, last_step, seed):
    """(x, y, start) global batches from `first_step` up to `last_step`, each prepared in a
    background thread PREFETCH_BATCHES steps ahead, so that a fast device need not wait for it;
    the steps that replay a batch (free training) get that same batch. A thread rather than a
    `tf.data.Dataset.from_generator`, which slows the training step itself while the process
    draws from it (benchmarks/README.md, "The training loop's batches")."""

    def prepare(step):
        x_batch, y_batch = batch_for_step(step // train_step.replays)
        return (np.asarray(x_batch, np.float32), np.asarray(y_batch, np.int64),
                train_step.start_points(x_batch, seed, step))

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        ahead = collections.deque(
            pool.submit(prepare, step)
            for step in range(first_step, min(first_step + PREFETCH_BATCHES, last_step)))
        for step in range(first_step, last_step):
            batch = ahead.popleft().result()
            if step + PREFETCH_BATCHES < last_step:
                ahead.append(pool.submit(prepare, step + PREFETCH_BATCHES))
            yield batch


def _resume(checkpoint, model_dir):
    """Restores the newest checkpoint of this run, if any; returns the step to continue from."""
    path = checkpoints.latest_checkpoint(model_dir)
    if path is None:
        return 0
    if checkpoints.is_tf1_checkpoint(path):
        raise UserError(f"{path} is a TF1 checkpoint: training resumes only from its own "
                        "checkpoints; choose another model_dir")
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise UserError(f"cannot resume from {path}: {error}") from error
    return int(checkpoint.global_step.numpy())


def _write_config(config, model_dir):
    with written_in_place(os.path.join(model_dir, "config.json"), "w") as config_file:
        json.dump(config, config_file, indent=2)


def _report(write, step, metrics, *, batch_size, examples_per_second):
    write(f"Step {step}:    ({datetime.now()})")
    write(f"    training nat accuracy {metrics['nat_correct'] / batch_size * 100:.4}%")
    write(f"    training adv accuracy {metrics['adv_correct'] / batch_size * 100:.4}%")
    if examples_per_second is not None:
        write(f"    {examples_per_second} examples per second")


def _summarize(writer, step, metrics, *, batch_size, images):
    with writer.as_default(step=step):
        accuracy = metrics["adv_correct"] / batch_size
        xent = metrics["adv_xent"] / batch_size
        tf.summary.scalar("accuracy adv train", accuracy)
        tf.summary.scalar("accuracy adv", accuracy)
        tf.summary.scalar("xent adv train", xent)
        tf.summary.scalar("xent adv", xent)
        tf.summary.image("images adv train", images, max_outputs=3)


def train(settings, train_step, *, batch_for_step, seed, to_images, guard=None):
    """The training loop of `settings` (a LoopSettings): `train_step` a TrainStep,
    `batch_for_step(index) -> (x, y)` the global batch of an index (a step, or with replays the
    step // replays), `seed` for the random starts, `to_images(x)` for the image summary in
    [0, 1], `guard` an OverfittingGuard or None.

    Every task of a multi-worker cluster runs it alike (all take part in saving, which may
    all-reduce); only the chief writes into `model_dir`, the others into a private temporary
    folder removed at the end, and all resume from the chief's newest checkpoint.
    """
    chief = devices.is_chief(train_step.strategy)
    write_dir = settings.model_dir if chief else tempfile.mkdtemp(prefix="madry-worker-")
    try:
        _train(settings, train_step, batch_for_step=batch_for_step, seed=seed,
               to_images=to_images, guard=guard, chief=chief, write_dir=write_dir)
    finally:
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)


def _train(settings, train_step, *, batch_for_step, seed, to_images, guard, chief, write_dir):
    model_dir, batch_size, max_steps = settings.model_dir, settings.batch_size, settings.max_steps
    os.makedirs(write_dir, exist_ok=True)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    state = dict(train_step.state)
    if guard is not None:
        state["overfitting_guard"] = guard.state
    checkpoint = checkpoints.training_checkpoint(train_step.model, train_step.optimizer,
                                                 global_step, **state)
    manager = checkpoints.checkpoint_manager(checkpoint, write_dir)
    first_step = _resume(checkpoint, model_dir)
    report_line = tqdm.tqdm.write if chief else lambda line: None
    if guard is not None and guard.stopped_at is not None:
        report_line(f"The overfitting guard stopped this run at step {guard.stopped_at}; its "
                    f"newest checkpoint holds the weights of step {first_step}")
        return
    if first_step:
        report_line(f"Resuming from {checkpoints.latest_checkpoint(model_dir)} at step "
                    f"{first_step}")
    if chief:
        _write_config(settings.config_copy, model_dir)
    writer = tf.summary.create_file_writer(model_dir) if chief else tf.summary.create_noop_writer()
    guard_manager = overfitting.last_good_manager(checkpoint, write_dir) if guard else None
    batches = _batches(train_step, batch_for_step, first_step=first_step, last_step=max_steps,
                       seed=seed)
    training_time = 0.0
    progress = tqdm.tqdm(total=max_steps, initial=first_step, unit="step", smoothing=0.1,
                         disable=not chief)
    stopped = False
    for step in range(first_step, max_steps):
        x_batch, y_batch, x_start = next(batches)
        if step > first_step or step == 0:
            if guard is not None and step % settings.overfitting_check_steps == 0:
                stopped = _overfitting_stops(guard, step, checkpoint=checkpoint,
                                             manager=manager, guard_manager=guard_manager,
                                             report_line=report_line, writer=writer)
                if stopped:
                    break
            if step % settings.checkpoint_steps == 0:
                manager.save(checkpoint_number=step)
        report = step % settings.output_steps == 0
        start = time.perf_counter()
        metrics, images = train_step(x_batch, y_batch, x_start, report=report, step=step,
                                     seed=seed)
        metrics = {name: value.numpy() for name, value in metrics.items()}
        training_time += time.perf_counter() - start
        if report:
            rate = None
            if step > first_step:
                rate = settings.output_steps * batch_size / training_time
                training_time = 0.0
            _report(report_line, step, metrics, batch_size=batch_size, examples_per_second=rate)
        if step % settings.summary_steps == 0:
            _summarize(writer, step, metrics, batch_size=batch_size, images=to_images(images))
        global_step.assign(step + 1)
        progress.update(1)
    progress.close()
    if first_step < max_steps and not stopped:
        manager.save(checkpoint_number=max_steps)
    writer.flush()


def _overfitting_stops(guard, step, *, checkpoint, manager, guard_manager, report_line,
                       writer):
    """Runs the guard's check at `step`. Where robustness collapsed, restores the last check
    that passed, marks the run stopped, saves that as the newest checkpoint and returns True;
    otherwise keeps this state as the last good one."""
    result = guard.check(step)
    report_line(f"Step {step}: PGD-{overfitting.STEPS} accuracy on the held-out batch "
                f"{result.accuracy * 100:.4}%")
    with writer.as_default(step=step):
        tf.summary.scalar("accuracy adv held out", result.accuracy)
    if not result.collapsed:
        guard_manager.save(checkpoint_number=step)
        return False
    report_line(f"Catastrophic overfitting at step {step}: the held-out accuracy fell from "
                f"{result.previous * 100:.4}% (step {result.previous_step}) to "
                f"{result.accuracy * 100:.4}%; training stops with the weights of step "
                f"{result.previous_step}")
    with writer.as_default(step=step):
        tf.summary.scalar("catastrophic overfitting, weights kept from step",
                          result.previous_step)
    checkpoint.restore(guard_manager.latest_checkpoint).assert_existing_objects_matched()
    guard.state.stopped_at.assign(step)
    manager.save(checkpoint_number=result.previous_step)
    return True
