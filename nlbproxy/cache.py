# -*- test-case-name: tests.test_cache -*-
"""A shared response cache per pool (RFC 9111), with out-of-band purges.

Sans-I/O: the router asks, the cache answers; time comes from an injected
clock.  Per request the router calls :meth:`ResponseCache.request`, which
reads what the request allows (method, ``Cache-Control``, ``Authorization``,
conditionals, ``Range``) into a :class:`CacheRequest` -- or None when the
cache has nothing to do with it.  :meth:`ResponseCache.get` then finds a
fresh stored response (a :class:`Hit`, with its current ``Age``); on a miss
the request goes to a host, and when its response headers come
:meth:`ResponseCache.admit` decides whether the response may be stored and
returns a :class:`Filling` that collects the body as it streams to the
client; the entry is kept only if the whole body came and stayed within
``max_object_bytes``.  The client's stream never waits for the cache.

What is stored: responses to GET (HEAD is served from them) with one of the
statuses RFC 9110 calls heuristically cacheable, with explicit freshness
(``s-maxage``, ``max-age``, ``Expires``) or, when ``default_ttl`` is set,
with that lifetime when they state none.  Not stored: ``no-store``,
``private``, ``no-cache`` (storing it would need revalidation, which this
cache does not do, so a stale entry is simply a miss), ``Vary: *``,
responses setting cookies, responses with trailers, and answers to requests
with ``Authorization`` unless the response says ``public``, ``s-maxage`` or
``must-revalidate`` (RFC 9111 section 3.5).  ``Vary`` makes secondary keys:
each stored variant remembers the request headers it varies on.  A
successful unsafe request (POST, PUT, DELETE, ...) invalidates its target
(section 4.4).

Memory is bounded: every entry is charged its body, headers and a fixed
overhead, and the least recently used entries go when ``max_bytes`` would
be exceeded; a URL keeps at most ``CACHE_MAX_VARIANTS`` variants.  Bodies
being collected are bounded too, each by ``max_object_bytes`` and all of
them together by ``max_bytes`` (past it, responses stream through unkept),
so many clients fetching big cacheable responses at once cannot make the
cache hold more than twice ``max_bytes``.  An exchange that ends without a
complete response must :meth:`Filling.drop` its filling.
"""

from __future__ import annotations

import email.utils
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

from nlbproxy import limits
from nlbproxy.config import CacheConfig, PoolConfig
from nlbproxy.metrics import CacheStats
from nlbproxy.routing import path_of

Field = tuple[bytes, bytes, bytes]

#: RFC 9110 section 15.1 "heuristically cacheable" statuses (206 left out:
#: ranges are not cached).
STORABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
#: Statuses whose responses never carry a body or a Content-Length of one.
_NO_BODY = frozenset({204, 304})
#: Request headers that make a conditional or partial request: these go to
#: the host, which knows the validators (the answer may still be stored).
_PASS_REQUEST = frozenset({
    b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range", b"range",
})
_SAFE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
#: Response headers not stored: the unit frames a hit itself and computes its Age.
_NOT_STORED = frozenset({b"content-length", b"transfer-encoding", b"age"})

Directives = dict[bytes, bytes | None]


class Clock(Protocol):
    def seconds(self) -> float: ...


def parse_cache_control(fields: Iterable[Field]) -> Directives:
    """The ``Cache-Control`` directives of a message, lower-case names; the
    first of a name wins, quoted values are unquoted."""
    directives: Directives = {}
    for _raw, name, value in fields:
        if name != b"cache-control":
            continue
        for item in _split_list(value):
            key, eq, arg = item.partition(b"=")
            key = key.strip().lower()
            if key:
                directives.setdefault(key, arg.strip().strip(b'"') if eq else None)
    return directives


def _split_list(value: bytes) -> list[bytes]:
    """A comma-separated list, commas inside quoted strings kept."""
    if b'"' not in value:
        return value.split(b",")
    items, current, quoted = [], bytearray(), False
    for byte in value:
        if byte == 0x22:
            quoted = not quoted
        if byte == 0x2C and not quoted:
            items.append(bytes(current))
            current.clear()
        else:
            current.append(byte)
    items.append(bytes(current))
    return items


