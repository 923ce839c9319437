"""Availability with no proxy in front: caps on open connections and deadlines on requests.

uvicorn holds an idle socket, a half-sent request or a trickling body for as long as the client
likes. `LimitedProtocol`, uvicorn's own h11 protocol with `Gate`'s rules added, closes them:

- a connection over `max_per_address` from one client address, or over `max_connections` in all,
  is answered 503 and closed at once (addresses in `exempt`, a trusted proxy's, have no
  per-address cap: the proxy caps its clients itself);
- request headers must be complete within `header_timeout` seconds of the connection opening (or
  of the previous answer on a kept-alive connection), else the socket is closed;
- a request body that sends nothing for `stall_timeout` seconds while the server reads it, or
  still arrives `upload_timeout` seconds after its headers, is answered 408 and closed.

Each cause is logged as a warning naming the client and the flag in force; `RateLimit` (a
logging filter) turns a flood of such lines into one line with a count.
"""

import dataclasses
import ipaddress
import json
import logging
import threading
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.runtime.errors import UserError

log = logging.getLogger(__name__)
# The scope key that holds the status a request was answered with here, not by the application
# (whose answer then goes nowhere), for the access log.
ANSWERED_HERE = "answered_by_connection_layer"


def networks(text, flag):
    """The addresses and networks of a comma-separated `text` ("127.0.0.1,10.0.0.0/8");
    UserError naming `flag` where one is not an address."""
    found = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise UserError(f"{flag} takes IP addresses or networks separated by commas. "
                            f"Received: {flag}={text!r} ({item!r} is not one)") from None
    return tuple(found)


def _is_in(host, exempt):
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in exempt)


@dataclasses.dataclass
class Gate:
    """The caps and deadlines of one server, and its connections counted per client address."""

    max_connections: int
    max_per_address: int
    header_timeout: float
    stall_timeout: float
    upload_timeout: float
    exempt: tuple = ()
    open: int = 0
    per_address: dict = dataclasses.field(default_factory=dict)

    def admit(self, host):
        """Counts a new connection from `host`; the reason it is refused, or None."""
        if self.open >= self.max_connections:
            return f"{self.open} connections are open (--max_connections={self.max_connections})"
        count = self.per_address.get(host, 0)
        if count >= self.max_per_address and not _is_in(host, self.exempt):
            return (f"{count} connections from that address are open "
                    f"(--max_connections_per_address={self.max_per_address})")
        self.open += 1
        self.per_address[host] = count + 1
        return None

    def release(self, host):
        self.open -= 1
        count = self.per_address.pop(host) - 1
        if count:
            self.per_address[host] = count


def _raw_response(status, reason, message, as_json):
    """A whole HTTP/1.1 answer that closes the connection, for a socket h11 no longer drives."""
    body = (json.dumps({"error": message}) if as_json else message + "\n").encode()
    kind = b"application/json" if as_json else b"text/plain; charset=utf-8"
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, kind, len(body))) + body


