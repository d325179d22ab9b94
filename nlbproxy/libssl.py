# -*- test-case-name: tests.test_tls_keys -*-
"""What Python's ``ssl`` module does not expose of the libssl it is linked to.

Listeners terminate TLS with Python's ``ssl`` because it is linked
dynamically to the system's ``libssl.so``: ctypes can then call, on the very
``SSL_CTX`` a listener uses, what neither ``ssl`` nor pyOpenSSL binds --
session ticket keys (``SSL_CTX_ctrl(SSL_CTRL_SET_TLSEXT_TICKET_KEYS)``), the
session timeout, and the ticket callback that stores an id in every ticket
(TLS-session affinity).  pyOpenSSL cannot do this: cryptography's wheels link
OpenSSL statically with hidden symbols.

Two facts are borrowed from CPython's ``_ssl`` module and checked before use,
never trusted: the ``SSL_CTX *`` (``SSL *``) is the first field after the
object header of an ``SSLContext`` (the second of an ``_SSLSocket``).  The
library must be the one loaded into the process (found in ``/proc/self/maps``),
and a pointer is used only once libssl itself confirms it (the context's
options read through it match ``SSLContext.options``; an ``SSL``'s context is
that context).  Anything else raises :class:`LibSSLUnavailable` with the
reason, and a unit that needs these calls refuses to start.
"""

from __future__ import annotations

import ctypes
import os
import ssl
from typing import Any

#: ssl.h: SSL_CTRL_SET_TLSEXT_TICKET_KEYS, SSL_CTRL_GET_TLSEXT_TICKET_KEYS,
#: SSL_CTRL_SET_SESS_CACHE_MODE.
_SET_TICKET_KEYS = 59
_GET_TICKET_KEYS = 58
_SET_SESS_CACHE_MODE = 44
#: 16 bytes of key name, 32 of HMAC key, 32 of AES key (OpenSSL's layout).
TICKET_KEYS_SIZE = 80
#: Bytes of the id stored in every ticket for TLS-session affinity.
SESSION_TAG_SIZE = 16

_GEN_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class LibSSLUnavailable(Exception):
    """This process's libssl cannot be reached safely; the message says why."""


def _loaded_libssl() -> str:
    """The path of the libssl mapped into this process (by ``_ssl``)."""
    import _ssl  # noqa: F401 -- loads libssl if nothing did yet

    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith("libssl.so"):
                    return path
    except OSError as exc:
        raise LibSSLUnavailable(f"cannot read /proc/self/maps: {exc.strerror}") from None
    raise LibSSLUnavailable(
        "Python's ssl module is not linked to a shared libssl (a static build); "
        "ticket keys cannot be set"
    )


