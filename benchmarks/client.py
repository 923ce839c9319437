"""A requests session whose connections leave from a chosen loopback address, so that a server
(or the proxy before it) sees many clients on one machine: the serving benchmark's
participants and the nginx test's real client."""

import requests


class _FromAddress(requests.adapters.HTTPAdapter):
    def __init__(self, address):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, source_address=(self.address, 0), **kwargs)


def session_from(address):
    """A `requests.Session` whose HTTP and HTTPS connections leave from `address`
    (127.0.0.2, say: any 127.x.y.z is this machine)."""
    session = requests.Session()
    session.mount("http://", _FromAddress(address))
    session.mount("https://", _FromAddress(address))
    return session
