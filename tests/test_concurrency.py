"""Many backups at once, as schedules that all fire at 02:00 make them: on the real platform.

One backup at a time hides races. These tests run execs and whole backups of different FreeIPA servers
simultaneously and check every result independently of the operator's own code.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.stream.ws_client import _IgnoredIO

from idm_backup_operator.kube.podexec import PodExec, PodRef
from testbed import freeipa_pod, stack
from testbed.deploy import OperatorProcess
from testbed.ldap_server import ALL_ROLES, HIDDEN, Server
from tests.helpers import (
    backup_spec,
    create_backup,
    get_backup,
    leases,
    pod_exec,
    pod_ready,
    s3_keys,
    s3_storage,
    wait_finished,
    wait_for,
)

pytestmark = pytest.mark.platform

# Enough to keep eight transfers in flight together, small enough for a 2-core machine.
PAYLOAD_BYTES = 6 << 20


def test_simultaneous_execs_leave_the_shared_api_client_alone(
    api: client.ApiClient, namespace: str, freeipa: Callable[..., str]
) -> None:
    """The kubernetes client's stream() swaps the shared ApiClient.request while it opens a websocket;
    with two threads that left it swapped, and every plain API call then failed (issue 12)."""
    pod = PodRef(namespace, freeipa(), "freeipa-server")
    execs = PodExec(api)
    core = client.CoreV1Api(api)
    stop = threading.Event()
    plain_calls: list[str] = []

    def plain_reads() -> None:
        # Lease renewals and status patches do this while backups exec: it must keep working.
        while not stop.is_set():
            plain_calls.append(core.read_namespaced_pod(pod.name, namespace).metadata.name)

    def exec_rounds(rounds: int) -> list[bytes]:
        return [
            execs.run(pod, ["cat", "/etc/ipa/default.conf"], timeout=60).check("cat").stdout
            for _ in range(rounds)
        ]

    reader = threading.Thread(target=plain_reads)
    reader.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            outputs = [out for results in pool.map(exec_rounds, [6] * 8) for out in results]
    finally:
        stop.set()
        reader.join()
    assert len(outputs) == 48 and all(b"host = ipa-hidden.example.test" in out for out in outputs)
    assert plain_calls and set(plain_calls) == {pod.name}
    # stream() (the test helpers use it) restores a bound method as an instance attribute: what counts is
    # that it is ApiClient.request again, not a websocket request.
    assert getattr(api.request, "__func__", None) is client.ApiClient.request, "the shared client is swapped"


def test_a_streamed_exec_keeps_no_copy_of_its_output(
    api: client.ApiClient, namespace: str, freeipa: Callable[..., str]
) -> None:
    pod = PodRef(namespace, freeipa(), "freeipa-server")
    session = PodExec(api).open(pod, ["head", "-c", str(4 << 20), "/dev/zero"], timeout=60)
    try:
        received = sum(len(chunk) for chunk in session.stdout_chunks())
        assert session.result(b"").exit_code == 0
        # capture_all off: the client's copy of everything is a sink, not a growing buffer.
        assert isinstance(session._ws._all, _IgnoredIO)
    finally:
        session.close()
    assert received == 4 << 20


# -- eight backups of eight servers at once ----------------------------------------------------------------


@pytest.fixture
def many_servers(
    api: client.ApiClient, namespace: str, platform: stack.Platform
) -> Iterator[Callable[[int], list[str]]]:
    """N more hidden replicas in the real 389-ds topology, each with a ready stand-in pod; pod names."""
    with stack.directory().more_servers([Server(f"hr{i}", HIDDEN, ALL_ROLES) for i in range(1, 21)]) as hosts:

        def create(count: int) -> list[str]:
            client.CoreV1Api(api).create_namespaced_secret(
                namespace, freeipa_pod.dm_password_secret(platform.ldap_password)
            )
            pods = [host.split(".", 1)[0] for host in hosts[:count]]
            for pod, host in zip(pods, hosts, strict=False):
                core = client.CoreV1Api(api)
                core.create_namespaced_persistent_volume_claim(
                    namespace, freeipa_pod.data_claim(f"{pod}-data")
                )
                core.create_namespaced_pod(
                    namespace,
                    freeipa_pod.freeipa_pod(pod, host, platform.ldap_uri, payload_bytes=PAYLOAD_BYTES),
                )
            wait_for(
                f"{count} FreeIPA pods ready",
                lambda: all(pod_ready(api, namespace, pod) for pod in pods),
                timeout=180,
                interval=1,
            )
            return pods

        yield create


@pytest.fixture
def operator_with_slots(
    platform: stack.Platform, namespace: str, crds: None, tmp_path: Path
) -> Iterator[Callable[[int], OperatorProcess]]:
    """The real operator for the test's namespace, with --max-concurrent-backups set; stopped afterwards."""
    started: list[OperatorProcess] = []

    def start(slots: int) -> OperatorProcess:
        proc = OperatorProcess(
            namespace, platform.kubeconfig, tmp_path, tmp_path / "operator.log",
            args=["--max-concurrent-backups", str(slots)],
        )  # fmt: skip
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _back_up_each(
    api: client.ApiClient, namespace: str, platform: stack.Platform, pods: list[str], prefix: str
) -> None:
    for pod in pods:
        spec = backup_spec(platform, s3_storage(platform, prefix), type="Data", target={"podName": pod})
        create_backup(api, namespace, pod, spec)


