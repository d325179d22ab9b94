# -*- test-case-name: tests.test_hostside -*-
"""The unit's end of a backend connection: HTTP/1.1 in the client role, sans-I/O.

The client side of the router parses with h11, which validates everything a
stranger on the internet may send.  The host side talks to the farm's own
servers, one request at a time per connection, and is the half of every
exchange that h11's generality makes slowest; this module is its lean
replacement: :func:`request_head` and :func:`chunk` write a request,
:class:`ResponseReader` turns the host's bytes into :class:`Head`,
:class:`Body` and :class:`End` events.

The reader is still strict where it matters for a proxy (RFC 9112): the
status line and every field line must parse, field names are tokens and
values hold no control characters, whitespace before a colon is refused,
``Content-Length`` must be digits and agree with itself, the only transfer
coding is ``chunked``, chunk sizes are hex of bounded length and every chunk
ends with CRLF.  Anything else raises :class:`ResponseError` (the host's
fault: the router answers 502 and never reuses the connection).  Framing
follows RFC 9112 section 6.3: no body for a response to HEAD, for 1xx, 204
and 304; ``Transfer-Encoding: chunked`` wins over ``Content-Length`` (the
router drops the latter and distrusts the connection); otherwise
``Content-Length``; otherwise the body runs until the host closes.

States, each naming what it accepts:

============ ============================================ ===================
state        reading                                      next
============ ============================================ ===================
``IDLE``     nothing: bytes here are the host's error      (ResponseError)
``HEAD``     status line and fields up to the blank line  LENGTH, CHUNK_SIZE,
                                                           CLOSE, DONE, HEAD
                                                           (1xx), SWITCHED
``LENGTH``   ``remaining`` body bytes                      DONE
``CHUNK_*``  size line, data, CRLF after data, trailers    DONE
``CLOSE``    body until EOF                                DONE at EOF
``DONE``     nothing: later bytes are kept in ``trailing`` (reset -> IDLE)
``SWITCHED`` nothing: a 101 handed the bytes to a tunnel   --
============ ============================================ ===================
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from nlbproxy import limits

Field = tuple[bytes, bytes, bytes]

IDLE, HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILERS, CLOSE, DONE, SWITCHED = range(10)

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_FIELD_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_DIGITS = re.compile(rb"[0-9]{1,20}")
_NO_BODY_STATUS = frozenset({204, 304})


class ResponseError(Exception):
    """The host sent something that is not a valid HTTP/1.1 response."""


class Head:
    """A response's status line and fields; ``informational`` for 1xx."""

    __slots__ = ("status", "reason", "http_version", "headers")

    def __init__(self, status: int, reason: bytes, http_version: bytes, headers: list[Field]) -> None:
        self.status = status
        self.reason = reason
        self.http_version = http_version
        #: ``(raw name, lower-case name, value)`` triples, as the router's header code takes them.
        self.headers = headers

    def __repr__(self) -> str:
        return f"Head({self.status}, {self.reason!r}, {self.headers!r})"


