"""Receiving uploads in-process: the multipart body streamed into a spool file of the server's own
naming, refused with 413 once past the size limit (or at once, by its Content-Length), every
malformed body refused in one line with nothing left behind, and the checks' messages naming
the participant's file."""

import asyncio
import hashlib

import numpy as np
import pytest

from common.runtime.errors import UserError
from common.serving import queue, uploads

IMAGES = np.random.default_rng(0).uniform(0, 1, (6, 5)).astype(np.float32)
RULES = uploads.Rules("TEST", IMAGES, np.zeros(6, np.int64), 0.3, (0.0, 1.0), "(6,5)")
BOUNDARY = "b0undary"


class FakeRequest:
    """What `receive` reads of a Starlette request: headers and the body in chunks."""

    def __init__(self, body, content_type=f"multipart/form-data; boundary={BOUNDARY}",
                 length=True, chunk=777):
        self.headers = {"content-type": content_type}
        if length:
            self.headers["content-length"] = str(len(body))
        self.body, self.chunk, self.read = body, chunk, 0

    async def stream(self):
        for start in range(0, len(self.body), self.chunk):
            self.read += len(self.body[start:start + self.chunk])
            yield self.body[start:start + self.chunk]


def part(name, value, filename=None):
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n").encode() + value + \
        b"\r\n"


def body(*parts, end=True):
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if end else b"")


def receive(request, spool, **hooks):
    return asyncio.run(uploads.receive(request, str(spool), RULES, **hooks))


def refused(request, spool, status, text, **hooks):
    with pytest.raises(uploads.Refused) as error:
        receive(request, spool, **hooks)
    assert error.value.status == status and text in error.value.message, error.value.message
    assert "\n" not in error.value.message
    assert list(spool.iterdir()) == []  # nothing left behind
    return error.value


def test_fields_and_the_file_are_received(tmp_path):
    data = bytes(range(256)) * 20
    seen = []

    async def on_field(name, value):
        seen.append((name, value))

    async def before_file():
        seen.append("file")

    request = FakeRequest(body(part("token", b"secret"),
                               part("file", data, filename="C:\\Users\\x\\my\x07 attack.npy"),
                               part("track", b"black-box")))
    received = receive(request, tmp_path, on_field=on_field, before_file=before_file)
    assert seen == [("token", "secret"), "file", ("track", "black-box")]
    assert received.fields == {"token": "secret", "track": "black-box"}
    assert received.filename == "my attack.npy" and received.size == len(data)
    assert received.sha256 == hashlib.sha256(data).hexdigest()
    assert [path.name for path in tmp_path.iterdir()] == [received.path.rsplit("/", 1)[1]]
    assert received.path.startswith(f"{tmp_path}/upload-") and received.path.endswith(".npy")
    with open(received.path, "rb") as spooled:
        assert spooled.read() == data
    received.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_file_over_the_limit_is_cut_off_while_it_streams(tmp_path):
    size = RULES.max_file_bytes + 1
    request = FakeRequest(body(part("file", b"\0" * size, filename="big.npy")), length=False)
    error = refused(request, tmp_path, 413, f"({RULES.max_file_bytes} bytes: float64 pixels")
    assert error.close
    assert request.read < size + 2 * request.chunk  # no more read than the limit and a chunk


def test_a_body_whose_length_is_over_the_limit_is_refused_unread(tmp_path):
    request = FakeRequest(b"x" * (RULES.max_body_bytes + 1))
    refused(request, tmp_path, 413, "larger than the largest submission")
    assert request.read == 0


def test_the_largest_acceptable_file_is_received(tmp_path):
    request = FakeRequest(body(part("file", b"\1" * RULES.max_file_bytes, filename="a.npy")),
                          length=False, chunk=65536)
    received = receive(request, tmp_path)
    assert received.size == RULES.max_file_bytes == 12 + 10000 + 8 * 30
    received.discard()


