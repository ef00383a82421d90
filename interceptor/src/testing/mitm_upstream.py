"""Test harness addon for mitmproxy: every upstream connection goes to one
loopback address (MITM_TEST_UPSTREAM, "host:port", a fake provider).

Whatever host the client asked for (through CONNECT or an absolute URL),
mitmproxy connects to the fake instead, so a test never reaches a real host.
The server name sent in the TLS handshake (and checked against the upstream
certificate) stays the host the client asked for, as does the request's Host.
Loaded before the addon under test; it changes nothing else.
"""

import os

_host, _, _port = os.environ["MITM_TEST_UPSTREAM"].rpartition(":")
UPSTREAM = (_host, int(_port))


def server_connect(data):
    asked = data.server.address[0] if data.server.address else None
    if data.server.sni is None and asked is not None:
        data.server.sni = asked
    data.server.address = UPSTREAM
