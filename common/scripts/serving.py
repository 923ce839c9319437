"""serve.py: hosts a challenge. Each challenge's `serve.py` hands its `Challenge` to `serve`, which
reads the flags (the config keys among them: model_dir, data_path, epsilon, ...) and runs the
web server, a scorer or both (common/serving), or adds a participant and exits."""

import functools
import logging
import logging.handlers
import os
import resource
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
from common.serving import (
    access,
    admin,
    connections,
    database,
    participants,
    proxy,
    queue,
    settings,
    storage,
    uploads,
)

FLAGS = flags.FLAGS
ROLES = ("web", "scorer", "both")
LOG_FILE = "serve.log"
ACCESS_LOG_FILE = "access.log"
ACCESS_LOG_BACKUPS = 5
# Open files kept for the database, spool files and TensorFlow beside the connections.
RESERVED_FILES = 100
SPOOL_FOLDER = "incoming"
WORK_FOLDER = "scoring"
# Files older than this, left by a killed process, are removed at start.
STALE_SECONDS = 3600
RESTART_SECONDS = 5
GRACEFUL_SHUTDOWN_SECONDS = 5

log = logging.getLogger("common.serving.server")
ACCESS_LOGGER = "common.serving.access"


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


def _define_network_flags():
    """The web role's connection caps and deadlines, its access log and its nginx site."""
    flags.DEFINE_integer("max_connections", 1000, "Connections the web role holds open at "
                         "once (lowered to fit the open-files limit); more are answered 503 "
                         "and closed.", lower_bound=1)
    flags.DEFINE_integer("max_connections_per_address", 16, "Connections one client address "
                         "may hold open at once (a --forwarded_allow_ips proxy: no cap); more "
                         "are answered 503 and closed.", lower_bound=1)
    flags.DEFINE_integer("header_timeout", 20, "Seconds a connection has to send a request's "
                         "headers, from its opening or the previous answer; then it is closed.",
                         lower_bound=1)
    flags.DEFINE_integer("stall_timeout", 20, "Seconds an upload's body may send nothing; then "
                         "it is answered 408 and closed.", lower_bound=1)
    flags.DEFINE_integer("upload_timeout", 300, "Seconds an upload's body may take in all; then "
                         "it is answered 408 and closed.", lower_bound=1)
    flags.DEFINE_string("forwarded_allow_ips", "", "Addresses or networks (comma-separated) of "
                        "proxies whose X-Forwarded-For header names the client (default: none, "
                        "the header is ignored).")
    flags.DEFINE_integer("access_log_bytes", 10_000_000, "Size at which the access log "
                         f"{ACCESS_LOG_FILE} of --state_dir is rotated ({ACCESS_LOG_BACKUPS} old "
                         "ones kept); 0: no access log.", lower_bound=0)
    flags.DEFINE_string("nginx_config", None, "Write an nginx site for this server (TLS, its "
                        "upload limit, deadlines and caps) to PATH and exit.")
    flags.DEFINE_string("nginx_server_name", "example.org", "The public host name in the "
                        "--nginx_config site, with its certificate in "
                        "/etc/letsencrypt/live/NAME.")


def serve(challenge):
    """serve.py: the challenge server of `challenge`."""
    _define_flags()
    _define_network_flags()

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
    """Progress and errors to stderr and to state_dir/serve.log, warnings of one cause (and
    refusals of uploads without a valid token) at most once every 10 s, with a count; requests
    to state_dir/access.log where --access_log_bytes is not 0."""
    formatter = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(module)s: "
                                  "%(message)s")
    handlers = [logging.StreamHandler(sys.stderr),
                logging.FileHandler(os.path.join(state_dir, LOG_FILE), encoding="utf-8")]
    rate_limit = connections.RateLimit()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(rate_limit)
    for name in ("common.serving", "uvicorn.error", "asyncio"):
        _route(name, handlers)
    if FLAGS.access_log_bytes:
        _route(ACCESS_LOGGER, [logging.handlers.RotatingFileHandler(
            os.path.join(state_dir, ACCESS_LOG_FILE), maxBytes=FLAGS.access_log_bytes,
            backupCount=ACCESS_LOG_BACKUPS, encoding="utf-8")])


