"""Bad input ends with exit status 1 and one `Error:` line, never a traceback: every config key of
both challenges with bad values (zero, negative, wrong type, out of range, a file where a folder
belongs and the reverse), checked in-process, and every script run with bad flags and files."""

import json

import pytest
from absl import flags
from helpers import assert_one_error_line, run_side_by_side, shared_path

from cifar10_challenge.challenge import CIFAR10
from common.runtime.errors import UserError
from common.scripts import config as config_lib
from mnist_challenge.challenge import MNIST

INT_BAD = ["-1", "2.5", "abc"]
BAD_VALUES = {
    "random_seed": INT_BAD + [str(2**32)], "tf_random_seed": INT_BAD + [str(2**32)],
    "np_random_seed": INT_BAD + [str(2**32)], "max_num_training_steps": INT_BAD,
    "num_output_steps": INT_BAD + ["0"], "num_summary_steps": INT_BAD + ["0"],
    "num_checkpoint_steps": INT_BAD + ["0"], "training_batch_size": INT_BAD + ["0"],
    "num_eval_examples": INT_BAD + ["0", "10001"], "eval_batch_size": INT_BAD + ["0"],
    "k": INT_BAD, "num_steps": INT_BAD,
    "epsilon": ["-0.1", "abc"], "a": ["-1", "abc"], "step_size": ["-1", "abc"],
    "weight_decay": ["-1", "abc"], "momentum": ["-0.5", "1.5", "abc"],
    "eval_on_cpu": ["maybe", "2"], "random_start": ["maybe"], "jit_compile": ["yes please"],
    "loss_func": ["hinge", ""], "attack_batch_norm": ["batch"],
    "precision": ["float16", "float64"], "training_precision": ["bfloat16", "AUTO"],
    "model_dir": [""], "data_path": [""], "store_adv_path": [""],
    "filters": ["[16,16,32]", "[16,16,32,0]", "[16,16,32,6.5]", "notjson", "5"],
    "step_size_schedule": ["[[5,0.1]]", "[[0,0.1],[10,-1]]", "[[0,0.1],[0,0.2]]", "[]",
                           "[[0,0.1,3]]", "[[0.5,0.1]]", "[[0,0],[10,0]]", "notjson"],
    "learning_rate_schedule": ["cosine", "piecewise"],
    "training_method": ["TRADES", "PGD", ""], "trades_beta": ["-1", "abc"],
    "gradalign_weight": ["-0.5", "abc"],
    "awp_gamma": ["-0.005", "abc"],
    "fgsm_step_size": ["-0.375", "0", "abc"],
    "replay_m": INT_BAD + ["0"],
    "overfitting_check_steps": INT_BAD, "epsilon_ramp_steps": INT_BAD,
    "overfitting_check_examples": INT_BAD + ["0"],
    "training_attack": ["[2]", "[2,0.1,3]", "[-1,0.1]", "[2.5,0.1]", "[2,-0.1]", "[2,\"a\"]",
                        "notjson"],
}


def load(challenge, *argv):
    """The config a script would load with `argv`; a flag error or UserError as one message."""
    values = flags.FlagValues()
    config_lib.define_flags(challenge.config_path, values)
    try:
        values(["script.py", *argv])
        return config_lib.load_config(values)
    except (flags.Error, UserError) as error:
        return error


def config_cases():
    for challenge in (MNIST, CIFAR10):
        keys = json.load(open(challenge.config_path))
        for key in keys:
            if key.startswith("_"):
                continue
            assert key in BAD_VALUES, f"no bad values listed for {key}"
            for value in BAD_VALUES[key]:
                yield pytest.param(challenge, key, value, id=f"{challenge.name}-{key}={value}")


@pytest.mark.parametrize("challenge, key, value", config_cases())
def test_every_bad_config_value_is_refused_in_one_line(challenge, key, value):
    error = load(challenge, f"--{key}={value}")
    assert isinstance(error, (flags.Error, UserError)), f"--{key}={value} was accepted"
    assert key in str(error) and "\n" not in str(error), str(error)


def test_files_and_folders_in_the_wrong_place_are_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    for key in ("model_dir", "data_path"):
        error = load(MNIST, f"--{key}={a_file}")
        assert isinstance(error, UserError)
        assert str(error) == f"config key '{key}' must name a folder, {a_file} is a file"
    error = load(CIFAR10, f"--store_adv_path={tmp_path}")
    assert str(error) == f"config key 'store_adv_path' must name a file, {tmp_path} is a folder"


