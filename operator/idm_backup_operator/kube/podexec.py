"""Running commands in a pod through the API server's exec endpoint, the way `kubectl exec` does.

Stdout can be streamed: it is handed over frame by frame, never accumulated, so a multi-GiB archive
passes through in constant memory. Stderr is delivered line by line while the command runs, so callers
can follow ipa-backup's progress. The exit status arrives as a number, not as an exception.
"""

from __future__ import annotations

import collections
import functools
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from kubernetes import client
from kubernetes.stream.ws_client import ERROR_CHANNEL, STDERR_CHANNEL, STDOUT_CHANNEL, websocket_call
from websocket import WebSocketException

# How long one wait for a frame may block before the deadline is checked again.
_POLL_SECONDS = 1.0
# What is kept of a command's stderr: the last lines, up to this many bytes, each line at most this long.
# A pod is not trusted input: a command that prints gigabytes without a newline must not fill memory.
MAX_KEPT_STDERR = 256 << 10
MAX_LINE = 16 << 10


class ExecError(RuntimeError):
    """The command could not be run, or did not finish in time; not a non-zero exit status."""


class ExecCancelled(ExecError):
    """The caller's should_stop said so; the command may still run in the pod."""


class ExecTimeout(ExecError):
    """The command did not finish before its deadline; it may still run in the pod."""


class ExecLost(ExecError):
    """The connection broke (API server or node restarted, network) before the command's end was known.

    The command may still run in the pod, or have died with its stream: the caller must find out.
    """


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: str

    def check(self, what: str) -> ExecResult:
        if self.exit_code != 0:
            detail = self.stderr.strip().splitlines()[-1:] or [f"exit code {self.exit_code}"]
            raise ExecError(f"{what} failed in the pod: {detail[0]}")
        return self


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    container: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} (container {self.container})"


def _exit_code(status_text: str) -> int:
    """Translate the API server's v1 Status on the error channel into an exit code."""
    status = yaml.safe_load(status_text) if status_text else None
    if not isinstance(status, dict):
        raise ExecLost("the exec connection closed without reporting how the command ended")
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            return int(cause["message"])
    raise ExecError(f"exec failed: {status.get('message') or status}")


