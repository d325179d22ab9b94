"""Twisted's own reverse proxy (twisted.web.proxy.ReverseProxyResource), as shipped.

It keeps client connections alive but opens one HTTP/1.0 connection to the
backend per request; that is the baseline nlbproxy must beat by a wide margin.

    python bench/twisted_revproxy.py --port 8080 --backend 127.0.0.1:8000
"""

from __future__ import annotations

import argparse

from twisted.internet import endpoints, reactor
from twisted.web import proxy, server


class QuietSite(server.Site):
    def log(self, request: object) -> None:
        pass  # no access log: it is not part of what is compared


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    ap.add_argument("--backend", required=True, help="backend as HOST:PORT")
    args = ap.parse_args(argv)
    host, port = args.backend.rsplit(":", 1)
    site = QuietSite(proxy.ReverseProxyResource(host, int(port), b""))
    site.displayTracebacks = False
    endpoints.serverFromString(reactor, f"tcp:{args.port}:interface=127.0.0.1:backlog=4096") \
        .listen(site)
    reactor.run()


if __name__ == "__main__":
    main()
