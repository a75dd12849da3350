"""IdmRestore on the platform: real API server, S3, gpg, and a real 389-ds that the restore rewrites.

Every restore here imports through 389-ds itself, so each module run has a directory server of its own
(the platform's shared one serves every other test): the proof of a restore is data read back over LDAP,
an entry deleted after the backup is back and one added after it is gone. Gates are proven the same
way: the refused restore leaves the changed data as it was.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ldap
import ldap.modlist
import pytest
from kubernetes import client

from testbed import freeipa_pod, stack
from testbed.deploy import OperatorProcess
from testbed.gpgkeys import ExportedKey, Keyring
from testbed.ldap_server import DirectoryServer
from testbed.processes import free_port
from tests.helpers import (
    GROUP,
    VERSION,
    apply,
    backup_spec,
    condition,
    create_backup,
    create_schedule,
    events,
    get_backup,
    get_schedule,
    leases,
    pod_exec,
    pod_ready,
    s3_storage,
    services_running,
    set_fault,
    wait_for,
)

RESTORES = "idmrestores"
HOST = "ipa-hidden.example.test"
POD = "ipa-hidden"
DM_SECRET = freeipa_pod.DM_PASSWORD_SECRET
PRIVATE_KEY_SECRET = "restore-private-key"
BOB = "uid=bob,cn=users,cn=accounts,dc=example,dc=test"
MALLORY = "uid=mallory,cn=users,cn=accounts,dc=example,dc=test"


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DirectoryServer]:
    """A 389-ds of this module's own: a restore replaces whole backends."""
    ds = DirectoryServer(tmp_path_factory.mktemp("restore-ds"), port=free_port())
    ds.start()
    ds.load_topology()
    yield ds
    ds.stop()


@pytest.fixture
def server(
    api: client.ApiClient, namespace: str, directory: DirectoryServer, tmp_path: Path, backup_key: ExportedKey
) -> Callable[..., str]:
    """A ready stand-in FreeIPA pod on the module's directory, with its /data on a host directory that
    389-ds (a host process) can read the staged LDIF from. The directory starts as documented: what an
    earlier test changed and did not restore is put back."""
    conn = directory.connect()
    try:
        conn.delete_s(MALLORY)
    except ldap.NO_SUCH_OBJECT:
        pass
    finally:
        conn.unbind_s()
    directory.load_topology()
    apply(
        api,
        namespace,
        freeipa_pod.dm_password_secret(directory.password),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": PRIVATE_KEY_SECRET},
            "data": {"private.asc": base64.b64encode(backup_key.secret).decode()},
        },
    )

    def create(host: str = HOST, name: str = POD, data_path: Path | None = None, **kwargs: Any) -> str:
        data = data_path or tmp_path / f"{name}-data"
        data.mkdir(exist_ok=True)
        pod = freeipa_pod.freeipa_pod(name, host, directory.uri, data_host_path=str(data), **kwargs)
        apply(api, namespace, pod)
        wait_for(f"pod {name} ready", lambda: pod_ready(api, namespace, name), timeout=60)
        return name

    return create


def target(directory: DirectoryServer, pod: str = POD) -> dict[str, Any]:
    return {"podName": pod, "ldap": {"url": directory.uri, "passwordSecretRef": {"name": DM_SECRET}}}


def data_backup(
    platform: stack.Platform, directory: DirectoryServer, prefix: str, **spec: Any
) -> dict[str, Any]:
    return backup_spec(platform, s3_storage(platform, prefix), type="Data", target=target(directory), **spec)


def restore_spec(directory: DirectoryServer, source: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "source": source,
        "decryption": {"secretKeySecretRef": {"name": PRIVATE_KEY_SECRET}},
        "target": target(directory),
        "confirm": HOST,
        **spec,
    }


def create_restore(api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "IdmRestore",
        "metadata": {"name": name},
        "spec": spec,
    }
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, RESTORES, body)


def get_restore(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, RESTORES, name
    )
    return obj


def run_restore(
    api: client.ApiClient, namespace: str, operator: OperatorProcess, name: str, spec: dict[str, Any]
) -> dict[str, Any]:
    create_restore(api, namespace, name, spec)

    def finished() -> dict[str, Any] | None:
        obj = get_restore(api, namespace, name)
        return obj if obj.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

    obj: dict[str, Any] = wait_for(f"IdmRestore {name} to finish", finished, timeout=180)
    return obj


