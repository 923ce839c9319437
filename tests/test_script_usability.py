"""What a new user meets: outputs checked before any work, runs that never block each other, a
model folder that knows its architecture, help that shows the script's flags, quiet start-up,
files with the user's umask, and run_attack.py on part of the test set."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import (
    REPO,
    assert_one_error_line,
    run_script,
    run_side_by_side,
    script_environment,
    shared_path,
)

from common.io import files
from common.scripts import config as config_lib
from common.scripts import startup

MNIST_FIXTURE = ("fixtures", "tf1_checkpoints", "mnist")
CIFAR_SIMPLE = ("fixtures", "tf1_checkpoints", "cifar10_simple")


def _cifar_data():
    return shared_path("data", "cifar10")


def _mnist(*extra):
    return (f"--model_dir={shared_path(*MNIST_FIXTURE)}",
            f"--data_path={shared_path('data', 'mnist')}", *extra)


@pytest.mark.slow
def test_every_writing_script_refuses_an_unwritable_output_at_once(tmp_path):
    """An output under a file (no folder can be made there) is refused, naming the user's own
    path, never a temporary name; nothing is attacked first."""
    blocker = tmp_path / "a_file"
    blocker.write_text("a file, not a folder")
    bad = blocker / "sub"
    cwd_with_folder = tmp_path / "cwd"
    (cwd_with_folder / "pred.npy").mkdir(parents=True)
    full = tmp_path / "full.npy"
    np.save(full, np.zeros((10000, 784), np.float32))
    model_with_eval_file = tmp_path / "model"
    shutil.copytree(shared_path(*MNIST_FIXTURE), model_with_eval_file)
    (model_with_eval_file / "eval").write_text("a file where eval.py writes its summaries")
    cases = [
        ("mnist_challenge/pgd_attack.py", _mnist(f"--store_adv_path={bad}/attack.npy"), None,
         f"{bad}/attack.npy"),
        ("cifar10_challenge/pgd_attack.py",
         (f"--model_dir={shared_path(*CIFAR_SIMPLE)}", f"--data_path={_cifar_data()}",
          "--filters=[16,16,32,64]", f"--store_adv_path={bad}/attack.npy"), None,
         f"{bad}/attack.npy"),
        ("mnist_challenge/autoattack.py", _mnist(f"--store_adv_path={bad}/aa.npy"), None,
         f"{bad}/aa.npy"),
        ("mnist_challenge/run_attack.py", _mnist(f"--store_adv_path={full}"),
         str(cwd_with_folder), "pred.npy"),
        ("mnist_challenge/train.py", (f"--model_dir={bad}/model",
                                      f"--data_path={shared_path('data', 'mnist')}"), None,
         f"{bad}/model"),
        ("mnist_challenge/eval.py", (f"--model_dir={model_with_eval_file}", "--once",
                                     f"--data_path={shared_path('data', 'mnist')}"), None,
         f"{model_with_eval_file}/eval"),
        ("mnist_challenge/reproduce.py", _mnist(f"--out_dir={bad}/paper"), None,
         f"{bad}/paper"),
    ]
    results = run_side_by_side([(script, args, cwd) for script, args, cwd, _ in cases])
    for (script, _, _, path), result in zip(cases, results):
        assert_one_error_line(result, path, context=script)
        assert ".partial" not in result.stderr and "Iterating" not in result.stdout, script


@pytest.mark.slow
def test_autoattack_runs_with_other_settings_never_block_each_other(tmp_path):
    """Two AutoAttack runs in one folder with other settings both finish; pgd_attack.py's
    attack.npy stays as it was; no state is left behind."""
    (tmp_path / "config.json").write_text(json.dumps({"store_adv_path": "attack.npy"}))
    submission = np.random.default_rng(0).random((3, 784)).astype(np.float32)
    np.save(tmp_path / "attack.npy", submission)
    for count in (2, 3):
        result = run_script("mnist_challenge/autoattack.py",
                            *_mnist(f"--config={tmp_path}/config.json", "--attacks=apgd-ce",
                                    f"--num_eval_examples={count}", "--eval_batch_size=2"))
        assert result.returncode == 0, result.stderr[-2000:]
        assert np.load(tmp_path / "autoattack.npy").shape == (count, 784)
        assert json.load(open(tmp_path / "autoattack.json"))["settings"]["num_examples"] == count
    np.testing.assert_array_equal(np.load(tmp_path / "attack.npy"), submission)
    assert sorted(os.listdir(tmp_path)) == ["attack.npy", "autoattack.json", "autoattack.npy",
                                            "config.json"]


def test_state_files_are_named_by_their_settings():
    first = files.keyed_path("out/table.state.json", {"epsilon": 0.3, "checkpoint": "a"})
    assert first == files.keyed_path("out/table.state.json", {"checkpoint": "a", "epsilon": 0.3})
    assert first != files.keyed_path("out/table.state.json", {"epsilon": 0.1, "checkpoint": "a"})
    assert first.startswith("out/table.state-") and first.endswith(".json")


@pytest.fixture(scope="module")
def simple_cifar_model(tmp_path_factory):
    """A CIFAR-10 model trained here for one step with the simple network's filters: its folder
    holds its checkpoints and the config.json train.py saves."""
    folder = tmp_path_factory.mktemp("simple") / "model"
    result = run_script("cifar10_challenge/train.py", f"--model_dir={folder}",
                        f"--data_path={shared_path('data', 'cifar10')}",
                        "--filters=[16,16,32,64]", "--max_num_training_steps=1",
                        "--num_checkpoint_steps=1", "--training_batch_size=4", "--num_steps=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(folder / "config.json"))["filters"] == [16, 16, 32, 64]
    return folder


def _cifar_attack(model_dir, tmp_path, *extra):
    return run_script("cifar10_challenge/pgd_attack.py", f"--model_dir={model_dir}",
                      f"--data_path={shared_path('data', 'cifar10')}", "--num_eval_examples=4",
                      "--eval_batch_size=4", "--num_steps=1",
                      f"--store_adv_path={tmp_path}/attack.npy", *extra)


@pytest.mark.slow
def test_the_model_folder_gives_its_architecture(simple_cifar_model, tmp_path):
    """The saved config.json decides the filters; a flag that contradicts it is one line; without
    a saved config, a checkpoint of another architecture is one line, not a flood."""
    guessed = _cifar_attack(simple_cifar_model, tmp_path)
    assert guessed.returncode == 0, guessed.stderr[-2000:]
    assert np.load(tmp_path / "attack.npy").shape == (4, 32, 32, 3)

    forced = _cifar_attack(simple_cifar_model, tmp_path, "--filters=[16,160,320,640]")
    assert_one_error_line(forced, "--filters=[16, 160, 320, 640] does not fit the model in "
                                  f"{simple_cifar_model}: it was trained with filters "
                                  "[16, 16, 32, 64]")
    assert len(forced.stderr.strip().splitlines()) <= 2, forced.stderr

    unsaved = tmp_path / "unsaved"
    shutil.copytree(simple_cifar_model, unsaved)
    os.remove(unsaved / "config.json")
    flooded = _cifar_attack(unsaved, tmp_path)
    assert_one_error_line(flooded, "does not fit this model: ")
    assert "in the model, (16,) in the checkpoint" in flooded.stderr
    assert len(flooded.stderr.strip().splitlines()) <= 2, flooded.stderr


@pytest.mark.slow
def test_help_shows_the_scripts_flags_and_the_config_in_effect():
    result = run_script("mnist_challenge/pgd_attack.py",
                        "--config=mnist_challenge/config_fast.json", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    own, config = text.split("Flags of this script:")[1].split("Config keys")
    assert "--restarts:" in own and "--tf_log:" in own and "--model_dir" not in own
    assert "--model_dir:" in config and "models/fast" in config  # config_fast.json's, in effect
    assert "--max_num_training_steps: Training steps. (default: 7500)" in config
    assert "--helpfull" in text and "--logtostderr" not in text and "Iterating" not in text
    list_keys = [key for key in json.load(open(os.path.join(REPO, "mnist_challenge/config.json")))
                 if config_lib.RULES.get(key, (None,))[0] is list]
    assert len(list_keys) == 2 and text.count("Given as JSON") == len(list_keys)
    assert max(len(line) for line in text.splitlines()) <= 100


def _driver_flags(script):
    """The flags the script's driver in common/scripts/drivers.py defines, itself or through the
    module's functions it calls (read with ast)."""
    with open(os.path.join(REPO, script)) as source:
        calls = [node.func.attr for node in ast.walk(ast.parse(source.read()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and isinstance(node.func.value, ast.Name) and node.func.value.id == "drivers"]
    with open(os.path.join(REPO, "common", "scripts", "drivers.py")) as source:
        functions = {node.name: node for node in ast.parse(source.read()).body
                     if isinstance(node, ast.FunctionDef)}
    found, seen, waiting = set(), set(), [calls[0]]
    while waiting:
        name = waiting.pop()
        seen.add(name)
        for node in ast.walk(functions[name]):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Attribute) and node.func.attr.startswith("DEFINE_"):
                found.add(node.args[0].value)
            elif isinstance(node.func, ast.Name) and node.func.id in functions.keys() - seen:
                waiting.append(node.func.id)
    return found


@pytest.mark.slow
def test_help_of_each_script_gives_its_drivers_flags_and_every_config_key():
    """Each script's --help lists, as its own flags, the ones its driver defines, and as config
    keys exactly the keys of its challenge's config.json, each one the config rules know."""
    scripts = ["mnist_challenge/eval.py", "mnist_challenge/autoattack.py",
               "mnist_challenge/run_attack.py", "cifar10_challenge/reproduce.py",
               "cifar10_challenge/train.py"]
    results = run_side_by_side([(script, ("--help",), None) for script in scripts])
    for script, result in zip(scripts, results):
        assert result.returncode == 0, (script, result.stderr[-1000:])
        own, config = result.stdout.split("Flags of this script:")[1].split("Config keys")
        named = re.compile(r"^  --(\w+)", re.M)
        with open(os.path.join(REPO, os.path.dirname(script), "config.json")) as config_file:
            keys = {key for key in json.load(config_file) if not key.startswith("_")}  # notes
        assert set(named.findall(config)) == keys | {"config"}, (script, config)
        assert keys <= set(config_lib.RULES), keys - set(config_lib.RULES)
        assert set(named.findall(own)) == _driver_flags(script) | {"tf_log"}, (script, own)


@pytest.mark.slow
def test_start_up_is_quiet_unless_asked(tmp_path):
    quiet = run_script("mnist_challenge/summary.py")
    loud = subprocess.run([sys.executable, os.path.join(REPO, "mnist_challenge/summary.py"),
                           "--tf_log"], capture_output=True, text=True, timeout=120,
                          env=script_environment())
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr[-2000:]
    assert quiet.stderr.strip() == "", quiet.stderr
    # What --tf_log shows and the quiet run hid: TensorFlow's start-up lines (which ones depends on
    # the machine: oneDNN's notice only where TensorFlow turns oneDNN on, CUDA's without a GPU).
    shown = [line for line in loud.stderr.splitlines() if startup.is_noise(line)]
    assert shown, loud.stderr[-2000:]


@pytest.mark.slow
def test_a_missing_output_folder_is_made_and_files_take_the_users_umask(tmp_path):
    store = tmp_path / "new" / "folder" / "attack.npy"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "mnist_challenge/pgd_attack.py"),
         *_mnist("--num_eval_examples=3", "--k=1", f"--store_adv_path={store}")],
        capture_output=True, text=True, timeout=300, env=script_environment(), umask=0o022)
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.load(store).shape == (3, 784)
    assert os.stat(store).st_mode & 0o777 == 0o644
    with files.written_in_place(tmp_path / "in_process.json", "w") as target:
        target.write("{}")
    old = os.umask(0o022)
    os.umask(old)
    assert os.stat(tmp_path / "in_process.json").st_mode & 0o777 == 0o666 & ~old


@pytest.mark.slow
def test_run_attack_scores_the_first_images_when_asked(tmp_path):
    """`--num_eval_examples=N` scores a submission of N images; without it the original's full
    check refuses it."""
    from mnist_challenge import mnist_input

    images = mnist_input.MNISTData(shared_path("data", "mnist")).test_images[:50]
    np.save(tmp_path / "part.npy", images)
    part, whole = run_side_by_side([
        ("mnist_challenge/run_attack.py",
         _mnist(f"--store_adv_path={tmp_path}/part.npy", "--num_eval_examples=50"), tmp_path),
        ("mnist_challenge/run_attack.py", _mnist(f"--store_adv_path={tmp_path}/part.npy"),
         tmp_path)])
    assert part.returncode == 0, part.stderr[-2000:]
    assert np.load(tmp_path / "pred.npy").shape == (50,)
    assert "Accuracy: " in part.stdout
    assert_one_error_line(whole, "Invalid shape: expected (10000,784), found (50, 784)")
