"""serve.py: hosts a challenge. Each challenge's `serve.py` hands its `Challenge` to `serve`, which
reads the flags (the config keys among them: model_dir, data_path, epsilon, ...) and runs the
web server, a scorer or both (common/serving), or adds a participant and exits."""

import logging
import os
import signal
import socket
import sys
import threading
import time

import sqlalchemy as sa
from absl import flags

from common.io import checkpoints, files
from common.runtime import devices, precision
from common.runtime.errors import UserError
from common.scripts import cli, drivers
from common.scripts import config as config_lib
from common.serving import admin, database, participants, queue, settings, storage, uploads

FLAGS = flags.FLAGS
ROLES = ("web", "scorer", "both")
LOG_FILE = "serve.log"
SPOOL_FOLDER = "incoming"
WORK_FOLDER = "scoring"
# Files older than this, left by a killed process, are removed at start.
STALE_SECONDS = 3600
RESTART_SECONDS = 5
GRACEFUL_SHUTDOWN_SECONDS = 5

log = logging.getLogger("common.serving.server")


class _Stop(BaseException):
    """SIGTERM, raised in the main thread."""


def _define_flags():
    flags.DEFINE_string("state_dir", None, "Folder of the server's state, created where "
                        "missing: uploads, the log serve.log and, without --database_url, the "
                        "SQLite database serve.sqlite3.")
    flags.DEFINE_string("host", "127.0.0.1", "Address the web server listens on.")
    flags.DEFINE_integer("port", 8000, "Port the web server listens on (0: a free one, logged).",
                         lower_bound=0, upper_bound=65535)
    flags.DEFINE_string("database_url", None, "postgresql://USER@HOST:PORT/DATABASE: keep the "
                        "participants, submissions, their files and the queue in PostgreSQL, "
                        "shared by web and scorer processes on several machines (default: "
                        "SQLite in --state_dir).")
    flags.DEFINE_enum("role", "both", ROLES, "web: the API and the pages; scorer: scores the "
                      "queue's jobs on the model; both: the two in one process.")
    flags.DEFINE_integer("max_submissions_per_hour", 10, "Uploads one participant may start in "
                         "an hour, accepted or refused; more are refused with 429.",
                         lower_bound=1)
    flags.DEFINE_integer("job_timeout", 60, "Seconds after which a job whose scorer stopped "
                         "renewing its lease (every third of it) goes to another scorer.",
                         lower_bound=3)
    flags.DEFINE_string("add_participant", None, "Add the participant NAME, print its token "
                        "and exit (the server may be running).")
    flags.DEFINE_string("reset_token", None, "Give the participant NAME a new token, the old one "
                        "no longer valid, print it and exit.")
    _define_data_flags()


def _define_data_flags():
    """Storage, model identity, the private split and the admin commands."""
    flags.DEFINE_integer("max_refused_per_hour", 30, "Refused uploads (a bad file, a wrong "
                         "field) one participant may make in an hour, besides "
                         "--max_submissions_per_hour; more are refused with 429.", lower_bound=1)
    flags.DEFINE_integer("max_submissions_total", 500, "Submissions one participant may make in "
                         "all; more are refused with 429.", lower_bound=1)
    flags.DEFINE_integer("min_free_bytes", 2 << 30, "Free bytes kept on the disk of --state_dir: "
                         "an upload that would leave less is refused with 507.", lower_bound=0)
    flags.DEFINE_boolean("rescore", False, "Move the challenge to the model of --model_dir where "
                         "the database holds another: every submission is scored again, the old "
                         "scores kept off the leaderboard.")
    flags.DEFINE_float("public_fraction", 1.0, "Fraction of the test images whose score is shown "
                       "while the challenge is open; below 1 the leaderboard switches to the "
                       "private rest once it closes (--closes_at).")
    flags.DEFINE_boolean("list_participants", False, "Print each participant's name, "
                         "submissions and best accuracy per track, and exit.")
    flags.DEFINE_string("hide_submission", None, "Take the submission ID off the leaderboard (it "
                        "is kept) and exit.")
    flags.DEFINE_string("unhide_submission", None, "Put the hidden submission ID back on the "
                        "leaderboard and exit.")
    flags.DEFINE_string("export", None, "Write the leaderboard to PATH, as CSV or JSON by its "
                        "extension (.csv, .json), and exit.")
    flags.DEFINE_string("closes_at", None, "Close the challenge at this ISO 8601 time with its "
                        "zone (2026-06-30T23:59:00+00:00; 'never' reopens it) and exit: later "
                        "uploads get 403, accepted ones are still scored.")


