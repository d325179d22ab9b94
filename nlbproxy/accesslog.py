# -*- test-case-name: tests.test_accesslog -*-
"""The access log: one line per request.

Fields: time, client, listener, pool, host, method, target, status, bytes
sent to the client, duration.  ``text`` lines follow the combined-log habit
of putting the request in quotes; ``json`` lines are one object each.  A file
path gets a buffered writer flushed once a second (a flush per request costs
more than the request); ``-`` sends lines to the unit's log (twisted.logger,
namespace ``nlbproxy.access``), where an operator's log observer applies.
"""

from __future__ import annotations

import json
import time
from typing import IO, TYPE_CHECKING, Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

if TYPE_CHECKING:
    from nlbproxy.routers.http import Exchange

#: Seconds between flushes of a file access log.
FLUSH_INTERVAL = 1.0
#: Bytes of request target written per line; longer ones are cut.
MAX_TARGET_LOGGED = 1024


def fields(exchange: Exchange, duration: float) -> dict[str, Any]:
    request = exchange.request
    client = exchange.client
    host = exchange.tried[-1] if exchange.tried else None
    return {
        "time": time.time(),
        "client": client.client_ip,
        "listener": client.listener.name,
        "pool": exchange.pool.name,
        "host": host.key if host is not None else "-",
        "method": request.method.decode("ascii", "replace"),
        "target": request.target[:MAX_TARGET_LOGGED].decode("ascii", "replace"),
        "status": exchange.status,
        "bytes": exchange.bytes_sent,
        "duration": round(duration, 6),
    }


def format_text(f: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(f["time"]))
    return (
        f'{stamp}Z {f["client"]} {f["listener"]} {f["pool"]} {f["host"]} '
        f'"{f["method"]} {f["target"]}" {f["status"]} {f["bytes"]} {f["duration"]:.6f}'
    )


def format_json(f: dict[str, Any]) -> str:
    return json.dumps(f, separators=(",", ":"))


class FileAccessLog:
    """Buffered lines to a file, flushed every ``FLUSH_INTERVAL`` seconds."""

    def __init__(self, path: str, fmt: str, clock: Any) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8", buffering=64 * 1024)
        self._format = format_json if fmt == "json" else format_text
        self._flusher = LoopingCall(self._file.flush)
        self._flusher.clock = clock
        self._flusher.start(FLUSH_INTERVAL, now=False)

    def __call__(self, exchange: Exchange, duration: float) -> None:
        self._file.write(self._format(fields(exchange, duration)) + "\n")

    def close(self) -> None:
        if self._flusher.running:
            self._flusher.stop()
        self._file.close()


class LoggerAccessLog:
    """Access log events to twisted.logger."""

    log = Logger(namespace="nlbproxy.access")

    def __init__(self, fmt: str) -> None:
        self._format = format_json if fmt == "json" else format_text

    def __call__(self, exchange: Exchange, duration: float) -> None:
        f = fields(exchange, duration)
        self.log.info("{line}", line=self._format(f), **{"access": f})

    def close(self) -> None:
        pass
