"""The warm interpreter stands for a new process: a script run in a fork of it answers as the
same script run by a new Python, and a run killed or timed out reports what subprocess would."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import warm_interpreter
from helpers import REPO, script_environment

pytestmark = pytest.mark.slow

PROBE = textwrap.dedent("""\
    import json, os, sys, time
    if sys.argv[1] == "sleep":
        time.sleep(60)
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0],
                      "umask": oct(os.umask(0)), "name": __name__,
                      "variable": os.environ.get("WARM_PROBE")}))
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
""")


def test_a_refused_flag_answers_as_in_a_new_process():
    argv = [os.path.join(REPO, "mnist_challenge/eval.py"), "--epsilon=-1"]
    env = script_environment()
    warm = warm_interpreter.run(argv, cwd=REPO, env=env, timeout=120)
    cold = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert (warm.returncode, warm.stdout, warm.stderr) == \
        (cold.returncode, cold.stdout, cold.stderr) == \
        (1, "", "Error: config key 'epsilon' must be at least 0, got -1.0\n")


def test_a_run_has_its_own_arguments_folder_environment_and_umask(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    env = {**script_environment(), "WARM_PROBE": "yes"}
    old = os.umask(0o027)
    try:
        result = warm_interpreter.run([str(script), "3"], cwd=folder, env=env, timeout=60)
    finally:
        os.umask(old)
    assert result.returncode == 3 and result.stderr == "to stderr\n"
    assert result.stdout.strip() == (
        f'{{"argv": ["{script}", "3"], "cwd": "{folder}", "path0": "{tmp_path}", '
        '"umask": "0o27", "name": "__main__", "variable": "yes"}')


def test_a_killed_or_timed_out_run_reports_as_subprocess_does(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    with open(tmp_path / "output", "wb") as output:
        run = warm_interpreter.Run([str(script), "sleep"], cwd=tmp_path,
                                   env=script_environment(), stdout=output, stderr=output)
    assert run.poll() is None
    run.send_signal(signal.SIGTERM)
    assert run.wait(30) == -signal.SIGTERM
    with pytest.raises(subprocess.TimeoutExpired):
        warm_interpreter.run([str(script), "sleep"], cwd=tmp_path, env=script_environment(),
                             timeout=1)


def test_a_setting_read_at_import_needs_a_new_process():
    argv = [os.path.join(REPO, "mnist_challenge/eval.py")]
    warm_interpreter.run([*argv, "--epsilon=-1"], cwd=REPO, env=script_environment(),
                         timeout=120)
    assert warm_interpreter.usable_for(argv, script_environment())
    assert not warm_interpreter.usable_for(argv, script_environment(TF_ENABLE_ONEDNN_OPTS="0"))
    assert not warm_interpreter.usable_for([*argv, "--tf_log"], script_environment())
