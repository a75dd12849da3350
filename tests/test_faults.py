"""Faults injected for real on the platform, at the moments that matter.

The first tests hit the worst moment: ipa-backup has stopped the services and is still running (the
stand-in's `hang` fault). For each, the test asserts how the backup ends, that IPA's services run
again (or, where another process holds the server, that they are left to it), that no ipa-backup is
left running, and that the server's Lease is released. The later ones hit the archive's transfer, and
an operator SIGKILLed at each step of the pipeline; they assert the same, and that nothing is left in
storage. docs/faults.md has the table of faults, outcomes and times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes import client

from testbed import processes, stack
from testbed.deploy import OperatorProcess
from testbed.faultproxy import Fault, FaultProxy
from tests.helpers import (
    backup_dirs,
    backup_spec,
    create_backup,
    event_messages,
    events,
    get_backup,
    leases,
    pod_exec,
    pod_ready,
    s3_keys,
    s3_storage,
    services_running,
    set_fault,
    wait_finished,
    wait_for,
)

pytestmark = pytest.mark.platform


def _ipa_backup_running(api: client.ApiClient, namespace: str, pod: str) -> bool:
    return pod_exec(api, namespace, pod, ["pgrep", "-x", "ipa-backup"])[0] == 0


def _start_hanging_backup(
    api: client.ApiClient, namespace: str, platform: stack.Platform, freeipa: Callable[..., str], name: str
) -> str:
    """A Full (offline) backup whose ipa-backup has stopped IPA and hangs; returns the pod."""
    pod = freeipa(fault="hang")
    spec = backup_spec(
        platform, s3_storage(platform, f"faults/{namespace}"), type="Full", activeDeadlineSeconds=600
    )
    create_backup(api, namespace, name, spec)

    def hanging() -> bool:
        # The hang's own line, "Backing up <backend> in <instance> to LDIF", comes after `ipactl stop`
        # returned; earlier steps ("Preparing backup on ...") come before IPA is stopped.
        step = (get_backup(api, namespace, name).get("status") or {}).get("step", "")
        return step.startswith("ipa-backup: Backing up ")

    wait_for("ipa-backup to stop the services and hang", hanging, timeout=120)
    assert not services_running(api, namespace, pod)
    return pod


def test_an_api_server_restart_while_ipa_backup_runs_ends_named_and_ipa_runs_again(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
) -> None:
    pod = _start_hanging_backup(api, namespace, platform, freeipa, "restarted")
    # What every control-plane upgrade does: the exec stream goes through the API server and breaks.
    run = stack.state_dir() / "run"
    processes.stop(run, "kube-apiserver")
    down = datetime.datetime.now(datetime.UTC)
    stack.up()  # starts what is not running, and waits until the API server is ready
    back = datetime.datetime.now(datetime.UTC)
    status = wait_finished(api, namespace, "restarted", operator, timeout=300)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "ExecStreamLost"), status
    assert "connection to ipa-backup" in status["message"] and "ipa-backup was stopped" in status["message"]
    running = next(c for c in status["conditions"] if c["type"] == "ServicesRunning")
    assert (running["status"], running["reason"]) == ("True", "StartedByOperator"), running
    assert services_running(api, namespace, pod)
    assert not _ipa_backup_running(api, namespace, pod)
    wait_for("the Lease to be released", lambda: leases(api, namespace) == [], timeout=30)
    assert (back - down).total_seconds() < 60  # an outage shorter than the Lease: not a LockLost
    log = operator.output()
    assert "Traceback" not in log, log[-3000:]
    # The server is usable at once: the next backup of it succeeds.
    set_fault(api, namespace, pod, "")
    spec = backup_spec(platform, s3_storage(platform, f"faults/{namespace}"), type="Full")
    create_backup(api, namespace, "after", spec)
    assert wait_finished(api, namespace, "after", operator)["status"]["phase"] == "Succeeded"


def test_sigterm_winds_a_running_backup_down_and_the_next_operator_takes_it_again(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
) -> None:
    pod = _start_hanging_backup(api, namespace, platform, freeipa, "rollout")
    assert operator.proc is not None
    operator.proc.terminate()  # SIGTERM, as the kubelet sends it in a rollout or a drain
    assert operator.proc.wait(timeout=60) == 0, operator.output()[-3000:]
    status = get_backup(api, namespace, "rollout")["status"]
    assert (status["phase"], status["step"]) == ("Pending", "waiting for the operator to start again"), status
    waiting = next(c for c in status["conditions"] if c["type"] == "Waiting")
    assert (waiting["status"], waiting["reason"]) == ("True", "OperatorShutdown")
    assert "BackupInterrupted" in events(api, namespace, "rollout")
    assert services_running(api, namespace, pod)
    assert not _ipa_backup_running(api, namespace, pod)
    assert leases(api, namespace) == []
    # The next operator pod takes it again from the start, and this time ipa-backup completes.
    set_fault(api, namespace, pod, "")
    operator.start()
    status = wait_finished(api, namespace, "rollout", operator, timeout=180)["status"]
    assert status["phase"] == "Succeeded", status
    assert services_running(api, namespace, pod)


def test_a_backup_whose_lease_is_taken_stops_and_leaves_the_server_to_the_holder(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
) -> None:
    pod = _start_hanging_backup(api, namespace, platform, freeipa, "usurped")
    (lease,) = leases(api, namespace)
    # Another process takes the lock over, as a standby replica or a recovery would after it expired.
    lease.spec.holder_identity = "intruder"
    lease.spec.renew_time = datetime.datetime.now(datetime.UTC)
    lease.spec.lease_duration_seconds = 600
    client.CoordinationV1Api(api).replace_namespaced_lease(
        lease.metadata.name, lease.metadata.namespace, lease
    )
    status = wait_finished(api, namespace, "usurped", operator, timeout=120)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "LockLost"), status
    assert not _ipa_backup_running(api, namespace, pod)
    # The holder acts on the server now: starting IPA under it could spoil its work.
    assert "ServicesNotRestarted" in events(api, namespace, "usurped")
    assert not services_running(api, namespace, pod)
    assert [lease.spec.holder_identity for lease in leases(api, namespace)] == ["intruder"]
    code, out = pod_exec(api, namespace, pod, ["ipactl", "start"])
    assert code == 0, out


def test_a_backup_waits_for_its_pod_to_become_ready(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
) -> None:
    """Right after a backup restarted IPA, the readiness probe lags for a moment: not a failure."""
    pod = freeipa()
    code, out = pod_exec(api, namespace, pod, ["ipactl", "stop"])
    assert code == 0, out
    wait_for("the pod to be not ready", lambda: not pod_ready(api, namespace, pod), timeout=30)
    create_backup(api, namespace, "early", backup_spec(platform, s3_storage(platform, f"faults/{namespace}")))

    def waiting() -> dict[str, Any] | None:
        status = get_backup(api, namespace, "early").get("status") or {}
        found = [
            c for c in status.get("conditions") or [] if c["type"] == "Waiting" and c["status"] == "True"
        ]
        return status if found and found[0]["reason"] == "TargetNotReady" else None

    status = wait_for("the backup to wait for the pod", waiting, timeout=60)
    assert (status["phase"], status["step"]) == ("Pending", "waiting for the pod to be ready")
    code, out = pod_exec(api, namespace, pod, ["ipactl", "start"])
    assert code == 0, out
    status = wait_finished(api, namespace, "early", operator, timeout=120)["status"]
    assert status["phase"] == "Succeeded", status


# -- the archive transfer, and the operator killed at each step ------------------------------------------
#
# These faults need a moment, not a byte offset (testbed.faultproxy's unit): "the second part of the
# archive is on its way", "the manifest is being written". _Tap holds S3 requests from the first one that
# matches a pattern (S3 is plain HTTP here), so the pipeline waits there, deterministically, for as long
# as a test needs; and in front of the API server (TLS, passed through unread) it cuts the one connection
# that carried an archive's worth of bytes: the exec stream, while every other connection stays up.

MiB = 1 << 20
# Every part after the first: part 1 is stored, the transfer is under way and not over.
LATER_PART = rb"PUT [^ \r\n]*[?&]partNumber=(?!1[& ])\d+"
MANIFEST = rb"PUT [^ \r\n?]*/manifest\.json[? ]"
_REQUEST_LINE = re.compile(rb"(?:GET|HEAD|PUT|POST|DELETE) /[^ \r\n]* HTTP/1\.1\r\n")
_TAP_BUFFER = 1 << 20  # past this much unforwarded data a side is not read any more: backpressure


@dataclasses.dataclass(eq=False)
class _Link:
    client: socket.socket
    upstream: socket.socket
    up: bytearray = dataclasses.field(default_factory=bytearray)  # from the client, not yet forwarded
    down: bytearray = dataclasses.field(default_factory=bytearray)  # from the upstream, not yet forwarded
    tail: bytes = b""  # the last bytes received from the client, for a pattern split across reads
    allowed: int = 0  # how many bytes of `up` may be forwarded
    received_down: int = 0  # bytes the upstream sent, in all
    held: bool = False
    doomed: bool = False  # to be reset
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class _Tap:
    """A loopback TCP proxy, bounded by `lifetime`, that holds or cuts connections when a test says so.

    - `hold`: once a connection's client sends bytes matching the pattern, nothing more of that
      connection's requests is forwarded (from the match on), and `held` is set; the connection stays
      open, as a server that stopped reading. `release()` forwards what was kept; `drop_held()` resets
      those connections instead. Either ends the holding: later requests pass.
    - `cut(min_bytes)`: reset (RST) every connection whose upstream sent at least `min_bytes`.
    """

    def __init__(self, upstream_url: str, hold: bytes | None = None, *, lifetime: float = 300) -> None:
        parts = urlsplit(upstream_url)
        assert parts.hostname == "127.0.0.1" and parts.port, upstream_url
        self._upstream = (parts.hostname, parts.port)
        self._pattern = re.compile(hold) if hold else None
        self._end = time.monotonic() + lifetime
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self.held = threading.Event()
        self.requests: list[str] = []  # HTTP request lines seen (method and target), for plain HTTP
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"{parts.scheme}://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> _Tap:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=2)
        for link in self._links:
            for sock in (link.client, link.upstream):
                sock.close()

    def release(self) -> None:
        with self._lock:
            self._pattern = None
            for link in self._links:
                if link.held:
                    link.held, link.allowed = False, len(link.up)

    def drop_held(self) -> int:
        with self._lock:
            self._pattern = None
            doomed = [link for link in self._links if link.held]
        return self._reset(doomed)

    def cut(self, min_bytes: int) -> int:
        with self._lock:
            doomed = [
                link for link in self._links if link.received_down >= min_bytes and not link.done.is_set()
            ]
        return self._reset(doomed)

    def _reset(self, links: list[_Link]) -> int:
        for link in links:
            link.doomed = True
        for link in links:
            assert link.done.wait(timeout=5), "a tapped connection did not close"
        return len(links)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._end

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while self._running():
            try:
                client_sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client_sock.close()
                continue
            link = _Link(client_sock, upstream)
            with self._lock:
                self._links.append(link)
            self._spawn(self._pump, link)

    def _take_up(self, link: _Link, data: bytes) -> None:
        with self._lock:
            before = len(link.up)
            link.up += data
            window = link.tail + data
            link.tail = window[-512:]
            new = len(window) - len(data)  # where this read starts in the window
            # A line that ends in this read is new; one that ended in the tail was counted before.
            self.requests += [
                m[0][: -len(b" HTTP/1.1\r\n")].decode("latin-1")
                for m in _REQUEST_LINE.finditer(window)
                if m.end() > new
            ]
            if link.held:
                return
            found = self._pattern.finditer(window) if self._pattern else ()
            match = next((m for m in found if m.end() > new), None)
            if match is None:
                link.allowed = len(link.up)
                return
            # Forward what came before the request that matched; keep it and everything after.
            link.held = True
            link.allowed = before + max(0, match.start() - new)
        self.held.set()

    def _pump(self, link: _Link) -> None:
        c, u = link.client, link.upstream
        for sock in (c, u):
            sock.setblocking(False)
        u_closed = False
        try:
            while self._running() and not link.doomed:
                pending = ((c, link.up), (u, link.down))
                readers = [s for s, buf in pending if len(buf) < _TAP_BUFFER and not (s is u and u_closed)]
                writers = [s for s, n in ((u, link.allowed), (c, len(link.down))) if n > 0]
                readable, writable, _ = select.select(readers, writers, [], 0.05)
                if u_closed and not link.down:
                    return  # all that the upstream said before closing has been passed on
                for sock in readable:
                    with contextlib.suppress(BlockingIOError):
                        if not (data := sock.recv(1 << 16)):
                            if sock is c:
                                return
                            u_closed = True
                            continue
                        if sock is u:
                            link.down += data
                            link.received_down += len(data)
                        else:
                            self._take_up(link, data)
                if u in writable:
                    with self._lock, contextlib.suppress(BlockingIOError):
                        sent = u.send(link.up[: link.allowed])
                        del link.up[:sent]
                        link.allowed -= sent
                if c in writable:
                    with contextlib.suppress(BlockingIOError):
                        sent = c.send(link.down)
                        del link.down[:sent]
        except (OSError, ValueError):
            return
        finally:
            if link.doomed:
                for sock in (c, u):  # a reset, not an orderly close: SO_LINGER with a zero timeout
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for sock in (c, u):
                with contextlib.suppress(OSError):
                    sock.close()
            link.done.set()


def _step(api: client.ApiClient, namespace: str, name: str) -> str:
    return str((get_backup(api, namespace, name).get("status") or {}).get("step", ""))


def _hold_the_transfer(api: client.ApiClient, namespace: str, name: str, s3_tap: _Tap) -> None:
    """Until the archive's part 1 is stored and a later part is held: mid-transfer, and staying there."""
    wait_for("a later part of the archive to be held", s3_tap.held.is_set, timeout=120, interval=0.1)
    assert _step(api, namespace, name).startswith("uploading "), get_backup(api, namespace, name)


