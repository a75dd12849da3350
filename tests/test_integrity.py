"""Every check that guards a backup's integrity, made to fail once, for real.

The real operator process, the platform's API server and S3, and stand-in FreeIPA pods whose faults are
injected in the pod itself (testbed/images/freeipa-standin/README.md lists them): an archive that changes
after its checksum, a header cut short or missing, an archive missing, a directory reported by another
path, no or a broken /etc/ipa/default.conf, an LDAP server that refuses the password or does not answer,
a directory that cannot be removed, `ipactl start` failing, ipa-backup killed or out of disk space. Each
test asserts what the user sees (phase, reason, the message's facts, conditions, Events), that IPA runs
afterwards (unless the point is that it does not), and, with plain boto3, that nothing is stored under
the backup's name when it failed.

What was stored is checked without the operator's code: `gpg --decrypt` and `gpg --list-packets` (the
CLI, with the restoring person's secret key), `tar -tzf`, and sha256 of the objects read with boto3.

Transfer faults (a flipped byte, a cut stream, a stalled or failing part between the operator and S3)
are the store-level tests' of tests/test_storage_faults.py, with testbed/faultproxy.py; here only one of
them goes through the whole operator, for what its user sees (UploadFailed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from testbed import freeipa_pod, stack
from testbed.faultproxy import Fault, FaultProxy
from testbed.gpgkeys import ExportedKey
from tests.helpers import (
    Backup,
    apply,
    backup_dirs,
    backup_spec,
    event_messages,
    events,
    pod_exec,
    pod_ready,
    s3_keys,
    s3_storage,
    services_running,
    set_fault,
    wait_for,
)

pytestmark = pytest.mark.platform

HOST = "ipa-hidden.example.test"
SERVERID = "EXAMPLE-TEST"


@pytest.fixture
def prefix(namespace: str) -> str:
    return f"integrity/{namespace}"


# -- what a test looks at ---------------------------------------------------------------------------------


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def failed(obj: dict[str, Any], reason: str) -> dict[str, Any]:
    """The status of a backup that must have failed for `reason`, with the Completed condition agreeing."""
    status: dict[str, Any] = obj["status"]
    assert (status["phase"], status.get("reason")) == ("Failed", reason), status
    completed = conditions(status)["Completed"]
    assert (completed["status"], completed["reason"]) == ("False", reason), completed
    return status


def nothing_stored(s3: Any, platform: stack.Platform, prefix: str) -> None:
    """Plain boto3: no object under the prefix, and no multipart upload left open there either."""
    assert s3_keys(s3, platform.s3_bucket, prefix) == []
    uploads = s3.list_multipart_uploads(Bucket=platform.s3_bucket, Prefix=prefix).get("Uploads", [])
    assert uploads == [], uploads


def in_pod(api: client.ApiClient, namespace: str, pod: str, *argv: str) -> str:
    code, out = pod_exec(api, namespace, pod, list(argv))
    assert code == 0, (argv, out)
    return out


def services_up(api: client.ApiClient, namespace: str, pod: str) -> bool:
    try:
        return services_running(api, namespace, pod)
    except client.ApiException:
        return False  # the container is not started yet


def s3_object(s3: Any, platform: stack.Platform, key: str) -> bytes:
    data: bytes = s3.get_object(Bucket=platform.s3_bucket, Key=key)["Body"].read()
    return data


def stored_key(platform: stack.Platform, uri: str) -> str:
    bucket_prefix = f"s3://{platform.s3_bucket}/"
    assert uri.startswith(bucket_prefix), uri
    return uri.removeprefix(bucket_prefix)


def tar_list(archive: Path) -> list[str]:
    return subprocess.run(
        ["tar", "-tzf", str(archive)], capture_output=True, text=True, check=True
    ).stdout.split()


# -- the archive, its header and its directory -------------------------------------------------------------


def test_an_archive_that_changes_after_its_checksum_fails_checksum_mismatch_and_nothing_is_stored(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
) -> None:
    """`rewrite`: right after the operator's sha256sum in the pod, one byte of the archive flips (size
    unchanged), so the bytes streamed out are not the ones whose checksum the operator took."""
    pod = freeipa(fault="rewrite")
    spec = backup_spec(platform, s3_storage(platform, prefix), type="Data", online=True, podCleanup="Keep")
    status = failed(run_backup("rewritten", spec), "ChecksumMismatch")
    match = re.fullmatch(
        r"the archive read from the pod \((\d+) bytes, sha256 ([0-9a-f]{64})\) differs from the file in "
        r"the pod \((\d+) bytes, sha256 ([0-9a-f]{64})\)",
        status["message"],
    )
    assert match, status["message"]
    read_size, read_sha, pod_size, pod_sha = match.groups()
    assert read_size == pod_size and read_sha != pod_sha  # the same size: only the checksum can tell
    # What was streamed is what the file is now: with the fault cleared, coreutils' own sha256sum agrees.
    set_fault(api, namespace, pod, "")
    archive = f"{status['ipaBackup']['directory']}/ipa-data.tar"
    assert in_pod(api, namespace, pod, "sha256sum", archive).split()[0] == read_sha
    assert "archive" not in status  # never reported as stored
    nothing_stored(s3, platform, prefix)  # the header and the archive were uploaded, then removed
    assert services_running(api, namespace, pod)
    assert events(api, namespace, "rewritten") == ["BackupStarted", "BackupFailed"]


@pytest.mark.parametrize("fault", ["noheader", "badheader"])
def test_a_missing_or_garbled_header_fails_invalid_header_and_the_pod_copy_goes(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
    fault: str,
) -> None:
    pod = freeipa(fault=fault)
    status = failed(
        run_backup("header", backup_spec(platform, s3_storage(platform, prefix), type="Data", online=True)),
        "InvalidHeader",
    )
    directory = status["ipaBackup"]["directory"]
    assert re.fullmatch(r"/var/lib/ipa/backup/ipa-data-\d{4}(-\d\d){5}", directory), directory
    if fault == "noheader":
        assert status["message"] == (
            f"cannot read {directory}/header: cat: {directory}/header: No such file or directory"
        )
    else:
        # Cut short in its time line: the first field the parser misses is the version.
        assert status["message"] == f"{directory}/header: backup header has no 'version' in its [ipa] section"
    assert "header" not in status and "archive" not in status
    # A failed run does not leave its plaintext copy in the pod (podCleanup: Remove, the default).
    assert backup_dirs(api, namespace, pod) == []
    nothing_stored(s3, platform, prefix)
    assert services_running(api, namespace, pod)


def test_a_missing_archive_fails_archive_missing(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
) -> None:
    pod = freeipa(fault="noarchive")
    status = failed(
        run_backup("noarchive", backup_spec(platform, s3_storage(platform, prefix), type="Full")),
        "ArchiveMissing",
    )
    archive = f"{status['ipaBackup']['directory']}/ipa-full.tar"
    assert status["message"].startswith(f"cannot read {archive} in the pod: stat: "), status["message"]
    assert status["message"].endswith(f"'{archive}': No such file or directory"), status["message"]
    assert status["header"]["type"] == "FULL"  # the header was read; the archive was not there
    assert backup_dirs(api, namespace, pod) == []
    nothing_stored(s3, platform, prefix)
    running = conditions(status)["ServicesRunning"]  # ipa-backup stopped and started them itself
    assert (running["status"], running["reason"]) == ("True", "StartedByIpaBackup")
    assert services_running(api, namespace, pod)


def test_a_directory_reported_by_another_path_fails_unexpected_output_and_is_left_alone(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
) -> None:
    """`otherdir`: ipa-backup says `Backed up to /data/var/lib/ipa/backup/ipa-full-...`, the same
    directory by its path on the volume. Only the canonical path is ever read or removed."""
    pod = freeipa(fault="otherdir")
    status = failed(
        run_backup("otherdir", backup_spec(platform, s3_storage(platform, prefix), type="Full")),
        "UnexpectedOutput",
    )
    reported = status["ipaBackup"]["directory"]
    assert re.fullmatch(r"/data/var/lib/ipa/backup/ipa-full-\d{4}(-\d\d){5}", reported), reported
    assert status["message"] == (
        f"ipa-backup reported an unexpected directory: backup directory {reported!r} is not directly "
        "inside /var/lib/ipa/backup"
    )
    assert status["ipaBackup"]["exitCode"] == 0
    assert "header" not in status  # not read
    # Not deleted either, although podCleanup is Remove: it stays for someone to look at.
    assert backup_dirs(api, namespace, pod) == [reported.rsplit("/", 1)[1]]
    nothing_stored(s3, platform, prefix)
    running = conditions(status)["ServicesRunning"]
    assert (running["status"], running["reason"]) == ("True", "StartedByIpaBackup")
    assert services_running(api, namespace, pod)


def test_a_backup_directory_that_cannot_be_removed_is_reported_after_success_and_failure(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
) -> None:
    """/var/lib/ipa/backup made append-only (`chattr +a`, as an administrator or a hardening tool may):
    ipa-backup can still create its directory there, nobody can remove one, root included."""
    pod = freeipa()
    claim = client.CoreV1Api(api).read_namespaced_persistent_volume_claim(f"{pod}-data", namespace)
    backups_on_host = Path(platform.volumes_dir) / claim.spec.volume_name / "var/lib/ipa/backup"
    in_pod(api, namespace, pod, "chattr", "+a", "/var/lib/ipa/backup")
    try:
        status = run_backup(
            "kept", backup_spec(platform, s3_storage(platform, prefix), type="Data", online=True)
        )["status"]
        assert status["phase"] == "Succeeded", status  # the backup itself is stored and verified
        directory = status["ipaBackup"]["directory"]
        assert (
            status["message"]
            == f"stored {status['archive']['uri']}; could not remove {directory} from the pod"
        )
        assert event_messages(api, namespace, "kept", "PodCleanupFailed") == [
            f"could not remove {directory}: rm: cannot remove '{directory}': Operation not permitted"
        ]
        assert events(api, namespace, "kept") == [
            "BackupStarted",
            "PodCleanupFailed",
            "BackupCompleted",
        ]
        assert len(s3_keys(s3, platform.s3_bucket, prefix)) == 3

        # The same after a failure: the directory ipa-backup reported is removed on failure too.
        set_fault(api, namespace, pod, "noarchive")
        failed_status = failed(
            run_backup(
                "failing",
                backup_spec(platform, s3_storage(platform, f"{prefix}/failing"), type="Data", online=True),
            ),
            "ArchiveMissing",
        )
        failed_dir = failed_status["ipaBackup"]["directory"]
        assert event_messages(api, namespace, "failing", "PodCleanupFailed") == [
            f"could not remove {failed_dir}: rm: cannot remove '{failed_dir}': Operation not permitted"
        ]
        nothing_stored(s3, platform, f"{prefix}/failing")
        # rm -rf emptied both; only the directories themselves stay.
        assert sorted(backup_dirs(api, namespace, pod)) == sorted(
            d.rsplit("/", 1)[1] for d in (directory, failed_dir)
        )
        assert in_pod(api, namespace, pod, "ls", "-A", directory, failed_dir).split() == [
            f"{directory}:",
            f"{failed_dir}:",
        ]
        assert services_running(api, namespace, pod)
    finally:
        # From the host, whatever became of the pod: the volume must stay deletable.
        subprocess.run(["chattr", "-a", str(backups_on_host)], check=True)


# -- the server's configuration and topology, before anything stops --------------------------------------


def unprobed_freeipa(api: client.ApiClient, namespace: str, platform: stack.Platform) -> str:
    """A stand-in pod without a readiness probe, installed and running.

    The stand-in's probe is `ipactl status`, which reads /etc/ipa/default.conf too: with it broken the
    pod turns NotReady and the operator rightly waits (TargetNotReady) without reaching its own check.
    Without a probe (or with one that does not look at IPA, as a freeipa-container still installing)
    the pod stays Ready, and the operator's own look at default.conf is what must refuse it.
    """
    pod = freeipa_pod.freeipa_pod("ipa-hidden", HOST, platform.ldap_uri)
    del pod["spec"]["containers"][0]["readinessProbe"]
    apply(api, namespace, freeipa_pod.data_claim("ipa-hidden-data"), pod)
    wait_for("the pod ready", lambda: pod_ready(api, namespace, "ipa-hidden"), timeout=60)
    wait_for("IPA installed and started", lambda: services_up(api, namespace, "ipa-hidden"), timeout=60)
    return "ipa-hidden"


def test_a_server_without_a_usable_default_conf_fails_not_configured_and_nothing_stops(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],  # for its Directory Manager password Secret
    run_backup: Backup,
    s3: Any,
    prefix: str,
) -> None:
    pod = unprobed_freeipa(api, namespace, platform)
    spec = backup_spec(platform, s3_storage(platform, prefix), type="Full")
    conf = "/data/etc/ipa/default.conf"  # /etc/ipa is a symlink to /data/etc/ipa
    in_pod(api, namespace, pod, "mv", conf, f"{conf}.saved")
    status = failed(run_backup("noconf", spec), "NotConfigured")
    assert status["message"] == (
        f"pod {pod} has no readable /etc/ipa/default.conf: IPA is not configured there"
    )
    assert "ipaBackup" not in status  # ipa-backup never ran

    # host = .. : a dotted name, so ipactl would take it, but no DNS name; it would become a path in S3.
    in_pod(api, namespace, pod, "sh", "-c", f"sed 's/^host = .*/host = ../' {conf}.saved > {conf}")
    status = failed(run_backup("badhost", spec), "NotConfigured")
    assert status["message"] == (
        f"/etc/ipa/default.conf in pod {pod}: host '..' in /etc/ipa/default.conf is not a DNS name "
        "(letters, digits and hyphens in dot-separated labels)"
    )
    assert "ipaBackup" not in status
    nothing_stored(s3, platform, prefix)
    in_pod(api, namespace, pod, "mv", f"{conf}.saved", conf)
    # Nothing was stopped: IPA runs without anyone having started it again.
    assert services_running(api, namespace, pod)
    assert backup_dirs(api, namespace, pod) == []


@pytest.fixture
def closed_loopback_port() -> Iterator[int]:
    """A loopback port bound by this test but not listening: a connection there is refused, and nothing
    else can take the port while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_an_unreadable_topology_fails_topology_unavailable_before_anything_stops(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
    closed_loopback_port: int,
) -> None:
    pod = freeipa()
    apply(
        api,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "wrong-dm-password"},
            "stringData": {"password": "not-the-directory-manager-password"},
        },
    )
    spec = backup_spec(
        platform,
        s3_storage(platform, prefix),
        type="Full",
        target={"ldap": {"url": platform.ldap_uri, "passwordSecretRef": {"name": "wrong-dm-password"}}},
    )
    status = failed(run_backup("wrongpw", spec), "TopologyUnavailable")
    assert status["message"] == (
        f"cannot check the FreeIPA topology: the LDAP server {platform.ldap_uri} rejected the password of "
        "cn=Directory Manager (invalid credentials)"
    )
    assert "ipaBackup" not in status

    unreachable = f"ldap://127.0.0.1:{closed_loopback_port}"
    spec = backup_spec(
        platform,
        s3_storage(platform, prefix),
        type="Full",
        target={"ldap": {"url": unreachable, "passwordSecretRef": {"name": freeipa_pod.DM_PASSWORD_SECRET}}},
    )
    status = failed(run_backup("unreachable", spec), "TopologyUnavailable")
    assert status["message"].startswith(
        f"cannot check the FreeIPA topology: cannot reach the LDAP server {unreachable} ("
    ), status["message"]
    assert "ipaBackup" not in status

    # A listener of someone else's (here on 127.0.0.2, not the pod's address): the operator refuses the
    # URL before it reads the password, and never connects, so nothing can be captured.
    with socket.socket() as listener:
        listener.bind(("127.0.0.2", 0))
        listener.listen()
        listener.settimeout(0)
        elsewhere = f"ldap://127.0.0.2:{listener.getsockname()[1]}"
        spec = backup_spec(
            platform,
            s3_storage(platform, prefix),
            type="Full",
            target={
                "ldap": {"url": elsewhere, "passwordSecretRef": {"name": freeipa_pod.DM_PASSWORD_SECRET}}
            },
        )
        status = failed(run_backup("elsewhere", spec), "TopologyUnavailable")
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert status["message"] == (
        f"cannot check the FreeIPA topology: ldap.url {elsewhere!r} is not the directory of the server "
        "backed up or restored: 127.0.0.2 (127.0.0.2) is neither ipa-hidden.example.test, the server's "
        "FQDN in its /etc/ipa/default.conf, nor an address of its pod (127.0.0.1). The operator binds only "
        "to the target's own directory"
    ), status["message"]
    nothing_stored(s3, platform, prefix)
    assert backup_dirs(api, namespace, pod) == []
    assert services_running(api, namespace, pod)
    assert events(api, namespace, "unreachable") == ["BackupStarted", "BackupFailed"]


