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
- ``flip``: invert the lowest bit of the byte at offset `after` of the client's stream;
- ``misreport-size``: in each 2xx answer to a HEAD request (from `after` on), change the Content-Length,
  the object's size, by `size_delta` (never below 0), as a caching gateway serving stale metadata does:
  a client checking what it stored sees a size other than the one it wrote. Only those digits change;
  every other byte passes as it came. To know which answer is a HEAD's, the proxy follows HTTP/1.1 on
  the connection: request heads and bodies (Content-Length or chunked) on the client's side, each
  request's method queued and paired in order with the answers (keep-alive without pipelining, as
  botocore does; a 1xx interim answer such as 100 Continue pairs with nothing). Only a header block is
  held until it is complete, at most 64 KiB; past that, or where a body runs to the end of the
  connection, the connection passes unchanged from then on and `unframed` counts it. `misreported`
  lists each (real, reported) size.

`connections` limits a fault to the first connections that reach `after`; the others pass, so the
requests that clean up after a failure (on fresh connections) still get through.

Everything is bounded: the proxy stops itself after `lifetime` seconds, every loop waits with a short
timeout and checks that, and leaving the `with` block stops it and closes every socket.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import ipaddress
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

Mode = Literal["pass", "refuse", "stall", "trickle", "reset", "flip", "misreport-size"]

_POLL = 0.05  # seconds: how long any wait may last before the stop flag is checked again
_BUFFER = 256 * 1024  # past this much unforwarded data a side is no longer read: backpressure, as a server
_RECV = 64 * 1024
# The longest HTTP header block (or chunk-size line) the misreport-size mode waits for: botocore's and
# versitygw's are a few KiB, so anything longer means the stream is not what the mode can follow.
_HEAD_LIMIT = 64 * 1024
# Requests a server may be behind on: without pipelining it is one, and one more whose head arrived
# while the answer to the previous one was still on its way.
_PENDING_LIMIT = 64


@dataclasses.dataclass(frozen=True)
class Fault:
    mode: Mode = "pass"
    after: int = 0
    direction: Literal["up", "down"] = "up"  # stall and trickle only: requests (up) or responses (down)
    connections: int | None = None  # None: every connection
    rate: float = 1.0  # trickle: bytes per second
    size_delta: int = -1  # misreport-size: added to the Content-Length of a HEAD's 2xx answer


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
        self.misreported: list[tuple[int, int]] = []  # misreport-size: (real, reported) Content-Length
        self.unframed = 0  # misreport-size: connections it stopped following (see the module docstring)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"{parts.scheme or 'http'}://127.0.0.1:{self.port}"

    def set_fault(self, fault: Fault) -> None:
        """Change the fault for connections accepted from now on."""
        with self._lock:
            self._fault = fault
            self.faulted = 0
            self.misreported = []
            self.unframed = 0

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
        self.exchange = _Exchange(self) if fault.mode == "misreport-size" else None

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
            if self.exchange is not None:
                self.down += self.exchange.responses.flush()  # a header block the server cut short
            return True
        if sock is self.upstream:
            self.down += self.exchange.responses.feed(data) if self.exchange is not None else data
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
        self.up += self.exchange.requests.feed(data) if self.exchange is not None else data
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


_Body = int | Literal["chunked", "to-close"]  # what follows a header block: a length in bytes, or how it ends

_CONTENT_LENGTH = re.compile(rb"^(content-length[ \t]*:[ \t]*)(\d+)", re.IGNORECASE | re.MULTILINE)
_CHUNKED = re.compile(rb"^transfer-encoding[ \t]*:[^\r\n]*chunked", re.IGNORECASE | re.MULTILINE)


