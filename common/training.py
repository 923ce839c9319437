"""PGD adversarial training, the loop both challenges share.

Per step, as the original: draw a batch, attack it, print and write summaries on their cadence,
save a checkpoint on its cadence (before the update, so `checkpoint-N` holds the model after N
updates), then take the optimizer step on the adversarial batch only. The attack runs inside the
replica step under a `tf.distribute` strategy, with `training_batch_size` as the global batch.

Beyond the original: a run resumes from the newest checkpoint in `model_dir` (data order and
random starts are functions of the step, so it continues the same sequence), a last checkpoint
is written at `max_num_training_steps`, and a progress bar shows the rate and the time left.
"""

import json
import os
import shutil
import tempfile
import time
from datetime import datetime

import tensorflow as tf
import tqdm

from common import checkpoints, devices, pgd, seeds
from common.errors import UserError
from common.files import written_in_place

PREFETCH_BATCHES = 2


class TrainStep:
    """One distributed training step: attack in each replica, metrics, optimizer update.

    `loss_fn(labels, logits, model)` returns what the replica minimises, scaled so that the
    sum over replicas is the loss of the global batch. `settings` (a pgd.AttackSettings) is the
    attack; `attack_training` selects the mode the model runs in during it (training mode in the
    CIFAR-10 original). `jit_compile` compiles the replica step with XLA.
    """

    def __init__(self, strategy, model, optimizer, settings, loss_fn, attack_training=False,
                 jit_compile=False):
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.settings = settings
        self.loss_fn = loss_fn
        self.attack_training = attack_training
        with strategy.scope():
            optimizer.build(model.trainable_variables)
        self._replica_function = tf.function(self._replica_step, jit_compile=True) \
            if jit_compile else self._replica_step
        self._step = tf.function(self._distributed_step)

    def _replica_step(self, x_nat, labels, x_start, report):
        model = self.model
        x_adv = tf.cast(pgd.pgd_steps(model, x_nat, labels, x_start, self.settings,
                                      self.attack_training), tf.float32)
        metrics = {}
        if report:
            metrics["nat_correct"] = _num_correct(model(x_nat, training=True), labels)
        with tf.GradientTape() as tape:
            logits = model(x_adv, training=True)
            loss = self.optimizer.scale_loss(self.loss_fn(labels, logits, model))
        gradients = tape.gradient(loss, model.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        metrics["adv_correct"] = _num_correct(logits, labels)
        metrics["adv_xent"] = tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        return metrics, x_adv

    def _distributed_step(self, x_nat, labels, x_start, report):
        metrics, x_adv = self.strategy.run(self._replica_function,
                                           args=(x_nat, labels, x_start, report))
        totals = {name: self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                  for name, value in metrics.items()}
        return totals, self.strategy.experimental_local_results(x_adv)[0]

    def _split(self, batch):
        """Gives replica r the r-th consecutive slice of the global batch."""
        replicas = self.strategy.num_replicas_in_sync
        size = len(batch[0])
        if size % replicas:
            raise UserError(f"training_batch_size {size} does not split over {replicas} replicas")
        local = size // replicas

        def replica_slice(context):
            first = context.replica_id_in_sync_group * local
            return tuple(tensor[first:first + local] for tensor in batch)

        return self.strategy.experimental_distribute_values_from_function(replica_slice)

    def __call__(self, x_nat, labels, x_start, report=True):
        """Runs the step on a global batch from its start points (float64, see pgd.start_point);
        returns summed metrics and some adversarial images."""
        batch = (tf.convert_to_tensor(x_nat), tf.convert_to_tensor(labels),
                 tf.convert_to_tensor(x_start, tf.float64))
        return self._step(*self._split(batch), report)


def _num_correct(logits, labels):
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), labels), tf.int64))


def training_start(x_nat, settings, seed, step):
    """The start points of a training step's attack, from the training-starts stream."""
    return pgd.start_point(x_nat, settings, seeds.generator(seed, seeds.TRAINING_STARTS, step))


