"""Entry point for every script: absl flags, and one clear `Error:` line instead of a traceback
for bad flags, bad config values, missing or unwritable files."""

import sys

from absl import app, flags, logging

from common.runtime.errors import UserError
from common.scripts import config as config_lib


def _fail(message):
    sys.stdout.flush()
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(error)


def run(main, config_path=None):
    """Runs `main(argv)` under absl; a bad flag, a UserError or an OSError (a file that cannot be
    read or written) ends with `Error: ...` on stderr and exit status 1.

    With `config_path` (a challenge's config.json), `--config` and one flag per key are defined.
    """
    if config_path is not None:
        config_lib.define_flags(config_path)

    def guarded_main(argv):
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