def delta_seconds(value: bytes | None) -> int | None:
    """A ``max-age``-style value; None when absent or invalid."""
    if value is None or not value.isdigit():
        return None
    return int(value)


def http_date(value: bytes) -> float | None:
    """An HTTP-date as a POSIX time; None when it does not parse."""
    try:
        parsed = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (ValueError, TypeError, IndexError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def _first(fields: Iterable[Field], wanted: bytes) -> bytes | None:
    for _raw, name, value in fields:
        if name == wanted:
            return value
    return None


def _joined(fields: Iterable[Field], wanted: bytes) -> bytes | None:
    """All values of a header, as one list value (for Vary matching)."""
    values = [value.strip() for _raw, name, value in fields if name == wanted]
    return b", ".join(values) if values else None


class Entry:
    """One stored response (one variant of one URL)."""

    __slots__ = (
        "url", "vary", "status", "reason", "headers", "body", "size", "response_time", "initial_age",
        "lifetime", "shared_auth",
    )

    def __init__(
        self,
        url: tuple[bytes, bytes],
        vary: tuple[tuple[bytes, bytes | None], ...],
        status: int,
        reason: bytes,
        headers: list[Field],
        body: bytes,
        response_time: float,
        initial_age: float,
        lifetime: float,
        shared_auth: bool,
    ) -> None:
        self.url = url
        self.vary = vary
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.response_time = response_time
        self.initial_age = initial_age
        self.lifetime = lifetime
        #: May answer a request that carries Authorization.
        self.shared_auth = shared_auth
        self.size = (
            len(body) + len(url[0]) + len(url[1]) + limits.CACHE_ENTRY_OVERHEAD
            + sum(len(raw) + len(value) + 4 for raw, _name, value in headers)
        )

    def age(self, now: float) -> float:
        """RFC 9111 section 4.2.3 ``current_age``."""
        return self.initial_age + max(0.0, now - self.response_time)

    def selected_by(self, fields: Sequence[Field]) -> bool:
        return all(_joined(fields, name) == value for name, value in self.vary)


class Hit:
    """A stored response ready to send: headers framed for the client."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, entry: Entry, age: float) -> None:
        self.status = entry.status
        self.reason = entry.reason
        headers = list(entry.headers)
        if entry.status not in _NO_BODY:
            headers.append((b"content-length", b"content-length", str(len(entry.body)).encode()))
        headers.append((b"age", b"age", str(int(age)).encode()))
        self.headers = headers
        self.body = entry.body


class CacheRequest:
    """What one request lets the cache do."""

    __slots__ = ("cache", "url", "fields", "head", "lookup", "store", "invalidate", "authorized",
                 "max_age", "min_fresh")

    def __init__(self, cache: ResponseCache, url: tuple[bytes, bytes], fields: Sequence[Field]) -> None:
        self.cache = cache
        self.url = url
        self.fields = fields
        self.head = False
        self.lookup = True
        self.store = True
        self.invalidate = False
        self.authorized = False
        self.max_age: int | None = None
        self.min_fresh = 0

    def get(self) -> Hit | None:
        return self.cache.get(self)

    def admit(self, status: int, reason: bytes, headers: Sequence[Field], request_time: float) -> Filling | None:
        return self.cache.admit(self, status, reason, headers, request_time)


class Filling:
    """A response body being collected while it streams to the client."""

    __slots__ = ("cache", "entry", "chunks", "size", "limit", "purges")

    def __init__(self, cache: ResponseCache, entry: Entry, limit: int) -> None:
        self.cache = cache
        #: The entry to store, still without its body.
        self.entry = entry
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.purges = cache.purges

    def add(self, data: bytes) -> bool:
        """Keep ``data``; False once the body is too big or the cache has no
        room for more bodies in flight (then all is dropped)."""
        cache = self.cache
        n = len(data)
        if self.size + n > self.limit:
            cache.stats.too_big += 1
            self.drop()
            return False
        if cache.filling_bytes + n > cache.config.max_bytes:
            cache.stats.busy += 1
            self.drop()
            return False
        self.size += n
        cache.filling_bytes += n
        self.chunks.append(data)
        return True

    def drop(self) -> None:
        """Forget what was collected (the response ended early or was refused)."""
        self.cache.filling_bytes -= self.size
        self.size = 0
        self.chunks = []

    def finish(self) -> bool:
        """The whole body came: store the entry.  False if a purge came first."""
        entry = self.entry
        entry.body = b"".join(self.chunks)
        entry.size += self.size
        self.drop()
        if self.purges != self.cache.purges:
            return False  # it may hold what the operator just purged
        return self.cache.insert(entry)


class ResponseCache:
    """The cache of one pool."""

    def __init__(self, name: str, config: CacheConfig, clock: Clock, stats: CacheStats | None = None) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.stats = stats if stats is not None else CacheStats()
        #: URL (host, target) -> its variants, oldest first.
        self._urls: dict[tuple[bytes, bytes], list[Entry]] = {}
        #: Every entry, least recently used first.
        self._lru: OrderedDict[Entry, None] = OrderedDict()
        #: Purges so far: a filling that saw one may hold purged content.
        self.purges = 0
        #: Body bytes held by fillings now.
        self.filling_bytes = 0

    def __len__(self) -> int:
        return len(self._lru)

    # -- requests ----------------------------------------------------------------
    def request(self, method: bytes, target: bytes, fields: Sequence[Field], has_body: bool) -> CacheRequest | None:
        """What the cache may do for this request; None: nothing."""
        host = (_first(fields, b"host") or b"").strip().lower()
        if method not in _SAFE:
            req = CacheRequest(self, (host, target), fields)
            req.lookup = req.store = False
            req.invalidate = True
            return req
        if method not in (b"GET", b"HEAD") or has_body:
            return None
        req = CacheRequest(self, (host, target), fields)
        req.head = method == b"HEAD"
        req.store = not req.head
        directives = parse_cache_control(fields)
        for _raw, name, value in fields:
            if name in _PASS_REQUEST:
                req.lookup = False
                if name == b"range":
                    req.store = False
            elif name == b"authorization":
                req.authorized = True
            elif name == b"pragma" and b"no-cache" in value.lower() and not directives:
                req.lookup = False  # RFC 9111 section 5.4, for HTTP/1.0 clients
        if b"no-store" in directives:
            return None
        if b"no-cache" in directives:
            req.lookup = False
        if b"max-age" in directives:
            req.max_age = delta_seconds(directives[b"max-age"]) or 0
        req.min_fresh = delta_seconds(directives.get(b"min-fresh")) or 0
        return req

    def get(self, req: CacheRequest) -> Hit | None:
        if not req.lookup:
            return None
        stats = self.stats
        now = self.clock.seconds()
        for entry in self._urls.get(req.url, ()):
            if not entry.selected_by(req.fields) or (req.authorized and not entry.shared_auth):
                continue
            age = entry.age(now)
            if age >= entry.lifetime:
                self._remove(entry)  # stale: this cache does not revalidate
                break
            if (req.max_age is not None and age > req.max_age) or entry.lifetime - age < req.min_fresh:
                break
            self._lru.move_to_end(entry)
            stats.hits += 1
            return Hit(entry, age)
        stats.misses += 1
        return None

    # -- responses ---------------------------------------------------------------
    def admit(
        self, req: CacheRequest, status: int, reason: bytes, headers: Sequence[Field], request_time: float,
    ) -> Filling | None:
        """The response's headers came: a :class:`Filling` if it may be stored."""
        if req.invalidate:
            if status < 400:
                self.invalidate(req.url)
            return None
        if not req.store or status not in STORABLE_STATUSES:
            return None
        directives = parse_cache_control(headers)
        if b"no-store" in directives or b"private" in directives or b"no-cache" in directives:
            return None
        shared_auth = b"public" in directives or b"s-maxage" in directives or b"must-revalidate" in directives
        if req.authorized and not shared_auth:
            return None
        vary_names: list[bytes] = []
        length = -1
        for _raw, name, value in headers:
            if name == b"set-cookie":
                return None
            if name == b"vary":
                for item in value.split(b","):
                    item = item.strip().lower()
                    if item == b"*":
                        return None
                    if item and item not in vary_names:
                        vary_names.append(item)
            elif name == b"content-length" and value.isdigit():
                length = int(value)
        now = self.clock.seconds()
        date = http_date(_first(headers, b"date") or b"")
        lifetime = self._lifetime(directives, headers, now if date is None else date)
        age_value = delta_seconds(_first(headers, b"age")) or 0
        apparent_age = max(0.0, now - date) if date is not None else 0.0
        initial_age = max(apparent_age, age_value + max(0.0, now - request_time))
        if lifetime is None or lifetime <= initial_age:
            return None
        limit = self.config.max_object_bytes
        if length > limit:
            self.stats.too_big += 1
            return None
        vary = tuple((name, _joined(req.fields, name)) for name in vary_names)
        kept = [item for item in headers if item[1] not in _NOT_STORED]
        entry = Entry(req.url, vary, status, reason, kept, b"", now, initial_age, lifetime, shared_auth)
        return Filling(self, entry, limit)

    def _lifetime(self, directives: Directives, headers: Sequence[Field], date: float) -> float | None:
        """RFC 9111 section 4.2.1, for a shared cache; None: no freshness."""
        for name in (b"s-maxage", b"max-age"):
            if name in directives:
                return float(delta_seconds(directives[name]) or 0)  # invalid: stale
        expires = _first(headers, b"expires")
        if expires is not None:
            when = http_date(expires)
            return 0.0 if when is None else when - date
        return self.config.default_ttl or None

    # -- the store -----------------------------------------------------------------
    def insert(self, entry: Entry) -> bool:
        """Keep ``entry``, in place of the variant it replaces."""
        config = self.config
        if entry.size > config.max_bytes:
            return False
        variants = self._urls.setdefault(entry.url, [])
        for old in [v for v in variants if v.vary == entry.vary]:
            self._remove(old)
        if len(variants) >= limits.CACHE_MAX_VARIANTS:
            self._remove(variants[0])
            self.stats.evictions += 1
        stats = self.stats
        while stats.bytes + entry.size > config.max_bytes:
            oldest = next(iter(self._lru))
            self._remove(oldest)
            stats.evictions += 1
        self._urls.setdefault(entry.url, []).append(entry)
        self._lru[entry] = None
        stats.bytes += entry.size
        stats.entries += 1
        stats.stores += 1
        return True

    def _remove(self, entry: Entry) -> None:
        variants = self._urls.get(entry.url)
        if variants is None or entry not in self._lru:
            return
        variants.remove(entry)
        if not variants:
            del self._urls[entry.url]
        del self._lru[entry]
        self.stats.bytes -= entry.size
        self.stats.entries -= 1

    def invalidate(self, url: tuple[bytes, bytes]) -> int:
        """Drop every variant of ``url`` (after a successful unsafe request)."""
        variants = list(self._urls.get(url, ()))
        for entry in variants:
            self._remove(entry)
        self.stats.purged += len(variants)
        return len(variants)

    def purge(self, prefix: bytes) -> int:
        """Drop every entry whose path starts with ``prefix``, on every host;
        the number dropped.  Responses being collected now are not kept."""
        self.purges += 1
        doomed = [entry for entry in self._lru if path_of(entry.url[1]).startswith(prefix)]
        for entry in doomed:
            self._remove(entry)
        self.stats.purged += len(doomed)
        return len(doomed)


def pool_caches(pools: Iterable[PoolConfig], clock: Clock) -> dict[str, ResponseCache]:
    """A cache for every pool whose config has ``cache``."""
    return {pool.name: ResponseCache(pool.name, pool.cache, clock) for pool in pools if pool.cache is not None}