class _Framing:
    """One direction of an HTTP/1.1 connection, split into messages as its bytes arrive.

    A header block is held until its blank line has arrived, then handed to `on_head`, which returns the
    bytes to forward in its place and what body follows; bodies are forwarded as they arrive, counted
    (Content-Length) or parsed (chunked) only to know where the next header block starts. Once lost (a
    header block or chunk-size line over _HEAD_LIMIT, or a body that runs to the end of the connection),
    everything is forwarded unchanged.
    """

    def __init__(self, on_head: Callable[[bytes], tuple[bytes, _Body]], on_lost: Callable[[], None]) -> None:
        self.on_head, self.on_lost = on_head, on_lost
        self.held = bytearray()  # the header block, chunk-size line or trailer line being received
        self.state: Literal["head", "body", "chunk-size", "chunk-data", "trailer", "lost"] = "head"
        self.left = 0  # bytes of the body, or of the chunk and its CRLF, still to come

    def feed(self, data: bytes | bytearray) -> bytearray:
        out = bytearray()
        view = memoryview(data)
        while view:
            if self.state == "lost":
                out += view
                break
            if self.state in ("body", "chunk-data"):
                take = min(self.left, len(view))
                out += view[:take]
                view = view[take:]
                self.left -= take
                if not self.left:
                    self.state = "head" if self.state == "body" else "chunk-size"
                continue
            view = self._take_held(view, out)
        return out

    def flush(self) -> bytearray:
        held, self.held = self.held, bytearray()
        return held

    def _take_held(self, view: memoryview, out: bytearray) -> memoryview:
        """Bytes into `held` until it is a whole header block (state head) or line; the rest of view.

        The ending's last byte is always in `view` (`held` had no whole ending before), so what follows
        the ending is the tail of `view`."""
        ending = b"\r\n\r\n" if self.state == "head" else b"\n"
        searched = max(0, len(self.held) - len(ending) + 1)
        self.held += view
        end = self.held.find(ending, searched)
        if end < 0:
            if len(self.held) > _HEAD_LIMIT:
                self._lose(out)
            return view[len(view) :]
        end += len(ending)
        rest = view[len(view) - (len(self.held) - end) :]
        unit = bytes(self.held[:end])
        self.held = bytearray()
        if self.state == "head":
            forwarded, body = self.on_head(unit)
            out += forwarded
            self._start_body(body, out)
            return rest
        out += unit
        if self.state == "trailer":
            if not unit.strip():
                self.state = "head"  # the blank line that ends a chunked message
            return rest
        try:
            size = int(unit.split(b";", 1)[0].strip(), 16)
        except ValueError:
            self._lose(out)
            return rest
        self.state, self.left = ("trailer", 0) if size == 0 else ("chunk-data", size + 2)
        return rest

    def _start_body(self, body: _Body, out: bytearray) -> None:
        if body == "chunked":
            self.state = "chunk-size"
        elif body == "to-close":
            self._lose(out)
        elif body:
            self.state, self.left = "body", body
        else:
            self.state = "head"

    def _lose(self, out: bytearray) -> None:
        out += self.flush()
        if self.state != "lost":
            self.state = "lost"
            self.on_lost()


class _Exchange:
    """misreport-size on one connection: requests and answers, paired in order.

    Once either direction is lost, so is the pairing: each direction passes unchanged from its next
    header block on (a block held at that moment is forwarded first, so nothing is reordered)."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe
        self.methods: collections.deque[bytes] = collections.deque()  # of requests not answered yet
        self.lost = False
        self.requests = _Framing(self._request, self._lose)
        self.responses = _Framing(self._response, self._lose)

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            with self.pipe.proxy._lock:
                self.pipe.proxy.unframed += 1

    def _request(self, head: bytes) -> tuple[bytes, _Body]:
        if self.lost or len(self.methods) >= _PENDING_LIMIT:
            return head, "to-close"
        self.methods.append(head.split(b" ", 1)[0])
        return head, _body_of(head)

    def _response(self, head: bytes) -> tuple[bytes, _Body]:
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = 0
        if self.lost or not 100 <= status < 600 or status == 101:
            return head, "to-close"
        if status < 200:
            return head, 0  # interim (100 Continue): the request's real answer follows
        method = self.methods.popleft() if self.methods else None
        if method == b"HEAD" or status in (204, 304):
            if method == b"HEAD" and status < 300 and self.pipe.faulty:
                head = self._misreport(head)
            return head, 0
        return head, _body_of(head)

    def _misreport(self, head: bytes) -> bytes:
        found = _CONTENT_LENGTH.search(head)
        if found is None:
            return head
        real = int(found.group(2))
        reported = max(0, real + self.pipe.fault.size_delta)
        with self.pipe.proxy._lock:
            self.pipe.proxy.misreported.append((real, reported))
        return head[: found.start(2)] + str(reported).encode() + head[found.end(2) :]


def _body_of(head: bytes) -> _Body:
    """The body after a request's head, or a response's other than a HEAD's, 1xx, 204 or 304."""
    if _CHUNKED.search(head):
        return "chunked"
    if (length := _CONTENT_LENGTH.search(head)) is not None:
        return int(length.group(2))
    # A request without either has no body; a response, one until the connection closes.
    return 0 if not head.startswith(b"HTTP/") else "to-close"


class _Reset(Exception):
    pass


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST rather than a FIN: SO_LINGER with a zero timeout."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