class Body:
    """A piece of the response body."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Body({self.data!r})"


class End:
    """The end of the response, with the trailer fields of a chunked body."""

    __slots__ = ("trailers",)

    def __init__(self, trailers: list[Field]) -> None:
        self.trailers = trailers

    def __repr__(self) -> str:
        return f"End({self.trailers!r})"


Event = Head | Body | End


def request_head(method: bytes, target: bytes, headers: Iterable[Field]) -> bytes:
    """The request line and fields of a request, ready for the wire."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for raw, _name, value in headers:
        parts += (raw, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> list[bytes]:
    """``data`` as one chunk of a chunked body (for ``writeSequence``)."""
    return [b"%x\r\n" % len(data), data, b"\r\n"]


#: The end of a chunked request body (no trailers).
LAST_CHUNK = b"0\r\n\r\n"


def _split_lines(block: bytes) -> list[bytes]:
    # RFC 9112 section 2.2: a recipient may take a bare LF as a line end.
    if block.count(b"\n") == block.count(b"\r\n"):
        return block.split(b"\r\n")
    return [line[:-1] if line.endswith(b"\r") else line for line in block.split(b"\n")]


def parse_fields(lines: Iterable[bytes]) -> list[Field]:
    """Field lines as triples; obsolete line folding is joined with a space (RFC 9112 5.2)."""
    fields: list[Field] = []
    match = _FIELD_LINE.fullmatch
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise ResponseError("a continuation line before any field")
            raw, name, value = fields[-1]
            folded = line.strip(b" \t")
            if any(c < 0x20 and c != 0x09 or c == 0x7F for c in folded):
                raise ResponseError("a control character in a folded field value")
            fields[-1] = (raw, name, value + b" " + folded if value else folded)
            continue
        found = match(line)
        if found is None:
            raise ResponseError(f"invalid field line {line[:80]!r}")
        raw, value = found.groups()
        fields.append((raw, raw.lower(), value.rstrip(b" \t")))
    return fields


class ResponseReader:
    """Parses the host's responses to the requests announced by :meth:`expect`."""

    __slots__ = ("state", "_buf", "_method_head", "remaining", "keep_alive", "trailing", "_head_limit")

    def __init__(self, max_head: int = limits.MAX_RESPONSE_HEAD) -> None:
        self.state = IDLE
        self._buf = b""
        self._method_head = False
        #: Body bytes still due in ``LENGTH`` / ``CHUNK_DATA``.
        self.remaining = 0
        #: Whether the connection may carry another request after ``DONE``.
        self.keep_alive = True
        #: Bytes after the end of the response (``DONE``) or after a 101 (``SWITCHED``).
        self.trailing = b""
        self._head_limit = max_head

    def expect(self, method: bytes) -> None:
        """A request with ``method`` was sent: its response comes next."""
        if self.state != IDLE:
            raise RuntimeError(f"expect() in state {self.state}")
        self.state = HEAD
        self._method_head = method == b"HEAD"

    def reset(self) -> None:
        """Ready for the next request on a kept connection."""
        if self.state != DONE or self.trailing or not self.keep_alive:
            raise RuntimeError("the connection cannot carry another request")
        self.state = IDLE

    # -- input -----------------------------------------------------------------
    def feed(self, data: bytes) -> list[Event]:
        """Events for ``data``; raises :class:`ResponseError` on invalid input."""
        state = self.state
        if state == LENGTH and not self._buf:
            # The common bulk case: body bytes pass through without a copy.
            size = len(data)
            if size < self.remaining:
                self.remaining -= size
                return [Body(data)]
            if size == self.remaining:
                self.remaining = 0
                self.state = DONE
                return [Body(data), End([])]
        if state == CLOSE:
            return [Body(data)] if data else []
        if state in (DONE, SWITCHED):
            self.trailing += data
            return []
        if state == IDLE:
            if data:
                raise ResponseError("data from the host while no request was outstanding")
            return []
        self._buf = self._buf + data if self._buf else data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def eof(self) -> list[Event]:
        """The host closed its side: ends a read-until-close body, else raises."""
        if self.state == CLOSE:
            self.state = DONE
            self.keep_alive = False
            return [End([])]
        if self.state in (IDLE, DONE, SWITCHED):
            return []
        raise ResponseError("the host closed the connection in the middle of a response")

    # -- the state machine -----------------------------------------------------
    def _step(self, events: list[Event]) -> bool:
        """Consume what the current state can from the buffer; False when it needs more."""
        state = self.state
        buf = self._buf
        if state == HEAD:
            return self._head(events)
        if state == LENGTH:
            if not self._take_body(events):
                return False
            if self.remaining == 0:
                self._finish(events, [])
            return self.state != DONE and bool(self._buf)
        if state == CHUNK_SIZE:
            eol = buf.find(b"\n")
            if eol < 0:
                if len(buf) > limits.MAX_CHUNK_LINE:
                    raise ResponseError("chunk size line too long")
                return False
            line = buf[:eol]
            if line.endswith(b"\r"):
                line = line[:-1]
            found = _CHUNK_SIZE.fullmatch(line)
            if found is None:
                raise ResponseError(f"invalid chunk size line {line[:40]!r}")
            self._buf = buf[eol + 1:]
            size = int(found.group(1), 16)
            if size == 0:
                self.state = TRAILERS
            else:
                self.remaining = size
                self.state = CHUNK_DATA
            return True
        if state == CHUNK_DATA:
            if not self._take_body(events):
                return False
            if self.remaining == 0:
                self.state = CHUNK_CRLF
            return bool(self._buf)
        if state == CHUNK_CRLF:
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise ResponseError("chunk data not followed by CRLF")
            self._buf = buf[2:]
            self.state = CHUNK_SIZE
            return True
        if state == TRAILERS:
            if buf.startswith(b"\r\n") or buf.startswith(b"\n"):
                self._buf = buf[2:] if buf.startswith(b"\r\n") else buf[1:]
                self._finish(events, [])
                return False
            block_end = _block_end(buf)
            if block_end is None:
                if len(buf) > limits.MAX_TRAILER_BYTES:
                    raise ResponseError("trailer section too large")
                return False
            block, self._buf = buf[: block_end[0]], buf[block_end[1]:]
            self._finish(events, parse_fields(_split_lines(block)))
            return False
        raise AssertionError(f"_step in state {state}")

    def _take_body(self, events: list[Event]) -> bool:
        """Up to ``remaining`` buffered bytes as a Body; False if none are buffered."""
        buf = self._buf
        if not buf:
            return False
        take = buf[: self.remaining] if len(buf) > self.remaining else buf
        self.remaining -= len(take)
        self._buf = buf[len(take):]
        events.append(Body(take))
        return True

    def _head(self, events: list[Event]) -> bool:
        buf = self._buf
        end = _block_end(buf)
        if end is None:
            if len(buf) > self._head_limit:
                raise ResponseError("response head too large")
            return False
        if end[0] > self._head_limit:
            raise ResponseError("response head too large")
        lines = _split_lines(buf[: end[0]])
        self._buf = buf[end[1]:]
        found = _STATUS_LINE.fullmatch(lines[0])
        if found is None:
            raise ResponseError(f"invalid status line {lines[0][:80]!r}")
        minor, code, reason = found.groups()
        status = int(code)
        if status < 100:
            raise ResponseError(f"invalid status code {status}")
        headers = parse_fields(lines[1:])
        version = b"1.1" if minor == b"1" else b"1.0"
        events.append(Head(status, reason or b"", version, headers))
        if status < 200:
            if status == 101:
                self.state = SWITCHED
                self.trailing, self._buf = self._buf, b""
                return False
            return bool(self._buf)  # an interim response: the final one follows
        self.keep_alive = version == b"1.1"
        chunked = False
        length = -1
        for _raw, name, value in headers:
            if name == b"connection":
                if b"close" in (t.strip().lower() for t in value.split(b",")):
                    self.keep_alive = False
            elif name == b"transfer-encoding":
                if chunked or value.strip().lower() != b"chunked":
                    raise ResponseError(f"unsupported transfer coding {value[:40]!r}")
                chunked = True
            elif name == b"content-length":
                for part in value.split(b","):
                    part = part.strip()
                    if _DIGITS.fullmatch(part) is None:
                        raise ResponseError(f"invalid Content-Length {value[:40]!r}")
                    if length >= 0 and int(part) != length:
                        raise ResponseError("conflicting Content-Length values")
                    length = int(part)
        if self._method_head or status in _NO_BODY_STATUS:
            self._finish(events, [])
        elif chunked:
            self.state = CHUNK_SIZE
            return True
        elif length >= 0:
            if length == 0:
                self._finish(events, [])
            else:
                self.remaining = length
                self.state = LENGTH
                return bool(self._buf)
        else:
            self.state = CLOSE
            self.keep_alive = False
            if self._buf:
                events.append(Body(self._buf))
                self._buf = b""
        return False

    def _finish(self, events: list[Event], trailers: list[Field]) -> None:
        self.state = DONE
        events.append(End(trailers))
        if self._buf:
            self.trailing, self._buf = self._buf, b""


def _block_end(buf: bytes) -> tuple[int, int] | None:
    """Where the blank line ending a head (or trailer) block is: (block end, data start)."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if crlf < 0 and lf < 0:
        return None
    if lf < 0 or 0 <= crlf < lf:
        return crlf, crlf + 4
    # A bare-LF blank line (its lines' CRs, if any, go with the lines).
    return lf, lf + 2