# -- ipa-backup failing, and IPA's services after it -------------------------------------------------------


def test_ipactl_start_failing_after_a_failed_full_backup_reports_services_down(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
) -> None:
    """`startfail`: ipa-backup's own `ipactl start` fails (one service does not start, everything is
    stopped again), and so does the operator's. The server is down, and the status must say so."""
    pod = freeipa()
    set_fault(api, namespace, pod, "startfail")  # only now: the pod's own start must work
    status = failed(
        run_backup("down", backup_spec(platform, s3_storage(platform, prefix), type="Full")),
        "IpaBackupFailed",
    )
    assert status["message"] == (
        "ipa-backup failed: CalledProcessError(Command ['/usr/sbin/ipactl', 'start'] returned non-zero "
        "exit status 1)"
    )
    running = conditions(status)["ServicesRunning"]
    assert (running["status"], running["reason"]) == ("False", "ServicesDown"), running
    assert running["message"] == "IPA is stopped: the directory server is not running"
    assert event_messages(api, namespace, "down", "ServicesDown") == [
        f"IPA services in pod {pod} did not come back: check the server"
    ]
    assert "ServicesRestarted" not in events(api, namespace, "down")
    assert not services_running(api, namespace, pod)
    nothing_stored(s3, platform, prefix)
    # What a user does next works: with the cause gone, ipactl start brings the server back.
    set_fault(api, namespace, pod, "")
    in_pod(api, namespace, pod, "ipactl", "start")
    assert services_running(api, namespace, pod)