class Session:
    """One exec'd command: read its stdout in chunks, see its stderr in lines, then its exit code."""

    def __init__(
        self,
        ws: Any,
        deadline: float | None,
        on_stderr_line: Callable[[str], None] | None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self._ws = ws
        self._deadline = deadline
        self._on_line = on_stderr_line
        self._should_stop = should_stop
        self._partial = bytearray()
        self._partial_cut = False
        self._stderr: collections.deque[str] = collections.deque()
        self._stderr_kept = 0
        self._stderr_dropped = 0
        self._error_channel = b""
        self.keep_stdout = 0
        self.stdout = bytearray()

    def _pump(self, wait: float = _POLL_SECONDS) -> bytes:
        """Wait up to `wait` seconds for the next frame; return stdout bytes it carried (possibly none)."""
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise ExecTimeout("the command did not finish before its deadline")
        if self._should_stop is not None and self._should_stop():
            raise ExecCancelled("stopped waiting for the command: its caller was cancelled")
        timeout = wait
        if self._deadline is not None:
            timeout = max(0.0, min(timeout, self._deadline - time.monotonic()))
        # read_channel reads the socket again (the client's peek_channel calls update): a connection that
        # breaks there is as lost as one that breaks in update.
        try:
            self._ws.update(timeout=timeout)
            out = self._ws.read_channel(STDOUT_CHANNEL)
            err = self._ws.read_channel(STDERR_CHANNEL)
            status = self._ws.read_channel(ERROR_CHANNEL)
        except (WebSocketException, OSError) as broken:
            raise ExecLost(f"the exec connection was lost: {type(broken).__name__}: {broken}") from None
        if err:
            self._take_stderr(err)
        if status:
            self._error_channel += status
        return bytes(out)

    def _take_stderr(self, data: bytes) -> None:
        # Linear in the output: each frame is scanned once, and a line is joined only when it ends.
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            self._extend_line(data[start:end])
            self._end_line()
            start = end + 1
        self._extend_line(data[start:])

    def _extend_line(self, piece: bytes) -> None:
        room = MAX_LINE - len(self._partial)
        self._partial += piece[: max(room, 0)]
        self._partial_cut = self._partial_cut or len(piece) > room

    def _end_line(self) -> None:
        line = self._partial.decode("utf-8", "replace")
        if self._partial_cut:
            line += f" [line cut at {MAX_LINE} bytes]"
        self._partial, self._partial_cut = bytearray(), False
        self._stderr.append(line)
        self._stderr_kept += len(line) + 1  # and the newline that will join it to the next
        while self._stderr_kept > MAX_KEPT_STDERR and len(self._stderr) > 1:
            self._stderr_kept -= len(self._stderr.popleft()) + 1
            self._stderr_dropped += 1
        if self._on_line is not None:
            self._on_line(line)

    def send(self, data: bytes) -> bool:
        """Write to the command's stdin; False when the command is gone (it exited, or closed its stdin), so
        the caller stops sending and asks `finish` how it ended. What it printed meanwhile is read first:
        a command writing to a full stderr pipe would otherwise never read its stdin again."""
        self.take_stdout(self._pump(wait=0))
        if not self._ws.is_open():
            return False
        try:
            self._ws.write_stdin(data)
        except (WebSocketException, OSError):
            return False
        return True

    def take_stdout(self, data: bytes) -> None:
        """Stdout that arrives while stdin is fed: kept up to `keep_stdout` bytes (a checksum, a verdict)."""
        room = self.keep_stdout - len(self.stdout)
        if data and room > 0:
            self.stdout += data[:room]

    def stdout_chunks(self) -> Iterator[bytes]:
        while self._ws.is_open():
            chunk = self._pump()
            if chunk:
                yield chunk

    def finish(self) -> ExecResult:
        """Drain what is left, and return the exit status; stdout is discarded."""
        for _ in self.stdout_chunks():
            pass
        return self.result(b"")

    def result(self, stdout: bytes) -> ExecResult:
        if self._partial or self._partial_cut:
            self._end_line()
        dropped = [f"[{self._stderr_dropped} earlier lines not kept]"] if self._stderr_dropped else []
        stderr = "\n".join([*dropped, *self._stderr])
        return ExecResult(_exit_code(self._error_channel.decode()), stdout, stderr)

    def close(self) -> None:
        self._ws.close()


_HANDSHAKE_STATUS = re.compile(r"Handshake status (\d{3})")
_PASSING = {429, 500, 502, 503, 504}


def _open_failure(pod: PodRef, err: BaseException) -> ExecError:
    """What a failed exec handshake was: the API server saying no, or no connection at all.

    websocket_call reports both as an ApiException with status 0, and the generated client then fails on
    its missing body (`e.body.decode`) with an AttributeError whose context is that ApiException.
    """
    cause = err if isinstance(err, client.ApiException) else err.__context__
    reason = str(getattr(cause, "reason", None) or err)
    handshake = _HANDSHAKE_STATUS.search(reason)
    # No handshake at all, or an API server that is starting or overloaded: it may work in a moment.
    if isinstance(cause, client.ApiException) and (handshake is None or int(handshake[1]) in _PASSING):
        return ExecLost(f"cannot reach the API server to exec in pod {pod}: {reason.splitlines()[0]}")
    # The reason continues with the response's headers (audit ids and the like): the status says it all.
    status = int(handshake[1]) if handshake else None
    if status == 404:
        return ExecError(f"pod {pod} was not found (it was deleted, or its container is gone)")
    if status in (401, 403):
        return ExecError(
            f"the API server refused exec into pod {pod} ({status}); "
            "the operator needs get and create on pods/exec there"
        )
    return ExecError(f"the API server refused exec into pod {pod}: {reason.splitlines()[0]}")


def open_exec_websocket(
    configuration: client.Configuration, pod: PodRef, argv: Sequence[str], *, stdin: bool
) -> Any:
    """The one place that opens an exec websocket: on an API client of its own, used for nothing else.

    kubernetes.stream.stream() opens the websocket by swapping the *shared* ApiClient.request for a
    websocket request and back; two threads doing so at once leave the shared client swapped, and every
    plain API call on it (Lease renewals, status patches) then fails. A client per session has nothing to
    swap back and nothing shared, and costs about 0.04 ms against a handshake of milliseconds
    (benchmarks/concurrent.md). stream() also keeps a copy of all output (capture_all), which a multi-GiB
    archive cannot afford, and the generated method refuses unknown arguments: so the request function is
    bound here, with capture_all off. tests/test_podexec.py fails loudly if a client upgrade changes the
    parts of the client this relies on.
    """
    with client.ApiClient(configuration) as own:
        own.request = functools.partial(websocket_call, configuration, binary=True, capture_all=False)
        return client.CoreV1Api(own).connect_get_namespaced_pod_exec(
            pod.name,
            pod.namespace,
            container=pod.container,
            command=list(argv),
            stdin=stdin,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
        )


class PodExec:
    """Exec in pods; blocking, to be called from a worker thread. Every session has its own connection."""

    def __init__(self, api: client.ApiClient) -> None:
        self._configuration = api.configuration

    def open(
        self,
        pod: PodRef,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        on_stderr_line: Callable[[str], None] | None = None,
        stdin: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> Session:
        try:
            ws = open_exec_websocket(self._configuration, pod, argv, stdin=stdin)
        except (client.ApiException, AttributeError) as err:
            raise _open_failure(pod, err) from None
        deadline = None if timeout is None else time.monotonic() + timeout
        return Session(ws, deadline, on_stderr_line, should_stop)

    def run(
        self,
        pod: PodRef,
        argv: Sequence[str],
        *,
        timeout: float | None = 120,
        on_stderr_line: Callable[[str], None] | None = None,
        max_stdout: int = 1 << 20,
    ) -> ExecResult:
        """Run to completion and keep stdout, which must be small (files such as a header)."""
        session = self.open(pod, argv, timeout=timeout, on_stderr_line=on_stderr_line)
        try:
            out = bytearray()
            for chunk in session.stdout_chunks():
                out += chunk
                if len(out) > max_stdout:
                    raise ExecError(f"{argv[0]} printed more than {max_stdout} bytes")
            return session.result(bytes(out))
        finally:
            session.close()

    def feed(
        self,
        pod: PodRef,
        argv: Sequence[str],
        chunks: Iterator[bytes],
        *,
        timeout: float | None = None,
        on_stderr_line: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        keep_stdout: int = 0,
    ) -> ExecResult:
        """Run the command with `chunks` on its stdin, in constant memory; the first `keep_stdout` bytes of
        its stdout are kept, the rest discarded. The command must know where its input ends (`head -c N`, a
        prompt it reads): exec over the v4 protocol cannot close stdin. Sending stops early when the command
        exits (a full disk, a refusal): its status and stderr say why."""
        session = self.open(
            pod, argv, timeout=timeout, on_stderr_line=on_stderr_line, stdin=True, should_stop=should_stop
        )
        session.keep_stdout = keep_stdout
        try:
            for chunk in chunks:
                if not session.send(chunk):
                    break
            for rest in session.stdout_chunks():
                session.take_stdout(rest)
            return session.result(bytes(session.stdout))
        finally:
            session.close()

    def stream_stdout(
        self,
        pod: PodRef,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[bytes]:
        """Yield the command's stdout as it arrives; raise ExecError unless it then exits 0."""
        session = self.open(pod, argv, timeout=timeout, should_stop=should_stop)
        try:
            yield from session.stdout_chunks()
            session.result(b"").check(" ".join(argv))
        finally:
            session.close()