def exists(directory: DirectoryServer, dn: str) -> bool:
    conn = directory.connect()
    try:
        conn.search_s(dn, ldap.SCOPE_BASE, "(objectClass=*)", ["1.1"])
        return True
    except ldap.NO_SUCH_OBJECT:
        return False
    finally:
        conn.unbind_s()


def change_after_backup(directory: DirectoryServer) -> None:
    """What the restore must undo: bob deleted, mallory added."""
    conn = directory.connect()
    try:
        conn.delete_s(BOB)
        conn.add_s(
            MALLORY,
            ldap.modlist.addModlist(
                {"objectClass": [b"top", b"inetOrgPerson"], "uid": [b"mallory"], "cn": [b"M"], "sn": [b"M"]}
            ),
        )
    finally:
        conn.unbind_s()


def host_states(directory: DirectoryServer, host: str = HOST) -> set[str]:
    conn = directory.connect()
    try:
        found = conn.search_s(
            f"cn={host},cn=masters,cn=ipa,cn=etc,dc=example,dc=test",
            ldap.SCOPE_ONELEVEL,
            "(objectClass=ipaConfigObject)",
            ["ipaConfigString"],
        )
    finally:
        conn.unbind_s()
    states = {"enabledService", "hiddenService"}
    return {
        v.decode() for _, attrs in found for v in attrs.get("ipaConfigString", []) if v.decode() in states
    }


def paused_condition(api: client.ApiClient, namespace: str, schedule: str) -> dict[str, Any]:
    return condition(get_schedule(api, namespace, schedule), "Paused")


def staged_files(api: client.ApiClient, namespace: str, pod: str = POD) -> str:
    _, out = pod_exec(api, namespace, pod, ["sh", "-c", "ls /var/lib/ipa/backup"])
    return out.strip()