def _batches(batch_for_step, first_step, last_step, seed, settings, example_shape):
    """Prefetched (x, y, start) global batches from `first_step` up to `last_step`."""

    def generate():
        for step in range(first_step, last_step):
            x_batch, y_batch = batch_for_step(step)
            yield x_batch, y_batch, training_start(x_batch, settings, seed, step)

    shape = (None, *example_shape)
    signature = (tf.TensorSpec(shape, tf.float32), tf.TensorSpec((None,), tf.int64),
                 tf.TensorSpec(shape, tf.float64))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return iter(dataset.prefetch(PREFETCH_BATCHES))


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


def _report(write, step, metrics, batch_size, examples_per_second):
    write(f"Step {step}:    ({datetime.now()})")
    write(f"    training nat accuracy {metrics['nat_correct'] / batch_size * 100:.4}%")
    write(f"    training adv accuracy {metrics['adv_correct'] / batch_size * 100:.4}%")
    if examples_per_second is not None:
        write(f"    {examples_per_second} examples per second")


def _summarize(writer, step, metrics, batch_size, images):
    with writer.as_default(step=step):
        accuracy = metrics["adv_correct"] / batch_size
        xent = metrics["adv_xent"] / batch_size
        tf.summary.scalar("accuracy adv train", accuracy)
        tf.summary.scalar("accuracy adv", accuracy)
        tf.summary.scalar("xent adv train", xent)
        tf.summary.scalar("xent adv", xent)
        tf.summary.image("images adv train", images, max_outputs=3)


def train(config, train_step, batch_for_step, seed, to_images):
    """The training loop: `train_step` a TrainStep, `batch_for_step(step) -> (x, y)` global
    batches, `seed` for the random starts, `to_images(x)` for the image summary in [0, 1].

    Every task of a multi-worker cluster runs it alike (all take part in saving, which may
    all-reduce); only the chief writes into `model_dir`, the others into a private temporary
    folder removed at the end, and all resume from the chief's newest checkpoint.
    """
    chief = devices.is_chief(train_step.strategy)
    model_dir = config["model_dir"]
    write_dir = model_dir if chief else tempfile.mkdtemp(prefix="madry-worker-")
    try:
        _train(config, train_step, batch_for_step, seed, to_images, chief, write_dir)
    finally:
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)


def _train(config, train_step, batch_for_step, seed, to_images, chief, write_dir):
    model_dir = config["model_dir"]
    batch_size = config["training_batch_size"]
    max_steps = config["max_num_training_steps"]
    os.makedirs(write_dir, exist_ok=True)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    checkpoint = checkpoints.training_checkpoint(train_step.model, train_step.optimizer,
                                                 global_step)
    manager = checkpoints.checkpoint_manager(checkpoint, write_dir)
    first_step = _resume(checkpoint, model_dir)
    report_line = tqdm.tqdm.write if chief else lambda line: None
    if first_step:
        report_line(f"Resuming from {checkpoints.latest_checkpoint(model_dir)} at step "
                    f"{first_step}")
    if chief:
        _write_config(config, model_dir)
    writer = tf.summary.create_file_writer(model_dir) if chief else tf.summary.create_noop_writer()
    batches = _batches(batch_for_step, first_step, max_steps, seed, train_step.settings,
                       train_step.model.input_shape[1:])
    training_time = 0.0
    progress = tqdm.tqdm(total=max_steps, initial=first_step, unit="step", smoothing=0.1,
                         disable=not chief)
    for step in range(first_step, max_steps):
        x_batch, y_batch, x_start = next(batches)
        if step % config["num_checkpoint_steps"] == 0 and (step > first_step or step == 0):
            manager.save(checkpoint_number=step)
        report = step % config["num_output_steps"] == 0
        start = time.perf_counter()
        metrics, images = train_step(x_batch, y_batch, x_start, report)
        metrics = {name: value.numpy() for name, value in metrics.items()}
        training_time += time.perf_counter() - start
        if report:
            rate = None
            if step > first_step:
                rate = config["num_output_steps"] * batch_size / training_time
                training_time = 0.0
            _report(report_line, step, metrics, batch_size, rate)
        if step % config["num_summary_steps"] == 0:
            _summarize(writer, step, metrics, batch_size, to_images(images))
        global_step.assign(step + 1)
        progress.update(1)
    progress.close()
    if first_step < max_steps:
        manager.save(checkpoint_number=max_steps)
    writer.flush()
