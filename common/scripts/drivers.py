"""The scripts of a challenge, written once. Each challenge's `train.py`, `eval.py`,
`pgd_attack.py`, `run_attack.py`, `fetch_model.py` and `model.py` hands its `Challenge` to the
function of the same role here, which reads the config beside that script, flags included."""

import json
import os

import keras
import numpy as np
import tqdm
from absl import flags

from common.attacks import AutoAttack, pgd, threat_model
from common.attacks import autoattack as autoattack_lib
from common.evaluation import reproduce as reproduce_lib
from common.evaluation import robustness, submission
from common.io import checkpoints, fetch, files
from common.io.files import written_in_place
from common.runtime import cluster, devices, errors, precision
from common.runtime.batching import batch_bounds
from common.scripts import cli
from common.scripts import config as config_lib
from common.training import loop, overfitting

FLAGS = flags.FLAGS


def _config():
    config = config_lib.load_config()
    precision.set_precision(config["precision"])
    return config


def _model(challenge, config, strategy):
    """The challenge's model under `strategy`, with the CPU-tuned layers where it runs on CPUs."""
    with strategy.scope():
        return challenge.create_model(config, devices.runs_on_cpu(strategy))


def restored_model(challenge, config, strategy, missing_message):
    """The model with the newest weights of `model_dir`; UserError(missing_message) if none."""
    model = _model(challenge, config, strategy)
    checkpoints.require_latest_weights(model, config["model_dir"], challenge.tf1_variables,
                                       missing_message)
    return model


def test_set(challenge, config):
    return challenge.test_set(challenge.load_data(config["data_path"]))


def train(challenge):
    """train.py: adversarial training by the config's training_method, resuming from the newest
    checkpoint of `model_dir`."""

    def main(argv):
        config = _config()
        files.check_writable_folder(config["model_dir"], "model_dir")
        keras.utils.set_random_seed(challenge.weights_seed(config))
        data = challenge.load_data(config["data_path"])
        strategy = devices.training_strategy()
        _set_training_precision(config, strategy)
        model = _model(challenge, config, strategy)
        with strategy.scope():
            optimizer = precision.training_optimizer(challenge.optimizer(config))
        batch_size, seed = config["training_batch_size"], challenge.data_seed(config)
        guard = None
        if config["overfitting_check_steps"]:
            examples = config["overfitting_check_examples"]
            try:
                guard = overfitting.OverfittingGuard(
                    strategy, model, challenge.held_out(data, examples),
                    settings=challenge.attack_settings(config), seed=seed, examples=examples)
            except ValueError as error:
                raise errors.UserError(f"overfitting_check_examples: {error}") from None
        train_step = _train_step(challenge, config, strategy, model=model, optimizer=optimizer)
        loop.train(loop.LoopSettings.from_config(config), train_step,
                   batch_for_step=lambda index: challenge.training_batch(
                       data, index, batch_size=batch_size, seed=seed),
                   seed=seed, to_images=challenge.summary_images, guard=guard)

    cli.run(main, challenge.config_path)


def _set_training_precision(config, strategy):
    """Training's policy (precision.training_policy), named on a line where it is not the
    config's `precision`."""
    policy = precision.training_policy(config["training_precision"], config["precision"],
                                       on_cpu=devices.runs_on_cpu(strategy))
    if policy != config["precision"]:
        print(f"Training computes in {policy} (training_precision "
              f"{config['training_precision']})", flush=True)
        precision.set_precision(policy)


def _train_step(challenge, config, strategy, *, model, optimizer):
    """The training step of the config's training_method."""
    return loop.build_train_step(
        strategy, model, optimizer, method=config["training_method"],
        settings=challenge.training_attack_settings(config),
        loss_fn=challenge.loss(config, strategy.num_replicas_in_sync),
        replays=config["replay_m"], batch_size=config["training_batch_size"],
        beta=config["trades_beta"], alignment=config["gradalign_weight"],
        weight_perturbation=config["awp_gamma"],
        attack_training=challenge.attack_training(config),
        epsilon_ramp_steps=config["epsilon_ramp_steps"], jit_compile=config["jit_compile"])