def serve(challenge):
    """serve.py: the challenge server of `challenge`."""
    _define_flags()

    def main(argv):
        if len(argv) > 1:
            raise UserError(f"unexpected argument {argv[1]!r}: every setting is a --flag")
        if not FLAGS.state_dir:
            raise UserError("give --state_dir: the folder of the server's state")
        files.check_writable_folder(FLAGS.state_dir, "--state_dir")
        db = database.Database(FLAGS.database_url, FLAGS.state_dir, challenge.name)
        try:
            db.create()
            if FLAGS.add_participant is not None or FLAGS.reset_token is not None:
                _participant(db)
            elif _admin_command() is not None:
                _admin(db, *_admin_command())
            else:
                _serve(challenge, db)
        except sa.exc.SQLAlchemyError as error:  # the database went away while starting
            reason = str(getattr(error, "orig", None) or error).strip().splitlines()
            raise UserError(f"the database {db.shown_url} failed: "
                            f"{reason[0] if reason else type(error).__name__}") from error
        finally:
            db.dispose()

    cli.run(main, challenge.config_path)


def _participant(db):
    if FLAGS.add_participant is not None and FLAGS.reset_token is not None:
        raise UserError("give either --add_participant or --reset_token, not both")
    if FLAGS.add_participant is not None:
        print(participants.add(db, FLAGS.add_participant))
    else:
        print(participants.add(db, FLAGS.reset_token, replace=True))


ADMIN_FLAGS = ("list_participants", "hide_submission", "unhide_submission", "export",
               "closes_at")


def _admin_command():
    """The admin command given, as (flag name, value), or None; UserError for two."""
    given = [(name, FLAGS[name].value) for name in ADMIN_FLAGS
             if FLAGS[name].value not in (None, False)]
    if len(given) > 1:
        raise UserError(f"give one admin command at a time, got --{given[0][0]} and "
                        f"--{given[1][0]}")
    return given[0] if given else None


def _admin(db, command, value):
    """Runs the admin command `command` (a flag's name) with the flag's `value`."""
    if command == "list_participants":
        _print_standings(admin.standings(db))
    elif command in ("hide_submission", "unhide_submission"):
        admin.set_hidden(db, value, hidden=command == "hide_submission")
        print(f"submission {value} is {'off' if command == 'hide_submission' else 'back on'} "
              "the leaderboard")
    elif command == "export":
        print(f"wrote {admin.export(db, value)} leaderboard rows to {value}")
    elif value.strip().lower() == "never":
        settings.set_closing(db, None)
        print("the challenge is open, with no closing time")
    else:
        seconds = settings.parse_time(value)
        settings.set_closing(db, seconds)
        print(f"the challenge closes at {queue.shown_time(seconds)}")


def _print_standings(standings):
    tracks = queue.TRACKS
    print("\t".join(("participant", "submissions", *(f"best {track}" for track in tracks))))
    for standing in standings:
        best = [f"{100 * standing.best[track]:.2f}%" if track in standing.best else "-"
                for track in tracks]
        print("\t".join((standing.name, str(standing.submissions), *best)))


