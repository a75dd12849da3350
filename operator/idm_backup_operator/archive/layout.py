"""Where a backup's files go in storage, and the manifest that describes them.

    <prefix>/<namespace>/<host>/<ipa-full|ipa-data>-YYYY-MM-DD-HH-MM-SS/
        header                 ipa-backup's header, as is (ipa-restore needs it beside the archive)
        ipa-full.tar.gpg       the archive, encrypted (ipa-full.tar when encryption is off)
        manifest.json          written last: its presence means the directory is complete

The directory name is ipa-backup's own, so an archive can be put back under /var/lib/ipa/backup and
restored without renaming anything.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from idm_backup_operator import __version__
from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import IDMBACKUP
from idm_backup_operator.freeipa import HEADER_FILE, BackupDirectory, BackupHeader

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class BackupKeys:
    directory: str  # ends with "/"
    header: str
    archive: str
    manifest: str


def backup_keys(namespace: str, host: str, backup_dir: BackupDirectory, encrypted: bool) -> BackupKeys:
    directory = f"{namespace}/{host}/{backup_dir.path.name}/"
    archive = backup_dir.type.archive_name + (".gpg" if encrypted else "")
    return BackupKeys(
        directory=directory,
        header=directory + HEADER_FILE,
        archive=directory + archive,
        manifest=directory + MANIFEST_FILE,
    )


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    sha256: str


def build_manifest(
    *,
    resource: ResourceIdentity,
    host: str,
    pod: str,
    header: BackupHeader,
    header_file: FileRecord,
    archive: FileRecord,
    plaintext: FileRecord,
    recipients: Sequence[str],
    options: Mapping[str, Any],
    created: datetime.datetime,
) -> bytes:
    """Everything needed to check a stored backup without trusting the operator's memory of it."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "createdAt": created.isoformat(timespec="seconds"),
        "operatorVersion": __version__,
        "resource": {
            "kind": IDMBACKUP,
            "namespace": resource.namespace,
            "name": resource.name,
            "uid": resource.uid,
        },
        "server": {"host": host, "pod": pod},
        "options": dict(options),
        "header": {
            "type": header.type.name,
            "time": header.time.isoformat(),
            "host": header.host,
            "ipaVersion": header.ipa_version,
            "version": header.version,
            "services": list(header.services),
        },
        "files": {
            "header": {"name": header_file.name, "size": header_file.size, "sha256": header_file.sha256},
            "archive": {
                "name": archive.name,
                "size": archive.size,
                "sha256": archive.sha256,
                "plaintext": {"name": plaintext.name, "size": plaintext.size, "sha256": plaintext.sha256},
                "encryption": {"tool": "gpg", "recipients": list(recipients)} if recipients else None,
            },
        },
    }
    return json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"


def parse_manifest(data: bytes) -> dict[str, Any]:
    manifest = json.loads(data)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError("not an idm-backup-operator manifest of a known format")
    return manifest
