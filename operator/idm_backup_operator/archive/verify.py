"""Can a stored backup be restored? Checked end to end, the way a restore would read it.

`verify_backup` reads a backup directory (``header``, ``ipa-*.tar[.gpg]``, ``manifest.json``) from any
store, in one streaming pass over the archive, with memory independent of its size:

1. the manifest is there and readable (it is written last: without it the directory is incomplete);
2. the header's and the archive's sizes and sha256 are the manifest's (nothing was altered or truncated);
3. the archive decrypts with the given private key, and gpg's integrity check passes at its end;
4. the plaintext's size and sha256 are the manifest's (what ipa-backup made, byte for byte);
5. the plaintext is a gzip tar holding what ipa-restore needs: ``<SERVERID>-userRoot.ldif`` and, for
   a full backup, a readable ``files.tar``.

Every step that fails adds a reason; the verdict is "yes" only when there is none. The same module
resolves where a backup is (an S3 URI, a local directory, or an IdmBackup resource) and lists the
backups stored under a location, for the command line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from idm_backup_operator.archive import layout
from idm_backup_operator.archive.encryption import GpgError, KeyMaterialError, decrypt
from idm_backup_operator.freeipa import HEADER_FILE
from idm_backup_operator.freeipa.ipa_restore import BACKENDS, count_ldif_entries
from idm_backup_operator.storage import ObjectNotFound, PVCStore, S3Config, S3Store, StorageError, Store
from idm_backup_operator.streams import CHUNK_SIZE, Tally, chunks_of

# What a restore needs in the archive (ipa-restore's own checks): the main database's LDIF always,
# and the configuration files for a full backup.
USERROOT_SUFFIX = "-userRoot.ldif"
FILES_TAR = "files.tar"
_FILE_NAMES = re.compile(r"header|manifest\.json|ipa-(full|data)\.tar(\.gpg)?")
_LDIF_MEMBER = re.compile(rf"[^/]+-({'|'.join(BACKENDS)})\.ldif")


class LocationError(Exception):
    """The backup cannot be located or reached; the message says which and why."""


@dataclasses.dataclass
class Verdict:
    location: str
    reasons: list[str] = dataclasses.field(default_factory=list)
    facts: list[str] = dataclasses.field(default_factory=list)
    manifest: dict[str, Any] | None = None
    # What a restore would bring back, counted while the archive was read: entries per backend's LDIF,
    # and the bytes its extraction writes.
    ldif_entries: dict[str, int] = dataclasses.field(default_factory=dict)
    unpacked_bytes: int = 0

    @property
    def restorable(self) -> bool:
        return not self.reasons

    def render(self) -> str:
        lines = [f"backup: {self.location}", *(f"  {fact}" for fact in self.facts)]
        if self.restorable:
            lines.append("can be restored: yes")
        else:
            lines.append(f"can be restored: no, because {self.reasons[0]}")
            lines += [f"  also: {reason}" for reason in self.reasons[1:]]
        return "\n".join(lines)


# -- reading streams --------------------------------------------------------------------------------------


class _TallyReader:
    """A file reader that hashes what passes; the lock keeps a read and its tally together when gpg's
    feeder thread and the final drain could overlap."""

    def __init__(self, source: BinaryIO) -> None:
        self.source, self.tally = source, Tally()
        self._lock = threading.Lock()

    def read(self, size: int = -1, /) -> bytes:
        with self._lock:
            data = self.source.read(size if size > 0 else CHUNK_SIZE)
            self.tally.update(data)
            return data

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass


class _IterReader:
    """Chunks as a file object for tarfile, one chunk buffered at a time, tallied as they are read."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self.tally, self.finished = chunks, Tally(), False
        # The current chunk and how far it was read: tarfile reads 10 KiB at a time, and cutting the
        # rest of a 1 MiB chunk off at each read would copy a hundred times what it returns.
        self._chunk, self._offset = b"", 0

    def _next_chunk(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            self.finished = True
            return False
        self.tally.update(chunk)
        self._chunk, self._offset = chunk, 0
        return True

    def read(self, size: int = -1, /) -> bytes:
        parts: list[bytes] = []
        wanted = size if size >= 0 else None
        while wanted is None or wanted > 0:
            if self._offset >= len(self._chunk) and not self._next_chunk():
                break
            end = len(self._chunk) if wanted is None else min(len(self._chunk), self._offset + wanted)
            parts.append(self._chunk[self._offset : end])
            if wanted is not None:
                wanted -= end - self._offset
            self._offset = end
        return b"".join(parts)

    def drain(self) -> None:
        self._chunk, self._offset = b"", 0
        while self._next_chunk():
            pass


@dataclasses.dataclass
class _Members:
    names: list[str] = dataclasses.field(default_factory=list)  # top-level members
    inner: int | None = None  # members of the tar looked inside, if it is there
    ldif_entries: dict[str, int] = dataclasses.field(default_factory=dict)  # backend -> entries
    unpacked_bytes: int = 0  # what extracting the archive writes


def _stream_members(fileobj: Any, *, look_inside: str | None = None) -> _Members:
    """What a gzip tar read as a stream holds, with the entries of each backend's LDIF counted as they pass.

    tarfile keeps every member it has read in a list, even when streaming; it is emptied as we go so
    that memory does not grow with the number of files (db2bak directories have thousands).
    """
    found = _Members()
    with tarfile.open(fileobj=fileobj, mode="r|gz") as tar:
        while (member := tar.next()) is not None:
            found.unpacked_bytes += member.size
            name = member.name.removeprefix("./")
            if name and "/" not in name.rstrip("/"):
                found.names.append(name.rstrip("/"))
            if (ldif := _LDIF_MEMBER.fullmatch(name)) and member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                found.ldif_entries[ldif[1]] = count_ldif_entries(extracted)
            if look_inside is not None and name == look_inside and member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                found.inner = 0
                with tarfile.open(fileobj=extracted, mode="r|*") as nested:
                    while nested.next() is not None:
                        found.inner += 1
                        nested.members = []  # type: ignore[attr-defined]  # see the docstring
            tar.members = []  # type: ignore[attr-defined]  # not in typeshed, but documented
    return found


def _sha256_of(reader: BinaryIO) -> Tally:
    tally = Tally()
    for chunk in chunks_of(reader):
        tally.update(chunk)
    return tally


def key_fingerprints(secret_key: bytes) -> tuple[set[str], bool]:
    """The fingerprints (primary and subkeys) in a key file, and whether it holds a private key.

    ``gpg --show-keys`` reads the file without importing it: no keyring, no agent.
    """
    with tempfile.TemporaryDirectory(prefix="idm-verify-") as home:
        os.chmod(home, 0o700)
        key_file = Path(home) / "key"
        key_file.write_bytes(secret_key)
        command = ["gpg", "--batch", "--no-tty", "--no-autostart", "--homedir", home, "--with-colons"]
        result = subprocess.run(
            [*command, "--show-keys", str(key_file)],
            capture_output=True,
            env={**os.environ, "LC_ALL": "C"},
        )
    lines = result.stdout.decode(errors="replace").splitlines()
    fingerprints = {line.split(":")[9] for line in lines if line.startswith("fpr:")}
    return fingerprints, any(line.startswith(("sec:", "ssb:")) for line in lines)


# -- the check itself ------------------------------------------------------------------------------------


def verify_backup(
    store: Store,
    directory: str,
    *,
    secret_key: bytes | None,
    passphrase: str | None = None,
    expected_uid: str | None = None,
    server_id: str | None = None,
) -> Verdict:
    """Check the backup under `directory` ("" or a key prefix ending with "/") of `store`."""
    verdict = Verdict(location=store.uri(directory + layout.MANIFEST_FILE).removesuffix(layout.MANIFEST_FILE))
    try:
        with store.open_read(directory + layout.MANIFEST_FILE) as f:
            manifest = layout.parse_manifest(f.read())
    except ObjectNotFound:
        verdict.reasons.append(
            f"there is no {layout.MANIFEST_FILE}: the backup is incomplete (the manifest is written last) "
            "or this is not a backup directory"
        )
        return verdict
    except (ValueError, StorageError) as err:
        verdict.reasons.append(f"{layout.MANIFEST_FILE} cannot be read: {err}")
        return verdict
    verdict.manifest = manifest
    header, files = manifest.get("header") or {}, manifest["files"]
    resource = manifest.get("resource") or {}
    verdict.facts.append(
        f"{header.get('type', '?')} backup of {header.get('host', '?')} made {manifest.get('createdAt')} "
        f"by IdmBackup {resource.get('namespace')}/{resource.get('name')}"
    )
    if expected_uid is not None and resource.get("uid") != expected_uid:
        verdict.reasons.append(
            f"the manifest names another resource (uid {resource.get('uid')}, expected {expected_uid})"
        )
    _check_file(verdict, store, directory + HEADER_FILE, files["header"], "header")
    _check_archive(verdict, store, directory, manifest, secret_key, passphrase, server_id)
    return verdict


def _mismatch(what: str, actual: Tally, expected: Mapping[str, Any]) -> str | None:
    if actual.size != expected.get("size"):
        return f"{what} is {actual.size} bytes, the manifest says {expected.get('size')}"
    if actual.sha256 != expected.get("sha256"):
        return f"{what}'s sha256 is {actual.sha256}, the manifest says {expected.get('sha256')}"
    return None


def _check_file(verdict: Verdict, store: Store, key: str, expected: Mapping[str, Any], what: str) -> None:
    try:
        with store.open_read(key) as f:
            tally = _sha256_of(f)
    except StorageError as err:
        verdict.reasons.append(f"the {what} cannot be read: {err}")
        return
    problem = _mismatch(f"the {what}", tally, expected)
    if problem:
        verdict.reasons.append(f"{problem}: it is corrupted or was altered")
    else:
        verdict.facts.append(f"{what}: {tally.size} bytes, sha256 matches the manifest")


def _check_archive(
    verdict: Verdict,
    store: Store,
    directory: str,
    manifest: Mapping[str, Any],
    secret_key: bytes | None,
    passphrase: str | None,
    server_id: str | None,
) -> None:
    archive = manifest["files"]["archive"]
    encryption = archive.get("encryption")
    full = (manifest.get("header") or {}).get("type") == "FULL"
    if encryption:
        recipients = list(encryption.get("recipients") or [])
        if secret_key is None:
            verdict.reasons.append(
                f"the archive is encrypted (to {', '.join(recipients)}) and no private key was given (--key)"
            )
            return
        fingerprints, has_secret = key_fingerprints(secret_key)
        if not has_secret:
            verdict.reasons.append(
                "the key file holds no OpenPGP private key (export it with --export-secret-keys)"
            )
            return
        if recipients and not fingerprints & set(recipients):
            verdict.reasons.append(
                f"the key ({', '.join(sorted(fingerprints)) or 'no fingerprint'}) is not one this archive is "
                f"encrypted to (recipients: {', '.join(recipients)})"
            )
            return
    try:
        source = _TallyReader(store.open_read(directory + archive["name"]))
    except StorageError as err:
        verdict.reasons.append(f"the archive cannot be read: {err}")
        return
    plain_problem: str | None = None
    members = _Members()
    with source.source:
        if encryption:
            assert secret_key is not None
            chunks: Iterator[bytes] = decrypt(source, secret_key, passphrase=passphrase)
        else:
            chunks = chunks_of(source)
        plaintext = _IterReader(chunks)
        try:
            try:
                members = _stream_members(plaintext, look_inside=FILES_TAR if full else None)
            except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
                # Not a gzip tar (or a truncated one); decryption may still have worked: read on.
                plain_problem = f"the decrypted archive is not a readable gzip tar: {err}"
            plaintext.drain()  # tar's end padding, and gpg's final integrity check
        except GpgError as err:
            plain_problem = f"the archive cannot be decrypted: {err}"
        except KeyMaterialError as err:
            plain_problem = f"the private key cannot be used: {err}"
        except StorageError as err:
            verdict.reasons.append(f"the archive cannot be read to its end: {err}")
            return
        finally:
            # Stops gpg (and its feeder thread) if the tar ended early or something failed.
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        try:
            source.drain()  # whatever a failure left unread, for the archive's checksum
        except StorageError as err:
            verdict.reasons.append(f"the archive cannot be read to its end: {err}")
            return
    # The stored object first: when it differs from the manifest, that explains everything after it.
    stored = _mismatch("the stored archive", source.tally, archive)
    if stored:
        verdict.reasons.append(f"{stored}: it is corrupted or was altered")
    else:
        verdict.facts.append(
            f"archive {archive['name']}: {source.tally.size} bytes, sha256 matches the manifest"
        )
    if plain_problem is not None:
        verdict.reasons.append(plain_problem)
        return
    expected_plain = archive.get("plaintext") or {}
    problem = _mismatch("the decrypted archive", plaintext.tally, expected_plain)
    if problem:
        verdict.reasons.append(f"{problem}: it is not the archive ipa-backup made")
    elif encryption:
        verdict.facts.append(
            f"decrypted with the key: {plaintext.tally.size} bytes, sha256 matches what ipa-backup made"
        )
    verdict.ldif_entries, verdict.unpacked_bytes = members.ldif_entries, members.unpacked_bytes
    _check_members(verdict, members.names, members.inner, full, server_id)


def _check_members(
    verdict: Verdict, members: list[str], inner: int | None, full: bool, server_id: str | None
) -> None:
    if server_id:
        wanted = f"{server_id}{USERROOT_SUFFIX}"
        ldif = [m for m in members if m == wanted]
    else:
        wanted = f"<SERVERID>{USERROOT_SUFFIX}"
        ldif = [m for m in members if m.endswith(USERROOT_SUFFIX)]
    if not ldif:
        verdict.reasons.append(
            f"the archive has no {wanted}, the directory's data (it has: {', '.join(members)})"
        )
    else:
        verdict.facts.append(f"the archive holds {ldif[0]}")
    if full:
        if FILES_TAR not in members:
            verdict.reasons.append(f"the full backup's archive has no {FILES_TAR} (the configuration files)")
        elif inner is None:
            verdict.reasons.append(f"the archive's {FILES_TAR} is not a regular file")
        else:
            verdict.facts.append(f"the archive holds {FILES_TAR}, a readable tar of {inner} entries")


# -- where a backup is ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class S3Options:
    """How the command line reaches S3 for a URI: the environment's AWS_* settings, and these."""

    endpoint: str | None = None
    addressing: str = "default"  # "path", "virtual", or "default": path with an endpoint, else auto
    ca_bundle: str | None = None

    def config(self, bucket: str, prefix: str) -> S3Config:
        endpoint = (
            self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        path_style = self.addressing == "path" or (self.addressing == "default" and endpoint is not None)
        ca = self.ca_bundle or os.environ.get("AWS_CA_BUNDLE")
        return S3Config(
            bucket=bucket,
            prefix=prefix,
            endpoint_url=endpoint,
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            # None: boto3's own chain, which reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / profiles.
            verify=ca or True,
            force_path_style=path_style,
        )


def split_location(location: str) -> tuple[str, str | None, str]:
    """(scheme, bucket, path) of ``s3://bucket/path`` or of a local path (scheme "file", no bucket)."""
    if location.startswith("s3://"):
        bucket, _, path = location.removeprefix("s3://").partition("/")
        if not bucket:
            raise LocationError(f"{location!r} names no bucket")
        return "s3", bucket, path.strip("/")
    if "://" in location:
        raise LocationError(f"{location!r}: only s3:// URIs and local directories are supported")
    return "file", None, location


def open_location(location: str, s3: S3Options) -> Store:
    """A store rooted at `location`: everything below it is reachable by relative keys."""
    scheme, bucket, path = split_location(location)
    try:
        if scheme == "s3":
            assert bucket is not None
            return S3Store(s3.config(bucket, path))
        if not Path(path).is_dir():
            raise LocationError(f"{path} is not a directory")
        return PVCStore(path)
    except StorageError as err:
        raise LocationError(str(err)) from None


def backup_directory_location(location: str, s3: S3Options) -> tuple[Store, str]:
    """The store and directory key of one backup given by its directory's (or one of its files') URI."""
    scheme, bucket, path = split_location(location)
    parts = (
        [p for p in path.rstrip("/").split("/") if p] if scheme == "s3" else list(Path(path).resolve().parts)
    )
    if parts and _FILE_NAMES.fullmatch(parts[-1]):
        parts.pop()  # the URI of a file in the directory, e.g. copied from status.archive.uri
    if not parts:
        raise LocationError(f"{location!r} does not name a backup directory")
    name = parts.pop()
    # A resolved local path starts with "/", which Path() joins back correctly.
    parent = f"s3://{bucket}/{'/'.join(parts)}" if scheme == "s3" else str(Path(*parts))
    return open_location(parent, s3), f"{name}/"


@dataclasses.dataclass(frozen=True)
class StoredBackup:
    directory: str  # the store's URI of the directory
    manifest: dict[str, Any] | None  # None: no readable manifest, the directory is incomplete
    problem: str | None = None


def list_stored(store: Store) -> list[StoredBackup]:
    """Every backup directory below the store's root, found by its files and described by its manifest."""
    directories: dict[str, bool] = {}
    for obj in store.list_objects(""):
        directory, _, name = obj.key.rpartition("/")
        if _FILE_NAMES.fullmatch(name):
            directories[directory] = directories.get(directory, False) or name == layout.MANIFEST_FILE
    found = []
    for directory, has_manifest in sorted(directories.items()):
        uri = store.uri(f"{directory}/{layout.MANIFEST_FILE}").removesuffix(layout.MANIFEST_FILE)
        if not has_manifest:
            found.append(StoredBackup(uri, None, "no manifest: incomplete"))
            continue
        try:
            with store.open_read(f"{directory}/{layout.MANIFEST_FILE}") as f:
                found.append(StoredBackup(uri, layout.parse_manifest(f.read())))
        except (ValueError, StorageError) as err:
            found.append(StoredBackup(uri, None, f"unreadable manifest: {err}"))
    return found


def server_id(realm: str | None) -> str | None:
    """ipa-backup names the directory server instance after the realm, dots replaced by dashes."""
    return realm.replace(".", "-") if realm else None
