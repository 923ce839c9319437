"""Entry point for every script: absl flags, and one clear line instead of a traceback."""

import os
import sys

from absl import app, logging

from common import config as config_lib
from common.errors import UserError


def quiet_tensorflow():
    """Hides TensorFlow's start-up chatter so the original's printed lines stand out."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(main, script=None):
    """Runs `main` under absl; a UserError becomes `Error: ...` on stderr and exit status 1.

    With `script` (a script's `__file__`), the flags of the `config.json` beside it are defined.
    """
    if script is not None:
        config_lib.define_flags(os.path.join(os.path.dirname(os.path.abspath(script)),
                                             "config.json"))

    def guarded_main(argv):
        try:
            main(argv)
        except UserError as error:
            sys.stdout.flush()
            print(f"Error: {error}", file=sys.stderr)
            sys.exit(1)

    logging.set_verbosity(logging.WARNING)
    app.run(guarded_main)