def evaluate(challenge):
    """eval.py: evaluates each new checkpoint of `model_dir` (`--once`: the newest, then exits)."""
    flags.DEFINE_boolean("once", False, "Evaluate the newest checkpoint and exit.")
    _define_restarts()

    def main(argv):
        config = _config()
        files.check_writable_folder(os.path.join(config["model_dir"], "eval"),
                                    "summaries folder")
        images, labels = test_set(challenge, config)
        strategy = devices.evaluation_strategy(cpu_only=config["eval_on_cpu"])
        model = _model(challenge, config, strategy)
        with strategy.scope(), cluster.stops_on_lost_worker(strategy), \
                cluster.chief_output(strategy), cluster.output_folder(
                    strategy, os.path.join(config["model_dir"], "eval")) as summaries:
            attack = pgd.PGD.from_settings(
                model, challenge.attack_settings(config), restarts=FLAGS.restarts,
                seed=challenge.data_seed(config), jit_compile=config["jit_compile"],
                strategy=strategy)
            robustness.eval_loop(
                config["model_dir"],
                lambda path: checkpoints.load_weights(model, path, challenge.tf1_variables),
                lambda: robustness.evaluate(model, attack, images=images, labels=labels,
                                            num_examples=config["num_eval_examples"],
                                            batch_size=config["eval_batch_size"]),
                once=FLAGS.once, summary_dir=summaries,
                newest=lambda folder: _chief_checkpoint(strategy, folder))

    cli.run(main, challenge.config_path)


def _chief_checkpoint(strategy, folder):
    """The newest checkpoint of `folder` as the chief (worker 0) finds it, on every worker of a
    cluster: workers polling at their own moments could each find another."""
    path = checkpoints.latest_checkpoint(folder)
    if not devices.spans_workers(strategy):
        return path
    step = -1 if path is None else int(path.rsplit("-", 1)[1])
    chosen = int(cluster.values_of_workers(strategy, [step])[0, 0])
    if chosen < 0:
        return None
    return os.path.join(folder, f"checkpoint-{chosen}") if path is None else \
        f"{path.rsplit('-', 1)[0]}-{chosen}"


def _define_restarts():
    flags.DEFINE_integer("restarts", 1, "Random restarts per example; the strongest one is kept.",
                         lower_bound=1)


def attack(challenge):
    """pgd_attack.py: attacks the first `num_eval_examples` test images, stores them."""
    _define_restarts()

    def main(argv):
        config = _config()
        files.check_writable(config["store_adv_path"], "store_adv_path")
        strategy = devices.evaluation_strategy()
        model = restored_model(challenge, config, strategy, _no_model(config))
        attack = pgd.PGD.from_settings(
            model, challenge.attack_settings(config), restarts=FLAGS.restarts,
            seed=challenge.data_seed(config), jit_compile=config["jit_compile"],
            strategy=strategy)
        images, labels = test_set(challenge, config)
        with cluster.stops_on_lost_worker(strategy), cluster.chief_output(strategy):
            x_adv = _attack_test_set(attack, images, labels, config["num_eval_examples"],
                                     config["eval_batch_size"])
            if devices.is_chief(strategy):
                _store_attack(x_adv, config["store_adv_path"])

    cli.run(main, challenge.config_path)


def _no_model(config):
    return f"No model found in {config['model_dir']}"


def _attack_test_set(attack, images, labels, num_examples, batch_size):
    """Attacks the first `num_examples` images batch by batch, printing as the original script."""
    bounds = batch_bounds(num_examples, batch_size)
    print(f"Iterating over {len(bounds)} batches")
    x_adv = []
    for first, end in tqdm.tqdm(bounds, unit="batch"):
        tqdm.tqdm.write(f"batch size: {end - first}")
        x_adv.append(attack.perturb(images[first:end], labels[first:end]))
    return np.concatenate(x_adv).astype(np.float32)


