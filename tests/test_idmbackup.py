"""IdmBackup end to end: the real operator process, API server, stand-in FreeIPA pods, S3 and LDAP."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import kopf
import pytest
from kubernetes import client

from idm_backup_operator.handlers import idmbackup
from testbed import freeipa_pod, stack
from testbed.deploy import OperatorProcess
from testbed.gpgkeys import ExportedKey
from tests.helpers import (
    GROUP,
    KEY_SECRET,
    PLURAL,
    VERSION,
    Backup,
    apply,
    backup_dirs,
    backup_spec,
    create_backup,
    decrypted_sha256,
    events,
    get_backup,
    pod_exec,
    pod_ready,
    s3_chunks,
    s3_keys,
    s3_storage,
    services_running,
    wait_deleted,
    wait_finished,
    wait_for,
)


def test_full_backup_to_s3_decrypts_to_the_archive_ipa_backup_made(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    backup_key: ExportedKey,
) -> None:
    pod = freeipa()
    prefix = f"test/{namespace}"
    obj = run_backup(
        "full", backup_spec(platform, s3_storage(platform, prefix), type="Full", podCleanup="Keep")
    )
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    archive = status["archive"]
    directory = status["ipaBackup"]["directory"]
    assert directory.startswith("/var/lib/ipa/backup/ipa-full-")
    dirname = directory.rsplit("/", 1)[1]
    expected_dir = f"{prefix}/{namespace}/ipa-hidden.example.test/{dirname}/"
    assert archive["uri"] == f"s3://{platform.s3_bucket}/{expected_dir}ipa-full.tar.gpg"
    assert s3_keys(s3, platform.s3_bucket, prefix) == [
        f"{expected_dir}header",
        f"{expected_dir}ipa-full.tar.gpg",
        f"{expected_dir}manifest.json",
    ]
    # The stored archive decrypts, with the private key the operator never saw, to ipa-backup's own tar.
    sha, size = decrypted_sha256(
        s3_chunks(s3, platform.s3_bucket, f"{expected_dir}ipa-full.tar.gpg"), backup_key
    )
    code, out = pod_exec(api, namespace, pod, ["sha256sum", f"{directory}/ipa-full.tar"])
    assert code == 0
    assert sha == out.split()[0] == archive["plaintextSHA256"]
    assert size == archive["plaintextSizeBytes"]
    assert archive["encrypted"] is True and archive["recipients"] == [backup_key.fingerprint]
    header = status["header"]
    assert header["type"] == "FULL" and header["host"] == "ipa-hidden.example.test"
    assert "KRA" in header["services"] and header["ipaVersion"]
    assert (
        status["target"]["host"] == "ipa-hidden.example.test" and status["target"]["realm"] == "EXAMPLE.TEST"
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Completed"]["status"] == "True"
    assert conditions["ServicesRunning"]["status"] == "True"
    assert services_running(api, namespace, pod)
    assert status["observedGeneration"] == 1 and status["durationSeconds"] >= 0
    # The stand-in is shaped like freeipa-container: /etc/ipa is a symlink into /data.
    assert events(api, namespace, "full") == ["BackupStarted", "ConfigFilesAreSymlinks", "BackupCompleted"]
    manifest = json.loads(
        s3.get_object(Bucket=platform.s3_bucket, Key=f"{expected_dir}manifest.json")["Body"].read()
    )
    assert manifest["resource"]["uid"] == obj["metadata"]["uid"]
    assert manifest["files"]["archive"]["sha256"] == archive["sha256"]
    assert manifest["files"]["archive"]["plaintext"]["sha256"] == archive["plaintextSHA256"]


def test_data_backup_to_pvc_decrypts_and_removes_the_pod_copy(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    operator: OperatorProcess,
    backup_key: ExportedKey,
) -> None:
    pod = freeipa()
    apply(api, namespace, freeipa_pod.data_claim("backups", "20Gi"))
    claim = wait_for(
        "backup claim bound",
        lambda: (
            client.CoreV1Api(api)
            .read_namespaced_persistent_volume_claim("backups", namespace)
            .spec.volume_name
        ),
    )
    volume_dir = Path(platform.volumes_dir) / claim
    # What the Helm chart does with a volume mount: the claim appears under the operator's PVC root.
    (operator.pvc_root / "backups").symlink_to(volume_dir)
    obj = run_backup(
        "data",
        backup_spec(platform, {"pvc": {"claimName": "backups", "subPath": "idm"}}, type="Data", online=True),
    )
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    dirname = status["ipaBackup"]["directory"].rsplit("/", 1)[1]
    stored = volume_dir / "idm" / namespace / "ipa-hidden.example.test" / dirname
    assert sorted(p.name for p in stored.iterdir()) == ["header", "ipa-data.tar.gpg", "manifest.json"]
    assert status["archive"]["uri"] == str(
        operator.pvc_root
        / "backups"
        / "idm"
        / namespace
        / "ipa-hidden.example.test"
        / dirname
        / "ipa-data.tar.gpg"
    )
    with (stored / "ipa-data.tar.gpg").open("rb") as f:
        sha, size = decrypted_sha256(iter(lambda: f.read(1 << 20), b""), backup_key)
    assert (sha, size) == (status["archive"]["plaintextSHA256"], status["archive"]["plaintextSizeBytes"])
    assert status["header"]["type"] == "DATA"
    # podCleanup defaults to Remove: the server's volume does not fill up with old backups.
    code, _ = pod_exec(api, namespace, pod, ["test", "-e", status["ipaBackup"]["directory"]])
    assert code == 1
    # Nothing else anywhere on the volume: no `.<name>.partial-*` upload file (PVCStore writes it beside
    # the final name, in `stored` itself), no `.idm-backup-probe-*` left by the writability check (at the
    # store's root). pathlib's rglob matches hidden names too.
    files = sorted(str(p.relative_to(volume_dir)) for p in volume_dir.rglob("*") if not p.is_dir())
    expected = f"idm/{namespace}/ipa-hidden.example.test/{dirname}"
    assert files == [f"{expected}/header", f"{expected}/ipa-data.tar.gpg", f"{expected}/manifest.json"]


def test_role_mismatch_fails_before_any_service_stops(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
) -> None:
    pod = freeipa("ipa-partial.example.test")
    prefix = f"test/{namespace}"
    obj = run_backup("roles", backup_spec(platform, s3_storage(platform, prefix), target={"podName": pod}))
    status = obj["status"]
    assert status["phase"] == "Failed" and status["reason"] == "RoleCheckFailed"
    # ipa-backup's own words, then which roles are missing and where they are.
    assert status["message"].startswith(
        "Error: Local roles CA do not match globally used roles ADTRUST, CA, DNS, DNSKeySync, KRA."
    )
    assert (
        "KRA server (KRA on ipa-hidden.example.test, ipa-kra.example.test, ipa-visible.example.test)"
        in status["message"]
    )
    assert "ipaBackup" not in status  # ipa-backup never ran: nothing was stopped
    assert backup_dirs(api, namespace, pod) == []
    assert services_running(api, namespace, pod)
    assert s3_keys(s3, platform.s3_bucket, prefix) == []
    assert events(api, namespace, "roles") == ["BackupStarted", "BackupFailed"]


def test_a_server_that_is_not_a_hidden_replica_is_refused_unless_overridden(
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
) -> None:
    pod = freeipa("ipa-visible.example.test")
    storage = s3_storage(platform, f"test/{namespace}")
    refused = run_backup("visible", backup_spec(platform, storage, type="Data", target={"podName": pod}))[
        "status"
    ]
    assert refused["phase"] == "Failed" and refused["reason"] == "NotHiddenReplica"
    assert "ipa-visible.example.test is not a hidden replica (its services are enabled)" in refused["message"]
    assert "requireHiddenReplica" in refused["message"]
    allowed = run_backup(
        "visible-ok",
        backup_spec(platform, storage, type="Data", target={"podName": pod, "requireHiddenReplica": False}),
    )["status"]
    assert allowed["phase"] == "Succeeded", allowed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "Full", "online": True}, "online is only possible with type Data"),
        ({"type": "Data", "logs": True}, "logs is only possible with type Full"),
        ({"encryption": {}}, "encryption.publicKeysSecretRef is required"),
        (
            {"encryption": {"mode": "Sometimes"}},
            'Unsupported value: "Sometimes": supported values: "GPG", "None"',
        ),
        ({"storage": {}}, "storage needs exactly one of s3 or pvc"),
        ({"target": {"podName": "a", "host": "ipa.example.test"}}, "target needs exactly one of podName"),
        ({"activeDeadlineSeconds": 5}, "should be greater than or equal to 60"),
        ({"tmpDir": "relative/tmp"}, "spec.tmpDir in body should match '^/'"),
    ],
)
def test_bad_specs_are_refused_at_apply_time_with_a_message(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    crds: None,
    change: dict[str, Any],
    message: str,
) -> None:
    spec = backup_spec(platform, s3_storage(platform, "x"))
    if "target" in change:
        spec["target"] = {**change.pop("target"), "ldap": spec["target"]["ldap"]}
    spec.update(change)
    with pytest.raises(client.ApiException) as refused:
        create_backup(api, namespace, "bad", spec)
    assert refused.value.status == 422
    assert message in json.loads(refused.value.body)["message"]


def test_spec_cannot_change_once_created(
    api: client.ApiClient, namespace: str, platform: stack.Platform, crds: None
) -> None:
    create_backup(api, namespace, "fixed", backup_spec(platform, s3_storage(platform, "x")))
    with pytest.raises(client.ApiException) as refused:
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "fixed", {"spec": {"type": "Data"}}
        )
    assert refused.value.status == 422
    assert "spec is immutable" in refused.value.body


def test_missing_or_unusable_keys_fail_with_a_clear_message(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    backup_key: ExportedKey,
) -> None:
    freeipa()
    storage = s3_storage(platform, f"test/{namespace}")
    apply(
        api,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "garbage"},
            "stringData": {
                "key.asc": "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnot a key\n"
                "-----END PGP PUBLIC KEY BLOCK-----\n"
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "private"},
            "data": {"key.asc": base64.b64encode(backup_key.secret).decode()},
        },
    )
    cases = {
        "absent": (f"Secret {namespace}/nope not found", {"name": "nope"}),
        "garbage": ("encryption keys unusable:", {"name": "garbage"}),
        "private": ("private key", {"name": "private"}),
        "wrongkey": ("has no key other.asc", {"name": KEY_SECRET, "keys": ["other.asc"]}),
    }
    for name, (expected, ref) in cases.items():
        spec = backup_spec(platform, storage, type="Data", online=True)
        spec["encryption"] = {"publicKeysSecretRef": ref}
        status = run_backup(f"keys-{name}", spec)["status"]
        assert status["phase"] == "Failed" and status["reason"] == "InvalidEncryptionKeys", (name, status)
        assert expected in status["message"], (name, status["message"])
        assert "Traceback" not in status["message"]
        assert "ipaBackup" not in status


def test_ipa_backup_failing_half_way_ends_failed_with_services_running(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
) -> None:
    pod = freeipa(fault="ldif")
    prefix = f"test/{namespace}"
    status = run_backup("ldif", backup_spec(platform, s3_storage(platform, prefix), type="Full"))["status"]
    assert status["phase"] == "Failed" and status["reason"] == "IpaBackupFailed"
    assert status["message"].startswith("ipa-backup failed: ")
    assert "db2ldif" in status["message"]  # ipa-backup's own error line
    assert status["ipaBackup"]["exitCode"] == 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["ServicesRunning"]["status"] == "True"
    assert conditions["ServicesRunning"]["reason"] == "StartedByOperator"
    assert services_running(api, namespace, pod)
    assert "ServicesRestarted" in events(api, namespace, "ldif")
    assert s3_keys(s3, platform.s3_bucket, prefix) == []


def test_a_hanging_ipa_backup_is_stopped_at_the_deadline_and_services_restarted(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
) -> None:
    pod = freeipa(fault="hang")
    spec = backup_spec(
        platform, s3_storage(platform, f"test/{namespace}"), type="Full", activeDeadlineSeconds=60
    )
    status = run_backup("hang", spec, timeout=150)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded"), status
    assert "did not finish within activeDeadlineSeconds=60; ipa-backup was stopped" in status["message"]
    running = next(c for c in status["conditions"] if c["type"] == "ServicesRunning")
    assert (running["status"], running["reason"]) == ("True", "StartedByOperator")
    code, _ = pod_exec(api, namespace, pod, ["pgrep", "-x", "ipa-backup"])
    assert code == 1  # no ipa-backup left running in the pod
    assert services_running(api, namespace, pod)


def test_deleting_a_running_backup_stops_ipa_backup_restarts_services_and_frees_the_server(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
) -> None:
    """As deleting a Job stops its pods: an offline ipa-backup that would hang for its whole deadline
    (services stopped) is stopped within seconds, and the server is up and free for the next backup."""
    pod = freeipa(fault="hang")
    prefix = f"test/{namespace}"
    create_backup(
        api, namespace, "unwanted", backup_spec(platform, s3_storage(platform, prefix), type="Full")
    )
    wait_for(
        "ipa-backup to run",
        lambda: (
            get_backup(api, namespace, "unwanted").get("status", {}).get("step", "").startswith("ipa-backup")
        ),
        timeout=60,
    )
    wait_for("the services to be stopped", lambda: not services_running(api, namespace, pod), timeout=60)
    deleted_at = time.monotonic()
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "unwanted"
    )
    wait_for(
        "the cancellation event", lambda: "BackupFailed" in events(api, namespace, "unwanted"), timeout=60
    )
    stopped_after = time.monotonic() - deleted_at
    code, _ = pod_exec(api, namespace, pod, ["pgrep", "-x", "ipa-backup"])
    assert code == 1  # no ipa-backup left running in the pod
    assert services_running(api, namespace, pod)
    assert stopped_after < 40, stopped_after  # the deadline was 7200 s
    cancelled = (
        client.CoreV1Api(api)
        .list_namespaced_event(namespace, field_selector="involvedObject.name=unwanted,reason=BackupFailed")
        .items
    )
    assert [e.message for e in cancelled] == [
        "the IdmBackup was deleted while the backup ran: stopped, and nothing was stored; "
        "ipa-backup was stopped"
    ]
    assert s3_keys(s3, platform.s3_bucket, prefix) == []
    # The server's lock is free: the next backup runs as soon as the kubelet sees the pod ready again.
    assert pod_exec(api, namespace, pod, ["sh", "-c", ": > /data/ipa-standin-fault"])[0] == 0
    wait_for("the pod to be ready again", lambda: pod_ready(api, namespace, pod), timeout=60)
    status = run_backup(
        "next", backup_spec(platform, s3_storage(platform, prefix), type="Data", online=True)
    )["status"]
    assert status["phase"] == "Succeeded", status


def test_operator_killed_during_transfer_leaves_no_success_no_partial_object_and_services_up(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    s3: Any,
) -> None:
    pod = freeipa(payload_bytes=768 << 20)
    prefix = f"test/{namespace}"
    create_backup(
        api,
        namespace,
        "killed",
        backup_spec(platform, s3_storage(platform, prefix), type="Full", tmpDir="/data/tmp"),
    )

    def uploading() -> bool:
        return get_backup(api, namespace, "killed").get("status", {}).get("step", "").startswith("uploading")

    def stored_parts() -> list[dict[str, Any]]:
        """The parts of the archive's multipart uploads that the server holds so far."""
        uploads = s3.list_multipart_uploads(Bucket=platform.s3_bucket, Prefix=prefix).get("Uploads", [])
        return [
            part
            for upload in uploads
            for part in s3.list_parts(
                Bucket=platform.s3_bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            ).get("Parts", [])
        ]

    wait_for("the archive transfer to start", uploading, timeout=180, interval=0.1)
    # Mid-transfer, observed on the server: a first 5 MiB part of the 768 MiB archive is stored.
    wait_for("a first part of the archive in S3", stored_parts, timeout=60, interval=0.1)
    operator.kill()
    # The dead operator's last word, and the server's, say the kill came mid-transfer: still uploading,
    # and a multipart upload of the archive open, with parts, not completed.
    status = get_backup(api, namespace, "killed")["status"]
    assert status["phase"] == "Running" and status["step"].startswith("uploading"), status
    (upload,) = s3.list_multipart_uploads(Bucket=platform.s3_bucket, Prefix=prefix)["Uploads"]
    assert upload["Key"].endswith("/ipa-full.tar.gpg"), upload
    assert stored_parts()
    assert s3_keys(s3, platform.s3_bucket, prefix) == [f"{upload['Key'].rsplit('/', 1)[0]}/header"]
    operator.start()
    status = wait_finished(api, namespace, "killed", operator, timeout=300)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "OperatorRestarted", status
    assert "uploading" in status["message"] and "nothing partial is left in storage" in status["message"]
    assert s3_keys(s3, platform.s3_bucket, prefix) == []
    assert not s3.list_multipart_uploads(Bucket=platform.s3_bucket, Prefix=prefix).get("Uploads")
    assert services_running(api, namespace, pod)
    selector = f"idm-backup.io/target-namespace={namespace}"  # its servers' locks, wherever they are
    leases = client.CoordinationV1Api(api).list_lease_for_all_namespaces(label_selector=selector).items
    assert leases == []