# spec.tmpDir reaches ipa-backup only as its TMPDIR, not the container's: the clean-up must look there.
@pytest.mark.parametrize("tmp", [None, "/data/tmp"], ids=["container-tmp", "spec-tmpDir"])
def test_ipa_backup_killed_half_way_fails_and_the_operator_starts_ipa_again(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
    tmp: str | None,
) -> None:
    pod = freeipa(fault="killed")
    root = tmp or "/tmp"
    # A working directory some earlier run left, before this backup began: not this backup's to remove.
    code, out = pod_exec(
        api,
        namespace,
        pod,
        ["sh", "-c", f"mkdir -p {root}/tmpearlieripa && touch -d '1 hour ago' {root}/tmpearlieripa"],
    )
    assert code == 0, out
    options = {"tmpDir": tmp} if tmp else {}
    status = failed(
        run_backup("killed", backup_spec(platform, s3_storage(platform, prefix), type="Full", **options)),
        "IpaBackupFailed",
    )
    # The process died by SIGKILL, which the platform's node reports as an exec error ("signal: killed"),
    # not as the exit code 137 a container runtime reports: so the operator cannot tell the exit status,
    # treats ipa-backup as lost and makes sure it is gone.
    assert status["message"].startswith("ipa-backup could not be followed: exec failed: "), status["message"]
    assert status["message"].endswith("signal: killed; ipa-backup was stopped"), status["message"]
    # No exit status and no directory: both absent from the status.
    assert "exitCode" not in status["ipaBackup"] and "directory" not in status["ipaBackup"], status[
        "ipaBackup"
    ]
    running = conditions(status)["ServicesRunning"]
    assert (running["status"], running["reason"]) == ("True", "StartedByOperator"), running
    assert "ServicesRestarted" in events(api, namespace, "killed")
    assert services_running(api, namespace, pod)
    assert backup_dirs(api, namespace, pod) == []
    nothing_stored(s3, platform, prefix)
    # The killed ipa-backup's working directory (tempfile.mkdtemp("ipa"), plaintext inside) is gone; the
    # older one is left alone.
    code, out = pod_exec(api, namespace, pod, ["sh", "-c", f"ls -d {root}/tmp*ipa"])
    assert out.split() == [f"{root}/tmpearlieripa"], out
    (removed,) = event_messages(api, namespace, "killed", "PodCleanedUp")
    assert re.fullmatch(
        rf"removed {root}/tmp\w+ipa from pod {pod}: the working directory of the interrupted ipa-backup, "
        "with plaintext in it",
        removed,
    ), removed


