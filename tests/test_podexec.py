"""What podexec relies on inside the kubernetes client: a client upgrade that changes it fails here first.

open_exec_websocket binds the client's websocket request function into an ApiClient of its own instead of
calling stream(), which swaps the shared client's request (not thread-safe) and keeps a copy of all
output. That leans on three details of the client; each is checked here without a server, and the
platform tests (tests/test_concurrency.py) run the real thing.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from kubernetes import client
from kubernetes.stream import ws_client

from idm_backup_operator.kube import podexec
from idm_backup_operator.kube.podexec import PodRef


def test_websocket_call_takes_the_arguments_podexec_binds() -> None:
    assert list(inspect.signature(ws_client.websocket_call).parameters)[:3] == [
        "configuration",
        "_method",
        "url",
    ]
    # capture_all and binary are read from its keyword arguments and handed to WSClient.
    source = inspect.getsource(ws_client.websocket_call)
    assert 'kwargs.get("capture_all"' in source and "kwargs.get('binary'" in source
    assert {"capture_all", "binary"} <= set(inspect.signature(ws_client.WSClient.__init__).parameters)


def test_the_generated_exec_method_hands_back_what_the_clients_request_returned() -> None:
    """With _preload_content=False the generated method returns the request function's result as is:
    that is how the websocket reaches podexec. Recorded here with a stand-in request function (this
    checks the client's plumbing, not a fault)."""
    calls: list[tuple[Any, ...]] = []
    sentinel = object()

    def request(*args: Any, **kwargs: Any) -> object:
        calls.append((args, kwargs))
        return sentinel

    configuration = client.Configuration()
    configuration.host = "https://127.0.0.1:6443"
    own = client.ApiClient(configuration)
    own.request = request
    out = client.CoreV1Api(own).connect_get_namespaced_pod_exec(
        "pod",
        "ns",
        container="c",
        command=["cat", "x"],
        stdin=False,
        stdout=True,
        stderr=True,
        tty=False,
        _preload_content=False,
    )
    assert out is sentinel
    (method, url), kwargs = calls[0]
    assert method == "GET" and url == "https://127.0.0.1:6443/api/v1/namespaces/ns/pods/pod/exec"
    # A list: websocket_call's get_websocket_url repeats the parameter for each word, as exec needs.
    assert ("command", ["cat", "x"]) in kwargs["query_params"]
    assert kwargs["_preload_content"] is False


def test_open_exec_websocket_never_touches_a_shared_client(monkeypatch: Any) -> None:
    opened: list[dict[str, Any]] = []

    def websocket_call(configuration: Any, method: str, url: str, **kwargs: Any) -> str:
        opened.append({"configuration": configuration, "url": url, **kwargs})
        return "websocket"

    monkeypatch.setattr(podexec, "websocket_call", websocket_call)
    shared = client.ApiClient(client.Configuration())
    ws = podexec.open_exec_websocket(shared.configuration, PodRef("ns", "pod", "c"), ["true"], stdin=False)
    assert ws == "websocket"
    assert opened[0]["configuration"] is shared.configuration
    assert opened[0]["capture_all"] is False and opened[0]["binary"] is True
    assert "request" not in vars(shared)


class _Frames:
    """A websocket that delivers scripted stderr frames, then the exit status (parsing only, no fault)."""

    def __init__(self, stderr_frames: list[bytes]) -> None:
        self._frames = list(stderr_frames)
        self._current: dict[int, bytes] = {}
        self._open = True

    def update(self, timeout: float) -> None:
        if self._frames:
            self._current = {ws_client.STDERR_CHANNEL: self._frames.pop(0)}
        else:
            self._current = {ws_client.ERROR_CHANNEL: b'{"status": "Success"}'}
            self._open = False

    def read_channel(self, channel: int) -> bytes:
        return self._current.pop(channel, b"")

    def is_open(self) -> bool:
        return self._open

    def close(self) -> None:
        self._open = False


def test_stderr_lines_are_assembled_across_frames_and_delivered_as_they_end() -> None:
    seen: list[str] = []
    session = podexec.Session(_Frames([b"one\ntw", b"o\n", b"", b"three"]), None, seen.append)
    result = session.finish()
    assert seen == ["one", "two", "three"]
    assert (result.exit_code, result.stderr) == (0, "one\ntwo\nthree")


def test_a_line_without_end_is_cut_and_what_is_kept_is_bounded() -> None:
    # 64 MiB without a newline, in 64 KiB frames: joined by concatenation this took minutes of CPU.
    frames = [b"x" * (64 << 10)] * 1024 + [b"\n" + b"short\n" * 100_000]
    seen: list[str] = []
    started = time.process_time()
    result = podexec.Session(_Frames(frames), None, seen.append).finish()
    assert time.process_time() - started < 10
    assert seen[0] == "x" * podexec.MAX_LINE + f" [line cut at {podexec.MAX_LINE} bytes]"
    assert len(seen) == 100_001
    assert len(result.stderr) <= podexec.MAX_KEPT_STDERR + 100
    first, *rest = result.stderr.splitlines()
    assert first.startswith("[") and first.endswith("earlier lines not kept]") and rest[-1] == "short"


def _as_the_client_raises_it(reason: str) -> AttributeError:
    """websocket_call's ApiException(status=0), as the generated client turns it into an AttributeError."""
    try:
        try:
            raise client.ApiException(status=0, reason=reason)
        except client.ApiException as err:
            err.body.decode("utf-8")  # what the client does: the body is None
    except AttributeError as failure:
        return failure
    raise AssertionError("unreachable")


def test_a_failed_exec_handshake_is_told_apart_from_no_connection() -> None:
    pod = PodRef("ns", "pod", "c")
    refused = podexec._open_failure(pod, _as_the_client_raises_it("Handshake status 403 Forbidden"))
    assert type(refused) is podexec.ExecError and "needs get and create on pods/exec" in str(refused)
    for reason in ("[Errno 111] Connection refused", "Handshake status 503 Service Unavailable"):
        lost = podexec._open_failure(pod, _as_the_client_raises_it(reason))
        assert isinstance(lost, podexec.ExecLost) and "cannot reach the API server" in str(lost), reason


def test_a_gone_pod_is_named_as_such_and_no_response_headers_are_quoted() -> None:
    """The handshake's reason goes on with the response's headers (audit ids, cache headers); a 404 is a
    pod that was deleted, not missing RBAC."""
    pod = PodRef("ns", "pod", "c")
    headers = "Handshake status 404 Not Found\n-+-+- {'audit-id': '0c9b', 'cache-control': 'no-cache'} -+-+-"
    gone = podexec._open_failure(pod, _as_the_client_raises_it(headers))
    assert type(gone) is podexec.ExecError
    assert str(gone) == "pod ns/pod (container c) was not found (it was deleted, or its container is gone)"
    other = podexec._open_failure(
        pod, _as_the_client_raises_it(headers.replace("404 Not Found", "400 Bad Request"))
    )
    assert (
        str(other)
        == "the API server refused exec into pod ns/pod (container c): Handshake status 400 Bad Request"
    )
