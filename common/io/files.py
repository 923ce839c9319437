"""Writing files so that a crash or a kill never leaves a half-written one under the real name,
and reading back the state file of a resumable run."""

import contextlib
import os
import tempfile

from common.runtime.errors import UserError


@contextlib.contextmanager
def written_in_place(path, mode="wb"):
    """Yields a temporary file beside `path` that replaces `path` only once it is complete.

    An exception removes the temporary file; a kill leaves it under a hidden `.partial` name that
    nothing reads.
    """
    folder, name = os.path.split(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    try:
        with os.fdopen(handle, mode) as target:
            yield target
            target.flush()
            os.fsync(target.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def read_state(path, settings, read, what, instead):
    """`read(path)`, the state of a resumable run (an object with `settings`), where it belongs to
    a run of `settings`; otherwise UserError naming `what` the file is and, for a state of
    another run, `instead` (what to do but remove it)."""
    try:
        state = read(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot read the {what} {path}: {error}; remove it to start "
                        "again") from error
    if state.settings != settings:
        raise UserError(f"the {what} {path} belongs to another run ({state.settings}); remove "
                        f"it, or {instead}")
    return state
