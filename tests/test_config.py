"""Config loading: the original keys, overrides on the command line, and bad input refused."""

import json

import pytest
from absl import flags
from helpers import REPO, run_script

from common.runtime.errors import UserError
from common.scripts import config as config_lib

MNIST_CONFIG = f"{REPO}/mnist_challenge/config.json"


@pytest.fixture
def flag_values():
    """Parses the given arguments with a fresh flag set holding the MNIST config's flags."""

    def parse(*argv):
        values = flags.FlagValues()
        config_lib.define_flags(MNIST_CONFIG, values)
        values(["prog", *argv])
        return config_lib.load_config(values)

    return parse


def test_defaults_are_the_originals(flag_values):
    config = flag_values()
    assert config["model_dir"] == f"{REPO}/mnist_challenge/models/a_very_robust_model"
    assert config["data_path"] == f"{REPO}/mnist_challenge/MNIST_data"
    assert (config["random_seed"], config["max_num_training_steps"]) == (4557077, 100000)
    assert (config["num_output_steps"], config["num_summary_steps"]) == (100, 100)
    assert (config["num_checkpoint_steps"], config["training_batch_size"]) == (300, 50)
    assert (config["num_eval_examples"], config["eval_batch_size"]) == (10000, 200)
    assert config["eval_on_cpu"] is True and config["random_start"] is True
    assert (config["epsilon"], config["k"], config["a"]) == (0.3, 40, 0.01)
    assert config["loss_func"] == "xent"
    assert config["store_adv_path"].endswith("mnist_challenge/attack.npy")


def test_flags_override_and_paths_follow_their_origin(flag_values, tmp_path, monkeypatch):
    config_file = tmp_path / "mine.json"
    config_file.write_text(json.dumps({"model_dir": "here", "epsilon": 1}))
    monkeypatch.chdir(tmp_path.parent)
    config = flag_values(f"--config={config_file}", "--k=7", "--loss_func=cw",
                         "--norandom_start", "--data_path=rel/data")
    assert config["model_dir"] == str(tmp_path / "here")
    assert config["data_path"] == str(tmp_path.parent / "rel" / "data")
    assert config["epsilon"] == 1.0 and isinstance(config["epsilon"], float)
    assert (config["k"], config["loss_func"], config["random_start"]) == (7, "cw", False)
    assert config["training_batch_size"] == 50


@pytest.mark.parametrize("content, message", [
    ({"epsilon": -0.1}, "'epsilon' must be at least 0"),
    ({"training_batch_size": 0}, "'training_batch_size' must be at least 1"),
    ({"k": 2.5}, "'k' must be of type int"),
    ({"random_start": "yes"}, "'random_start' must be of type bool"),
    ({"loss_func": "hinge"}, "'loss_func' must be one of xent, cw"),
    ({"num_eval_examples": 20000}, "between 1 and 10000"),
    ({"learning_rate": 0.1}, "unknown config key 'learning_rate'"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_configs_are_refused(flag_values, tmp_path, content, message):
    config_file = tmp_path / "bad.json"
    config_file.write_text(json.dumps(content))
    with pytest.raises(UserError, match=message):
        flag_values(f"--config={config_file}")


def test_unreadable_config_is_refused(flag_values, tmp_path):
    config_file = tmp_path / "broken.json"
    config_file.write_text("{ not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        flag_values(f"--config={config_file}")
    with pytest.raises(UserError, match="cannot read config file"):
        flag_values(f"--config={tmp_path / 'missing.json'}")


@pytest.mark.slow
def test_scripts_refuse_a_bad_value_in_one_line_before_any_work(tmp_path):
    result = run_script("mnist_challenge/train.py", "--epsilon=-1", f"--model_dir={tmp_path}/m")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "Error: config key 'epsilon' must be at least 0, got -1.0"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_scripts_refuse_an_unknown_flag(tmp_path):
    result = run_script("mnist_challenge/eval.py", "--learning_rate=3")
    assert result.returncode != 0
    assert "Unknown command line flag 'learning_rate'" in result.stderr