class LibSSL:
    """The process's libssl, with the few functions the listeners need."""

    def __init__(self) -> None:
        path = _loaded_libssl()
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        self.path = path
        version = ctypes.CDLL(path).OpenSSL_version_num
        version.restype = ctypes.c_ulong
        if version() != ssl.OPENSSL_VERSION_NUMBER:
            raise LibSSLUnavailable(
                f"{path} is OpenSSL {version():#x}, Python's ssl was built with {ssl.OPENSSL_VERSION_NUMBER:#x}")
        vp, i, lng, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_size_t
        self._ctrl = self._fn(lib, "SSL_CTX_ctrl", lng, vp, i, lng, vp)
        self._options = self._fn(lib, "SSL_CTX_get_options", ctypes.c_uint64, vp)
        self._set_timeout = self._fn(lib, "SSL_CTX_set_timeout", lng, vp, lng)
        self._ticket_cb = self._fn(lib, "SSL_CTX_set_session_ticket_cb", i, vp, _GEN_CB, vp, vp)
        self._ssl_ctx = self._fn(lib, "SSL_get_SSL_CTX", vp, vp)
        self._get_session = self._fn(lib, "SSL_get_session", vp, vp)
        self._get_appdata = self._fn(lib, "SSL_SESSION_get0_ticket_appdata", i, vp,
                                     ctypes.POINTER(vp), ctypes.POINTER(sz))
        self._set_appdata = self._fn(lib, "SSL_SESSION_set1_ticket_appdata", i, vp, ctypes.c_char_p, sz)
        # One C callback for every context: it lives as long as the process.
        self._gen = _GEN_CB(self._tag_session)

    @staticmethod
    def _fn(lib: Any, name: str, restype: Any, *argtypes: Any) -> Any:
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise LibSSLUnavailable(f"libssl has no {name}") from None
        fn.restype = restype
        fn.argtypes = argtypes
        return fn

    # -- pointers --------------------------------------------------------------------
    def context_pointer(self, ctx: ssl.SSLContext) -> int:
        """The ``SSL_CTX *`` of ``ctx``, confirmed by libssl."""
        if type(ctx) is not ssl.SSLContext:
            raise LibSSLUnavailable(f"expected an ssl.SSLContext, got {type(ctx).__name__}")
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        # Flip an option (and back, before any connection uses the context)
        # and watch libssl see the flip too.
        if not pointer or self._options(pointer) != ctx.options:
            raise LibSSLUnavailable("the SSL_CTX of Python's SSLContext is not where expected")
        ctx.options ^= ssl.OP_ENABLE_MIDDLEBOX_COMPAT
        seen = self._options(pointer) == ctx.options
        ctx.options ^= ssl.OP_ENABLE_MIDDLEBOX_COMPAT
        if not seen:
            raise LibSSLUnavailable("the SSL_CTX of Python's SSLContext is not where expected")
        return pointer

    def ssl_pointer(self, sslobj: ssl.SSLObject, context_pointer: int) -> int | None:
        """The ``SSL *`` of a connection, if libssl confirms it belongs to ``context_pointer``."""
        inner = getattr(sslobj, "_sslobj", None)
        if inner is None:
            return None
        pointer = ctypes.c_void_p.from_address(id(inner) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)).value
        if not pointer or self._ssl_ctx(pointer) != context_pointer:
            return None
        return pointer

    # -- what the listeners set --------------------------------------------------------
    def set_ticket_keys(self, context_pointer: int, keys: bytes) -> None:
        if len(keys) != TICKET_KEYS_SIZE:
            raise ValueError(f"ticket keys are {TICKET_KEYS_SIZE} bytes, got {len(keys)}")
        if self._ctrl(context_pointer, _SET_TICKET_KEYS, len(keys), keys) != 1:
            raise LibSSLUnavailable("libssl refused the ticket keys")

    def ticket_keys(self, context_pointer: int) -> bytes:
        buffer = ctypes.create_string_buffer(TICKET_KEYS_SIZE)
        if self._ctrl(context_pointer, _GET_TICKET_KEYS, TICKET_KEYS_SIZE, buffer) != 1:
            raise LibSSLUnavailable("libssl did not give the ticket keys back")
        return buffer.raw

    def set_session_timeout(self, context_pointer: int, seconds: int) -> None:
        self._set_timeout(context_pointer, seconds)

    def disable_session_cache(self, context_pointer: int) -> None:
        self._ctrl(context_pointer, _SET_SESS_CACHE_MODE, 0, None)

    def tag_sessions(self, context_pointer: int) -> None:
        """Store a random id in every new session's tickets (kept on resumption)."""
        if self._ticket_cb(context_pointer, self._gen, None, None) != 1:
            raise LibSSLUnavailable("libssl refused the session ticket callback")

    def _tag_session(self, ssl_pointer: int | None, _arg: int | None) -> int:
        # Runs inside OpenSSL, as each ticket is made: a session that came
        # from a ticket already carries its tag (OpenSSL copies it into the
        # renewed session), a new one gets a fresh tag.
        session = self._get_session(ssl_pointer)
        if session and self._appdata(session) is None:
            self._set_appdata(session, os.urandom(SESSION_TAG_SIZE), SESSION_TAG_SIZE)
        return 1

    def _appdata(self, session: int) -> bytes | None:
        data = ctypes.c_void_p()
        size = ctypes.c_size_t()
        if self._get_appdata(session, ctypes.byref(data), ctypes.byref(size)) != 1 or not data.value:
            return None
        return ctypes.string_at(data.value, size.value) if size.value else None

    def session_tag(self, ssl_pointer: int) -> bytes | None:
        """The tag of the connection's session (None before a ticket was made)."""
        session = self._get_session(ssl_pointer)
        return self._appdata(session) if session else None


_instance: LibSSL | LibSSLUnavailable | None = None


def libssl() -> LibSSL:
    """The process's :class:`LibSSL`; raises :class:`LibSSLUnavailable` (always the same)."""
    global _instance
    if _instance is None:
        try:
            _instance = LibSSL()
        except (LibSSLUnavailable, OSError) as exc:
            _instance = exc if isinstance(exc, LibSSLUnavailable) else LibSSLUnavailable(str(exc))
    if isinstance(_instance, LibSSLUnavailable):
        raise _instance
    return _instance