def _store_attack(x_adv, path):
    """Saves the attack as `path`, written whole or not at all, with the original's lines."""
    print("Storing examples")
    with written_in_place(path) as target:
        np.save(target, x_adv)
    print(f"Examples stored in {path}")


def _score(challenge, config, model, strategy, x_adv_of, count=None):
    """Checks the attack (`x_adv_of(test_images)` loads and checks it), prints the accuracy and
    saves `pred.npy`; returns the accuracy. With `count`, the attack is of the first `count`
    test images only."""
    images, labels = test_set(challenge, config)
    images, labels = images[:count], labels[:count]
    x_adv = x_adv_of(images)
    accuracy, predictions = submission.score(model, x_adv, labels,
                                             challenge.prediction_batch_size, strategy)
    submission.report_score(accuracy, predictions)
    return accuracy


def score(challenge):
    """run_attack.py: checks the submission at `store_adv_path` and scores the model on it."""

    def main(argv):
        config = _config()
        count = FLAGS.num_eval_examples  # given on the command line; else all 10,000 images
        files.check_writable(submission.PREDICTIONS_PATH, "predictions file")
        strategy = devices.local_strategy()
        model = restored_model(challenge, config, strategy,
                                f"No checkpoint found in {config['model_dir']}")
        _score(challenge, config, model, strategy, lambda images: submission.load_and_check(
            config["store_adv_path"], images, config["epsilon"], challenge.pixel_range,
            shape_text(challenge, count)), count)

    cli.run(main, challenge.config_path)


def shape_text(challenge, count):
    """How the expected shape is printed: the challenge's own text, with `count` images."""
    if count is None:
        return challenge.submission_shape_text
    return challenge.submission_shape_text.replace(str(config_lib.TEST_SET_SIZE), str(count))


def run_attack_function(challenge):
    """The original run_attack.py's `run_attack(checkpoint, x_adv, epsilon)` for `challenge`."""

    def run_attack(checkpoint, x_adv, epsilon):
        """Checks the array `x_adv` against the test set (from the `data_path` of the
        challenge's config.json), scores the model of `checkpoint` on it, prints the accuracy
        and saves `pred.npy`. Returns the accuracy; raises UserError for an invalid attack."""
        return _run_attack(challenge, checkpoint, x_adv, epsilon)

    return run_attack


def _run_attack(challenge, checkpoint, x_adv, epsilon):
    config = config_lib.default_config(challenge.config_path)
    strategy = devices.local_strategy()
    model = _model(challenge, config, strategy)
    checkpoints.load_weights(model, checkpoint, challenge.tf1_variables)
    return _score(challenge, config, model, strategy, lambda images: submission.check_array(
        np.asarray(x_adv), images, epsilon, challenge.pixel_range,
        challenge.submission_shape_text))


def fetch_model(challenge):
    """fetch_model.py NAME: downloads, checks and unzips a released model."""
    flags.DEFINE_string("sha256", None, "Expected SHA256 of the zip; a different one is refused.")
    flags.register_validator("sha256", fetch.is_sha256,
                             "--sha256 must be 64 hexadecimal digits")
    cli.run(lambda argv: fetch.fetch_model(argv, challenge.model_urls,
                                           challenge.published_sha256, challenge.folder,
                                           FLAGS.sha256))


def summary(challenge):
    """model.py: prints the Keras summary of the config's model."""
    cli.run(lambda argv: _model(challenge, _config(), devices.local_strategy()).summary(),
            challenge.config_path)