def test_a_data_restore_from_s3_brings_back_exactly_the_backed_up_entries(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
) -> None:
    server()
    backup = run_backup("before", data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    change_after_backup(directory)
    assert not exists(directory, BOB) and exists(directory, MALLORY)

    restored = run_restore(
        api, namespace, operator, "back", restore_spec(directory, {"backupRef": {"name": "before"}})
    )

    status = restored["status"]
    assert status["phase"] == "Succeeded", status
    assert exists(directory, BOB) and not exists(directory, MALLORY)
    checked = {c["backend"]: (c["expected"], c["found"]) for c in status["check"]["entries"]}
    assert set(checked) == {"userRoot", "ipaca"} and all(e == f and e > 0 for e, f in checked.values())
    assert status["source"]["header"]["host"] == HOST and status["source"]["backup"] == "before"
    assert status["ipaRestore"]["exitCode"] == 0 and status["ipaRestore"]["critical"] == []
    assert "-p" not in status["ipaRestore"]["command"] and directory.password not in str(status)
    # ipa-restore made the hidden replica visible; the operator hid it again.
    assert host_states(directory) == {"hiddenService"}
    hidden = {c["type"]: c for c in status["conditions"]}["ReplicaHidden"]
    assert hidden["status"] == "True", hidden
    # Every other master of the topology, with the commands that re-initialize it.
    replication = {m["host"]: m for m in status["replication"]}
    assert set(replication) == {
        f"{h}.example.test" for h in ("ipa-ca", "ipa-kra", "ipa-partial", "ipa-visible")
    }
    assert replication["ipa-ca.example.test"]["commands"] == [
        f"ipa-replica-manage re-initialize --from {HOST}",
        f"ipa-csreplica-manage re-initialize --from {HOST}",
    ]
    assert staged_files(api, namespace) == ""
    assert services_running(api, namespace, POD)
    assert leases(api, namespace) == []
    steps = events(api, namespace, "back")
    assert steps[0] == "RestoreStep" and "ArchiveVerified" in steps and steps[-1] == "RestoreCompleted", steps


def test_every_gate_refuses_before_anything_changes(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
    s3: Any,
    tmp_path: Path,
) -> None:
    server()
    backup = run_backup("gated", data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    change_after_backup(directory)
    source = {"backupRef": {"name": "gated"}}

    def refused(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        status: dict[str, Any] = run_restore(api, namespace, operator, name, spec)["status"]
        assert status["phase"] == "Failed", status
        # Nothing changed: mallory, added after the backup, is still there; nothing is staged.
        assert exists(directory, MALLORY) and not exists(directory, BOB)
        assert staged_files(api, namespace) == ""
        assert "ipaRestore" not in status or "exitCode" not in status["ipaRestore"]
        return status

    wrong = refused("wrong-confirm", restore_spec(directory, source, confirm="ipa-visible.example.test"))
    assert wrong["reason"] == "ConfirmationMismatch" and HOST in wrong["message"]

    other = Keyring(tmp_path / "other-gnupg")
    (tmp_path / "other-gnupg").mkdir(mode=0o700)
    stranger = other.export(other.make("Stranger <s@example.test>"))
    apply(
        api,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "stranger-key"},
            "data": {"private.asc": base64.b64encode(stranger.secret).decode()},
        },
    )
    wrong_key = refused(
        "wrong-key",
        restore_spec(directory, source, decryption={"secretKeySecretRef": {"name": "stranger-key"}}),
    )
    assert (
        wrong_key["reason"] == "ArchiveInvalid"
        and "not one this archive is encrypted to" in wrong_key["message"]
    )

    set_fault(api, namespace, POD, "version=4.13.0")
    try:
        version = refused("new-version", restore_spec(directory, source))
    finally:
        set_fault(api, namespace, POD, "")
    assert version["reason"] == "VersionMismatch" and "4.13.0" in version["message"], version

    archive_uri = backup["status"]["archive"]["uri"]
    bucket, key = archive_uri.removeprefix("s3://").split("/", 1)
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    tampered = refused("tampered", restore_spec(directory, source))
    assert tampered["reason"] == "ArchiveInvalid" and "corrupted or was altered" in tampered["message"]
    assert services_running(api, namespace, POD)


def test_a_backup_of_another_host_is_refused(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
) -> None:
    server()
    server("ipa-visible.example.test", "ipa-visible")
    spec = data_backup(platform, directory, f"restore/{namespace}")
    spec["target"] = {**target(directory, "ipa-visible"), "requireHiddenReplica": False}
    other = run_backup("visible", spec)
    assert other["status"]["phase"] == "Succeeded", other["status"]
    location = {
        "location": {
            "storage": s3_storage(platform, f"restore/{namespace}"),
            "directory": other["status"]["archive"]["uri"]
            .split(f"restore/{namespace}/", 1)[1]
            .rsplit("/", 1)[0]
            + "/",
        }
    }
    status = run_restore(api, namespace, operator, "other-host", restore_spec(directory, location))["status"]
    assert status["phase"] == "Failed" and status["reason"] == "HostMismatch", status
    assert "ipa-visible.example.test" in status["message"] and HOST in status["message"]


def test_ldif2db_failing_with_exit_0_fails_the_restore_and_services_run(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
) -> None:
    server()
    backup = run_backup("silent", data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    change_after_backup(directory)
    set_fault(api, namespace, POD, "restore-ldif2db")
    status = run_restore(
        api, namespace, operator, "silent", restore_spec(directory, {"backupRef": {"name": "silent"}})
    )["status"]
    assert status["phase"] == "Failed" and status["reason"] == "RestoreIncomplete", status
    assert "ldif2db failed" in status["message"]
    assert status["ipaRestore"]["exitCode"] == 0 and status["ipaRestore"]["critical"]
    assert services_running(api, namespace, POD)
    assert staged_files(api, namespace) == ""
    set_fault(api, namespace, POD, "")


def test_a_restore_and_a_backup_of_one_server_never_overlap_and_a_killed_operator_leaves_it_failed_and_clean(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
) -> None:
    # A payload big enough that staging takes a few seconds: the kill lands while files are in the pod.
    server(payload_bytes=300 << 20)
    backup = run_backup("big", data_backup(platform, directory, f"restore/{namespace}"), timeout=300)
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    # A schedule of the same server, whose cron does not fire during the test.
    template = data_backup(platform, directory, f"restore/{namespace}")
    create_schedule(api, namespace, "yearly", {"schedule": "0 3 1 1 *", "template": {"spec": template}})
    wait_for("the schedule's first pass", lambda: condition(get_schedule(api, namespace, "yearly"), "Ready"))
    assert paused_condition(api, namespace, "yearly") == {}
    create_restore(api, namespace, "killed", restore_spec(directory, {"backupRef": {"name": "big"}}))
    wait_for(
        "the restore to stage",
        lambda: get_restore(api, namespace, "killed").get("status", {}).get("step") == "stage",
        timeout=120,
        interval=0.1,
    )
    # Meanwhile a backup of the same server waits for the restore's lock.
    create_backup(api, namespace, "meanwhile", data_backup(platform, directory, f"restore/{namespace}"))
    waiting = wait_for(
        "the backup to wait",
        lambda: (get_backup(api, namespace, "meanwhile").get("status") or {}).get("message"),
        timeout=60,
    )
    assert "IdmRestore" in waiting and "killed" in waiting, waiting
    # The schedule says it is paused, and by which restore.
    paused = wait_for(
        "the schedule to say it is paused",
        lambda: (c := paused_condition(api, namespace, "yearly")).get("status") == "True" and c,
        timeout=30,
    )
    assert paused["reason"] == "RestoreInProgress" and f"IdmRestore {namespace}/killed" in paused["message"]
    operator.kill()
    assert staged_files(api, namespace) != ""
    operator.start()
    status = wait_for(
        "the interrupted restore to end",
        lambda: (s := get_restore(api, namespace, "killed").get("status", {})).get("phase") == "Failed" and s,
        timeout=180,
    )
    assert status["reason"] == "OperatorRestarted" and "stage" in status["message"], status
    assert staged_files(api, namespace) == ""
    assert services_running(api, namespace, POD)
    # The recovery gave the lock back: the schedule says so without waiting for its next pass.
    resumed = wait_for(
        "the schedule to resume",
        lambda: (c := paused_condition(api, namespace, "yearly")).get("status") == "False" and c,
        timeout=30,
    )
    assert resumed["reason"] == "NoRestore", resumed
    # The backup that waited runs once the restore let go of the server.
    done = wait_for(
        "the waiting backup",
        lambda: (
            (get_backup(api, namespace, "meanwhile").get("status") or {}).get("phase")
            in ("Succeeded", "Failed")
            and get_backup(api, namespace, "meanwhile")["status"]
        ),
        timeout=180,
    )
    assert done["phase"] == "Succeeded", done


def test_a_restore_from_a_pvc_works_and_full_or_missing_backend_restores_are_refused(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
    tmp_path: Path,
) -> None:
    server()
    (tmp_path / "volume").mkdir()
    # What the Helm chart does with a volume mount: the claim appears under the operator's PVC root.
    (operator.pvc_root / "backups").symlink_to(tmp_path / "volume")
    pvc = {"pvc": {"claimName": "backups", "subPath": "idm"}}
    full = run_backup("full", {**data_backup(platform, directory, ""), "storage": pvc, "type": "Full"})
    data = run_backup("data", {**data_backup(platform, directory, ""), "storage": pvc})
    assert full["status"]["phase"] == data["status"]["phase"] == "Succeeded", (full["status"], data["status"])
    change_after_backup(directory)

    status = run_restore(
        api,
        namespace,
        operator,
        "full",
        restore_spec(directory, {"backupRef": {"name": "full"}}, type="Full"),
    )["status"]
    assert status["phase"] == "Failed" and status["reason"] == "ConfigFilesAreSymlinks", status
    assert "freeipa-container issue 543" in status["message"] and exists(directory, MALLORY)

    db = "/var/lib/dirsrv/slapd-EXAMPLE-TEST/db/ipaca"
    assert pod_exec(api, namespace, POD, ["mv", db, db + ".away"])[0] == 0
    status = run_restore(
        api, namespace, operator, "nobackend", restore_spec(directory, {"backupRef": {"name": "data"}})
    )["status"]
    assert status["phase"] == "Failed" and status["reason"] == "MissingBackend", status
    assert "ipaca" in status["message"] and exists(directory, MALLORY)
    assert pod_exec(api, namespace, POD, ["mv", db + ".away", db])[0] == 0

    status = run_restore(
        api, namespace, operator, "pvc", restore_spec(directory, {"backupRef": {"name": "data"}})
    )["status"]
    assert status["phase"] == "Succeeded", status
    assert status["source"]["uri"].startswith(str(operator.pvc_root / "backups" / "idm"))
    assert exists(directory, BOB) and not exists(directory, MALLORY)


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 96 MiB file system for the pod's /data: a full disk that is real, not simulated."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_not_enough_space_in_the_pod_is_refused_before_staging(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
    small_volume: Path,
) -> None:
    server(data_path=small_volume, payload_bytes=40 << 20)
    backup = run_backup("roomy", data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    status = run_restore(
        api, namespace, operator, "cramped", restore_spec(directory, {"backupRef": {"name": "roomy"}})
    )["status"]
    assert status["phase"] == "Failed" and status["reason"] == "InsufficientSpace", status
    assert "free" in status["message"] and "need" in status["message"]
    assert staged_files(api, namespace) == ""


# -- drills: the same restore, into a throwaway server -------------------------------------------------------

DRILL_DM_SECRET = "drill-dm-password"


def apply_drill_dm_secret(api: client.ApiClient, namespace: str, password: str) -> None:
    """The Secret DRILL_DM_SECRET: the Directory Manager password of the drill's scratch server."""
    apply(
        api,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": DRILL_DM_SECRET},
            "stringData": {"password": password},
        },
    )


@pytest.fixture(scope="module")
def drill_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DirectoryServer]:
    """The scratch server's own directory: in freeipa-container it lives in the scratch pod itself."""
    ds = DirectoryServer(tmp_path_factory.mktemp("drill-ds"), port=free_port())
    ds.start()
    ds.load_topology()
    yield ds
    ds.stop()