def test_ipa_backup_out_of_disk_space_fails_with_tars_error_and_ipa_is_started_again(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
) -> None:
    pod = freeipa(fault="diskfull")
    status = failed(
        run_backup("diskfull", backup_spec(platform, s3_storage(platform, prefix), type="Full")),
        "IpaBackupFailed",
    )
    # ipa-backup's own line, tar's ENOSPC error in it, with the real file name.
    assert status["message"].startswith("ipa-backup failed: tar returned non-zero code 2: "), status[
        "message"
    ]
    assert re.search(
        r"tar: /tmp/tmp\w+ipa/ipa/files\.tar: Cannot write: No space left on device", status["message"]
    ), status["message"]
    assert status["ipaBackup"]["exitCode"] == 1
    running = conditions(status)["ServicesRunning"]
    assert (running["status"], running["reason"]) == ("True", "StartedByOperator"), running
    assert events(api, namespace, "diskfull") == [
        "BackupStarted",
        "ConfigFilesAreSymlinks",
        "ServicesRestarted",
        "BackupFailed",
    ]
    assert services_running(api, namespace, pod)
    nothing_stored(s3, platform, prefix)


# -- what was stored, checked without the operator's code ---------------------------------------------------


def test_an_unencrypted_backup_is_stored_as_ipa_backups_own_tar(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
    tmp_path: Path,
) -> None:
    pod = freeipa()
    spec = backup_spec(
        platform, s3_storage(platform, prefix), type="Data", online=True, encryption={"mode": "None"}
    )
    status = run_backup("plain", spec)["status"]
    assert status["phase"] == "Succeeded", status
    archive = status["archive"]
    key = stored_key(platform, archive["uri"])
    directory = key.rsplit("/", 1)[0]
    assert key.endswith("/ipa-data.tar")  # no .gpg
    assert s3_keys(s3, platform.s3_bucket, prefix) == [
        f"{directory}/header",
        f"{directory}/ipa-data.tar",
        f"{directory}/manifest.json",
    ]
    data = s3_object(s3, platform, key)
    assert data[:2] == b"\x1f\x8b"  # gzip, as ipa-backup wrote it: no OpenPGP around it
    digest = hashlib.sha256(data).hexdigest()
    assert digest == archive["sha256"] == archive["plaintextSHA256"]
    assert len(data) == archive["sizeBytes"] == archive["plaintextSizeBytes"]
    assert archive["encrypted"] is False and archive["recipients"] == []
    (tmp_path / "ipa-data.tar").write_bytes(data)
    names = tar_list(tmp_path / "ipa-data.tar")
    assert {f"./{SERVERID}-userRoot.ldif", f"./{SERVERID}-ipaca.ldif", f"./{SERVERID}/DBVERSION"} <= set(
        names
    )
    manifest = json.loads(s3_object(s3, platform, f"{directory}/manifest.json"))
    assert (
        manifest["files"]["archive"]["sha256"]
        == manifest["files"]["archive"]["plaintext"]["sha256"]
        == digest
    )
    assert manifest["files"]["archive"]["encryption"] is None
    assert services_running(api, namespace, pod)