def test_eight_backups_of_eight_servers_applied_at_once_all_succeed(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    many_servers: Callable[[int], list[str]],
    operator_with_slots: Callable[[int], OperatorProcess],
    secrets: None,
    s3: Any,
) -> None:
    pods = many_servers(8)
    # The default limit would queue half of them: eight slots let all eight run, and race, at once.
    operator = operator_with_slots(8)
    prefix = f"concurrent/{namespace}"
    _back_up_each(api, namespace, platform, pods, prefix)
    results = {pod: wait_finished(api, namespace, pod, operator, timeout=300) for pod in pods}
    log = operator.output()
    failed = {
        pod: obj["status"].get("message")
        for pod, obj in results.items()
        if obj["status"]["phase"] != "Succeeded"
    }
    assert not failed, f"{failed}\n{log[-4000:]}"
    # They ran together, not one after another: every backup started before the first one finished.
    starts = [results[pod]["status"]["startTime"] for pod in pods]
    ends = [results[pod]["status"]["completionTime"] for pod in pods]
    assert max(starts) <= min(ends), (starts, ends)
    for pod, obj in results.items():
        archive = obj["status"]["archive"]
        key = archive["uri"].removeprefix(f"s3://{platform.s3_bucket}/")
        # Each archive checked with plain boto3, not with the operator's code: the stored bytes hash to
        # what the status says, and each server's archive is its own.
        digest = hashlib.sha256(s3.get_object(Bucket=platform.s3_bucket, Key=key)["Body"].read())
        assert digest.hexdigest() == archive["sha256"], pod
        assert f"/{pod}.example.test/" in key
        assert archive["plaintextSizeBytes"] > PAYLOAD_BYTES
        code, out = pod_exec(api, namespace, pod, ["ipactl", "status"])
        assert code == 0, out
    assert len(s3_keys(s3, platform.s3_bucket, prefix)) == 3 * len(pods)
    # No handler was retried, nothing failed unexpectedly, and no server's lock outlived its backup.
    assert "Traceback" not in log and "will retry" not in log.lower() and "WebSocket" not in log
    assert leases(api, namespace) == []


def test_backups_beyond_the_limit_wait_visibly_and_all_run(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    many_servers: Callable[[int], list[str]],
    operator_with_slots: Callable[[int], OperatorProcess],
    secrets: None,
) -> None:
    pods = many_servers(4)
    operator = operator_with_slots(2)
    _back_up_each(api, namespace, platform, pods, f"queue/{namespace}")

    def queued() -> list[dict[str, Any]]:
        statuses = [get_backup(api, namespace, pod).get("status") or {} for pod in pods]
        return [s for s in statuses if s.get("step") == "waiting for a backup slot"]

    waiting = wait_for("two backups queued for a slot", lambda: len(queued()) == 2 and queued(), timeout=60)
    for status in waiting:
        assert status["phase"] == "Pending"
        condition = next(c for c in status["conditions"] if c["type"] == "Waiting")
        assert condition["status"] == "True" and condition["reason"] == "OperatorBusy"
        assert "at most 2 backups at once" in condition["message"]
    results = [wait_finished(api, namespace, pod, operator, timeout=300) for pod in pods]
    assert [r["status"]["phase"] for r in results] == ["Succeeded"] * 4
    # Never more than two at once: sorted by start, each backup starts after some earlier one ended.
    spans = sorted((r["status"]["startTime"], r["status"]["completionTime"]) for r in results)
    for index, (start, _) in enumerate(spans):
        running = [s for s in spans[:index] if s[1] > start]
        assert len(running) < 2, spans
    for result in results:
        waited = next(c for c in result["status"]["conditions"] if c["type"] == "Waiting")
        assert waited["status"] == "False"
