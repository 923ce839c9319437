"""Writing files so that a crash or a kill never leaves a half-written one under the real name."""

import contextlib
import os
import tempfile


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
