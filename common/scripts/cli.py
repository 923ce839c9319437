"""Entry point for every script: absl flags, `--help` that shows the script's own flags and the
config keys with their effective values, and one clear `Error:` line instead of a traceback for
bad flags, bad config values, missing or unwritable files."""

import logging as std_logging
import os
import sys
import textwrap

from absl import app, flags, logging

from common.runtime.errors import UserError
from common.scripts import config as config_lib
from common.scripts import startup

FLAGS = flags.FLAGS
HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-?", "--help=true")
# The modules that define the flags of the script itself, as against absl's and TensorFlow's.
SCRIPT_FLAG_MODULES = ("common.scripts.drivers", "common.scripts.diagnosing",
                       "common.scripts.serving", "common.scripts.cli")
WIDTH = 100


def _fail(message):
    """Prints the one-line error and exits 1; what TensorFlow would warn while objects of the
    failed run are torn down (a checkpoint read half-way) is not shown."""
    _quiet_tensorflow(std_logging.ERROR)
    logging.set_verbosity(logging.ERROR)
    sys.stdout.flush()
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)


def _quiet_tensorflow(level):
    std_logging.getLogger("tensorflow").setLevel(level)


def _parse_flags(argv):
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(help_text(argv))
        sys.exit(0)
    try:
        return FLAGS(argv)
    except flags.Error as error:
        _fail(error)


def _flag_line(flag, value):
    shown = value if isinstance(value, str) else ("true" if value is True else
                                                   "false" if value is False else value)
    text = f"{flag.help} (default: {shown})" if value is not None else flag.help
    return textwrap.fill(text, WIDTH, initial_indent=f"  --{flag.name}: ",
                         subsequent_indent=" " * 4)


def _effective_config(argv):
    """The config after `--config` and the flags of `argv`, or, where they do not parse or
    check, the challenge's own config file as it is."""
    try:
        FLAGS([arg for arg in argv if arg not in HELP_FLAGS])
        return config_lib.load_config(check=False), FLAGS.config
    except (flags.Error, UserError):
        FLAGS.unparse_flags()
        path = FLAGS["config"].default
        return config_lib.read_config_file(path), path


def help_text(argv):
    """The script's usage: its docstring, its own flags, then the config keys with the values
    they take after `--config` and the other flags of `argv`."""
    script = os.path.relpath(argv[0])
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    lines = [f"usage: python {script} [--flag=value ...]", ""]
    if doc:
        lines += [doc, ""]
    by_module = FLAGS.flags_by_module_dict()
    own = [flag for module in SCRIPT_FLAG_MODULES for flag in by_module.get(module, [])]
    config = None
    if "config" in FLAGS:
        config, path = _effective_config(argv)
    lines.append("Flags of this script:")
    lines += [_flag_line(flag, flag.value if flag.present else flag.default)
              for flag in sorted(own, key=lambda flag: flag.name)]
    if config is not None:
        lines += ["", textwrap.fill(f"Config keys, with their values from {os.path.relpath(path)}"
                                    " and the flags given (relative paths in a config file are "
                                    "relative to its folder):", WIDTH),
                  _flag_line(FLAGS["config"], os.path.relpath(path))]
        lines += [_flag_line(FLAGS[key], config_lib.shown_value(key, value))
                  for key, value in config.items()]
    lines += ["", "absl's and TensorFlow's own flags: --helpfull"]
    return "\n".join(lines)


def run(main, config_path=None):
    """Runs `main(argv)` under absl; a bad flag, a UserError or an OSError (a file that cannot be
    read or written) ends with `Error: ...` on stderr and exit status 1.

    With `config_path` (a challenge's config.json), `--config` and one flag per key are defined.
    """
    if config_path is not None:
        config_lib.define_flags(config_path)
    flags.DEFINE_boolean("tf_log", False, "Show TensorFlow's own start-up, info and warning "
                         "lines (as TF_CPP_MIN_LOG_LEVEL=0 does).")

    def guarded_main(argv):
        if not (FLAGS.tf_log or startup.wants_tensorflow_log()):
            _quiet_tensorflow(std_logging.ERROR)
        try:
            main(argv)
        except UserError as error:
            _fail(error)
        except OSError as error:
            where = f": {error.filename}" if error.filename else ""
            _fail(f"{error.strerror or error}{where}")

    logging.set_verbosity(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # each report line shows at once in a log file
    app.run(guarded_main, flags_parser=_parse_flags)
