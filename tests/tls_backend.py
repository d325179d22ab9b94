"""The test backend of ``tests/backend.py`` behind TLS: ``python -m tests.tls_backend HOST PORT NAME PEM``.

``PEM`` holds the server's chain and key (``tests/certs.py`` makes them), so
pools with ``tls`` are tested against Python's own TLS server.
"""

from __future__ import annotations

import ssl
import sys

from tests.backend import Server


def main() -> None:
    host, port, name, pem = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    server = Server((host, port), name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    # The handshake runs in the handler's thread (on the first read), so a
    # client that fails it does not stall the accept loop.
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
