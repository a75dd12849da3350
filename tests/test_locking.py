"""The servers' locks (locking.py): one Lease per FreeIPA server, all of them in the operator's own
namespace, named so that no two servers of the cluster ever share one.

The names are checked without the platform (uniqueness across namespaces, the length limit, stability);
on the platform, the API server accepts them, two servers whose pods have the same name in two
namespaces are locked apart, and two backups of such servers run at the same time.
"""

from __future__ import annotations

import base64
import datetime
import functools
import random
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from kubernetes import client

from idm_backup_operator import cli
from idm_backup_operator.handlers import startup
from idm_backup_operator.kube import locking
from idm_backup_operator.kube.locking import Busy, TargetLock, lease_name
from idm_backup_operator.kube.podexec import PodRef
from testbed import freeipa_pod, stack
from testbed.deploy import OperatorProcess, drop_finalizers
from testbed.gpgkeys import ExportedKey
from tests.helpers import (
    KEY_SECRET,
    S3_SECRET,
    apply,
    backup_spec,
    create_test_namespace,
    get_backup,
    pod_exec,
    pod_ready,
    s3_storage,
    wait_finished,
    wait_for,
)

# What the API server takes as an object name (IsDNS1123Subdomain: no limit on a part's length).
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def pod(namespace: str, name: str, container: str = "freeipa-server") -> PodRef:
    return PodRef(namespace=namespace, name=name, container=container)


def namespace_of(lease: str) -> str:
    """The namespace a lock is for, read back from its name: up to the first dot."""
    return lease.removeprefix(locking.LEASE_PREFIX).split(".", 1)[0]


# --- names ------------------------------------------------------------------------------------------


def test_a_lock_is_named_after_the_servers_namespace_and_pod_whatever_the_container() -> None:
    assert lease_name(pod("identity", "ipa-hidden-0")) == "idm-backup-lock-identity.ipa-hidden-0"
    assert lease_name(pod("identity", "ipa-hidden-0", "other")) == lease_name(pod("identity", "ipa-hidden-0"))
    # The same name again, in this process or another: every operator version and replica finds the
    # lock another one took.
    assert lease_name(pod("identity", "ipa.hidden-0")) == "idm-backup-lock-identity.ipa.hidden-0"


def test_servers_of_different_namespaces_never_share_a_lock_name() -> None:
    # Same pod name, two namespaces; and dashes that would make two servers meet with a dash separator.
    pairs = [
        (pod("team-a", "ipa-hidden"), pod("team-b", "ipa-hidden")),
        (pod("a-b", "c"), pod("a", "b-c")),
        (pod("a", "b.c"), pod("a-b", "c")),
        (pod("ns", "ipa"), pod("ns-ipa", "x")),
    ]
    for one, other in pairs:
        assert lease_name(one) != lease_name(other), (one, other)
        assert namespace_of(lease_name(one)) == one.namespace
        assert namespace_of(lease_name(other)) == other.namespace


def test_a_name_too_long_for_an_object_is_cut_with_a_hash_and_stays_valid_unique_and_stable() -> None:
    namespace = "n" * 63  # the longest namespace
    longest = "p" * 253  # the longest pod name
    name = lease_name(pod(namespace, longest))
    assert len(name) == locking.NAME_LIMIT and DNS_SUBDOMAIN.fullmatch(name), name
    assert name.startswith(f"idm-backup-lock-{namespace}.ppp")
    # Pinned: a new algorithm would give a running backup's lock another name than the next version of
    # the operator looks for.
    assert name.endswith("-9d573081401e3fc6"), name
    assert lease_name(pod(namespace, longest)) == name
    # Two pods that differ only after the cut still get two locks.
    assert lease_name(pod(namespace, longest[:-1] + "q")) != name
    # A cut that falls on a dot or a dash drops it: every part of the name still starts and ends with a
    # letter or a digit.
    cut = locking.NAME_LIMIT - locking.DIGEST_CHARS - 1 - len(f"idm-backup-lock-{namespace}.")
    for separator in (".", "-", "--"):
        for at in (cut - len(separator), cut - 1):  # the whole separator kept, or only its first character
            awkward = "a" * at + separator + "b" * 40
            assert DNS_SUBDOMAIN.fullmatch(lease_name(pod(namespace, awkward))), (separator, at)
    # Just at the limit: kept as it is, no hash.
    exact = "x" * (locking.NAME_LIMIT - len(f"idm-backup-lock-{namespace}."))
    assert lease_name(pod(namespace, exact)) == f"idm-backup-lock-{namespace}.{exact}"


