"""serve.py as a user meets it: --help shows its own flags, and a bad flag, a missing state folder,
an unreachable database, a database of another schema version, a model folder without a
checkpoint or a taken port ends with one
`Error:` line and exit status 1, never a traceback (the other refusals are checked in-process, in
test_serve_queue.py and test_serve_uploads.py)."""

import socket

import pytest
from helpers import assert_one_error_line, run_script, run_side_by_side, shared_path
from serving_helpers import open_database

from common.serving import database

pytestmark = pytest.mark.slow

FLAGS = ("state_dir", "host", "port", "database_url", "role", "max_submissions_per_hour",
         "job_timeout", "add_participant", "reset_token")


def test_help_shows_the_servers_own_flags():
    result = run_script("cifar10_challenge/serve.py", "--help")
    assert result.returncode == 0, result.stderr
    own = result.stdout.split("Flags of this script:")[1].split("Config keys")[0]
    for flag in FLAGS:
        assert f"  --{flag}:" in own, (flag, own)
    assert "--role: <web|scorer|both>: web: the API and the pages" in own
    assert "usage: python cifar10_challenge/serve.py" in result.stdout
    assert "  --model_dir:" in result.stdout and "  --epsilon:" in result.stdout


def test_bad_flags_folders_databases_models_and_ports_are_one_error_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    state = f"--state_dir={tmp_path / 'state'}"
    data = f"--data_path={shared_path('data', 'mnist')}"
    model = f"--model_dir={shared_path('fixtures', 'tf1_checkpoints', 'mnist')}"
    newer = tmp_path / "newer"  # written by a later version of the server
    newer.mkdir()
    db = open_database(state_dir=newer)
    with db.write() as connection:
        database.set_meta(connection, db.tables, "schema", database.SCHEMA_VERSION + 1)
    db.dispose()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    serve = "mnist_challenge/serve.py"
    cases = [
        ([state, "--role=judge"], "flag --role=judge"),
        ([model, data], "give --state_dir"),
        ([state, "--database_url=postgresql://postgres@127.0.0.1:1/test"],
         "cannot use the database postgresql+psycopg://postgres@127.0.0.1:1/test: "),
        ([f"--state_dir={newer}", model, data, "--port=0"],
         f"has tables of schema version {database.SCHEMA_VERSION + 1}; "
         f"this server needs {database.SCHEMA_VERSION}"),
        ([state, f"--model_dir={empty}", data, "--port=0"], f"No checkpoint found in {empty}"),
        ([state, model, data, f"--port={port}"],
         f"cannot listen on 127.0.0.1:{port}: Address already in use"),
    ]
    results = run_side_by_side([(serve, args, None) for args, _ in cases])
    taken.close()
    for (args, message), result in zip(cases, results):
        assert_one_error_line(result, message, context=args)