def _autoattack_report(result, *, largest, settings, path):
    """autoattack.json: settings, package versions, accuracies, and what broke each example."""
    attacks = [{"attack": name, "robust_accuracy": accuracy}
               for name, accuracy in result.accuracy_after.items() if name != autoattack_lib.CLEAN]
    report = {
        "settings": settings,
        "versions": reproduce_lib.package_versions(),
        "clean_accuracy": result.clean_accuracy,
        "robust_accuracy": result.robust_accuracy,
        "attacks": attacks,
        "seconds": result.seconds,
        "max_perturbation": largest,
        "broken_by": [str(name) or None for name in result.broken_by],
    }
    with written_in_place(path, "w") as target:
        json.dump(report, target, indent=1)
    print(f"Report written in {path}")


def _autoattack_choice(version, attacks):
    """(version, attack names or None) from the `--version` and `--attacks` flags."""
    if version is not None and attacks is not None:
        raise errors.UserError("give either --version or --attacks, not both")
    if attacks is None:
        version = version or "standard"
        if version not in autoattack_lib.VERSIONS:
            raise errors.UserError(f"unknown AutoAttack version {version!r}: use one of "
                                   f"{', '.join(autoattack_lib.VERSIONS)}")
        return version, None
    try:
        return "custom", autoattack_lib.check_attacks(name.strip() for name in attacks.split(","))
    except ValueError as error:
        raise errors.UserError(f"--attacks: {error}") from error


def _autoattack_store(config):
    """AutoAttack's output: `--store_adv_path` where given on the command line, else
    autoattack.npy beside the config's store_adv_path (never pgd_attack.py's own file)."""
    if FLAGS["store_adv_path"].present:
        return config["store_adv_path"]
    return os.path.join(os.path.dirname(config["store_adv_path"]), "autoattack.npy")


def autoattack(challenge):
    """autoattack.py: AutoAttack on the first `num_eval_examples` test images of the model in
    `model_dir`; writes the adversarial examples to autoattack.npy (or `--store_adv_path`) and
    its report beside them (autoattack.json). Its state, kept while it runs so that a rerun
    resumes, is named by its settings and removed at the end."""
    flags.DEFINE_string("version", None, "AutoAttack's version: standard (the default), plus or "
                        "rand.")
    flags.DEFINE_string("attacks", None, "A comma list of attacks to run instead of a version, "
                        f"from {', '.join(autoattack_lib.ATTACKS)}.")
    flags.DEFINE_integer("seed", 0, "Seeds the attacks' random starts.", lower_bound=0)
    flags.DEFINE_enum("norm", "Linf", list(threat_model.BALLS), "The ball: the challenge's "
                      "L-infinity one, of the config's epsilon, or L2 or L1, which need --epsilon "
                      "(in pixel units; see docs/autoattack.md for the usual radii).")

    def main(argv):
        config = _config()
        version, names = _autoattack_choice(FLAGS.version, FLAGS.attacks)
        linf = isinstance(threat_model.ball(FLAGS.norm), threat_model.LinfBall)
        if not linf and not FLAGS["epsilon"].present:
            raise errors.UserError(f"--norm={FLAGS.norm} needs --epsilon, its radius in pixel "
                                   "units (the config's epsilon is the L-infinity one)")
        store = _autoattack_store(config)
        report_path = os.path.splitext(store)[0] + ".json"
        files.check_writable(store, "output file")
        files.check_writable(report_path, "report")
        strategy = devices.evaluation_strategy()
        model = restored_model(challenge, config, strategy, _no_model(config))
        images, labels = test_set(challenge, config)
        count = config["num_eval_examples"]
        x, y = images[:count], labels[:count]
        try:
            attack = AutoAttack(model, epsilon=config["epsilon"], norm=FLAGS.norm,
                                version=version, attacks=names,
                                pixel_range=challenge.pixel_range, seed=FLAGS.seed,
                                strategy=strategy, image_shape=challenge.image_shape, log=print,
                                progress=True)
        except ValueError as error:  # a flag the library refuses: one line, as the others
            raise errors.UserError(str(error)) from error
        run_info = {"challenge": challenge.name,
                    "checkpoint": checkpoints.latest_checkpoint(config["model_dir"]),
                    "num_examples": count, "batch_size": config["eval_batch_size"]}
        state = files.keyed_path(os.path.splitext(store)[0] + ".state.npz",
                                 {**attack.settings, **run_info})
        with cluster.stops_on_lost_worker(strategy), cluster.chief_output(strategy):
            print(f"using {attack.version} version including {', '.join(attack.attacks)}.")
            result = attack.evaluate(x, y, batch_size=config["eval_batch_size"],
                                     state_path=state, run_info=run_info)
        if devices.is_chief(strategy):
            _store_attack(result.x_adv, store)
            largest = autoattack_lib.largest_perturbation(attack.threat_model, result.x_adv, x)
            _autoattack_report(result, largest=largest,
                               settings={**attack.settings, **run_info}, path=report_path)
            os.remove(state)

    cli.run(main, challenge.config_path)


