"""Clean-up and reporting that fail for real, and what the operator does about it.

1. The working directory of an interrupted ipa-backup (plaintext inside) cannot be removed: the kernel
   refuses `rm -rf` a file in it (`chattr +i`, which tmpfs supports since Linux 6.0). It is the killed
   run's own directory, made so before the kill, so there is no race with the operator's clean-up. An
   append-only /tmp would be simpler but proves nothing: Python's tempfile probes a directory by creating
   and removing a file, finds /tmp unusable and silently puts ipa-backup's directory in /var/tmp, where
   the clean-up never looks.
2. The schedule's `Paused` condition cannot be known: the operator runs with the chart's own RBAC,
   except that its Role for the locks no longer grants `list` on Leases, so the real API server answers
   the schedule's look at the locks with 403 while every other call the operator makes is allowed.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from idm_backup_operator.api.names import IDMRESTORE
from idm_backup_operator.kube import locking
from idm_backup_operator.kube.podexec import PodRef
from testbed import stack
from testbed.deploy import OperatorProcess
from tests.helpers import (
    CHART,
    backup_spec,
    condition,
    create_backup,
    create_schedule,
    event_messages,
    events,
    get_backup,
    get_schedule,
    leases,
    pod_exec,
    s3_keys,
    s3_storage,
    services_running,
    token_client,
    token_kubeconfig,
    wait_finished,
    wait_for,
)

pytestmark = pytest.mark.platform


def in_pod(api: client.ApiClient, namespace: str, pod: str, *argv: str) -> str:
    code, out = pod_exec(api, namespace, pod, list(argv))
    assert code == 0, (argv, out)
    return out


def event_types(api: client.ApiClient, namespace: str, name: str, reason: str) -> list[str]:
    items = (
        client.CoreV1Api(api)
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={name},reason={reason}")
        .items
    )
    return [e.type for e in items]


# -- 1. the interrupted ipa-backup's working directory cannot be removed ----------------------------------


@pytest.fixture
def immutable(api: client.ApiClient, namespace: str) -> Iterator[Callable[[str, str], None]]:
    """make(pod, path): the file can no longer be removed, by root either (`chattr +i`); undone afterwards,
    with the working directories it kept."""
    made: list[tuple[str, str]] = []

    def make(pod: str, path: str) -> None:
        in_pod(api, namespace, pod, "chattr", "+i", path)
        made.append((pod, path))

    yield make
    for pod, path in made:
        in_pod(api, namespace, pod, "chattr", "-i", path)
        in_pod(
            api,
            namespace,
            pod,
            "sh",
            "-c",
            "find /tmp -mindepth 1 -maxdepth 1 -name 'tmp*ipa' -exec rm -rf -- {} + && ! ls -d /tmp/tmp*ipa",
        )


def test_a_working_directory_that_cannot_be_removed_is_reported_and_the_backup_ends_as_it_would(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    immutable: Callable[[str, str], None],
    s3: Any,
) -> None:
    """ipa-backup is killed (SIGKILL, as the OOM killer does) while it has IPA stopped, and its working
    directory holds a file that cannot be removed. The killed run's own directory, made so before the kill:
    the stand-in's `hang` fault holds ipa-backup, with its directory made, until the test kills it."""
    pod = freeipa(fault="hang")
    prefix = f"cleanup/{namespace}"
    spec = backup_spec(platform, s3_storage(platform, prefix), type="Full", activeDeadlineSeconds=600)
    create_backup(api, namespace, "stuck", spec)

    def hanging() -> bool:
        # The hang's own line comes after `ipactl stop` returned: no `ipactl stop` is left to run after
        # the kill, and ipa-backup's header is written.
        step: str = (get_backup(api, namespace, "stuck").get("status") or {}).get("step", "")
        return step.startswith("ipa-backup: Backing up ")

    wait_for("ipa-backup to stop the services and hang", hanging, timeout=120)
    (workdir,) = in_pod(api, namespace, pod, "sh", "-c", "ls -d /tmp/tmp*ipa").split()
    assert re.fullmatch(r"/tmp/tmp\w+ipa", workdir), workdir
    assert sorted(in_pod(api, namespace, pod, "ls", "-A", workdir).split()) == ["header", "ipa"]
    immutable(pod, f"{workdir}/header")
    in_pod(api, namespace, pod, "pkill", "-KILL", "-x", "ipa-backup")
    obj = wait_finished(api, namespace, "stuck", operator)

    # The backup's own outcome is the one of test_integrity.py's `killed` test, where removal works.
    status = obj["status"]
    assert (status["phase"], status.get("reason")) == ("Failed", "IpaBackupFailed"), status
    assert status["message"].startswith("ipa-backup could not be followed: exec failed: "), status["message"]
    assert status["message"].endswith("signal: killed; ipa-backup was stopped"), status["message"]
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Completed"]["status"], by_type["Completed"]["reason"]) == ("False", "IpaBackupFailed")
    running = by_type["ServicesRunning"]
    assert (running["status"], running["reason"]) == ("True", "StartedByOperator"), running

    # `rm -rf` removed what it could, the plaintext directory `ipa` with it, and was refused the header.
    assert in_pod(api, namespace, pod, "ls", "-A", workdir).split() == ["header"]
    assert event_messages(api, namespace, "stuck", "PodCleanupFailed") == [
        "could not remove ipa-backup's working directory: "
        f"rm: cannot remove '{workdir}/header': Operation not permitted"
    ]
    assert event_types(api, namespace, "stuck", "PodCleanupFailed") == ["Warning"]
    # Not also claimed removed; and the failed clean-up is the only difference from a clean one (the
    # stand-in is laid out as freeipa-container, which every Full backup warns about).
    assert events(api, namespace, "stuck") == [
        "BackupStarted",
        "ConfigFilesAreSymlinks",
        "PodCleanupFailed",
        "ServicesRestarted",
        "BackupFailed",
    ]

    assert services_running(api, namespace, pod)
    assert leases(api, namespace) == []
    assert in_pod(api, namespace, pod, "ls", "-A", "/var/lib/ipa/backup") == ""
    assert s3_keys(s3, platform.s3_bucket, prefix) == []
    uploads = s3.list_multipart_uploads(Bucket=platform.s3_bucket, Prefix=prefix).get("Uploads", [])
    assert uploads == [], uploads


