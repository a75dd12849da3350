"""What podexec relies on inside the kubernetes client: a client upgrade that changes it fails here first.

open_exec_websocket binds the client's websocket request function into an ApiClient of its own instead of
calling stream(), which swaps the shared client's request (not thread-safe) and keeps a copy of all
output. That leans on three details of the client; each is checked here without a server, and the
platform tests (tests/test_concurrency.py) run the real thing.
"""

from __future__ import annotations

import inspect
from typing import Any

from kubernetes import client
from kubernetes.stream import ws_client

from idm_backup_operator import podexec
from idm_backup_operator.podexec import PodRef


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