def _start_log(state_dir):
    """Progress and errors to stderr and to state_dir/serve.log."""
    formatter = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(module)s: "
                                  "%(message)s")
    handlers = [logging.StreamHandler(sys.stderr),
                logging.FileHandler(os.path.join(state_dir, LOG_FILE), encoding="utf-8")]
    for handler in handlers:
        handler.setFormatter(formatter)
    for name in ("common.serving", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = handlers
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _bind(host, port):
    """A socket bound to host:port, so that a taken port is an Error line before any work."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listener


def _remove_stale(folder, keep=lambda name: False):
    """Removes the files of `folder` older than STALE_SECONDS (left by a killed process)."""
    cutoff = time.time() - STALE_SECONDS
    for entry in os.scandir(folder):
        if entry.is_file() and not keep(entry.name) and entry.stat().st_mtime < cutoff:
            os.remove(entry.path)
            log.info("removed %s, left by a stopped process", entry.path)


def _rules(challenge, config):
    count = FLAGS.num_eval_examples  # given on the command line; else the whole test set
    images, labels = drivers.test_set(challenge, config)
    return uploads.Rules(challenge.name, images[:count], labels[:count], config["epsilon"],
                         challenge.pixel_range, drivers.shape_text(challenge, count))


def _serve(challenge, db):
    config = config_lib.load_config()
    precision.set_precision(config["precision"])
    state_dir = os.path.abspath(FLAGS.state_dir)
    role = FLAGS.role
    listener = _bind(FLAGS.host, FLAGS.port) if role != "scorer" else None
    _start_log(state_dir)
    rules = _rules(challenge, config)
    db.agree_on("settings", rules.settings, "challenge, test images and epsilon")
    fingerprint, public = _challenge_state(db, config, len(rules.images))
    store = storage.DatabaseStore(db) if db.is_postgresql else storage.FolderStore(state_dir)
    scorer = None
    if role != "web":
        from common.serving import scorer as scorer_lib  # the web role needs no model

        strategy = devices.local_strategy()
        model = drivers.restored_model(challenge, config, strategy,
                                        f"No checkpoint found in {config['model_dir']}")
        work_dir = os.path.join(state_dir, WORK_FOLDER)
        os.makedirs(work_dir, exist_ok=True)
        _remove_stale(work_dir)
        scorer = scorer_lib.Scorer(db, store, work_dir, rules, model, strategy,
                                   challenge.prediction_batch_size, fingerprint, public,
                                   FLAGS.job_timeout)
    signal.signal(signal.SIGTERM, _raise_stop)
    where = f"database {db.shown_url}, state in {state_dir}"
    if role == "scorer":
        log.info("%s scorer: %s, %d test images, epsilon %g", challenge.name, where,
                 len(rules.images), rules.epsilon)
        _run_scorer_here(scorer)
        return
    _web(challenge, db, store, rules, state_dir, listener, scorer, where)


def _challenge_state(db, config, examples):
    """The fingerprint of the model of --model_dir, recorded as the challenge's (or moved to,
    with --rescore), and the public test images (None: all)."""
    checkpoint = checkpoints.latest_checkpoint(config["model_dir"])
    if checkpoint is None:
        raise UserError(f"No checkpoint found in {config['model_dir']}")
    fingerprint = checkpoints.fingerprint(checkpoint)
    requeued = settings.adopt_model(db, fingerprint, rescore=FLAGS.rescore)
    log.info("model %s (%s)%s", settings.short(fingerprint), checkpoint,
             f": the challenge moved to it, {requeued} submissions queued again to be scored "
             "on it" if FLAGS.rescore else "")
    return fingerprint, settings.public_subset(db, examples, FLAGS.public_fraction)


def _raise_stop(signum, frame):
    raise _Stop()


def _scorer_loop(scorer, stop):
    """Runs the scorer until `stop`, restarting it after a failure (a database that went
    away)."""
    while not stop.is_set() and not scorer.retired:
        try:
            scorer.run(stop)
        except Exception:
            log.exception("the scorer failed; it starts again in %d s", RESTART_SECONDS)
            stop.wait(RESTART_SECONDS)


def _run_scorer_here(scorer):
    stop = threading.Event()
    try:
        _scorer_loop(scorer, stop)
    except (_Stop, KeyboardInterrupt):
        scorer.give_back()
        log.info("scorer stopped")
    if scorer.retired:
        raise UserError(f"{scorer.retired}: start the scorer with that model")


def _web(challenge, db, store, rules, state_dir, listener, scorer, where):
    import uvicorn

    from common.serving import web

    spool_dir = os.path.join(state_dir, SPOOL_FOLDER)
    os.makedirs(spool_dir, exist_ok=True)
    _remove_stale(spool_dir)
    if isinstance(store, storage.FolderStore):
        known = queue.submission_ids(db)
        _remove_stale(store.folder, keep=lambda name: name[:-len(storage.SUFFIX)] in known)
    limits = queue.Limits(FLAGS.max_submissions_per_hour, FLAGS.max_refused_per_hour,
                          FLAGS.max_submissions_total)
    service = web.Service(db, store, rules, spool_dir, limits, FLAGS.min_free_bytes)
    host, port = listener.getsockname()[:2]
    log.info("%s challenge on http://%s:%d (role %s): %s; %d test images, epsilon %g, at most "
             "%d uploads per participant and hour", challenge.name,
             f"[{host}]" if ":" in host else host, port, FLAGS.role, where, len(rules.images),
             rules.epsilon, FLAGS.max_submissions_per_hour)
    server = uvicorn.Server(uvicorn.Config(
        service.app(), log_config=None, access_log=False, http="h11", loop="asyncio",
        ws="none", lifespan="off", server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS))
    stop = threading.Event()
    thread = None
    if scorer is not None:
        thread = threading.Thread(target=_scorer_loop, args=(scorer, stop), name="scorer",
                                  daemon=True)
        thread.start()
    try:
        server.run(sockets=[listener])
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        stop.set()
        if scorer is not None:
            scorer.give_back()
        log.info("server stopped")
    if thread is not None:
        thread.join(timeout=1)
    if thread is not None and thread.is_alive():
        # The scorer is inside TensorFlow; its job is back in the queue: end at once.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
