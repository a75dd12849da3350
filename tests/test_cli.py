"""The command line on the platform: verify (name, URI, directory; corrupted; wrong key), list, backup-now."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from idm_backup_operator.archive.encryption import encrypt, load_recipients
from idm_backup_operator.cli import build_parser, main, manual_backup_name
from testbed import stack
from testbed.deploy import OperatorProcess
from testbed.gpgkeys import ExportedKey, Keyring
from tests.helpers import (
    backup_spec,
    create_backup,
    create_schedule,
    get_backup,
    s3_storage,
    wait_finished,
)

Run = Callable[..., tuple[int, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    def run(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


@pytest.fixture
def key_file(tmp_path: Path, backup_key: ExportedKey) -> Path:
    path = tmp_path / "restore.key"
    path.write_bytes(backup_key.secret)
    return path


def test_manual_backup_names_fit_kubernetes_limits() -> None:
    moment = datetime.datetime(2026, 11, 26, 2, 3, 4, tzinfo=datetime.UTC)
    assert manual_backup_name("nightly", moment) == "nightly-manual-20261126020304"
    long = manual_backup_name("x" * 60, moment)
    assert len(long) == 63 and long.endswith("-manual-20261126020304")
    assert long != manual_backup_name("x" * 59 + "y", moment)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def record(name: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def make_backup_dir(path: Path, key: ExportedKey, members: dict[str, bytes], kind: str = "FULL") -> Path:
    """A backup directory as the operator writes it: header, encrypted archive, manifest."""
    path.mkdir(parents=True)
    plaintext = tar_gz(members)
    archive = b"".join(encrypt([plaintext], load_recipients(key.public)))
    header = b"[ipa]\nhost = ipa.example.test\n"
    (path / "header").write_bytes(header)
    (path / "ipa-full.tar.gpg").write_bytes(archive)
    manifest = {
        "format": 1,
        "createdAt": "2026-11-26T02:00:00+00:00",
        "resource": {"kind": "IdmBackup", "namespace": "identity", "name": "nightly", "uid": "u-1"},
        "server": {"host": "ipa.example.test", "pod": "ipa"},
        "header": {"type": kind, "host": "ipa.example.test"},
        "files": {
            "header": record("header", header),
            "archive": {
                **record("ipa-full.tar.gpg", archive),
                "plaintext": record("ipa-full.tar", plaintext),
                "encryption": {"tool": "gpg", "recipients": [key.fingerprint]},
            },
        },
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_verify_reads_a_local_directory_and_names_what_a_restore_would_miss(
    tmp_path: Path, backup_key: ExportedKey, key_file: Path, cli: Run
) -> None:
    files_tar = tar_gz({"etc/ipa/default.conf": b"[global]\n"})
    good = make_backup_dir(
        tmp_path / "good",
        backup_key,
        {"EXAMPLE-TEST-userRoot.ldif": b"dn: x\n" * 50_000, "files.tar": files_tar},
    )
    code, out = cli("verify", str(good), "--key", str(key_file))
    assert code == 0 and out.strip().endswith("can be restored: yes"), out
    assert "files.tar, a readable tar of 1 entries" in out
    no_ldif = make_backup_dir(tmp_path / "no-ldif", backup_key, {"files.tar": files_tar})
    code, out = cli("verify", str(no_ldif / "manifest.json"), "--key", str(key_file))
    assert code == 1 and "because the archive has no <SERVERID>-userRoot.ldif" in out, out
    no_files = make_backup_dir(tmp_path / "no-files", backup_key, {"EXAMPLE-TEST-userRoot.ldif": b"dn: x\n"})
    code, out = cli("verify", str(no_files), "--key", str(key_file))
    assert code == 1 and "the full backup's archive has no files.tar" in out, out
    code, out = cli("verify", str(good))
    assert code == 1 and "no private key was given (--key)" in out
    (good / "header").write_bytes(b"[ipa]\nhost = other.example.test\n")
    code, out = cli("verify", str(good), "--key", str(key_file))
    assert code == 1 and "because the header is 32 bytes, the manifest says 30" in out, out


def test_run_options_come_from_flags_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["run"])
    assert (args.peering, args.log_format, args.metrics_port) == (None, "text", 9090)
    assert args.metrics_address == "127.0.0.1"  # outside a pod: loopback only
    monkeypatch.setenv("IDM_BACKUP_LOG_FORMAT", "json")
    monkeypatch.setenv("IDM_BACKUP_METRICS_PORT", "0")
    # Only its presence matters (it says "in a pod"); nothing connects to it.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    args = build_parser().parse_args(["run", "--peering", "idm-backup"])
    assert (args.peering, args.log_format, args.metrics_port) == ("idm-backup", "json", 0)
    assert args.metrics_address == "0.0.0.0"  # in a pod, where Prometheus scrapes the pod IP
    capsys.readouterr()
    # argparse's refusal of a mutually exclusive pair: usage error, exit code 2, and which pair it was.
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["run", "--peering", "x", "--standalone"])
    assert refused.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last_line
        == "idm-backup-operator run: error: argument --standalone: not allowed with argument --peering"
    )


@pytest.mark.platform
def test_verify_by_name_uri_and_directory_and_what_makes_it_fail(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    s3: Any,
    cli: Run,
    key_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    freeipa()
    prefix = f"test/{namespace}"
    create_backup(api, namespace, "full", backup_spec(platform, s3_storage(platform, prefix), type="Full"))
    status = wait_finished(api, namespace, "full", operator)["status"]
    assert status["phase"] == "Succeeded", status
    directory_uri = status["archive"]["uri"].rsplit("/", 1)[0] + "/"
    directory_key = directory_uri.removeprefix(f"s3://{platform.s3_bucket}/")

    # By name: the location and the S3 credentials come from the resource and its Secret.
    code, out = cli("verify", "full", "-n", namespace, "--key", str(key_file))
    assert code == 0, out
    assert out.strip().endswith("can be restored: yes")
    assert "EXAMPLE-TEST-userRoot.ldif" in out and "files.tar, a readable tar" in out

    # By URI: the credentials from the environment, as on a laptop.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", platform.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", platform.s3_secret_key)
    endpoint = ("--s3-endpoint", platform.s3_endpoint)
    code, out = cli("verify", directory_uri, *endpoint, "--key", str(key_file))
    assert code == 0, out
    assert "can be restored: yes" in out

    # A downloaded directory (or a PVC's).
    local = tmp_path / directory_key.rstrip("/").rsplit("/", 1)[1]
    local.mkdir()
    for name in ("header", "ipa-full.tar.gpg", "manifest.json"):
        s3.download_file(platform.s3_bucket, directory_key + name, str(local / name))
    code, out = cli("verify", str(local), "--key", str(key_file))
    assert code == 0 and "can be restored: yes" in out, out

    code, out = cli("list", "-n", namespace)
    assert code == 0
    assert re.search(r"^full\s+Succeeded\s+Full\s+\S+ \S+\s+\S+\s+s3://", out, re.M), out
    code, out = cli("list", "--storage", f"s3://{platform.s3_bucket}/{prefix}", *endpoint)
    assert code == 0
    assert directory_uri in out and "FULL" in out and f"{namespace}/full" in out, out

    # The wrong key: refused before anything is downloaded, saying which keys would do.
    home = tmp_path / "other-gnupg"
    home.mkdir(mode=0o700)
    ring = Keyring(home)
    other = ring.export(ring.make("Someone Else <else@example.test>"))
    (tmp_path / "other.key").write_bytes(other.secret)
    code, out = cli("verify", directory_uri, *endpoint, "--key", str(tmp_path / "other.key"))
    assert code == 1
    assert "can be restored: no, because the key" in out and status["archive"]["recipients"][0] in out, out
    (tmp_path / "public.key").write_bytes(other.armored)
    code, out = cli("verify", directory_uri, *endpoint, "--key", str(tmp_path / "public.key"))
    assert code == 1 and "holds no OpenPGP private key" in out, out

    # One byte changed in the stored archive.
    archive_key = directory_key + "ipa-full.tar.gpg"
    data = bytearray(s3.get_object(Bucket=platform.s3_bucket, Key=archive_key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=platform.s3_bucket, Key=archive_key, Body=bytes(data))
    code, out = cli("verify", "full", "-n", namespace, "--key", str(key_file))
    assert code == 1, out
    assert "can be restored: no, because the stored archive's sha256 is" in out
    assert "corrupted or was altered" in out

    # No manifest: an incomplete directory.
    s3.delete_object(Bucket=platform.s3_bucket, Key=directory_key + "manifest.json")
    code, out = cli("verify", directory_uri, *endpoint, "--key", str(key_file))
    assert code == 1 and "there is no manifest.json" in out, out


@pytest.mark.platform
def test_backup_now_creates_a_backup_of_the_schedule_that_the_operator_completes(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    cli: Run,
) -> None:
    freeipa()
    template = backup_spec(platform, s3_storage(platform, f"test/{namespace}"), type="Data", online=True)
    created = create_schedule(
        api, namespace, "nightly", {"schedule": "0 2 * * *", "template": {"spec": template}}
    )
    code, out = cli("backup-now", "nightly", "-n", namespace, "--wait", "--timeout", "180")
    assert code == 0, out
    name = re.search(r"idmbackup \S+/(nightly-manual-\d{14}) created", out)
    assert name, out
    backup = get_backup(api, namespace, name[1])
    assert backup["status"]["phase"] == "Succeeded"
    assert backup["metadata"]["labels"]["idm-backup.io/schedule"] == "nightly"
    owner = backup["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (
        "IdmBackupSchedule",
        created["metadata"]["uid"],
        True,
    )
    code, out = cli("list", "-n", namespace, "--schedule", "nightly")
    assert code == 0 and name[1] in out
    # The schedule's storage, opened with the template's credentials Secret.
    code, out = cli("list", "-n", namespace, "--schedule", "nightly", "--storage")
    assert code == 0 and f"{namespace}/{name[1]}" in out and "DATA" in out, out
    code, out = cli("backup-now", "missing", "-n", namespace)
    assert code == 1 and f"IdmBackupSchedule {namespace}/missing not found" in out