def _tapped_s3(platform: stack.Platform, prefix: str, tap: _Tap) -> dict[str, Any]:
    storage = s3_storage(platform, prefix)
    storage["s3"]["endpoint"] = tap.url
    return storage


def _multipart_uploads(s3: Any, platform: stack.Platform, prefix: str) -> list[dict[str, Any]]:
    return list(s3.list_multipart_uploads(Bucket=platform.s3_bucket, Prefix=prefix).get("Uploads", []))


def _archive_completed(tap: _Tap) -> list[str]:
    """CompleteMultipartUpload requests for an archive that went through the tap: an archive committed
    under its final name."""
    return [line for line in tap.requests if line.startswith("POST ") and ".tar.gpg?uploadId=" in line]


def _nothing_stored(s3: Any, platform: stack.Platform, prefix: str) -> None:
    assert s3_keys(s3, platform.s3_bucket, prefix) == []
    assert _multipart_uploads(s3, platform, prefix) == []


def test_an_exec_stream_dropped_mid_transfer_with_the_api_server_up_fails_transfer_failed(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    crds: None,
    secrets: None,
    s3: Any,
    tmp_path: Path,
) -> None:
    """The one websocket that carries the archive is reset between the operator and the API server (a
    load balancer's idle timeout, a network blip); the API server, and every other connection of the
    operator, stay up. The operator reaches the API server through the tap, the test directly."""
    pod = freeipa(payload_bytes=48 * MiB)  # incompressible: ~10 parts of 5 MiB, more than is in flight
    prefix = f"faults/{namespace}"
    with _Tap(platform.api_server) as api_tap, _Tap(platform.s3_endpoint, hold=LATER_PART) as s3_tap:
        config = yaml.safe_load(Path(platform.kubeconfig).read_text())
        config["clusters"][0]["cluster"]["server"] = api_tap.url
        kubeconfig = tmp_path / "kubeconfig-tapped"
        kubeconfig.write_text(json.dumps(config))
        (tmp_path / "pvc").mkdir()
        operator = OperatorProcess(namespace, str(kubeconfig), tmp_path / "pvc", tmp_path / "operator.log")
        operator.start()
        try:
            spec = backup_spec(platform, _tapped_s3(platform, prefix, s3_tap), type="Full")
            create_backup(api, namespace, "dropped", spec)
            _hold_the_transfer(api, namespace, "dropped", s3_tap)
            # Only the exec stream of the archive has carried megabytes: watches and status writes are small.
            assert api_tap.cut(min_bytes=8 * MiB) == 1
            dropped = time.monotonic()
            s3_tap.release()
            status = wait_finished(api, namespace, "dropped", operator, timeout=120)["status"]
            took = time.monotonic() - dropped
            log = operator.output()
        finally:
            operator.stop()
        completed = _archive_completed(s3_tap)
    assert (status["phase"], status["reason"]) == ("Failed", "TransferFailed"), (status, log[-3000:])
    # The operator's words for a lost exec connection (ExecLost), then the client's, which vary with how
    # the reset reaches the TLS socket (an EOF, or ECONNRESET).
    lost = "reading the archive from the pod failed: the exec connection was lost: "
    assert status["message"].startswith(lost), status["message"]
    assert took < 30, took  # noticed at the next read, not at the 2 h deadline
    assert "archive" not in status
    assert completed == []  # never committed, not even for a moment
    _nothing_stored(s3, platform, prefix)
    # What a failed run owes the server: its plaintext copy gone, IPA running (ipa-backup had started it
    # again itself), nothing of it left running, the server's Lease released.
    assert backup_dirs(api, namespace, pod) == []
    assert services_running(api, namespace, pod)
    assert not _ipa_backup_running(api, namespace, pod)
    assert leases(api, namespace) == []
    assert events(api, namespace, "dropped") == ["BackupStarted", "ConfigFilesAreSymlinks", "BackupFailed"]
    assert "Traceback" not in log, log[-3000:]


