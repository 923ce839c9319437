"""The web application (Starlette): the JSON API and the server-rendered pages.

API (tokens as `Authorization: Bearer TOKEN`):
- `POST /api/submissions`, multipart fields `file` and, optionally, `track` (white-box or
  black-box) and `attack` (a short description): 202 `{"id", "status": "queued"}`; 400 with the
  checks' one line, 401, 403 (the challenge closed), 413, 429 (a limit, named), 503 or 507
  (the server cannot store it) `{"error": ...}`;
- `GET /api/submissions/ID`: the owner's view of a submission; 404 for anyone else;
- `GET /api/leaderboard`: each participant's best per track, strongest attack first, and the
  model's clean accuracy as a reference row.

Pages, usable without JavaScript: `/` the leaderboard, `/submit` the form and what a file must
be, and `/submissions/ID/KEY` a submission's status page, at an unguessable address, refreshing
itself until the submission is scored.

The leaderboard and the challenge's settings (model, closing time) are read from the database at
most every CACHE_SECONDS, so a crowd reloading the page costs one query.
"""

import asyncio
import datetime
import logging
import os
import time

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from common.runtime.errors import UserError
from common.serving import participants, queue, settings, storage, uploads

log = logging.getLogger(__name__)

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
# Submissions checked at once: a check holds a few copies of the test set in memory.
CONCURRENT_CHECKS = 2
REFRESH_SECONDS = 2
CACHE_SECONDS = 2
# How long the rest of a refused form upload is read before the connection is closed.
DRAIN_SECONDS = 30
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; style-src 'self'; form-action 'self'; "
                                 b"frame-ancestors 'none'; base-uri 'none'"),
]
TRACK_TITLES = {"white-box": "White-box leaderboard", "black-box": "Black-box leaderboard"}


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS, and `Cache-Control: no-store` where a response
    sets no cache policy, to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Upload:
    """One upload in progress: who sends it, and its row in the uploads table."""

    def __init__(self, participant=None):
        self.participant = participant
        self.upload_id = None
        self.start = time.monotonic()


def _date(iso):
    if iso is None:
        return "—"
    moment = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return queue.shown_time(moment.timestamp())


def _percent(accuracy):
    return "—" if accuracy is None else f"{100 * accuracy:.2f}%"


class _Cached:
    """A value read by `read` (blocking, run in a thread) at most every CACHE_SECONDS."""

    def __init__(self, read):
        self.read = read
        self.value = None
        self.read_at = None

    async def get(self):
        now = time.monotonic()
        if self.read_at is None or now - self.read_at >= CACHE_SECONDS:
            self.value = await run_in_threadpool(self.read)
            self.read_at = now
        return self.value


