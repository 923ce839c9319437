"""Receiving an upload and checking it.

`receive` reads a `multipart/form-data` body as it streams in, writing the part named `file`
straight into a spool file of the state folder (its name the server's own) and keeping the few
small text fields; the upload is refused with 413 as soon as it passes the size limit, before
any more is read. `Rules.check` is `run_attack.py`'s own check
(`common.evaluation.submission.load_and_check`: the `.npy` header first, never a pickle), with
the file named in its message by the name the participant gave.
"""

import contextlib
import dataclasses
import hashlib
import os
import tempfile

import numpy as np
import python_multipart
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from common.evaluation import submission
from common.runtime.errors import UserError
from common.serving import storage

FILE_FIELD = "file"
MAX_FIELDS = 8
MAX_FIELD_BYTES = 1024
# Room for the multipart boundaries, part headers and text fields around the file.
MULTIPART_ALLOWANCE = 64 * 1024
# A `.npy` file's magic string, version and header length, before the header itself.
NPY_PREAMBLE_BYTES = 12
UNNAMED = "the upload"
MAX_SHOWN_NAME = 100


class Refused(Exception):
    """An upload the server refuses: the HTTP status and the one-line message. `close` where
    the rest of the body was not read (the connection is closed after the answer)."""

    def __init__(self, status, message, close=False, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers or {}


@dataclasses.dataclass(frozen=True)
class Rules:
    """What submissions are checked against: the test images (the first `len(images)`), their
    labels, the L-infinity radius, the pixel range and how the expected shape is printed."""

    challenge: str
    images: np.ndarray
    labels: np.ndarray
    epsilon: float
    pixel_range: tuple
    shape_text: str

    @property
    def max_file_bytes(self):
        """The largest file the checks can accept: float64 pixels of the whole test set, with
        the longest header numpy reads."""
        return NPY_PREAMBLE_BYTES + submission.MAX_HEADER_BYTES + 8 * self.images.size

    @property
    def max_body_bytes(self):
        return self.max_file_bytes + MULTIPART_ALLOWANCE

    @property
    def settings(self):
        """What every process sharing a database must agree on."""
        return {"challenge": self.challenge, "examples": int(len(self.images)),
                "epsilon": float(self.epsilon)}

    def check(self, path, shown_name):
        """The submission at `path` as float32, checked as `run_attack.py` checks it; UserError
        whose message names the file `shown_name` instead of `path`."""
        try:
            return submission.load_and_check(path, self.images, self.epsilon, self.pixel_range,
                                             self.shape_text)
        except UserError as error:
            raise UserError(str(error).replace(path, shown_name)) from None


def shown_name(filename):
    """The participant's file name as messages show it: its last path component, printable
    characters only, at most 100 of them. Only ever shown, never used as a path."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(character for character in name if character.isprintable()).strip()
    return name[:MAX_SHOWN_NAME] or UNNAMED


@dataclasses.dataclass
class Received:
    """A received upload: its spool file (None where it had no `file` part), the name the
    participant gave it, its size and SHA-256, and the text fields."""

    path: str | None = None
    filename: str = UNNAMED
    size: int = 0
    sha256: str = ""
    fields: dict = dataclasses.field(default_factory=dict)

    def discard(self):
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)


class _Parts:
    """python-multipart's callbacks for one body: the file part goes to a spool file as it
    arrives, text fields are kept."""

    def __init__(self, spool_dir, rules, received):
        self.spool_dir = spool_dir
        self.rules = rules
        self.max_file_bytes = rules.max_file_bytes
        self.received = received
        self.spool = None
        self.digest = hashlib.sha256()
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.name = None
        self.is_file = False
        self.value = bytearray()
        self.parts = 0
        self.file_started = False
        self.ended = False
        self.finished_fields = []

    def callbacks(self):
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_end": self.on_end}

    def on_part_begin(self):
        self.parts += 1
        if self.parts > MAX_FIELDS:
            raise Refused(400, f"too many form fields: at most {MAX_FIELDS}", close=True)
        self.disposition, self.name, self.is_file = b"", None, False
        self.value = bytearray()

    def on_header_field(self, data, start, end):
        self.header_name += data[start:end]

    def on_header_value(self, data, start, end):
        self.header_value += data[start:end]

    def on_header_end(self):
        if self.header_name.strip().lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self):
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise Refused(400, "a form field has no name", close=True)
        self.name = options[b"name"].decode("utf-8", "replace")
        self.is_file = self.name == FILE_FIELD
        if not self.is_file:
            return
        if self.received.path is not None:
            raise Refused(400, "send one file only, in the field 'file'", close=True)
        self.received.filename = shown_name(options.get(b"filename", b"").decode("utf-8",
                                                                                 "replace"))
        handle, self.received.path = tempfile.mkstemp(dir=self.spool_dir, prefix="upload-",
                                                      suffix=".npy")
        self.spool = os.fdopen(handle, "wb")
        self.file_started = True

    def on_part_data(self, data, start, end):
        if self.is_file:
            self.received.size += end - start
            if self.received.size > self.max_file_bytes:
                raise Refused(413, too_large(self.max_file_bytes, len(self.rules.images)),
                              close=True)
            chunk = data[start:end]
            self.digest.update(chunk)
            self.spool.write(chunk)
        else:
            self.value += data[start:end]
            if len(self.value) > MAX_FIELD_BYTES:
                raise Refused(400, f"the form field '{self.name}' is longer than "
                              f"{MAX_FIELD_BYTES} bytes", close=True)

    def on_part_end(self):
        if self.is_file:
            self.spool.close()
            self.spool = None
        else:
            value = self.value.decode("utf-8", "replace")
            self.received.fields.setdefault(self.name, value)
            self.finished_fields.append((self.name, value))

    def on_end(self):
        self.ended = True

    def close(self):
        if self.spool is not None:
            with contextlib.suppress(OSError):  # the write that failed is reported already
                self.spool.close()


def too_large(limit, examples):
    """The 413 line, naming the limit in force."""
    return (f"the upload is larger than the largest submission the checks accept ({limit} "
            f"bytes: float64 pixels of the {examples} test images this server scores, with the "
            ".npy header)")


def check_length(headers, rules):
    """Refuses with 413 a body whose Content-Length is over the limit, before reading it."""
    length = headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > rules.max_body_bytes:
        raise Refused(413, too_large(rules.max_file_bytes, len(rules.images)), close=True)


async def receive(request, spool_dir, rules, on_field=None, before_file=None):
    """The upload of `request` (a Starlette request), its file in `spool_dir`; raises Refused.

    `on_field(name, value)` (async) is called for each text field as soon as it is complete;
    `before_file()` (async) before the first byte of the file is accepted. The caller removes
    the spool file (`Received.discard`) when done with it.
    """
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise Refused(400, "send the submission as multipart/form-data, the .npy file in the "
                      "field 'file'", close=True)
    check_length(request.headers, rules)
    received = Received()
    parts = _Parts(spool_dir, rules, received)
    try:
        try:
            parser = python_multipart.MultipartParser(options[b"boundary"], parts.callbacks())
        except ValueError as error:  # FormParserError is one
            raise Refused(400, f"malformed multipart body: {error}", close=True) from None
        body = 0
        checked_file = before_file is None
        async for chunk in request.stream():
            body += len(chunk)
            if body > rules.max_body_bytes:
                raise Refused(413, too_large(rules.max_file_bytes, len(rules.images)),
                              close=True)
            _write(parser, chunk)
            for name, value in parts.finished_fields:
                if on_field is not None:
                    await on_field(name, value)
            parts.finished_fields.clear()
            if parts.file_started and not checked_file:
                await before_file()
                checked_file = True
        if not parts.ended:
            raise Refused(400, "malformed multipart body: it ends before its closing boundary")
        if received.path is None:
            raise Refused(400, "no file: send the .npy file in the multipart field 'file'")
        received.sha256 = parts.digest.hexdigest()
        return received
    except OSError as error:  # the spool file could not be written
        parts.close()
        received.discard()
        failed = storage.write_error(error)
        raise Refused(failed.status, failed.message, close=True) from None
    except BaseException:
        parts.close()
        received.discard()
        raise


def _write(parser, chunk):
    try:
        parser.write(chunk)
    except FormParserError as error:
        raise Refused(400, f"malformed multipart body: {error}", close=True) from None