def drill_spec(
    drill_directory: DirectoryServer, data: Path, source: dict[str, Any], **drill: Any
) -> dict[str, Any]:
    """A Drill of `source` into a scratch stand-in with the production server's host name and realm."""
    pod = freeipa_pod.freeipa_pod("template", HOST, drill_directory.uri, data_host_path=str(data))
    for env in pod["spec"]["containers"][0]["env"]:
        if "valueFrom" in env:
            env["valueFrom"]["secretKeyRef"]["name"] = DRILL_DM_SECRET
    return {
        "mode": "Drill",
        "source": source,
        "decryption": {"secretKeySecretRef": {"name": PRIVATE_KEY_SECRET}},
        "drill": {
            "podTemplate": {"metadata": {"labels": {"purpose": "drill"}}, "spec": pod["spec"]},
            "ldap": {"url": drill_directory.uri, "passwordSecretRef": {"name": DRILL_DM_SECRET}},
            **drill,
        },
    }


def scratch_objects(api: client.ApiClient, namespace: str) -> list[str]:
    selector = "idm-backup.io/drill"
    core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
    found = [
        f"pod/{p.metadata.name}" for p in core.list_namespaced_pod(namespace, label_selector=selector).items
    ]
    found += [
        f"pvc/{c.metadata.name}"
        for c in core.list_namespaced_persistent_volume_claim(namespace, label_selector=selector).items
    ]
    found += [
        f"networkpolicy/{n.metadata.name}"
        for n in net.list_namespaced_network_policy(namespace, label_selector=selector).items
    ]
    return found