class Service:
    """The web role of a challenge server: accepts uploads into `db` and `store` after checking
    them against `rules`, spooling them in `spool_dir`, within the queue.Limits `limits`, while
    more than `min_free_bytes` stay free where files are kept, each upload received within
    `upload_timeout` seconds (the connections' own deadline, connections.Gate, comes first
    where the server takes connections itself)."""

    def __init__(self, db, store, rules, spool_dir, limits, min_free_bytes, *, upload_timeout):
        self.db, self.store, self.rules = db, store, rules
        self.spool_dir = spool_dir
        self.limits = limits
        self.min_free_bytes = min_free_bytes
        self.upload_timeout = upload_timeout
        self._checks = asyncio.Semaphore(CONCURRENT_CHECKS)
        self._settings = _Cached(lambda: settings.current(db))
        self._board = _Cached(self._read_board)
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                                            autoescape=True, undefined=jinja2.StrictUndefined,
                                            trim_blocks=True, lstrip_blocks=True)
        self.templates.filters["percent"] = _percent
        self.templates.filters["date"] = _date
        self.templates.filters["time"] = queue.shown_time

    def app(self):
        routes = [
            Route("/", self.leaderboard_page, methods=["GET"]),
            Route("/submit", self.submit_form, methods=["GET"]),
            Route("/submit", self.submit_page, methods=["POST"]),
            Route("/submissions/{submission_id}/{key}", self.status_page, methods=["GET"]),
            Route("/style.css", self.style, methods=["GET"]),
            Route("/api/submissions", self.api_submit, methods=["POST"]),
            Route("/api/submissions/{submission_id}", self.api_status, methods=["GET"]),
            Route("/api/leaderboard", self.api_leaderboard, methods=["GET"]),
        ]
        handlers = {HTTPException: self._http_error, sa.exc.SQLAlchemyError: self._database_error,
                    OSError: self._storage_error}
        return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)],
                         exception_handlers=handlers)

    # Responses.

    def _render(self, name, status=200, headers=None, **context):
        current = self._settings.value
        closes_at = current.closes_at if current is not None else None
        text = self.templates.get_template(name).render(
            challenge=self.rules.challenge, closes_at=closes_at,
            closed=closes_at is not None and time.time() >= closes_at, **context)
        return HTMLResponse(text, status_code=status, headers=headers)

    @staticmethod
    def _api_error(status, message, close=False, headers=None):
        headers = dict(headers or {})
        if close:
            headers["Connection"] = "close"  # the body was not read: no keep-alive
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def _http_error(self, request, error):
        message = {404: "not found", 405: "method not allowed"}.get(error.status_code,
                                                                   str(error.detail))
        if request.url.path.startswith("/api/"):
            return self._api_error(error.status_code, message, headers=error.headers)
        return self._render("error.html", status=error.status_code, headers=error.headers,
                            message=message)

    async def _database_error(self, request, error):
        reason = str(getattr(error, "orig", None) or error).strip() or type(error).__name__
        log.error("database error on %s %s: %s", request.method, request.url.path,
                  reason.splitlines()[0])
        message = "the database is unavailable; try again later"
        if request.url.path.startswith("/api/"):
            return self._api_error(503, message, close=True)
        return self._render("error.html", status=503, message=message)

    async def _storage_error(self, request, error):
        """A file error no upload path turned into a Refused: 503 or 507 all the same."""
        failed = storage.write_error(error)
        log.error("storage error on %s %s: %s", request.method, request.url.path, error)
        if request.url.path.startswith("/api/"):
            return self._api_error(failed.status, failed.message, close=True)
        return self._render("error.html", status=failed.status, message=failed.message)

    # Uploads, through the API and the form alike.

    async def _start(self, request, upload):
        """Refuses the upload where the challenge closed (403), the disk would be left too
        full (507) or the participant passed a limit (429); else records it."""
        current = await self._settings.get()
        if current.closed(time.time()):
            closed_at = queue.shown_time(current.closes_at)
            raise uploads.Refused(403, f"the challenge closed at {closed_at}: uploads are no "
                                  "longer accepted", close=True)
        length = request.headers.get("content-length", "")
        needed = self.rules.max_body_bytes  # a longer body gets 413 once it is read
        if length.strip().isdigit():
            needed = min(int(length), needed)
        try:
            storage.check_free(self.spool_dir, 2 * needed, self.min_free_bytes)
        except storage.StorageError as full:
            raise uploads.Refused(full.status, full.message, close=True) from None
        try:
            upload.upload_id = await run_in_threadpool(
                queue.start_upload, self.db, upload.participant.id, self.limits)
        except queue.RateLimited as limited:
            headers = {} if limited.retry_after is None else \
                {"Retry-After": str(limited.retry_after)}
            raise uploads.Refused(429, str(limited), close=True, headers=headers) from None

    async def _receive(self, request, on_field=None, before_file=None):
        """The upload, within `upload_timeout`: a client that sends too slowly holds no
        connection and no spool file longer (the spool file is removed on the way out)."""
        try:
            return await asyncio.wait_for(uploads.receive(request, self.spool_dir, self.rules,
                                                          on_field, before_file),
                                          self.upload_timeout)
        except TimeoutError:
            raise uploads.Refused(408, f"the upload took longer than {self.upload_timeout:g} s",
                                  close=True) from None

    async def _accept(self, upload, received):
        """Checks the received file, stores it compacted and queues it; Refused(400) where the
        checks refuse it, Refused(503 or 507) where it cannot be stored."""
        stored = None
        try:
            track = received.fields.get("track", "").strip() or queue.DEFAULT_TRACK
            if track not in queue.TRACKS:
                raise uploads.Refused(400, f"unknown track {track!r}: use "
                                      f"{' or '.join(queue.TRACKS)}")
            attack = "".join(character for character in received.fields.get("attack", "")
                             if character.isprintable()).strip()[:queue.MAX_ATTACK_TEXT]
            async with self._checks:
                try:
                    await run_in_threadpool(self.rules.check, received.path, received.filename)
                    storage.check_free(self.spool_dir, received.size, self.min_free_bytes)
                    stored = await run_in_threadpool(
                        storage.compact, received.path, self.rules.images.shape,
                        self.rules.shape_text, self.spool_dir)
                except UserError as error:
                    raise uploads.Refused(400, str(error)) from None
                except storage.StorageError as failed:
                    raise uploads.Refused(failed.status, failed.message) from None
            try:
                accepted = await run_in_threadpool(queue.accept, self.db, self.store,
                                                   upload.upload_id, upload.participant.id,
                                                   received, stored, track, attack)
            except storage.StorageError as failed:
                raise uploads.Refused(failed.status, failed.message) from None
        finally:
            received.discard()
            if stored is not None and os.path.exists(stored[0]):
                os.remove(stored[0])
        log.info("accepted %s from %s: %s, %.1f MB, stored in %.1f MB, %s (%.2f s)",
                 accepted.id, upload.participant.name, received.filename, received.size / 1e6,
                 stored[1] / 1e6, track, time.monotonic() - upload.start)
        return accepted

    async def _refused(self, request, upload, status, message):
        if upload.participant is not None:
            log.info("refused an upload from %s: %d %s", upload.participant.name, status, message)
        else:  # anyone can send these: a flood of them is one line a window (RateLimit)
            log.info("refused an upload from %s (no valid token): %d %s",
                     request.client.host if request.client else "a client", status, message,
                     extra={"cause": "an upload without a valid token"})
        if upload.upload_id is not None:
            await run_in_threadpool(queue.end_upload, self.db, upload.upload_id, str(status))

    async def api_submit(self, request):
        token = participants.bearer_token(request.headers.get("authorization"))
        upload = _Upload(await run_in_threadpool(participants.authenticate, self.db, token))
        try:
            if upload.participant is None:
                raise uploads.Refused(401, "a valid token is needed: send the header "
                                      "'Authorization: Bearer TOKEN'", close=True,
                                      headers={"WWW-Authenticate": "Bearer"})
            await self._start(request, upload)
            received = await self._receive(request)
            accepted = await self._accept(upload, received)
        except uploads.Refused as refused:
            await self._refused(request, upload, refused.status, refused.message)
            close = await self._closes_after(request, refused,
                                             read_rest=upload.participant is not None)
            return self._api_error(refused.status, refused.message, close, refused.headers)
        except ClientDisconnect:
            await self._refused(request, upload, 499, "the client went away")
            return Response(status_code=400)
        return JSONResponse({"id": accepted.id, "status": queue.QUEUED}, status_code=202)

    async def submit_page(self, request):
        upload = _Upload()
        fields = {}

        async def on_field(name, value):
            fields.setdefault(name, value)
            if name == "token" and upload.participant is None:
                upload.participant = await run_in_threadpool(participants.authenticate,
                                                             self.db, value.strip())
                if upload.participant is None:
                    raise uploads.Refused(401, "unknown token", close=True)
                await self._start(request, upload)

        async def before_file():
            if upload.participant is None:
                raise uploads.Refused(401, "give your token (before the file, as the form "
                                      "does)", close=True)

        try:
            received = await self._receive(request, on_field, before_file)
            if upload.participant is None:
                received.discard()
                raise uploads.Refused(401, "give your token")
            accepted = await self._accept(upload, received)
        except uploads.Refused as refused:
            await self._refused(request, upload, refused.status, refused.message)
            headers = dict(refused.headers)
            if await self._closes_after(request, refused):
                headers["Connection"] = "close"
            return self._render_form(status=refused.status, headers=headers,
                                     error=refused.message,
                                     track=fields.get("track", queue.DEFAULT_TRACK),
                                     attack=fields.get("attack", ""))
        except ClientDisconnect:
            await self._refused(request, upload, 499, "the client went away")
            return Response(status_code=400)
        return RedirectResponse(f"/submissions/{accepted.id}/{accepted.page_key}",
                                status_code=303)

    async def _closes_after(self, request, refused, *, read_rest=True):
        """Whether the connection closes after answering `refused`, whose body was not all read.

        A client still sending (a browser, requests, curl: they send the whole body before they
        read the answer) may see the reset of a connection closed on unread bytes instead of the
        answer. So the rest is read first (up to the size limit, storing none of it), as a web
        server's lingering close does, except from a client too slow (408), too large (413) or
        not `read_rest` (an API client without a valid token), which is closed on at once.
        """
        if not refused.close:
            return False
        if refused.status in (408, 413) or not read_rest:
            return True
        return not await self._drain(request)

    async def _drain(self, request):
        """Reads the rest of the body, up to the size limit and for at most DRAIN_SECONDS (a
        client trickling bytes holds no connection open); whether it all came."""
        try:
            return await asyncio.wait_for(self._read_rest(request), DRAIN_SECONDS)
        except TimeoutError:
            return False

    async def _read_rest(self, request):
        read = 0
        try:
            async for chunk in request.stream():
                read += len(chunk)
                if read > self.rules.max_body_bytes:
                    return False
        except RuntimeError:  # it had all been read
            return True
        except ClientDisconnect:
            return False
        return True

    # Reading.

    async def _private(self):
        """Whether the pages show the private split's scores (the challenge closed)."""
        current = await self._settings.get()
        return current.private(time.time())

    async def api_status(self, request):
        """The owner's view; 404 for anyone else, with a token or without (whether the id
        exists is not told)."""
        token = participants.bearer_token(request.headers.get("authorization"))
        participant = await run_in_threadpool(participants.authenticate, self.db, token)
        view = None
        if participant is not None:
            view = await run_in_threadpool(queue.owned, self.db,
                                           request.path_params["submission_id"],
                                           participant.id, await self._private())
        if view is None:
            return self._api_error(404, "no such submission of yours")
        return JSONResponse(view)

    def _read_board(self):
        """The leaderboard of the challenge's current model and that model's clean accuracy
        (None until a scorer measured it), on the subset the pages show now."""
        current = settings.current(self.db)
        private = current.private(time.time())
        if current.model is None:
            return [], None
        rows = queue.leaderboard(self.db, current.model, private)
        reference = queue.get_reference(self.db, current.model)
        if reference is not None:
            reference = {**reference, "shown": reference["private" if private else "public"]}
        return rows, reference

    async def _leaderboard(self):
        """The leaderboard's rows, the reference row (participant None: the model's accuracy
        on the clean test images) in its place by accuracy."""
        rows, reference = await self._board.get()
        rows = list(rows)
        if reference is not None:
            row = {"id": None, "participant": None, "track": None,
                   "accuracy": reference["shown"], "submitted_at": None, "attack": None}
            place = sum(1 for other in rows if other["accuracy"] <= row["accuracy"])
            rows.insert(place, row)
        return rows, reference

    async def api_leaderboard(self, request):
        rows, _ = await self._leaderboard()
        keys = ("id", "participant", "track", "accuracy", "submitted_at")
        return JSONResponse([{key: row[key] for key in keys} for row in rows])

    async def leaderboard_page(self, request):
        await self._settings.get()
        rows, reference = await self._leaderboard()
        tables = [(TRACK_TITLES[track], [row for row in rows if row["track"] in (track, None)])
                  for track in queue.TRACKS]
        current = self._settings.value
        return self._render("leaderboard.html", tables=tables, reference=reference,
                            examples=len(self.rules.images), epsilon=self.rules.epsilon,
                            split=current.split, private=current.private(time.time()))

    def _render_form(self, status=200, headers=None, error=None, track=queue.DEFAULT_TRACK,
                     attack=""):
        rules, limits = self.rules, self.limits
        return self._render("submit.html", status=status, headers=headers, error=error,
                            tracks=queue.TRACKS, track=track, attack=attack,
                            shape=(len(rules.images), *rules.images.shape[1:]),
                            shape_text=rules.shape_text, epsilon=rules.epsilon,
                            pixel_range=rules.pixel_range, examples=len(rules.images),
                            max_file_bytes=rules.max_file_bytes, limits=limits)

    async def submit_form(self, request):
        await self._settings.get()
        return self._render_form()

    async def status_page(self, request):
        view = await run_in_threadpool(queue.by_page, self.db,
                                       request.path_params["submission_id"],
                                       request.path_params["key"], await self._private())
        if view is None:
            raise HTTPException(404)
        waiting = view["status"] in (queue.QUEUED, queue.SCORING)
        return self._render("status.html", submission=view,
                            refresh=REFRESH_SECONDS if waiting else None)

    async def style(self, request):
        with open(os.path.join(TEMPLATES, "style.css"), encoding="utf-8") as style:
            return Response(style.read(), media_type="text/css",
                            headers={"Cache-Control": "max-age=3600"})