@pytest.mark.parametrize("archive", ["intact", "altered"])
def test_a_backup_found_stored_after_a_restart_is_checked_byte_for_byte_and_its_pod_copy_removed(
    archive: str,
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Backup,
    s3: Any,
) -> None:
    """An operator killed right after writing the manifest leaves a Running backup whose files are all
    stored. Killing it in exactly that millisecond is a race, so the state is built: a real backup's
    files (its plaintext copy kept in the pod), and a second IdmBackup left Running at the last step,
    which its manifest names. The restarted operator must read the archive back before calling it
    Succeeded, and then remove the pod's copy (podCleanup: Remove, the default)."""
    pod = freeipa()
    prefix = f"test/{namespace}"
    spec = backup_spec(platform, s3_storage(platform, prefix), type="Data")
    done = run_backup("source", {**spec, "podCleanup": "Keep"})["status"]
    assert done["phase"] == "Succeeded", done
    directory = done["ipaBackup"]["directory"]
    operator.stop()
    create_backup(api, namespace, "interrupted", spec)
    uid = get_backup(api, namespace, "interrupted")["metadata"]["uid"]
    client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "interrupted",
        {
            "status": {
                "phase": "Running",
                "step": "verifying the stored archive",
                **{k: done[k] for k in ("startTime", "target", "ipaBackup", "header")},
            }
        },
    )
    bucket = platform.s3_bucket
    manifest_key = done["archive"]["manifestURI"].removeprefix(f"s3://{bucket}/")
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    manifest["resource"].update(name="interrupted", uid=uid)
    s3.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps(manifest).encode())
    if archive == "altered":
        # One byte changed, the size kept: only a read-back hash tells.
        key = done["archive"]["uri"].removeprefix(f"s3://{bucket}/")
        data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    operator.start()
    status = wait_finished(api, namespace, "interrupted", operator)["status"]
    copy_left, _ = pod_exec(api, namespace, pod, ["test", "-e", directory])
    if archive == "intact":
        assert status["phase"] == "Succeeded", status
        assert "completed before the operator restarted" in status["message"]
        assert status["durationSeconds"] >= 0
        assert copy_left != 0, f"{directory} is still in the pod"
        assert len(s3_keys(s3, bucket, prefix)) == 3
    else:
        assert (status["phase"], status["reason"]) == ("Failed", "OperatorRestarted"), status
        assert "nothing partial is left in storage" in status["message"]
        assert s3_keys(s3, bucket, prefix) == []
    assert services_running(api, namespace, pod)