def gpg(home: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    argv = ["gpg", "--batch", "--no-tty", "--homedir", str(home), *args]
    return subprocess.run(argv, input=input, capture_output=True, timeout=120)


@pytest.fixture
def restore_home(tmp_path: Path, backup_key: ExportedKey) -> Iterator[Path]:
    """A GnuPG home as the person who restores has it: their secret key, imported by the gpg CLI."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    imported = gpg(home, "--import", input=backup_key.secret)
    assert imported.returncode == 0, imported.stderr
    yield home
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)


def test_a_full_backup_with_logs_decrypts_with_the_gpg_cli_to_ipa_backups_tar(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
    tmp_path: Path,
    backup_key: ExportedKey,
    restore_home: Path,
) -> None:
    pod = freeipa()
    spec = backup_spec(platform, s3_storage(platform, prefix), type="Full", logs=True, podCleanup="Keep")
    status = run_backup("logs", spec)["status"]
    assert status["phase"] == "Succeeded", status
    assert "--logs" in status["ipaBackup"]["command"]
    archive = status["archive"]
    key = stored_key(platform, archive["uri"])
    assert key.endswith("/ipa-full.tar.gpg")
    # The transfer's progress ends at the whole tar, as read from the pod.
    assert status["progress"] == {
        "bytesRead": archive["plaintextSizeBytes"],
        "totalBytes": archive["plaintextSizeBytes"],
    }
    # The short name kubectl get shows: the server and ipa-backup's own directory name.
    directory = status["ipaBackup"]["directory"].rsplit("/", 1)[1]
    assert archive["name"] == f"{HOST}/{directory}" and key.endswith(f"/{HOST}/{directory}/ipa-full.tar.gpg")

    # The stored object, hashed as read with boto3.
    ciphertext = s3_object(s3, platform, key)
    assert hashlib.sha256(ciphertext).hexdigest() == archive["sha256"]
    assert len(ciphertext) == archive["sizeBytes"]
    encrypted = tmp_path / "ipa-full.tar.gpg"
    encrypted.write_bytes(ciphertext)

    # Who can decrypt it, as OpenPGP says: one session key, for the restore key's encryption subkey.
    packets = gpg(restore_home, "--list-packets", str(encrypted))
    assert packets.returncode == 0, packets.stderr
    recipients = re.findall(rb"^:pubkey enc packet: .* keyid ([0-9A-F]{16})$", packets.stdout, re.M)
    listing = gpg(restore_home, "--with-colons", "--list-keys", backup_key.fingerprint).stdout.decode()
    records = [line.split(":") for line in listing.splitlines()]
    primary = next(r[9] for r in records if r[0] == "fpr")  # the first fpr record is the primary key's
    assert primary == backup_key.fingerprint == archive["recipients"][0]
    encryption_subkeys = [r[4] for r in records if r[0] == "sub" and "e" in r[11]]
    assert [r.decode() for r in recipients] == encryption_subkeys
    assert archive["recipients"] == [backup_key.fingerprint]

    # Decrypted by the CLI: ipa-backup's own tar, byte for byte.
    plain = tmp_path / "ipa-full.tar"
    decrypted = gpg(restore_home, "--output", str(plain), "--decrypt", str(encrypted))
    assert decrypted.returncode == 0, decrypted.stderr
    plaintext = plain.read_bytes()
    assert hashlib.sha256(plaintext).hexdigest() == archive["plaintextSHA256"]
    assert len(plaintext) == archive["plaintextSizeBytes"]
    in_pod_sha = in_pod(api, namespace, pod, "sha256sum", f"{status['ipaBackup']['directory']}/ipa-full.tar")
    assert in_pod_sha.split()[0] == archive["plaintextSHA256"]
    names = tar_list(plain)
    assert {f"./{SERVERID}-userRoot.ldif", f"./{SERVERID}-ipaca.ldif", "./files.tar"} <= set(names)

    # logs: true, i.e. --logs: files.tar (gzip'ed, as ipa-backup does) holds the server's log files.
    files_tar = tmp_path / "files.tar"
    files_tar.write_bytes(
        subprocess.run(["tar", "-xzOf", str(plain), "./files.tar"], capture_output=True, check=True).stdout
    )
    files = set(tar_list(files_tar))
    assert {
        "var/log/ipaserver-install.log",
        "var/log/httpd/error_log",
        f"var/log/dirsrv/slapd-{SERVERID}/errors",
    } <= files, sorted(files)

    # The header stored beside it is the pod's.
    header = s3_object(s3, platform, key.rsplit("/", 1)[0] + "/header")
    assert header == in_pod(api, namespace, pod, "cat", f"{status['ipaBackup']['directory']}/header").encode()
    assert services_running(api, namespace, pod)


# -- storage that breaks while the archive is stored --------------------------------------------------------


def test_an_s3_endpoint_that_resets_every_part_upload_fails_upload_failed_through_the_operator(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
) -> None:
    """The store-level behaviour is tests/test_storage_faults.py's; this is what the user of the operator
    sees: the reason, nothing under the backup's name, no open multipart upload, IPA running, and the
    server free for the next backup."""
    pod = freeipa(payload_bytes=6 << 20)  # incompressible: two 5 MiB parts
    # Every connection that gets 1 MiB into a request is reset, botocore's retries included; the small
    # requests (the probe, the header, the abort, the deletes) pass.
    with FaultProxy(platform.s3_endpoint, Fault("reset", after=1 << 20)) as proxy:
        storage = s3_storage(platform, prefix)
        storage["s3"]["endpoint"] = proxy.url
        status = failed(
            run_backup("reset", backup_spec(platform, storage, type="Data", online=True)), "UploadFailed"
        )
        assert proxy.faulted >= 1
    # The key it could not write, and the request that broke: the first part of the multipart upload.
    dirname = status["ipaBackup"]["directory"].rsplit("/", 1)[1]
    key = f"s3://{platform.s3_bucket}/{prefix}/{namespace}/{HOST}/{dirname}/ipa-data.tar.gpg"
    assert status["message"].startswith(f"upload failed: cannot upload {key}: "), status["message"]
    assert "Connection was closed before we received a valid response" in status["message"]
    assert "partNumber=1" in status["message"]
    assert "archive" not in status
    nothing_stored(s3, platform, prefix)
    assert backup_dirs(api, namespace, pod) == []
    assert services_running(api, namespace, pod)
    status = run_backup(
        "next", backup_spec(platform, s3_storage(platform, prefix), type="Data", online=True)
    )["status"]
    assert status["phase"] == "Succeeded", status
    assert len(s3_keys(s3, platform.s3_bucket, prefix)) == 3


def test_a_secret_value_that_is_not_text_fails_without_quoting_any_of_it(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    s3: Any,
    prefix: str,
) -> None:
    """Python's decoding error names the byte and its position: a piece of the password, in a status that
    people who may not read the Secret can read."""
    pod = freeipa()
    password = b"dm-\xff\xfepassword"
    apply(
        api,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "binary-password"},
            "data": {"password": base64.b64encode(password).decode()},
        },
    )
    spec = backup_spec(platform, s3_storage(platform, prefix), type="Data", online=True)
    spec["target"]["ldap"]["passwordSecretRef"] = {"name": "binary-password"}
    status = failed(run_backup("binary", spec), "TopologyUnavailable")
    assert status["message"] == (
        "cannot check the FreeIPA topology: "
        f"Secret {namespace}/binary-password key 'password' is not UTF-8 text"
    )
    nothing_stored(s3, platform, prefix)
    assert services_running(api, namespace, pod)