def test_the_target_pod_deleted_mid_transfer_fails_transfer_failed_and_says_what_was_left(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    s3: Any,
) -> None:
    """The pod goes while `cat` streams its archive (a node drain, an eviction, a StatefulSet rollout):
    the stream ends early. Whatever the exec status says about the killed `cat`, a short archive is a
    failed transfer: never stored, not even for a moment, under its final name."""
    pod = freeipa(payload_bytes=48 * MiB)
    prefix = f"faults/{namespace}"
    core = client.CoreV1Api(api)
    claim = core.read_namespaced_persistent_volume_claim(f"{pod}-data", namespace).spec.volume_name
    with _Tap(platform.s3_endpoint, hold=LATER_PART) as s3_tap:
        spec = backup_spec(platform, _tapped_s3(platform, prefix, s3_tap), type="Full")
        create_backup(api, namespace, "orphaned", spec)
        _hold_the_transfer(api, namespace, "orphaned", s3_tap)
        core.delete_namespaced_pod(pod, namespace)
        deleted = time.monotonic()

        def gone() -> bool:
            try:
                core.read_namespaced_pod(pod, namespace)
            except client.ApiException as err:
                return bool(err.status == 404)
            return False

        wait_for("the pod to be gone", gone, timeout=60)
        s3_tap.release()
        status = wait_finished(api, namespace, "orphaned", operator, timeout=120)["status"]
        took = time.monotonic() - deleted
        completed = _archive_completed(s3_tap)
    # The API server may report the killed `cat` as a failure or, with its output cut short, as Success
    # (kubernetes/kubernetes#124571): the checksum then fails before the upload is committed.
    assert status["phase"] == "Failed" and status["reason"] in ("TransferFailed", "ChecksumMismatch"), status
    expected_start = {
        "TransferFailed": "reading the archive from the pod failed: ",
        "ChecksumMismatch": "the archive read from the pod (",
    }[status["reason"]]
    assert status["message"].startswith(expected_start), status["message"]
    assert took < 30, took
    assert "archive" not in status
    assert completed == [], completed
    _nothing_stored(s3, platform, prefix)
    assert leases(api, namespace) == []
    # ipa-backup's plaintext copy is on the server's volume, which outlives the pod; with no pod to exec
    # in, the operator cannot remove it, and must say so, and where, without blaming permissions it has.
    directory = status["ipaBackup"]["directory"]
    left = Path(platform.volumes_dir) / claim / directory.removeprefix("/")
    assert left.is_dir(), left
    (warning,) = event_messages(api, namespace, "orphaned", "PodCleanupFailed")
    assert warning.startswith(f"could not remove {directory}: "), warning
    assert "not found" in warning, warning
    assert "needs get and create on pods/exec" not in warning, warning  # a 404 is not a 403
    assert "audit-id" not in warning, warning  # no raw HTTP headers in an Event
    assert events(api, namespace, "orphaned") == [
        "BackupStarted",
        "ConfigFilesAreSymlinks",
        "PodCleanupFailed",
        "BackupFailed",
    ]