def _ipa_backup_runs(api: client.ApiClient, namespace: str, pod: str) -> list[tuple[str, datetime, datetime]]:
    """Each ipa-backup run in the pod, from the stand-in's own log (/var/log/ipabackup.log, appended to by
    every run, timestamps to the millisecond): (the directory it reported, its first line, its last)."""
    code, out = pod_exec(api, namespace, pod, ["cat", "/var/log/ipabackup.log"])
    assert code == 0, out
    runs, start, directory = [], None, None
    for line in out.splitlines():
        if not (m := re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) [A-Z]+ (.*)", line)):
            continue  # the continuation of a multi-line message
        at, message = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f"), m[2]
        if message.startswith("Logging to "):  # the first line a run writes to the file
            start, directory = at, None
        elif message.startswith("Backed up to "):
            directory = message.removeprefix("Backed up to ")
        elif message == "The ipa-backup command was successful":
            assert start is not None and directory is not None, out
            runs.append((directory, start, at))
    return runs


def test_two_backups_of_one_server_run_one_after_the_other(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
) -> None:
    pod = freeipa(payload_bytes=64 << 20)
    storage = s3_storage(platform, f"test/{namespace}")
    names = ("first", "second")
    for name in names:
        create_backup(api, namespace, name, backup_spec(platform, storage, type="Data", online=True))
    finished = {name: wait_finished(api, namespace, name, operator)["status"] for name in names}
    assert [s["phase"] for s in finished.values()] == ["Succeeded", "Succeeded"], finished
    # Which one waited, exactly: one backup, and it waited for the other, named with its uid as the holder
    # of the server's lock. (Both end with a Waiting=False condition, LockAcquired: not evidence.)
    reasons = {name: events(api, namespace, name) for name in names}
    (waiter,) = [name for name in names if "BackupWaiting" in reasons[name]]
    (holder,) = [name for name in names if name != waiter]
    assert reasons[holder] == ["BackupStarted", "BackupCompleted"], reasons
    assert reasons[waiter] == ["BackupWaiting", "BackupStarted", "BackupCompleted"], reasons
    holder_uid = get_backup(api, namespace, holder)["metadata"]["uid"]
    core = client.CoreV1Api(api)

    def event(name: str, reason: str) -> Any:
        selector = f"involvedObject.name={name},reason={reason}"
        (found,) = core.list_namespaced_event(namespace, field_selector=selector).items
        return found

    assert event(waiter, "BackupWaiting").message == (
        f"waiting for IdmBackup {namespace}/{holder} ({holder_uid}) to finish: "
        "one backup per server at a time"
    )

    # Never overlapping, precisely: status times and Event timestamps have whole seconds, so two backups in
    # the same second would pass any comparison of them. The API server's resourceVersions order writes
    # exactly: the waiter started only after the holder had completed, verified archive and all.
    def order(name: str, reason: str) -> int:
        return int(event(name, reason).metadata.resource_version)

    assert order(holder, "BackupCompleted") < order(waiter, "BackupStarted")
    # And on the server itself, to the millisecond: the waiter's ipa-backup began after the holder's ended.
    runs = _ipa_backup_runs(api, namespace, pod)
    assert [directory for directory, _, _ in runs] == [
        finished[holder]["ipaBackup"]["directory"],
        finished[waiter]["ipaBackup"]["directory"],
    ], runs
    (_, _, holder_end), (_, waiter_start, _) = runs
    assert holder_end < waiter_start, runs