@pytest.mark.parametrize("request_body, content_type, text", [
    (body(part("track", b"white-box")), None, "no file: send the .npy file"),
    (body(part("file", b"a", "a.npy"), part("file", b"b", "b.npy")), None, "one file only"),
    (body(part("file", b"abc", "a.npy"), end=False), None, "ends before its closing boundary"),
    (body(part("file", b"abc", "a.npy"))[:-30], None, "ends before its closing boundary"),
    (body(part("attack", b"x" * 1025), part("file", b"a", "a.npy")), None, "longer than 1024"),
    (body(*[part(f"f{n}", b"x") for n in range(9)]), None, "too many form fields"),
    (b"--" + BOUNDARY.encode() + b"\r\nno colon here\r\n\r\n", None, "malformed multipart"),
    (b'{"file": "x"}', "application/json", "as multipart/form-data"),
    (b"x", "multipart/form-data", "as multipart/form-data"),
    (body(b"--b0undary\r\nContent-Disposition: form-data\r\n\r\nx\r\n"), None, "has no name"),
])
def test_malformed_bodies_are_refused_in_one_line(tmp_path, request_body, content_type, text):
    request = FakeRequest(request_body) if content_type is None else \
        FakeRequest(request_body, content_type=content_type)
    refused(request, tmp_path, 400, text)


def test_a_refusal_by_a_hook_leaves_nothing_behind(tmp_path):
    async def before_file():
        raise uploads.Refused(401, "give your token")

    request = FakeRequest(body(part("file", b"data" * 1000, "a.npy")))
    refused(request, tmp_path, 401, "give your token", before_file=before_file)


@pytest.mark.parametrize("given, shown", [
    ("attack.npy", "attack.npy"), ("../../etc/passwd", "passwd"), ("C:\\x\\y.npy", "y.npy"),
    ("", "the upload"), ("dir/", "the upload"), ("a\x00b\x1b[31m.npy", "ab[31m.npy"),
    ("x" * 300, "x" * 100),
])
def test_the_name_shown_is_the_last_component_printable_and_short(given, shown):
    assert uploads.shown_name(given) == shown


def test_the_checks_name_the_participants_file_never_the_servers_path(tmp_path):
    path = tmp_path / "upload-secret.npy"
    np.save(path, np.full((6, 5), np.nan))
    with pytest.raises(UserError) as error:
        RULES.check(str(path), "mine.npy")
    assert str(error.value) == "Invalid pixel value: nan at index (0, 0)"
    path.write_bytes(b"")
    with pytest.raises(UserError) as error:
        RULES.check(str(path), "mine.npy")
    assert str(error.value) == "submission mine.npy is empty"
    np.save(path, IMAGES)
    assert RULES.check(str(path), "mine.npy").dtype == np.float32


def test_an_upload_too_slow_to_finish_is_refused_with_408_leaving_nothing(tmp_path):
    from common.serving import web

    class Slow(FakeRequest):
        async def stream(self):
            yield self.body[:200]  # the file part begins: its spool file is made
            await asyncio.sleep(30)
            yield self.body[200:]

    service = web.Service(None, None, RULES, str(tmp_path), queue.Limits(10, 30, 500),
                          min_free_bytes=0, upload_timeout=0.3)
    request = Slow(body(part("file", b"x" * 1000, "a.npy")))
    with pytest.raises(uploads.Refused) as error:
        asyncio.run(service._receive(request))
    assert (error.value.status, error.value.close) == (408, True)
    assert error.value.message == "the upload took longer than 0.3 s"
    assert list(tmp_path.iterdir()) == []


def test_a_spool_file_that_cannot_be_written_is_503_never_a_crash(tmp_path):
    request = FakeRequest(body(part("file", b"x" * 1000, "a.npy")))
    with pytest.raises(uploads.Refused) as error:
        receive(request, tmp_path / "gone")
    assert (error.value.status, error.value.close) == (503, True)
    assert error.value.message == ("the server cannot store uploads now (No such file or "
                                   "directory); try again later")
    assert list(tmp_path.iterdir()) == []


def test_the_form_is_refused_at_the_first_byte_of_a_file_sent_before_the_token(tmp_path):
    async def before_file():
        raise uploads.Refused(401, "give your token (before the file, as the form does)",
                              close=True)

    request = FakeRequest(body(part("file", b"x" * 1000, "a.npy"), part("token", b"t")))
    refused(request, tmp_path, 401, "before the file", before_file=before_file)
