"""A TCP proxy on loopback that misbehaves on purpose, for testing what a client does when S3 does.

    with FaultProxy(platform.s3_endpoint, Fault("stall", after=MiB)) as proxy:
        store = S3Store(S3Config(..., endpoint_url=proxy.url))

It listens on 127.0.0.1 (an ephemeral port) and forwards each connection to the upstream, which must be
on loopback too. A fault starts on a connection once its client has sent `after` bytes (counted from the
connection's first byte, across all requests on it), so that `after` can place a fault inside an upload's
body while the small requests before and after it (create, abort) pass:

- ``pass``: forward everything;
- ``refuse``: reset each connection as soon as it is accepted;
- ``stall``: stop forwarding past `after` (requests, or with direction="down" the responses that follow),
  keeping both connections open, as a hung server or a black-holing middlebox does;
- ``trickle``: forward at `rate` bytes per second past `after` (or the responses after it): every read
  returns something, so no per-read timeout ever fires;
- ``reset``: reset both connections once the client has sent `after` bytes;
- ``flip``: invert the lowest bit of the byte at offset `after` of the client's stream.

`connections` limits a fault to the first connections that reach `after`; the others pass, so the
requests that clean up after a failure (on fresh connections) still get through.

Everything is bounded: the proxy stops itself after `lifetime` seconds, every loop waits with a short
timeout and checks that, and leaving the `with` block stops it and closes every socket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

Mode = Literal["pass", "refuse", "stall", "trickle", "reset", "flip"]

_POLL = 0.05  # seconds: how long any wait may last before the stop flag is checked again
_BUFFER = 256 * 1024  # past this much unforwarded data a side is no longer read: backpressure, as a server
_RECV = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Fault:
    mode: Mode = "pass"
    after: int = 0
    direction: Literal["up", "down"] = "up"  # stall and trickle only: requests (up) or responses (down)
    connections: int | None = None  # None: every connection
    rate: float = 1.0  # trickle: bytes per second


class FaultProxy:
    def __init__(self, upstream_url: str, fault: Fault | None = None, *, lifetime: float = 300) -> None:
        parts = urlsplit(upstream_url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the fault proxy only forwards to loopback, not to {host}")
        self._upstream = (host, port)
        self._fault = fault or Fault()
        self._end = time.monotonic() + lifetime
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self.accepted = 0
        self.faulted = 0  # connections the fault was applied to
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"{parts.scheme or 'http'}://127.0.0.1:{self.port}"

    def set_fault(self, fault: Fault) -> None:
        """Change the fault for connections accepted from now on."""
        with self._lock:
            self._fault = fault
            self.faulted = 0

    def start(self) -> FaultProxy:
        self._spawn(self._accept_loop, "faultproxy-accept")
        return self

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=2)
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._end

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept_loop(self) -> None:
        while self._running():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._track(client)
            with self._lock:
                self.accepted += 1
                fault = self._fault
            if fault.mode == "refuse":
                _reset(client)
                continue
            self._spawn(self._serve, f"faultproxy-{self.accepted}", client, fault)

    def _claim(self, fault: Fault) -> bool:
        """Whether a connection that just reached `after` gets the fault."""
        with self._lock:
            if fault.connections is not None and self.faulted >= fault.connections:
                return False
            self.faulted += 1
            return True

    def _serve(self, client: socket.socket, fault: Fault) -> None:
        try:
            upstream = socket.create_connection(self._upstream, timeout=5)
        except OSError:
            _reset(client)
            return
        self._track(upstream)
        try:
            _Pipe(self, client, upstream, fault).run()
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()


class _Pipe:
    """One proxied connection, both directions, in one thread: a fault needs to see both at once."""

    def __init__(
        self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket, fault: Fault
    ) -> None:
        self.proxy, self.client, self.upstream, self.fault = proxy, client, upstream, fault
        self.up = bytearray()  # received from the client, not yet forwarded
        self.down = bytearray()  # received from the upstream, not yet forwarded
        self.received_up = 0  # bytes received from the client so far
        self.sent_up = 0
        self.faulty: bool | None = None  # decided once the client reaches `after`; None before
        self.triggered_at = 0.0
        self.sent_since = 0  # bytes forwarded in the faulty direction since the fault started
        self.closed: set[socket.socket] = set()  # sides that sent EOF

    @property
    def upstream_closed(self) -> bool:
        return self.upstream in self.closed

    def run(self) -> None:
        if self.fault.mode == "pass":
            self.faulty = False
        for sock in (self.client, self.upstream):
            sock.setblocking(False)
        while self.proxy._running():
            if self.upstream_closed and not self.down:
                return  # all that the upstream said before closing has been passed on
            pending = ((self.client, self.up), (self.upstream, self.down))
            readers = [s for s, buf in pending if len(buf) < _BUFFER and s not in self.closed]
            up_quota, down_quota = self._quota("up", len(self.up)), self._quota("down", len(self.down))
            writers = [s for s, n in ((self.upstream, up_quota), (self.client, down_quota)) if n > 0]
            try:
                readable, writable, _ = select.select(readers, writers, [], _POLL)
            except (OSError, ValueError):
                return
            try:
                for sock in readable:
                    if not self._receive(sock):
                        return
                if self.upstream in writable:
                    self.sent_up += self._send(self.upstream, self.up, up_quota, "up")
                if self.client in writable:
                    self._send(self.client, self.down, down_quota, "down")
            except _Reset:
                _reset(self.client)
                _reset(self.upstream)
                return
            except OSError:
                return

    def _receive(self, sock: socket.socket) -> bool:
        try:
            data = bytearray(sock.recv(_RECV))
        except BlockingIOError:
            return True
        if not data:
            if sock is self.client:
                return False  # nobody is left to answer
            self.closed.add(sock)
            return True
        if sock is self.upstream:
            self.down += data
            return True
        start = self.received_up
        self.received_up += len(data)
        if self.faulty is None and self.received_up >= self.fault.after:
            self.faulty = self.proxy._claim(self.fault)
            self.triggered_at = time.monotonic()
        if self.faulty and self.fault.mode == "reset":
            raise _Reset
        if self.faulty and self.fault.mode == "flip" and start <= self.fault.after < self.received_up:
            data[self.fault.after - start] ^= 0x01
        self.up += data
        return True

    def _quota(self, direction: str, pending: int) -> int:
        """How many pending bytes may be forwarded in this direction now."""
        fault = self.fault
        if not self.faulty or fault.mode not in ("stall", "trickle") or fault.direction != direction:
            return pending
        # Requests are held back from the exact offset `after`; responses from the moment it was reached.
        before = max(0, fault.after - self.sent_up) if direction == "up" else 0
        if fault.mode == "stall":
            return min(pending, before)
        allowed = int((time.monotonic() - self.triggered_at) * fault.rate) + 1 - self.sent_since
        return min(pending, before + max(0, allowed))

    def _send(self, sock: socket.socket, buffer: bytearray, quota: int, direction: str) -> int:
        try:
            sent = sock.send(memoryview(buffer)[:quota])
        except BlockingIOError:
            return 0
        del buffer[:sent]
        fault = self.fault
        if self.faulty and fault.mode == "trickle" and fault.direction == direction:
            already = max(0, fault.after - self.sent_up) if direction == "up" else 0
            self.sent_since += max(0, sent - already)
        return sent


class _Reset(Exception):
    pass


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST rather than a FIN: SO_LINGER with a zero timeout."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