# Where the operator is SIGKILLed, how the test gets the backup there and keeps it there, and the step the
# dead operator's status is left at.
KILL_STEPS: dict[str, Callable[[str], bool]] = {
    # The LDAP server stops answering: the topology read waits (10 s) before anything is touched.
    "pre-flight": lambda step: step == "pre-flight: reading the topology from LDAP",
    # ipa-backup past its start and before its last line: with a 384 MiB payload it spends seconds
    # `Backing up ...` with IPA stopped, where the kill lands unless the test's polling lags.
    "ipa-backup": lambda step: (
        step.startswith("ipa-backup: ") and step != "ipa-backup: starting" and "Backed up to" not in step
    ),
    # Part 1 stored, a later part held.
    "upload": lambda step: step.startswith("uploading "),
    # Archive and header stored and checked, the manifest's PUT held.
    "before-manifest": lambda step: step == "verifying the stored archive",
}


@pytest.mark.parametrize("where", list(KILL_STEPS))
def test_the_operator_sigkilled_at_each_step_leaves_a_backup_the_next_one_ends_cleanly(
    where: str,
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    s3: Any,
) -> None:
    """SIGKILL (OOM killer, node loss): nothing of the operator winds down. The next operator process
    must take the server's Lease, let a leftover ipa-backup end, start IPA, remove what was stored, and
    end the backup Failed with OperatorRestarted (it is complete only with a manifest, which the last
    step, with the state built exactly, covers in test_idmbackup.py)."""
    pod = freeipa(payload_bytes=(384 if where == "ipa-backup" else 12) * MiB)
    prefix = f"faults/{namespace}"
    hold = {"upload": LATER_PART, "before-manifest": MANIFEST}.get(where)
    ldap_fault = Fault("stall") if where == "pre-flight" else Fault("pass")
    with (
        _Tap(platform.s3_endpoint, hold=hold) as s3_tap,
        FaultProxy(platform.ldap_uri, ldap_fault) as ldap_proxy,
    ):
        spec = backup_spec(platform, _tapped_s3(platform, prefix, s3_tap), type="Full")
        spec["target"]["ldap"]["url"] = ldap_proxy.url
        create_backup(api, namespace, "killed", spec)
        at_step = KILL_STEPS[where]
        wait_for(f"the backup to reach {where}", lambda: at_step(_step(api, namespace, "killed")), 120, 0.05)
        if hold is not None:
            wait_for("the held request", s3_tap.held.is_set, timeout=30, interval=0.05)
        if where == "pre-flight":
            # The step is reported just before the LDAP connection is made: kill once it is stalled there.
            wait_for(
                "the stalled LDAP connection", lambda: ldap_proxy.faulted == 1, timeout=30, interval=0.05
            )
        operator.kill()
        # The dead operator's last word says where it died.
        left = get_backup(api, namespace, "killed")["status"]
        assert left["phase"] == "Running" and at_step(left["step"]), left
        if where == "pre-flight":
            assert ldap_proxy.faulted == 1 and "ipaBackup" not in left
        elif where == "ipa-backup":
            assert "directory" not in left["ipaBackup"], left  # ipa-backup had not ended
            assert _ipa_backup_running(api, namespace, pod)  # and runs on, orphaned
        elif where == "upload":
            (upload,) = _multipart_uploads(s3, platform, prefix)
            parts = s3.list_parts(Bucket=platform.s3_bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            assert [p["PartNumber"] for p in parts["Parts"]] == [1]
            assert [k.rsplit("/", 1)[1] for k in s3_keys(s3, platform.s3_bucket, prefix)] == ["header"]
        else:
            names = [k.rsplit("/", 1)[1] for k in s3_keys(s3, platform.s3_bucket, prefix)]
            assert names == ["header", "ipa-full.tar.gpg"], names
        s3_tap.drop_held()  # the dead process's request; the next one's pass
        operator.start()
        status = wait_finished(api, namespace, "killed", operator, timeout=180)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "OperatorRestarted"), status
    services = "" if where == "pre-flight" else "IPA services are running; "
    copy = {
        "pre-flight": "",
        # Written after the operator died: never reported, so its name is unknown, and it is not guessed.
        "ipa-backup": "ipa-backup ended after the operator stopped, so its directory in /var/lib/ipa/backup "
        "is unknown and was left there; ",
    }.get(where, f"{left.get('ipaBackup', {}).get('directory')} was removed from the pod; ")
    message = (
        f"the operator stopped while this backup was running (step: {left['step']}) and an exec session "
        f"cannot be resumed, so the backup was abandoned: {services}{copy}nothing partial is left in "
        "storage. Create a new IdmBackup to retry."
    )
    assert status["message"] == message, status["message"]
    assert event_messages(api, namespace, "killed", "BackupFailed") == [message]
    if where != "pre-flight":
        running = next(c for c in status["conditions"] if c["type"] == "ServicesRunning")
        assert (running["status"], running["reason"]) == ("True", "StartedByOperator"), running
    assert services_running(api, namespace, pod)
    assert not _ipa_backup_running(api, namespace, pod)
    wait_for("the Lease to be released", lambda: leases(api, namespace) == [], timeout=30)
    _nothing_stored(s3, platform, prefix)
    # podCleanup: Remove (the default): after a failure, the plaintext copy ipa-backup reported does not
    # stay on the server's volume (README, "After a verified upload, and after a failure once ipa-backup
    # has written its directory"); one it wrote after the operator died was never reported, and stays.
    dirs = backup_dirs(api, namespace, pod)
    assert (len(dirs) == 1 and dirs[0].startswith("ipa-full-")) if where == "ipa-backup" else dirs == [], dirs
    log = operator.output()
    assert "Traceback" not in log, log[-3000:]
