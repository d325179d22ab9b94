"""A bare HTTP/1.1 relay: h11 on both sides, on Twisted; the yardstick for nlbproxy.

Each client connection gets its own keep-alive connection to the one backend.
Requests and responses are re-framed by h11 (so framing is correct whatever
the peers send: content-length, chunked, read-until-close, pipelining), and
nothing else is done: no routing, no header rewriting, no timeouts.  This is
the least any h11-on-Twisted proxy must do, so nlbproxy should not be slower.

Flow control: each side's transport is paused for a set of reasons, and
reading resumes only when the set is empty.  "peer-full" comes from the other
side's transport (its write buffer is over its limit, so it pauses us as its
producer); "h11" is set when h11 holds bytes of a pipelined request that must
wait for the current response (so at most one read's worth is buffered); "connecting" while the backend connection is
being opened.

    python bench/h11_relay.py --port 8080 --backend 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
from typing import Any, cast

import h11
from twisted.internet import endpoints, protocol, reactor
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

MAX_HEADER_BYTES = 16 * 1024
_FINISHED = frozenset({h11.DONE, h11.MUST_CLOSE, h11.CLOSED})


class _Side(protocol.Protocol):
    """One h11 connection and its transport's pause reasons."""

    #: a TCP transport: ITransport, IConsumer and IPushProducer
    transport: Any
    peer: _Side | None = None

    def __init__(self, role: type[h11.SERVER] | type[h11.CLIENT]) -> None:
        self.h11 = h11.Connection(role, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.reasons: set[str] = set()
        self.closed = False

    def pause(self, reason: str) -> None:
        if not self.reasons and not self.closed:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons and not self.closed:
                self.transport.resumeProducing()

    def send(self, event: h11.Event) -> None:
        if self.closed or self.h11.our_state is h11.ERROR:
            return
        data = self.h11.send(event)
        if data:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self.pump()

    def connectionLost(self, reason: object = None) -> None:
        self.closed = True
        if self.h11.their_state is not h11.ERROR:
            self.h11.receive_data(b"")
            self.pump()
        if self.peer is not None:
            self.peer.peer_lost()

    def pump(self) -> None:
        raise NotImplementedError

    def peer_lost(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        # A transport with a producer registered waits for it before closing.
        if not self.closed:
            self.transport.unregisterProducer()
            self.transport.loseConnection()


@implementer(IPushProducer)
class _PeerReading:
    """Registered as producer on one side's transport; pauses the other side's reading."""

    def __init__(self, side: _Side) -> None:
        self.side = side

    def pauseProducing(self) -> None:
        self.side.pause("peer-full")

    def resumeProducing(self) -> None:
        self.side.resume("peer-full")

    def stopProducing(self) -> None:
        self.side.close()


class ClientSide(_Side):
    def __init__(self, backend: endpoints.TCP4ClientEndpoint, backend_host: bytes) -> None:
        super().__init__(h11.SERVER)
        self.backend_endpoint = backend
        self.backend_host = backend_host
        self.peer: BackendSide | None = None

    def connectionMade(self) -> None:
        self.pause("connecting")
        d = endpoints.connectProtocol(self.backend_endpoint, BackendSide(self))
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, backend: BackendSide) -> None:
        if self.closed:
            backend.close()
            return
        self.peer = backend
        self.transport.registerProducer(_PeerReading(backend), True)
        backend.transport.registerProducer(_PeerReading(self), True)
        self.resume("connecting")
        self.pump()

    def _connect_failed(self, _failure: object) -> None:
        self.error_response(502)

    def pump(self) -> None:
        while self.peer is not None and not self.closed:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                self.error_response(e.error_status_hint)
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                # h11 says PAUSED after every complete request; stop reading only
                # when it actually holds bytes of a pipelined next request.
                if self.h11.trailing_data[0]:
                    self.pause("h11")
                return
            if isinstance(event, h11.Request):
                headers = list(event.headers)
                if not any(name == b"host" for name, _ in headers):
                    headers.append((b"host", self.backend_host))  # HTTP/1.0 may omit it
                self.peer.send(h11.Request(method=event.method, target=event.target,
                                           headers=headers))
            elif isinstance(event, (h11.Data, h11.EndOfMessage)):
                self.peer.send(event)
                if isinstance(event, h11.EndOfMessage):
                    self.cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self.peer.close()
                return

    def relay_response(self, event: h11.Event) -> None:
        if isinstance(event, h11.Response):
            self.send(h11.Response(status_code=event.status_code, headers=event.headers,
                                   reason=event.reason))
        elif isinstance(event, h11.InformationalResponse):
            self.send(h11.InformationalResponse(status_code=event.status_code,
                                                headers=event.headers, reason=event.reason))
        else:
            self.send(event)
            if isinstance(event, h11.EndOfMessage):
                self.cycle()

    def cycle(self) -> None:
        """Once both exchanges are over, start the next on both sides, or close both."""
        backend = self.peer
        assert backend is not None
        states = [*self.h11.states.values(), *backend.h11.states.values()]
        if not all(state in _FINISHED for state in states):
            return  # a message is still under way in some direction
        if any(state is not h11.DONE for state in states):
            self.close()
            backend.close()
            return
        self.h11.start_next_cycle()
        backend.h11.start_next_cycle()
        self.resume("h11")
        self.pump()

    def error_response(self, status: int) -> None:
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                self.send(h11.Response(status_code=status,
                                       headers=[("content-length", "0"),
                                                ("connection", "close")]))
                self.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                pass
        self.close()
        if self.peer is not None:
            self.peer.close()

    def peer_lost(self) -> None:
        # The backend went away: 502 if a request awaits its response, else just close
        # (an idle client gets no unsolicited response, a started one is cut short).
        if self.h11.our_state is h11.SEND_RESPONSE:
            self.error_response(502)
        else:
            self.close()


class BackendSide(_Side):
    def __init__(self, client: ClientSide) -> None:
        super().__init__(h11.CLIENT)
        self.client = client

    def connectionMade(self) -> None:
        self.peer = self.client

    def pump(self) -> None:
        # Runs after connectionLost too: a read-until-close body ends there.
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                self.client.error_response(502)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            self.client.relay_response(cast(h11.Event, event))

    def peer_lost(self) -> None:
        self.close()


class RelayFactory(protocol.Factory):
    def __init__(self, host: str, port: int) -> None:
        self.backend = endpoints.TCP4ClientEndpoint(reactor, host, port)
        self.host_header = f"{host}:{port}".encode()

    def buildProtocol(self, addr: object) -> ClientSide:
        return ClientSide(self.backend, self.host_header)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    ap.add_argument("--backend", required=True, help="backend as HOST:PORT")
    args = ap.parse_args(argv)
    host, port = args.backend.rsplit(":", 1)
    endpoints.serverFromString(reactor, f"tcp:{args.port}:interface=127.0.0.1:backlog=4096") \
        .listen(RelayFactory(host, int(port)))
    reactor.run()


if __name__ == "__main__":
    main()