# -- 2. the schedule may not list the servers' locks ------------------------------------------------------


def may_list_leases(as_operator: client.ApiClient, namespace: str) -> bool:
    try:
        client.CoordinationV1Api(as_operator).list_namespaced_lease(namespace)
    except client.ApiException as err:
        if err.status != 403:
            raise
        return False
    return True


def set_lease_verbs(api: client.ApiClient, namespace: str, role: str, verbs: list[str]) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    rules = rbac.read_namespaced_role(role, namespace).rules
    (lease_rule,) = [r for r in rules if "leases" in r.resources]
    lease_rule.verbs = verbs
    rbac.patch_namespaced_role(role, namespace, {"rules": api.sanitize_for_serialization(rules)})


def log_records(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # what is not the operator's logging: Python's own warnings, say
        if isinstance(record, dict):
            records.append(record)
    return records


@pytest.fixture
def chart_release(
    helm: Callable[..., str], platform: stack.Platform, crds: None, namespace: str
) -> Iterator[str]:
    """The chart in namespace mode, serving and holding the locks of the test's namespace; its name."""
    name = f"r{uuid.uuid4().hex[:6]}"
    helm(
        "install", name, str(CHART), "-n", namespace, "--kubeconfig", platform.kubeconfig, "--skip-crds",
        # No pod of the chart's can run on the test node: the operator runs as a local process instead.
        "--set", "replicaCount=0", "--set", "webhook.enabled=false",
        "--set", "rbac.scope=namespace", "--set", f"watchNamespaces={{{namespace}}}",
    )  # fmt: skip
    yield name
    helm("uninstall", name, "-n", namespace, "--kubeconfig", platform.kubeconfig, check=False)


def test_a_schedule_whose_operator_may_not_list_the_locks_claims_no_pause_and_goes_on(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    secrets: None,
    chart_release: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pod = freeipa()
    service_account = f"{chart_release}-idm-backup-operator"
    locks_role = f"{chart_release}-idm-backup-operator-locks"
    user = f"system:serviceaccount:{namespace}:{service_account}"
    granted = client.RbacAuthorizationV1Api(api).read_namespaced_role(locks_role, namespace)
    (lease_rule,) = [r for r in granted.rules if "leases" in r.resources]
    assert "list" in lease_rule.verbs, lease_rule  # else the chart changed, and this test means nothing
    set_lease_verbs(api, namespace, locks_role, [v for v in lease_rule.verbs if v != "list"])
    token = (
        client.CoreV1Api(api)
        .create_namespaced_service_account_token(
            service_account, namespace, {"spec": {"expirationSeconds": 3600}}
        )
        .status.token
    )
    as_operator = token_client(platform, token)
    # The authorizer follows Role changes through a watch: the refusal may take a moment.
    wait_for("list leases to be refused", lambda: not may_list_leases(as_operator, namespace), timeout=15)

    # A restore holds the server, exactly as an IdmRestore holds it (same Lease, same holder format), so
    # an operator that could look would write Paused=True.
    restore = f"{IDMRESTORE} {namespace}/restoring ({uuid.uuid4()})"
    lock = locking.TargetLock(
        client.CoordinationV1Api(api), PodRef(namespace, pod, ""), restore, namespace=namespace
    )
    assert lock.try_acquire() is None
    monkeypatch.setenv("POD_NAMESPACE", namespace)  # as the chart's pod has it: the locks are here
    monkeypatch.setenv("IDM_BACKUP_LOG_FORMAT", "json")  # a message exactly, quotes and all
    (tmp_path / "pvc").mkdir()
    operator = OperatorProcess(
        namespace,
        str(token_kubeconfig(platform, user, token, tmp_path / "operator.kubeconfig")),
        tmp_path / "pvc",
        tmp_path / "operator.log",
    )

    def warned() -> list[dict[str, Any]]:
        return [r for r in log_records(operator.output()) if r["message"].startswith("cannot tell")]

    lock.keep_renewed()
    try:
        operator.start()
        template = backup_spec(
            platform, s3_storage(platform, f"paused/{namespace}"), type="Data", online=True
        )
        # A cron that does not fire during the test: the pass at start-up is the one looked at.
        create_schedule(api, namespace, "yearly", {"schedule": "0 3 1 1 *", "template": {"spec": template}})

        expected = (
            f"cannot tell whether a restore holds {namespace}/yearly's server: leases.coordination.k8s.io is "
            f'forbidden: User "{user}" cannot list resource "leases" in API group "coordination.k8s.io" in '
            f'the namespace "{namespace}"'
        )
        (warning, *_) = wait_for("the schedule's warning", warned, timeout=60)
        assert (warning["level"], warning["message"]) == ("WARNING", expected), (
            warning,
            operator.output()[-3000:],
        )
        # The pass wrote the rest of the schedule's status before it looked at the locks, and nothing
        # after the refusal: no Paused condition either way, neither a pause it cannot see nor a "no pause".
        schedule = get_schedule(api, namespace, "yearly")
        status = schedule["status"]
        assert condition(schedule, "Paused") == {}, status
        ready = condition(schedule, "Ready")
        assert (ready["status"], ready["reason"]) == ("True", "Scheduled"), ready
        assert status["nextScheduleTime"].endswith("-01-01T03:00:00Z"), status
        assert ready["message"] == f"next backup at {status['nextScheduleTime']}", ready
        # The refusal is the only one the operator ran into: everything else the chart grants suffices.
        forbidden = [r for r in log_records(operator.output()) if "forbidden" in json.dumps(r).lower()]
        assert forbidden == warned(), forbidden

        # The same operator, the same lock, `list` granted again: the schedule says it is paused. So the
        # condition was missing above because the API server refused, not because nothing held the server.
        operator.stop()
        set_lease_verbs(api, namespace, locks_role, lease_rule.verbs)
        wait_for("list leases to be allowed", lambda: may_list_leases(as_operator, namespace), timeout=15)
        before = len(warned())
        operator.start()
        paused = wait_for(
            "the schedule to say it is paused",
            lambda: (
                (c := condition(get_schedule(api, namespace, "yearly"), "Paused")).get("status") == "True"
                and c
            ),
            timeout=60,
        )
        assert paused["reason"] == "RestoreInProgress", paused
        assert paused["message"] == (
            f"{restore} on pod {pod} holds the server's lock: this schedule's backups wait until it ends"
        ), paused
        assert len(warned()) == before
    except BaseException:
        print(f"--- operator log (last 6000 characters) ---\n{operator.output()[-6000:]}")
        raise
    finally:
        operator.stop()
        lock.release()
    assert leases(api, namespace) == []