def test_many_random_servers_get_valid_distinct_names_that_say_their_namespace() -> None:
    rng = random.Random(20261128)

    def label(length: int) -> str:
        inner = "".join(rng.choice("abc-") for _ in range(max(length - 2, 0)))
        return (rng.choice("ab") + inner + rng.choice("ab"))[:length]

    def pod_name() -> str:
        # Long and dotted, near the limits, where the cut and the hash come in.
        return ".".join(label(rng.randint(1, 63)) for _ in range(rng.randint(1, 5)))[:253].rstrip(".-")

    servers = {(label(rng.choice([1, 2, 5, 30, 62, 63])), pod_name()) for _ in range(3000)}
    names = {lease_name(pod(ns, name)): (ns, name) for ns, name in servers}
    assert len(names) == len(servers)
    for name, (ns, _) in names.items():
        assert len(name) <= locking.NAME_LIMIT and DNS_SUBDOMAIN.fullmatch(name), name
        assert namespace_of(name) == ns
    assert any(len(name) == locking.NAME_LIMIT for name in names)  # the cut was exercised


# --- where the locks go -----------------------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No namespace from this process's environment, no service account; returns where the service
    account's namespace file would be."""
    for name in (locking.LOCK_NAMESPACE_ENV, locking.POD_NAMESPACE_ENV, "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(locking, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "namespace")
    monkeypatch.setattr(locking, "_configured", None)
    return tmp_path / "namespace"


def test_the_lock_namespace_comes_from_the_option_then_the_pod_then_the_first_watched_namespace(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolve = locking.resolve_namespace
    # A local process: the first namespace it serves (as the tests run it).
    assert resolve(None, ["identity", "staging"]) == ("identity", "the first --namespace")
    # A pod the chart did not make: the service account's namespace, when it talks to its own cluster.
    clean_environment.write_text("idm-backup-system\n")
    assert resolve(None, ["identity"])[0] == "identity"  # no KUBERNETES_SERVICE_HOST: another cluster
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert resolve(None, ["identity"]) == ("idm-backup-system", str(clean_environment))
    # The chart's pod: its namespace from the downward API, in every scope.
    monkeypatch.setenv("POD_NAMESPACE", "ops")
    assert resolve(None, ["identity"]) == ("ops", "POD_NAMESPACE")
    assert resolve(None, []) == ("ops", "POD_NAMESPACE")
    # The option, or its variable, over everything.
    monkeypatch.setenv(locking.LOCK_NAMESPACE_ENV, "locks-env")
    assert resolve(None, ["identity"])[0] == "locks-env"
    assert resolve("locks", ["identity"])[0] == "locks"


def test_without_any_namespace_or_with_a_bad_one_the_operator_does_not_start(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cluster-wide, outside a pod, no option: no guess (kube-system would be one), and kopf's start-up
    # stops on this error instead of retrying it.
    with pytest.raises(locking.LockNamespaceUnknown, match="give --lock-namespace"):
        locking.resolve_namespace(None, [])
    with pytest.raises(kopf.PermanentError, match="give --lock-namespace"):
        startup.configure(
            settings=kopf.OperatorSettings(), memo=kopf.Memo(lock_namespace=None, namespaces=[])
        )
    # A wrong value is not passed over for the next source: whoever set it meant it.
    monkeypatch.setenv("POD_NAMESPACE", "Not_A_Namespace")
    with pytest.raises(locking.LockNamespaceUnknown, match="POD_NAMESPACE: 'Not_A_Namespace'"):
        locking.resolve_namespace(None, ["identity"])


def test_configure_fixes_the_namespace_that_target_locks_use(clean_environment: Path) -> None:
    assert locking.configure("locks", ["identity"]) == "locks"
    lock = TargetLock(client.CoordinationV1Api(), pod("identity", "ipa-hidden"), "someone")
    assert (lock.namespace, lock.name) == ("locks", "idm-backup-lock-identity.ipa-hidden")
    # A namespace given to the lock itself wins (tests, and any caller that knows better).
    other = TargetLock(client.CoordinationV1Api(), pod("identity", "ipa-hidden"), "someone", namespace="x")
    assert other.namespace == "x"


def test_the_command_line_takes_the_lock_namespace_from_the_option_or_its_variable(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.build_parser().parse_args(["run"]).lock_namespace is None
    assert cli.build_parser().parse_args(["run", "--lock-namespace", "ops"]).lock_namespace == "ops"
    monkeypatch.setenv(locking.LOCK_NAMESPACE_ENV, "locks")
    assert cli.build_parser().parse_args(["run"]).lock_namespace == "locks"
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["run", "--lock-namespace", "Not_A_Namespace"])
    assert exit_.value.code == 2
    assert "--lock-namespace: invalid namespace_name value: 'Not_A_Namespace'" in capsys.readouterr().err


# --- on the platform --------------------------------------------------------------------------------


@pytest.fixture
def new_namespace(api: client.ApiClient) -> Iterator[Callable[[str], str]]:
    """Namespaces of the test's own, short (a FreeIPA pod's FQDN must fit in 64 characters), deleted
    afterwards."""
    core = client.CoreV1Api(api)
    made: list[str] = []

    def create(prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        create_test_namespace(api, name)
        made.append(name)
        return name

    yield create
    for name in made:
        drop_finalizers(api, name)
        core.delete_namespace(name, propagation_policy="Background")


def _locks(api: client.ApiClient, namespace: str) -> list[client.V1Lease]:
    leases: list[client.V1Lease] = client.CoordinationV1Api(api).list_namespaced_lease(namespace).items
    return sorted(leases, key=lambda lease: lease.metadata.name)


def test_same_named_pods_of_two_namespaces_are_locked_apart_in_the_lock_namespace(
    api: client.ApiClient, platform: stack.Platform, new_namespace: Callable[[str], str]
) -> None:
    locks, team_a, team_b = new_namespace("locks"), new_namespace("team-a"), new_namespace("team-b")
    coordination = client.CoordinationV1Api(api)
    a, b = pod(team_a, "ipa-hidden"), pod(team_b, "ipa-hidden")
    first_a = TargetLock(coordination, a, "IdmBackup team-a/first", namespace=locks)
    first_b = TargetLock(coordination, b, "IdmBackup team-b/first", namespace=locks)
    assert first_a.try_acquire() is None
    assert first_b.try_acquire() is None  # the same pod name elsewhere: a lock of its own
    # The same server: busy, and the holder is named.
    second_a = TargetLock(coordination, a, "IdmBackup team-a/second", namespace=locks)
    assert second_a.try_acquire() == Busy(holder="IdmBackup team-a/first")
    leases = _locks(api, locks)
    assert [lease.metadata.name for lease in leases] == [
        f"idm-backup-lock-{team_a}.ipa-hidden",
        f"idm-backup-lock-{team_b}.ipa-hidden",
    ]
    for lease, server in zip(leases, (a, b), strict=True):
        assert lease.metadata.labels[locking.TARGET_NAMESPACE_LABEL] == server.namespace
        assert lease.metadata.annotations[locking.TARGET_POD_ANNOTATION] == f"{server.namespace}/ipa-hidden"
    # Nothing next to the pods.
    assert _locks(api, team_a) == [] and _locks(api, team_b) == []
    # Who holds each server of a namespace (what a schedule's Paused condition reads); a Lease whose
    # holder stopped renewing it is nobody's.
    assert locking.holders(coordination, team_a, locks=locks) == {"ipa-hidden": "IdmBackup team-a/first"}
    stale = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=locking.LEASE_SECONDS + 1)
    coordination.patch_namespaced_lease(lease_name(b), locks, {"spec": {"renewTime": stale.isoformat()}})
    assert locking.holders(coordination, team_b, locks=locks) == {}
    coordination.patch_namespaced_lease(
        lease_name(b), locks, {"spec": {"renewTime": datetime.datetime.now(datetime.UTC).isoformat()}}
    )
    # What a person sees: which server each lock is for, and who holds it.
    kubectl = stack.binaries()["kubectl"]
    shown = subprocess.run(
        [str(kubectl), "--kubeconfig", platform.kubeconfig, "get", "lease", "-n", locks,
         "-L", locking.TARGET_NAMESPACE_LABEL],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for server, holder in ((a, "IdmBackup team-a/first"), (b, "IdmBackup team-b/first")):
        (line,) = [line for line in shown.splitlines() if line.startswith(lease_name(server))]
        assert holder in line and line.rstrip().endswith(server.namespace), shown
    first_a.release()
    first_b.release()
    assert _locks(api, locks) == []


def test_the_api_server_accepts_the_longest_names(
    api: client.ApiClient, new_namespace: Callable[[str], str]
) -> None:
    locks = new_namespace("locks")
    coordination = client.CoordinationV1Api(api)
    namespace = "n" * 63
    servers = [pod(namespace, "p" * 253), pod(namespace, "a" * 150 + "." + "b" * 102), pod("x", "y" * 253)]
    held = [TargetLock(coordination, server, "a test", namespace=locks) for server in servers]
    for lock in held:
        assert lock.try_acquire() is None, lock.name
    assert sorted(lease.metadata.name for lease in _locks(api, locks)) == sorted(lock.name for lock in held)
    for lock in held:
        lock.release()
    assert _locks(api, locks) == []


def _server(api: client.ApiClient, namespace: str, platform: stack.Platform, key: ExportedKey) -> None:
    """A stand-in FreeIPA pod `ipa-hidden` whose ipa-backup hangs, and what a backup of it reads."""
    apply(
        api,
        namespace,
        freeipa_pod.dm_password_secret(platform.ldap_password),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": S3_SECRET},
            "stringData": {
                "AWS_ACCESS_KEY_ID": platform.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": platform.s3_secret_key,
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": KEY_SECRET},
            "data": {"restore.asc": base64.b64encode(key.armored).decode()},
        },
        freeipa_pod.data_claim("ipa-hidden-data"),
        freeipa_pod.freeipa_pod("ipa-hidden", "ipa-hidden.example.test", platform.ldap_uri, fault="hang"),
    )


def test_backups_of_same_named_pods_in_two_namespaces_run_at_once_with_locks_in_the_lock_namespace(
    api: client.ApiClient,
    platform: stack.Platform,
    crds: None,
    backup_key: ExportedKey,
    new_namespace: Callable[[str], str],
    tmp_path: Path,
) -> None:
    locks, team_a, team_b = new_namespace("locks"), new_namespace("team-a"), new_namespace("team-b")
    for ns in (team_a, team_b):
        _server(api, ns, platform, backup_key)
    for ns in (team_a, team_b):
        wait_for(
            f"pod {ns}/ipa-hidden ready", functools.partial(pod_ready, api, ns, "ipa-hidden"), timeout=90
        )
    operator = OperatorProcess(
        team_a, platform.kubeconfig, tmp_path, tmp_path / "operator.log",
        args=["--namespace", team_b, "--lock-namespace", locks],
    )  # fmt: skip
    operator.start()
    try:
        custom = client.CustomObjectsApi(api)
        for ns in (team_a, team_b):
            spec = backup_spec(platform, s3_storage(platform, f"locking/{ns}"), type="Data", online=True)
            body = {"apiVersion": "idm-backup.io/v1alpha1", "kind": "IdmBackup", "metadata": {"name": "b"}}
            custom.create_namespaced_custom_object(
                "idm-backup.io", "v1alpha1", ns, "idmbackups", {**body, "spec": spec}
            )

        def in_ipa_backup(ns: str) -> bool:
            status = get_backup(api, ns, "b").get("status") or {}
            return status.get("phase") == "Running" and status.get("step", "").startswith("ipa-backup:")

        # Both hold their server's lock at the same time: neither waits for the other (TargetBusy).
        wait_for("both backups in ipa-backup", lambda: in_ipa_backup(team_a) and in_ipa_backup(team_b), 120)
        leases = _locks(api, locks)
        assert [lease.metadata.name for lease in leases] == [
            f"idm-backup-lock-{team_a}.ipa-hidden",
            f"idm-backup-lock-{team_b}.ipa-hidden",
        ]
        for lease, ns in zip(leases, (team_a, team_b), strict=True):
            uid = get_backup(api, ns, "b")["metadata"]["uid"]
            assert lease.spec.holder_identity == f"IdmBackup {ns}/b ({uid})"
        assert _locks(api, team_a) == [] and _locks(api, team_b) == []

        # ipa-backup killed in both: the backups end, and so do their locks.
        def kill_ipa_backup(ns: str) -> bool:
            return pod_exec(api, ns, "ipa-hidden", ["pkill", "-x", "ipa-backup"])[0] == 0

        for ns in (team_a, team_b):
            wait_for(f"ipa-backup in {ns} to be killed", functools.partial(kill_ipa_backup, ns))
        results: dict[str, Any] = {
            ns: wait_finished(api, ns, "b", operator)["status"] for ns in (team_a, team_b)
        }
        assert all(status["phase"] == "Failed" for status in results.values()), results
        wait_for("both locks to be released", lambda: _locks(api, locks) == [], timeout=30)
        assert f"locks (Leases) go to namespace {locks} (from --lock-namespace" in operator.output()
    finally:
        operator.stop()
