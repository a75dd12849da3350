"""Logs: JSON lines with the object's context, redaction of secrets, and no secret on the platform."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from idm_backup_operator.logs import JsonFormatter, RedactingFilter, redact, register_secret
from testbed import stack
from testbed.deploy import OperatorProcess
from tests.helpers import backup_spec, create_backup, s3_storage, wait_finished


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("bind failed: password=hunter2-secret for cn=Directory Manager", "password=***"),
        (
            '{"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG", "bucket": "b"}',
            '"aws_secret_access_key": "***"',
        ),
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG", "AWS_SECRET_ACCESS_KEY=***"),
        ("headers: {'Authorization': 'Bearer eyJhbGciOi.J9x.y'}", "Bearer ***"),
        ("token: abc.def.ghi", "token: ***"),
        ("connecting to ldaps://admin:s3cr3t@ldap.example.test", "ldaps://admin:***@ldap.example.test"),
        ("ldapPassword='p@ss w'", "ldapPassword='***"),
    ],
)
def test_secret_bearing_fields_are_redacted(text: str, kept: str) -> None:
    redacted = redact(text)
    assert kept in redacted
    for secret in ("hunter2-secret", "wJalrXUtnFEMI", "eyJhbGciOi", "abc.def.ghi", "s3cr3t", "p@ss"):
        assert secret not in redacted


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "text",
    [
        "a" * 200_000,  # a long word: every position used to try every split of it
        "password" * 25_000,
        "ab" * 100_000 + "://" + "c" * 100_000,
        "p" * 100_000 + " password=hunter2 https://user:pw@host/ " + "p" * 100_000,
    ],
    ids=["letters", "keywords", "scheme", "secrets-inside"],
)
def test_redacting_a_large_annotation_takes_no_time_to_speak_of(text: str) -> None:
    """kopf logs whole bodies at debug level, and an annotation may hold 256 KiB: redaction used to take
    minutes on a long run of letters (quadratic patterns), stalling the thread that logged. The timeout
    is two orders of magnitude above the time it takes now; the old patterns need minutes."""
    redacted = redact(text)
    assert len(redacted) <= len(text)
    if "hunter2" in text:
        assert "hunter2" not in redacted and "user:***@host" in redacted


def test_references_to_secrets_and_ordinary_text_are_left_alone() -> None:
    for text in (
        "passwordSecretRef: {name: freeipa-dm-password}",
        "Secret identity/s3-credentials has no key 'AWS_SECRET_ACCESS_KEY' (it has: a, b)",
        "stored s3://idm-backups/prod/identity/ipa-hidden.example.test/ipa-full-2026/ipa-full.tar.gpg",
    ):
        assert redact(text) == text


def test_private_key_blocks_and_registered_values_are_redacted() -> None:
    block = "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQdGBGV...\n=abcd\n-----END PGP PRIVATE KEY BLOCK-----"
    assert "lQdGBGV" not in redact(f"imported {block} ok")
    assert "-----BEGIN PGP PRIVATE KEY BLOCK-----***" in redact(block)
    assert "MIIEvQ" not in redact("-----BEGIN RSA PRIVATE KEY-----\nMIIEvQ...")  # even cut off
    register_secret("Unusual-Value-42")
    assert redact("echo Unusual-Value-42 | base64") == "echo *** | base64"
    assert "Unusual" not in redact(base64.b64encode(b"Unusual-Value-42").decode())
    register_secret("abc")  # too short to redact without mangling ordinary words
    assert redact("abc") == "abc"


def test_json_lines_carry_the_object_context_and_are_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.idm.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        ref = {"kind": "IdmBackup", "namespace": "identity", "name": "nightly", "uid": "u-1"}
        logger.warning("backup %s failed: password=%s", "nightly", "hunter2-secret", extra={"k8s_ref": ref})
        try:
            raise RuntimeError("secret_key=AKIA-very-secret")
        except RuntimeError:
            logger.exception("plain")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "backup nightly failed: password=***"
    assert first["level"] == "WARNING" and first["logger"] == "test.idm.json"
    assert (first["namespace"], first["name"], first["kind"]) == ("identity", "nightly", "IdmBackup")
    assert first["time"].endswith("Z")
    assert "namespace" not in second
    assert "RuntimeError: secret_key=***" in second["exception"]
    assert "very-secret" not in stream.getvalue()


# -- on the platform -------------------------------------------------------------------------------------


@pytest.fixture
def json_operator(
    platform: stack.Platform, crds: None, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[OperatorProcess]:
    monkeypatch.setenv("IDM_BACKUP_LOG_FORMAT", "json")
    monkeypatch.setenv("IDM_BACKUP_METRICS_PORT", "0")
    (tmp_path / "pvc").mkdir()
    proc = OperatorProcess(namespace, platform.kubeconfig, tmp_path / "pvc", tmp_path / "operator.log")
    proc.start()
    yield proc
    proc.stop()


@pytest.mark.platform
def test_no_secret_in_logs_events_or_status(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    json_operator: OperatorProcess,
    secrets: None,
) -> None:
    freeipa()
    storage = s3_storage(platform, f"test/{namespace}")
    create_backup(api, namespace, "ok", backup_spec(platform, storage, type="Data", online=True))
    # A failure with S3 in the picture too: the bucket does not exist, so error paths are logged.
    bad_storage = s3_storage(platform, f"test/{namespace}")
    bad_storage["s3"]["bucket"] = "no-such-bucket"
    create_backup(api, namespace, "bad", backup_spec(platform, bad_storage, type="Data", online=True))
    objects = [wait_finished(api, namespace, name, json_operator) for name in ("ok", "bad")]
    assert [o["status"]["phase"] for o in objects] == ["Succeeded", "Failed"]
    json_operator.stop()  # every line written

    log = json_operator.output()
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line.get("namespace") == namespace and line.get("name") == "ok" for line in lines)
    events = client.CoreV1Api(api).list_namespaced_event(namespace).items
    texts = {
        "operator log": log,
        "events": "\n".join(f"{e.reason} {e.message}" for e in events),
        "status": json.dumps([o["status"] for o in objects]),
    }
    assert "BackupFailed" in texts["events"]
    for secret in (platform.s3_secret_key, platform.ldap_password):
        for form in (secret, base64.b64encode(secret.encode()).decode()):
            for where, text in texts.items():
                assert form not in text, f"a secret appears in the {where}"