def test_deletion_policy_delete_removes_the_stored_files_and_retain_keeps_them(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
) -> None:
    freeipa()
    custom = client.CustomObjectsApi(api)
    kept_prefix, deleted_prefix = f"test/{namespace}/kept", f"test/{namespace}/deleted"
    for name, prefix, policy in (("kept", kept_prefix, "Retain"), ("deleted", deleted_prefix, "Delete")):
        spec = backup_spec(
            platform, s3_storage(platform, prefix), type="Data", online=True, deletionPolicy=policy
        )
        status = run_backup(name, spec)["status"]
        assert status["phase"] == "Succeeded", status
        assert len(s3_keys(s3, platform.s3_bucket, prefix)) == 3
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    wait_deleted(api, namespace, "kept", "deleted")
    assert s3_keys(s3, platform.s3_bucket, deleted_prefix) == []
    assert len(s3_keys(s3, platform.s3_bucket, kept_prefix)) == 3


def test_without_a_credentials_secret_the_operators_own_identity_is_used_only_if_allowed(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    operator: OperatorProcess,
    s3: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """IRSA and EKS Pod Identity reach boto3 through its credential chain, as AWS_* variables do; the
    variables are what can be produced here (no STS), so they stand for the operator's own identity."""
    freeipa()
    prefix = f"test/{namespace}/ambient"
    spec = backup_spec(
        platform, s3_storage(platform, prefix), type="Data", online=True, deletionPolicy="Delete"
    )
    del spec["storage"]["s3"]["credentialsSecretRef"]
    # The operator of this test's fixture was not allowed to lend its identity.
    status = run_backup("refused", spec)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "StorageUnavailable")
    assert (
        "credentialsSecretRef is required: this operator does not lend its own AWS identity"
        in status["message"]
    )

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", platform.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", platform.s3_secret_key)
    allowed = OperatorProcess(
        namespace, platform.kubeconfig, tmp_path, tmp_path / "ambient.log", args=["--s3-ambient-credentials"]
    )
    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "refused")
    operator.stop()
    allowed.start()
    try:
        create_backup(api, namespace, "ambient", spec)
        status = wait_finished(api, namespace, "ambient", allowed)["status"]
        assert status["phase"] == "Succeeded", status
        assert len(s3_keys(s3, platform.s3_bucket, prefix)) == 3
        # Deleting (deletionPolicy Delete) goes through the same identity.
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "ambient"
        )
        wait_for(
            "the stored files to be deleted",
            lambda: s3_keys(s3, platform.s3_bucket, prefix) == [],
            timeout=60,
        )
    finally:
        allowed.stop()


@pytest.mark.parametrize("phase", [None, "Pending", "Running"])
def test_a_stale_copy_of_a_backup_this_process_finished_is_left_alone(phase: str | None) -> None:
    """kopf replays older copies of an object it could not mark as handled (all the events queued during
    a backup, once the object is deleted; the test above of deleting a running backup produces exactly
    that). The handler is called directly here to pin every phase such a copy can carry, with a memo
    without an API client: any write, any new backup, would fail the test."""
    raw = {
        "metadata": {"namespace": "ns", "name": "nightly", "uid": "uid-1", "generation": 1},
        "spec": {"target": {}, "storage": {}},
        "status": {"phase": phase} if phase else {},
    }
    body = kopf.Body(raw)
    memo = kopf.Memo(api=None, services=None, backups_finished={"uid-1"})
    asyncio.run(
        idmbackup.take_backup(body=body, status=body.status, memo=memo, logger=logging.getLogger("test"))
    )
    assert memo.backups_finished == {"uid-1"}
