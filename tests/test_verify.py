"""archive/verify.py on a backup directory built here (no platform): what a restore relies on.

Each check is made to fail once: another resource's manifest (uid), a plaintext that is not what
ipa-backup made, a changed stored archive; and the entries a restore must find are counted per backend.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.archive import layout
from idm_backup_operator.archive.encryption import encrypt, load_recipients
from idm_backup_operator.archive.verify import verify_backup
from idm_backup_operator.freeipa import parse_header
from idm_backup_operator.storage import PVCStore
from testbed.gpgkeys import ExportedKey, Keyring

DIRECTORY = "ns/ipa-hidden.example.test/ipa-data-2026-11-28-02-00-00/"
HEADER = (
    b"[ipa]\ntype = DATA\ntime = 2026-11-28T02:00:00\nhost = ipa-hidden.example.test\n"
    b"ipa_version = 4.12.2\nversion = 1\nservices = CA,KDC\n"
)
USERROOT = b"""version: 1

dn: dc=example,dc=test
objectClass: domain

dn: nsuniqueid=ffffffff-ffffffff-ffffffff-ffffffff,dc=example,dc=test
objectClass: nsTombstone

dn: uid=alice,cn=users,cn=accounts,dc=example,dc=test
objectClass: inetOrgPerson
"""
IPACA = b"dn: o=ipaca\nobjectClass: organization\n"


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExportedKey]:
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    ring = Keyring(home)
    yield ring.export(ring.make("Verify <verify@example.test>"))


def tar_gz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def record(name: str, data: bytes) -> layout.FileRecord:
    return layout.FileRecord(name, len(data), hashlib.sha256(data).hexdigest())


def store_backup(root: Path, key: ExportedKey, *, plaintext_sha: str | None = None) -> PVCStore:
    plain = tar_gz({"./EXAMPLE-TEST-userRoot.ldif": USERROOT, "./EXAMPLE-TEST-ipaca.ldif": IPACA})
    recipients = load_recipients(key.armored)
    cipher = b"".join(encrypt(io.BytesIO(plain), recipients))
    plaintext = record("ipa-data.tar", plain)
    if plaintext_sha is not None:
        plaintext = layout.FileRecord(plaintext.name, plaintext.size, plaintext_sha)
    manifest = layout.build_manifest(
        resource=ResourceIdentity("ns", "nightly", "uid-of-nightly"),
        host="ipa-hidden.example.test",
        pod="ipa-hidden",
        header=parse_header(HEADER),
        header_file=record("header", HEADER),
        archive=record("ipa-data.tar.gpg", cipher),
        plaintext=plaintext,
        recipients=list(recipients.fingerprints),
        options={},
        created=datetime.datetime(2026, 11, 28, 2, 1, tzinfo=datetime.UTC),
    )
    directory = root.joinpath(*DIRECTORY.strip("/").split("/"))
    directory.mkdir(parents=True)
    (directory / "header").write_bytes(HEADER)
    (directory / "ipa-data.tar.gpg").write_bytes(cipher)
    (directory / layout.MANIFEST_FILE).write_bytes(manifest)
    return PVCStore(root)


def test_a_good_backup_verifies_and_its_entries_are_counted_per_backend(
    tmp_path: Path, key: ExportedKey
) -> None:
    verdict = verify_backup(
        store_backup(tmp_path, key),
        DIRECTORY,
        secret_key=key.secret,
        expected_uid="uid-of-nightly",
        server_id="EXAMPLE-TEST",
    )
    assert verdict.restorable, verdict.reasons
    # The RUV tombstone is not an entry a search finds after a restore.
    assert verdict.ldif_entries == {"userRoot": 2, "ipaca": 1}
    assert verdict.unpacked_bytes == len(USERROOT) + len(IPACA)


def test_another_resources_manifest_is_refused(tmp_path: Path, key: ExportedKey) -> None:
    verdict = verify_backup(
        store_backup(tmp_path, key), DIRECTORY, secret_key=key.secret, expected_uid="someone-else"
    )
    assert not verdict.restorable
    assert (
        "the manifest names another resource (uid uid-of-nightly, expected someone-else)" in verdict.reasons
    )


def test_a_plaintext_that_is_not_what_ipa_backup_made_is_refused(tmp_path: Path, key: ExportedKey) -> None:
    verdict = verify_backup(
        store_backup(tmp_path, key, plaintext_sha="0" * 64), DIRECTORY, secret_key=key.secret
    )
    assert not verdict.restorable
    assert any("it is not the archive ipa-backup made" in r for r in verdict.reasons), verdict.reasons


def test_a_changed_stored_archive_is_refused(tmp_path: Path, key: ExportedKey) -> None:
    store = store_backup(tmp_path, key)
    archive = tmp_path.joinpath(*DIRECTORY.strip("/").split("/"), "ipa-data.tar.gpg")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x01
    archive.write_bytes(bytes(data))
    verdict = verify_backup(store, DIRECTORY, secret_key=key.secret)
    assert not verdict.restorable
    assert any("it is corrupted or was altered" in r for r in verdict.reasons), verdict.reasons