def test_a_good_config_loads():
    config = load(CIFAR10, "--filters=[16,16,32,64]", "--step_size_schedule=[[0,0.1],[10,0.01]]")
    assert config["filters"] == [16, 16, 32, 64]
    assert config["step_size_schedule"] == [[0, 0.1], [10, 0.01]]


def script_cases(tmp_path):
    """(script, arguments, message) for every script of both challenges: each refusal of the
    shared drivers once, on one challenge or the other (the scripts only hand over to them)."""
    a_file, a_folder = tmp_path / "file", tmp_path / "folder"
    a_file.write_text("not a folder")
    a_folder.mkdir()
    mnist, cifar = "mnist_challenge", "cifar10_challenge"
    cases = []
    scripts = ("train.py", "eval.py", "pgd_attack.py", "run_attack.py", "summary.py",
               "autoattack.py")
    for index, script in enumerate(scripts):
        cases.append((f"{(mnist, cifar)[index % 2]}/{script}", ["--epsilon=-1"],
                      "config key 'epsilon' must be at least 0, got -1.0"))
    cases += [
        (f"{mnist}/pgd_attack.py", ["--k=abc"], "flag --k=abc"),
        (f"{cifar}/pgd_attack.py", ["--num_steps=abc"], "flag --num_steps=abc"),
        (f"{mnist}/pgd_attack.py", ["--learning_rate=3"],
         "Unknown command line flag 'learning_rate'"),
        (f"{cifar}/train.py", [f"--config={tmp_path}/missing.json"], "cannot read config file"),
        (f"{mnist}/eval.py", [f"--config={a_folder}"], "cannot read config file"),
        (f"{cifar}/run_attack.py", [f"--data_path={a_file}"],
         "config key 'data_path' must name a folder"),
        (f"{mnist}/pgd_attack.py", ["--restarts=0"], "flag --restarts=0"),
        (f"{cifar}/pgd_attack.py", ["--restarts=-2"], "flag --restarts=-2"),
        (f"{cifar}/pgd_attack.py", [f"--model_dir={a_folder}"], "No model found"),
        (f"{mnist}/run_attack.py", [f"--model_dir={a_folder}"], "No checkpoint found"),
        (f"{cifar}/eval.py", ["--once=maybe"], "flag --once=maybe"),
        (f"{mnist}/eval.py", [f"--model_dir={a_folder}", "--once",
                              f"--data_path={shared_path('data', 'mnist')}"],
         f"No checkpoint found in {a_folder}"),
        (f"{mnist}/train.py", [f"--model_dir={a_file}"],
         "config key 'model_dir' must name a folder"),
        (f"{cifar}/autoattack.py", ["--attacks=apgd-ce,pgd"],
         "--attacks: name each attack once"),
        (f"{mnist}/autoattack.py", ["--version=plus", "--attacks=apgd-ce"],
         "either --version or --attacks, not both"),
        (f"{cifar}/autoattack.py", ["--seed=-1"], "flag --seed=-1"),
        (f"{mnist}/fetch_model.py", ["natural", "--sha256=feed"],
         "--sha256 must be 64 hexadecimal digits"),
        (f"{cifar}/fetch_model.py", ["adv_trained", "--sha256=feed"],
         "--sha256 must be 64 hexadecimal digits"),
    ]
    cifar_model = shared_path("fixtures", "tf1_checkpoints", "cifar10_simple")
    on_fixture = (f"--model_dir={shared_path('fixtures', 'tf1_checkpoints', 'mnist')}",
                  f"--data_path={shared_path('data', 'mnist')}",
                  f"--out_dir={tmp_path / 'paper'}")
    cases += [
        (f"{mnist}/reproduce.py", [*on_fixture, f"--source_model_dir={a_folder}"],
         f"--source_model_dir: No model found in {a_folder}"),
        (f"{mnist}/reproduce.py",
         [*on_fixture, f"--source_model_dir={cifar_model}"],
         "--source_model_dir: TF1 checkpoint"),
        (f"{mnist}/reproduce.py", [*on_fixture[:2], f"--out_dir={a_file}"],
         f"the --out_dir {a_file} is a file"),
        (f"{cifar}/reproduce.py", ["--artifacts=filters,table"],
         "from table, transfer, eps_sweep, loss_landscape;"),
    ]
    return cases


@pytest.mark.slow
def test_every_script_refuses_bad_flags_and_files_in_one_line(tmp_path):
    cases = script_cases(tmp_path)
    results = run_side_by_side([(script, args, None) for script, args, _ in cases])
    for (script, args, message), result in zip(cases, results):
        assert_one_error_line(result, message, context=(script, *args))
    assert not (tmp_path / "paper").exists() and (tmp_path / "file").read_text() == "not a folder"