def _route(name, handlers):
    logger = logging.getLogger(name)
    logger.handlers = handlers
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _raise_open_files_limit():
    """Raises the open-files soft limit to the hard limit: the new soft limit (None: no
    limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return None if soft == resource.RLIM_INFINITY else soft


def _gate():
    """The connection caps and deadlines of the flags, --max_connections lowered to leave
    RESERVED_FILES of the open-files limit for the rest."""
    limit = _raise_open_files_limit()
    most = FLAGS.max_connections if limit is None else \
        min(FLAGS.max_connections, max(1, limit - RESERVED_FILES))
    if most < FLAGS.max_connections:
        log.info("at most %d connections at once (--max_connections=%d): the open-files "
                 "limit is %d", most, FLAGS.max_connections, limit)
    return connections.Gate(most, FLAGS.max_connections_per_address, FLAGS.header_timeout,
                            FLAGS.stall_timeout, FLAGS.upload_timeout,
                            connections.networks(FLAGS.forwarded_allow_ips,
                                                 "--forwarded_allow_ips"))


def _write_nginx_config(challenge, rules):
    host = "127.0.0.1" if FLAGS.host in ("0.0.0.0", "::", "") else FLAGS.host
    text = proxy.nginx_site(
        challenge.name, server_name=FLAGS.nginx_server_name,
        upstream=f"{f'[{host}]' if ':' in host else host}:{FLAGS.port}",
        max_body_bytes=rules.max_body_bytes, header_timeout=FLAGS.header_timeout,
        stall_timeout=FLAGS.stall_timeout, upload_timeout=FLAGS.upload_timeout,
        per_address=FLAGS.max_connections_per_address)
    try:
        with open(FLAGS.nginx_config, "w", encoding="utf-8") as site:
            site.write(text)
    except OSError as error:
        raise UserError(f"cannot write --nginx_config={FLAGS.nginx_config}: "
                        f"{error.strerror or error}") from None
    print(f"nginx site for {challenge.name} written to {FLAGS.nginx_config}")


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
    if FLAGS.nginx_config:
        _write_nginx_config(challenge, _rules(challenge, config))
        return
    state_dir = os.path.abspath(FLAGS.state_dir)
    role = FLAGS.role
    listener = _bind(FLAGS.host, FLAGS.port) if role != "scorer" else None
    _start_log(state_dir)
    gate = _gate() if role != "scorer" else None
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
    _web(challenge, db, store, rules, state_dir, listener, scorer, where, gate)


def _uvicorn_config(uvicorn, app, gate):
    """uvicorn's settings: its h11 protocol under `gate`, X-Forwarded-For read only from the
    --forwarded_allow_ips proxies, and our own access log (which hides secrets)."""
    if FLAGS.access_log_bytes:
        app = access.AccessLog(app, logging.getLogger(ACCESS_LOGGER))
    trusted = [str(network) for network in gate.exempt]
    return uvicorn.Config(
        app, log_config=None, access_log=False, loop="asyncio", ws="none", lifespan="off",
        http=functools.partial(connections.LimitedProtocol, gate=gate), server_header=False,
        proxy_headers=bool(trusted), forwarded_allow_ips=trusted,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)


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


def _scorer_beside_web(scorer, stop):
    """The scorer thread of role `both`: the web server goes on when the scorer retires, which
    the log says."""
    _scorer_loop(scorer, stop)
    if scorer.retired:
        log.error("%s: this server scores nothing more; restart it with that model",
                  scorer.retired)


def _run_scorer_here(scorer):
    stop = threading.Event()
    try:
        _scorer_loop(scorer, stop)
    except (_Stop, KeyboardInterrupt):
        scorer.give_back()
        log.info("scorer stopped")
    if scorer.retired:
        raise UserError(f"{scorer.retired}: start the scorer with that model")


def _web(challenge, db, store, rules, state_dir, listener, scorer, where, gate):
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
    service = web.Service(db, store, rules, spool_dir, limits, FLAGS.min_free_bytes,
                          upload_timeout=FLAGS.upload_timeout)
    host, port = listener.getsockname()[:2]
    log.info("%s challenge on http://%s:%d (role %s): %s; %d test images, epsilon %g, at most "
             "%d uploads per participant and hour", challenge.name,
             f"[{host}]" if ":" in host else host, port, FLAGS.role, where, len(rules.images),
             rules.epsilon, FLAGS.max_submissions_per_hour)
    server = uvicorn.Server(_uvicorn_config(uvicorn, service.app(), gate))
    stop = threading.Event()
    thread = None
    if scorer is not None:
        thread = threading.Thread(target=_scorer_beside_web, args=(scorer, stop),
                                  name="scorer", daemon=True)
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
