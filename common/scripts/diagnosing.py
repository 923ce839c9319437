"""diagnose.py of each challenge: the diagnosis of the model in `model_dir` (common.evaluation
.diagnose) on the first `num_eval_examples` test images, written as diagnosis.md, diagnosis.json
and two figures in `--out_dir`. The verdict is a result, not an error: the exit status is 0
whatever it says."""

import json
import os

from absl import flags

from common.attacks import pgd, threat_model
from common.evaluation import figures
from common.evaluation.diagnose import diagnose
from common.io import files
from common.io.files import written_in_place
from common.runtime import cluster, devices, errors
from common.scripts import cli, drivers

FLAGS = flags.FLAGS
OUTPUTS = ("diagnosis.md", "diagnosis.json", "accuracy_vs_epsilon.png", "attack_loss.png")


def _reported_attack(challenge, config, model, strategy):
    """The config's PGD (what pgd_attack.py runs) in L-infinity; in another norm None, for
    diagnose's default PGD-40 scaled to epsilon."""
    if not isinstance(threat_model.ball(FLAGS.norm), threat_model.LinfBall):
        return None
    return pgd.PGD.from_settings(model, challenge.attack_settings(config),
                                 seed=FLAGS.seed, strategy=strategy)


def _check_norm():
    if FLAGS.norm != "Linf" and not FLAGS["epsilon"].present:
        raise errors.UserError(f"--norm={FLAGS.norm} needs --epsilon, its radius in pixel units "
                               "(the config's epsilon is the L-infinity one)")


def write_diagnosis(diagnosis, out_dir, challenge_name):
    """The four OUTPUTS of `diagnosis` in `out_dir`."""
    with written_in_place(os.path.join(out_dir, "diagnosis.md"), "w") as target:
        target.write(diagnosis.to_markdown())
    with written_in_place(os.path.join(out_dir, "diagnosis.json"), "w") as target:
        json.dump(diagnosis.to_dict(), target, indent=1)
    figures.accuracy_against_epsilon(diagnosis.epsilons, diagnosis.curves,
                                     f"{challenge_name} diagnosis",
                                     os.path.join(out_dir, "accuracy_vs_epsilon.png"))
    figures.loss_quartiles(diagnosis.loss_traces, os.path.join(out_dir, "attack_loss.png"))


def diagnose_script(challenge):
    """diagnose.py: diagnoses the model in `model_dir` on the first `num_eval_examples` test
    images within `--epsilon` (the config's) in `--norm`."""
    flags.DEFINE_string("out_dir", None, "Where the diagnosis goes; model_dir/diagnosis by "
                        "default.")
    flags.DEFINE_enum("norm", "Linf", list(threat_model.BALLS), "The ball: the challenge's "
                      "L-infinity one, of the config's epsilon, or L2 or L1, which need --epsilon.")
    flags.DEFINE_integer("seed", 0, "Seeds the attacks' random starts.", lower_bound=0)

    def main(argv):
        config = drivers._config()
        _check_norm()
        out_dir = FLAGS.out_dir or os.path.join(config["model_dir"], "diagnosis")
        if os.path.exists(out_dir):
            files.check_writable_folder(out_dir, "--out_dir")
        strategy = devices.evaluation_strategy()  # over a TF_CONFIG cluster, every worker
        model = drivers.restored_model(challenge, config, strategy, drivers._no_model(config))
        files.check_writable_folder(out_dir, "--out_dir")
        images, labels = drivers.test_set(challenge, config)
        count = config["num_eval_examples"]
        try:
            with cluster.stops_on_lost_worker(strategy), cluster.chief_output(strategy):
                diagnosis = diagnose(
                    model, images[:count], labels[:count], epsilon=config["epsilon"],
                    norm=FLAGS.norm, pixel_range=challenge.pixel_range, seed=FLAGS.seed,
                    attack=_reported_attack(challenge, config, model, strategy),
                    image_shape=challenge.image_shape, strategy=strategy,
                    batch_size=config["eval_batch_size"], progress=True)
        except ValueError as error:  # what the library refuses: one line, as the other scripts
            raise errors.UserError(str(error)) from error
        if devices.is_chief(strategy):
            write_diagnosis(diagnosis, out_dir, challenge.name)
            print(diagnosis.to_markdown())
            print(f"Diagnosis written in {out_dir}: {', '.join(OUTPUTS)}")

    cli.run(main, challenge.config_path)