def reproduce(challenge):
    """reproduce.py: the paper's tables and figures for the model in `model_dir`."""
    paper = challenge.paper
    flags.DEFINE_string("artifacts", None, "A comma list from " + ", ".join(paper.artifacts) +
                        "; all by default (transfer only with --source_model_dir).")
    flags.DEFINE_string("out_dir", None, "Where the files go; model_dir/paper by default.")
    flags.DEFINE_string("source_model_dir", None, "transfer: the model the attacks are crafted "
                        "on (an independently trained copy, or a naturally trained one).")
    flags.DEFINE_enum("source_name", "A'", list(paper.transfer), "transfer: what the source "
                      "model is, as the paper names it; picks the published column.")
    flags.DEFINE_integer("restarts", 1000, "loss_landscape: random starts per example for the "
                         "histogram of final losses (Figure 2).", lower_bound=1)

    def main(argv):
        config = _config()
        names = reproduce_lib.artifact_list(FLAGS.artifacts, paper, FLAGS.source_model_dir)
        out_dir = FLAGS.out_dir or os.path.join(config["model_dir"], "paper")
        if os.path.exists(out_dir):
            files.check_writable_folder(out_dir, "--out_dir")
        strategy = devices.evaluation_strategy()
        model = restored_model(challenge, config, strategy, _no_model(config))
        source, source_checkpoint = None, None
        if "transfer" in names:
            source, source_checkpoint = _source(challenge, config, strategy)
        files.check_writable_folder(out_dir, "--out_dir")  # made once the models are found
        images, labels = _first_test_images(challenge, config)
        run = reproduce_lib.Reproduction(
            challenge=challenge, attack_settings=challenge.attack_settings(config),
            batch_size=config["eval_batch_size"], seed=challenge.data_seed(config),
            jit_compile=config["jit_compile"], model_dir=config["model_dir"], model=model,
            strategy=strategy, out_dir=out_dir,
            checkpoint=checkpoints.latest_checkpoint(config["model_dir"]),
            landscape_restarts=FLAGS.restarts, images=images, labels=labels, source=source,
            source_model_dir=FLAGS.source_model_dir, source_checkpoint=source_checkpoint,
            source_name=FLAGS.source_name)
        with cluster.stops_on_lost_worker(strategy), cluster.chief_output(strategy):
            reproduce_lib.reproduce(run, names)

    cli.run(main, challenge.config_path)


def _first_test_images(challenge, config):
    images, labels = test_set(challenge, config)
    return images[:config["num_eval_examples"]], labels[:config["num_eval_examples"]]


def _source(challenge, config, strategy):
    """The transfer's source model, from --source_model_dir, and its checkpoint."""
    folder = FLAGS.source_model_dir
    source = _model(challenge, config, strategy)
    try:
        checkpoints.require_latest_weights(source, folder, challenge.tf1_variables,
                                           f"No model found in {folder}")
    except errors.UserError as error:
        raise errors.UserError(f"--source_model_dir: {error}") from error
    return source, checkpoints.latest_checkpoint(folder)