class LimitedProtocol(H11Protocol):
    """uvicorn's h11 protocol under `gate`'s caps and deadlines. Give uvicorn
    `functools.partial(LimitedProtocol, gate=gate)` as its `http` protocol."""

    def __init__(self, config, server_state, app_state, _loop=None, *, gate):
        super().__init__(config, server_state, app_state, _loop)
        self.gate = gate
        self.admitted = False
        self.header_timer = None
        self.body_timers = []
        self.timed_cycle = None
        self.last_data = 0.0

    def _host(self):
        return self.client[0] if self.client else "unknown"

    def connection_made(self, transport):
        super().connection_made(transport)
        refused = self.gate.admit(self._host())
        if refused is not None:
            log.warning("refused a connection from %s: %s", self._host(), refused,
                        extra={"cause": "refused a connection"})
            transport.write(_raw_response(503, b"Service Unavailable",
                                          f"too many connections: {refused}", as_json=False))
            transport.close()
            return
        self.admitted = True
        self._arm_header_timer()

    def connection_lost(self, exc):
        if self.admitted:
            self.admitted = False
            self.gate.release(self._host())
            self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data):
        if not self.admitted:
            return
        self.last_data = time.monotonic()
        super().data_received(data)

    def handle_events(self):
        super().handle_events()
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle is not self.timed_cycle:
            # A request's headers are complete: the header deadline is met.
            self.timed_cycle = self.cycle
            self._cancel_header_timer()
            if self.conn.their_state is h11.SEND_BODY:
                self._arm_body_timers()
        if self.body_timers and self.conn.their_state is not h11.SEND_BODY:
            self._cancel_body_timers()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:
            # The next request on a kept-alive connection (unless a pipelined one started).
            self._arm_header_timer()

    # Deadlines.

    def _arm_header_timer(self):
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(self.gate.header_timeout, self._headers_late)

    def _arm_body_timers(self):
        self.last_data = time.monotonic()
        self.body_timers = [self.loop.call_later(self.gate.stall_timeout, self._check_stall),
                            self.loop.call_later(self.gate.upload_timeout, self._body_late)]

    def _cancel_header_timer(self):
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _cancel_body_timers(self):
        for timer in self.body_timers:
            timer.cancel()
        self.body_timers = []

    def _cancel_timers(self):
        self._cancel_header_timer()
        self._cancel_body_timers()

    def _headers_late(self):
        self.header_timer = None
        if self.transport.is_closing():
            return
        log.warning("closed a connection from %s: no complete request within %g s "
                    "(--header_timeout)", self._host(), self.gate.header_timeout,
                    extra={"cause": "header timeout"})
        self.transport.close()

    def _check_stall(self):
        """Closes a body that sent nothing for stall_timeout s while the server was reading
        (time with reading paused by the server counts as sending); else looks again when it
        could be one."""
        if self.flow.read_paused:
            self.last_data = time.monotonic()
        quiet = time.monotonic() - self.last_data
        if quiet < self.gate.stall_timeout:
            self.body_timers[0] = self.loop.call_later(self.gate.stall_timeout - quiet,
                                                       self._check_stall)
            return
        self._close_body(f"the upload sent nothing for {self.gate.stall_timeout:g} s",
                         "stall_timeout")

    def _body_late(self):
        self._close_body(f"the upload took longer than {self.gate.upload_timeout:g} s",
                         "upload_timeout")

    def _close_body(self, message, flag):
        """Answers 408 (where no answer was started) and closes the connection; the
        application then sees the client gone."""
        self._cancel_body_timers()
        if self.transport.is_closing():
            return
        log.warning("closed a connection from %s: %s (--%s)", self._host(), message, flag,
                    extra={"cause": flag})
        if not self.cycle.response_started:
            self.cycle.response_started = True
            self.scope[ANSWERED_HERE] = 408
            as_json = self.scope["path"].startswith("/api/")
            self.transport.write(_raw_response(408, b"Request Timeout", message, as_json))
        self.transport.close()


class RateLimit(logging.Filter):
    """Lets the first warning or error of each cause through, holds back the others of that
    cause for `window` seconds, then writes one line with their count and the last of them. A
    record's cause is its `cause` attribute where it has one, else its logger and message
    template; a record below warning level is limited only where it names a cause (lines a
    stranger can repeat at will). One instance may filter several handlers: each record is
    judged once."""

    def __init__(self, window=10.0):
        super().__init__()
        self.window = window
        self.held = {}  # cause -> [count, last record], for causes inside their window
        self.lock = threading.Lock()

    def filter(self, record):
        if not hasattr(record, "let_through"):
            limited = record.levelno >= logging.WARNING or hasattr(record, "cause")
            record.let_through = not limited or self._first(record)
        return record.let_through

    def _first(self, record):
        cause = (record.name, getattr(record, "cause", None) or str(record.msg))
        with self.lock:
            if cause in self.held:
                self.held[cause][0] += 1
                self.held[cause][1] = record
                return False
            self.held[cause] = [0, None]
        timer = threading.Timer(self.window, self._report, args=(cause,))
        timer.daemon = True
        timer.start()
        return True

    def _report(self, cause):
        with self.lock:
            count, last = self.held.pop(cause)
        if count:
            summary = logging.makeLogRecord(last.__dict__)
            summary.msg = f"{count} more like this in {self.window:g} s, the last: " \
                          f"{last.getMessage()}"
            summary.args = None
            summary.let_through = True
            logging.getLogger(last.name).handle(summary)
