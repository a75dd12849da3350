"""Faults injected for real while an offline backup has IPA stopped, on the platform.

Each fault hits the worst moment: ipa-backup has stopped the services and is still running (the
stand-in's `hang` fault). For each, the test asserts how the backup ends, that IPA's services run
again (or, where another process holds the server, that they are left to it), that no ipa-backup is
left running, and that the server's Lease is released.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from testbed import processes, stack
from testbed.deploy import OperatorProcess
from tests.helpers import (
    backup_spec,
    create_backup,
    events,
    get_backup,
    leases,
    pod_exec,
    pod_ready,
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
        step = (get_backup(api, namespace, name).get("status") or {}).get("step", "")
        return step.startswith("ipa-backup: ") and step != "ipa-backup: starting"

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