def test_a_drill_proves_the_archive_restores_without_touching_production_and_leaves_nothing(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    drill_directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server()
    apply_drill_dm_secret(api, namespace, drill_directory.password)
    backup = run_backup("nightly", data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    change_after_backup(directory)  # production moves on: the drill must not bring the old data back there
    (tmp_path / "drill-data").mkdir()
    source = {"backupRef": {"name": "nightly"}}

    # Off unless the operator's administrator turned drills on: a drill makes a pod from a tenant's template.
    off = run_restore(
        api, namespace, operator, "off", drill_spec(drill_directory, tmp_path / "drill-data", source)
    )
    assert off["status"]["phase"] == "Failed" and off["status"]["reason"] == "DrillsDisabled", off["status"]
    assert scratch_objects(api, namespace) == []

    monkeypatch.setenv("IDM_BACKUP_ENABLE_DRILLS", "true")
    operator.stop()
    operator.start()
    # A drill of a pod that a backup in the namespace targets by host name is refused before anything exists.
    template = backup_spec(
        platform, s3_storage(platform, "x"), type="Data", target={**target(directory), "host": HOST}
    )
    del template["target"]["podName"]
    create_schedule(api, namespace, "yearly", {"schedule": "0 0 1 1 *", "template": {"spec": template}})
    refused = run_restore(
        api, namespace, operator, "near", drill_spec(drill_directory, tmp_path / "drill-data", source)
    )
    assert refused["status"]["reason"] == "DrillWouldTouchProduction", refused["status"]
    assert "IdmBackupSchedule yearly (host ipa-hidden.example.test)" in refused["status"]["message"]
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "idmbackupschedules", "yearly"
    )
    # Nor may the scratch pod mount a claim that outlives it read-write: a restore would overwrite it.
    sharing = drill_spec(drill_directory, tmp_path / "drill-data", source)
    sharing["drill"]["podTemplate"]["spec"]["volumes"] = [
        {"name": "data", "persistentVolumeClaim": {"claimName": "ipa-hidden-data"}}
    ]
    shared = run_restore(api, namespace, operator, "shared", sharing)
    assert shared["status"]["reason"] == "DrillWouldTouchProduction", shared["status"]
    assert "claim ipa-hidden-data read-write" in shared["status"]["message"]

    create_restore(api, namespace, "drill", drill_spec(drill_directory, tmp_path / "drill-data", source))
    # While it runs, the scratch pod is walled off: a policy denying all egress selects it.
    wait_for("the scratch pod", lambda: "pod/drill-drill" in scratch_objects(api, namespace), timeout=60)
    policy = client.NetworkingV1Api(api).read_namespaced_network_policy("drill-drill", namespace)
    assert policy.spec.policy_types == ["Egress"] and not policy.spec.egress
    assert policy.spec.pod_selector.match_labels["idm-backup.io/drill"] == "drill"
    status = wait_for(
        "the drill to finish",
        lambda: (
            (s := get_restore(api, namespace, "drill").get("status", {})).get("phase")
            in ("Succeeded", "Failed")
            and s
        ),
        timeout=180,
    )
    assert status["phase"] == "Succeeded", status
    assert status["drill"]["pod"] == "drill-drill" and status["drill"]["restoreSeconds"] > 0
    checked = {c["backend"]: c for c in status["check"]["entries"]}
    assert status["drill"]["entries"] == sum(c["expected"] for c in checked.values()) > 0
    assert all(c["expected"] == c["found"] for c in checked.values())
    assert "replication" not in status  # nothing to re-initialize from a throwaway server
    # The restored data is in the scratch server's directory; production kept its newer state.
    assert exists(drill_directory, BOB) and not exists(drill_directory, MALLORY)
    assert exists(directory, MALLORY) and not exists(directory, BOB)
    wait_for("the scratch server to be gone", lambda: scratch_objects(api, namespace) == [], timeout=60)


def test_a_failing_drill_shows_in_status_and_events_and_leaves_no_pod_or_volume(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    drill_directory: DirectoryServer,
    server: Callable[..., str],
    run_backup: Callable[..., dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    operator: OperatorProcess,
) -> None:
    monkeypatch.setenv("IDM_BACKUP_ENABLE_DRILLS", "true")
    operator.stop()
    operator.start()
    server()
    apply_drill_dm_secret(api, namespace, drill_directory.password)
    backup = run_backup("nightly", data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    (tmp_path / "elsewhere").mkdir()
    # A scratch volume of its own: the stand-in's 389-ds (on the host) cannot find what ipa-restore
    # stages there, so the import fails as a real one would on a broken LDIF.
    spec = drill_spec(
        drill_directory,
        tmp_path / "elsewhere",
        {"backupRef": {"name": "nightly"}},
        volumeClaimTemplate={"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    )
    create_restore(api, namespace, "broken", spec)
    wait_for("the scratch claim", lambda: "pvc/broken-drill" in scratch_objects(api, namespace), timeout=60)
    status = wait_for(
        "the drill to finish",
        lambda: (
            (s := get_restore(api, namespace, "broken").get("status", {})).get("phase")
            in ("Succeeded", "Failed")
            and s
        ),
        timeout=180,
    )
    assert status["phase"] == "Failed", status
    assert status["reason"] in ("RestoreIncomplete", "RestoreFailed", "EntryCountMismatch"), status
    assert "RestoreFailed" in events(api, namespace, "broken")
    wait_for("the scratch server to be gone", lambda: scratch_objects(api, namespace) == [], timeout=60)


def test_deleting_a_running_restore_cancels_it_and_cleans_up(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
) -> None:
    server(payload_bytes=300 << 20)
    backup = run_backup("big", data_backup(platform, directory, f"restore/{namespace}"), timeout=300)
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    change_after_backup(directory)
    create_restore(api, namespace, "unwanted", restore_spec(directory, {"backupRef": {"name": "big"}}))
    wait_for(
        "the restore to stage",
        lambda: get_restore(api, namespace, "unwanted").get("status", {}).get("step") == "stage",
        timeout=120,
        interval=0.1,
    )
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, RESTORES, "unwanted"
    )
    # Staging stops, the staged files go and the server's lock is released: the pod is as before.
    wait_for("the staged files to be removed", lambda: staged_files(api, namespace) == "", timeout=60)
    wait_for("the lock to be released", lambda: leases(api, namespace) == [], timeout=60)
    assert services_running(api, namespace, POD)
    # Cancelled before ipa-restore: the directory kept what changed after the backup.
    assert exists(directory, MALLORY) and not exists(directory, BOB)


def test_replication_reinitialize_runs_each_masters_commands_in_its_pod_and_names_the_ones_that_failed(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
) -> None:
    server()
    others = ("ipa-ca", "ipa-kra", "ipa-partial", "ipa-visible")
    for short in others:
        server(f"{short}.example.test", short, labels={"role": "replica"})
    backup = run_backup("nightly", data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    source = {"backupRef": {"name": "nightly"}}
    replication = {"mode": "Reinitialize", "podSelector": {"matchLabels": {"role": "replica"}}}

    status = run_restore(
        api, namespace, operator, "all", restore_spec(directory, source, replication=replication)
    )["status"]
    assert status["phase"] == "Succeeded", status
    for master in status["replication"]:
        short = master["host"].split(".")[0]
        assert [(r["command"], r["pod"], r["exitCode"]) for r in master["results"]] == [
            (f"ipa-replica-manage re-initialize --from {HOST}", short, 0),
            (f"ipa-csreplica-manage re-initialize --from {HOST}", short, 0),
        ], master
    assert "ReplicasReinitialized" in events(api, namespace, "all")

    wait_for("ipa-kra ready again", lambda: pod_ready(api, namespace, "ipa-kra"))
    set_fault(api, namespace, "ipa-kra", "reinit-fail")
    status = run_restore(
        api, namespace, operator, "one", restore_spec(directory, source, replication=replication)
    )["status"]
    assert status["phase"] == "Failed" and status["reason"] == "ReinitializeFailed", status
    assert "re-initializing ipa-kra.example.test failed" in status["message"]
    results = {m["host"].split(".")[0]: m["results"] for m in status["replication"]}
    assert results["ipa-kra"] == [
        {
            "command": f"ipa-replica-manage re-initialize --from {HOST}",
            "pod": "ipa-kra",
            "exitCode": 1,
            "message": "Update failed! Status: [-1 Total update abortedLDAP error: "
            "Can't contact LDAP server]",
        }
    ]
    # The masters after it are still re-initialized.
    assert all(r["exitCode"] == 0 for short in ("ipa-partial", "ipa-visible") for r in results[short])


def test_a_full_restore_that_enables_the_hidden_replica_is_hidden_again(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
) -> None:
    server()
    full = run_backup("full", {**data_backup(platform, directory, f"restore/{namespace}"), "type": "Full"})
    assert full["status"]["phase"] == "Succeeded", full["status"]
    change_after_backup(directory)
    spec = restore_spec(directory, {"backupRef": {"name": "full"}}, type="Full", allowSymlinkedConfig=True)
    status = run_restore(api, namespace, operator, "full", spec)["status"]
    assert status["phase"] == "Succeeded", status
    assert "--data" not in status["ipaRestore"]["command"]
    assert exists(directory, BOB) and not exists(directory, MALLORY)
    # ipa-restore enabled the restored server (FreeIPA PR #6192); the operator hid it again.
    hidden = {c["type"]: c for c in status["conditions"]}["ReplicaHidden"]
    assert (
        hidden["status"] == "True"
        and "ipa-restore enabled ipa-hidden.example.test; hidden again" in hidden["message"]
    )
    assert host_states(directory) == {"hiddenService"}
    assert "ReplicaHidden" in events(api, namespace, "full")
    assert services_running(api, namespace, POD)
