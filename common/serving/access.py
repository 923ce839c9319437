"""The access log: one line per answered request, in the combined log format's order (client,
time, request line, status, bytes sent) with the seconds taken and the user agent appended.

No secret reaches it: the query string is left out, the key of a status page (`/submissions/ID/KEY`,
an address only its participant is given) is written as `...`, and no header but the user agent
(printable characters, at most 200) is written; tokens travel in headers and bodies, never logged.
The client is the one the proxy-headers layer settled on (the real client behind a trusted
proxy). A request the connection layer answered (408, its deadline passed) is logged with that
status, the bytes being the application's, which went nowhere.
"""

import time

from common.serving import connections

SECRET_PATH_PREFIXES = ("/submissions/",)
MAX_AGENT = 200


def shown_path(path):
    """`path` with the secret part of a status page's address hidden."""
    for prefix in SECRET_PATH_PREFIXES:
        if path.startswith(prefix) and len(path) > len(prefix):
            return prefix + "..."
    return path


def _printable(text, limit):
    return "".join(character if character.isprintable() and character != '"' else "?"
                   for character in text[:limit])


class AccessLog:
    """ASGI middleware writing a line per request to `logger` (at INFO) once it is answered."""

    def __init__(self, app, logger):
        self.app = app
        self.logger = logger

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        answer = {"status": 0, "bytes": 0}

        async def counted(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self._write(scope, answer, time.monotonic() - start)

    def _write(self, scope, answer, seconds):
        agent = next((value.decode("latin-1") for name, value in scope["headers"]
                      if name == b"user-agent"), "-")
        client = scope["client"][0] if scope.get("client") else "-"
        when = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime())
        path = _printable(shown_path(scope["path"]), 1000)
        self.logger.info('%s - - [%s] "%s %s HTTP/%s" %d %d %.3f "%s"', client, when,
                         scope["method"], path, scope["http_version"],
                         scope.get(connections.ANSWERED_HERE) or answer["status"] or 499,
                         answer["bytes"], seconds, _printable(agent, MAX_AGENT))
