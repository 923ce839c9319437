"""The command line shared by the benchmark scripts, on absl flags as the challenge scripts are.

`--help` (also `-h`, `--helpshort`, `--helpfull`) prints the script's docstring and its flags on
stdout and exits with status 0 before anything is measured or TensorFlow is loaded (the scripts
import it inside `main`). An unknown flag, a bad value or a stray argument ends with one
`Error: ...` line on stderr and exit status 1.
"""

import sys

from absl import app, flags, logging

_HELP_NAMES = ("help", "helpshort", "helpfull", "h", "?")


def fail(message):
    """One `Error:` line on stderr, exit status 1."""
    sys.stdout.flush()
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)


def _help_asked(args):
    """'short' or 'full' where the arguments ask for help (before any `--`), else None."""
    for arg in args:
        if arg == "--":
            return None
        if arg.startswith("-"):
            name = arg.lstrip("-").split("=", 1)[0]
            if name in _HELP_NAMES:
                return "full" if name == "helpfull" else "short"
    return None


def print_help(full=False):
    """The main module's docstring and its flags (with `full`, every flag absl knows)."""
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    listing = flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help()
    print(doc)
    print()
    print("flags:")
    print(listing.strip("\n"))


def _parse(argv):
    asked = _help_asked(argv[1:])
    if asked:
        print_help(full=asked == "full")
        sys.exit(0)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as error:
        fail(error)
    if len(rest) > 1:
        fail(f"unexpected argument {rest[1]!r}: the benchmarks take flags only "
             f"(python {argv[0]} --help lists them)")
    return rest


def run(main):
    """Parses the flags, then calls `main()`."""
    logging.set_verbosity(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # each line shows at once in a log file
    app.run(lambda argv: main(), flags_parser=_parse)


def positive_integers(values):
    """A validator for a list flag: at least one item, each a positive integer."""
    return bool(values) and all(value.isdigit() and int(value) > 0 for value in values)


def choices_validator(allowed):
    """A validator for a list flag: at least one item, each one of `allowed`."""
    return lambda values: bool(values) and all(value in allowed for value in values)
