"""Writing files so that a crash or a kill never leaves a half-written one under the real name,
checking before any work that they can be written, and reading back the state file of a
resumable run."""

import contextlib
import hashlib
import json
import os
import tempfile

from common.runtime.errors import UserError


def _user_mode():
    """0666 less the process's umask: the mode `open` gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def written_in_place(path, mode="wb"):
    """Yields a temporary file beside `path` that replaces `path` only once it is complete, with
    the mode a plain `open` would give it (the user's umask).

    An exception removes the temporary file; a kill leaves it under a hidden `.partial` name that
    nothing reads. A file that cannot be written is a UserError naming `path`.
    """
    folder, name = os.path.split(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from error
    try:
        with os.fdopen(handle, mode) as target:
            yield target
            target.flush()
            os.fsync(target.fileno())
        os.chmod(temporary, _user_mode())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def check_writable(path, what="output file"):
    """Makes sure the file `path` can be written before any work: its folder exists (created
    where missing) and takes a new file, and `path` is not a folder. UserError naming `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"the {what} {path} is a folder")
    _check_folder(folder, f"the {what} {path}")


def check_writable_folder(folder, what="output folder"):
    """Makes sure files can be written into `folder` (created where missing); UserError naming
    it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"the {what} {folder} is a file")
    _check_folder(os.path.abspath(folder), f"the {what} {folder}")


def _check_folder(folder, what):
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"cannot write {what}: {error.strerror} ({error.filename or folder})") \
            from error


def keyed_path(path, settings):
    """`path` with a short digest of the JSON `settings` before its extension: the state files of
    runs with other settings have other names, so one never blocks or mixes into another."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    stem, extension = os.path.splitext(path)
    return f"{stem}-{digest}{extension}"


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
