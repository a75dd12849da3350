"""A stored backup found again from its resource: where its files are, whether they are its own.

Deleting is only ever done for files whose manifest names the resource's uid, or, before a manifest
exists, for the exact keys the resource's own status recorded: the operator deletes nothing it did not
write, even when a prefix is shared or a resource was recreated under the same name.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from idm_backup_operator import freeipa
from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.spec import BackupSpec, parse_backup_spec
from idm_backup_operator.archive import layout
from idm_backup_operator.storage import ObjectNotFound, StorageError, Store

log = logging.getLogger(__name__)


class StoredBackupError(Exception):
    """The stored backup cannot be reached or is not this resource's; the message says which."""


def keys_from_status(
    resource: ResourceIdentity, spec: BackupSpec, status: Mapping[str, Any]
) -> layout.BackupKeys | None:
    """The keys a backup writes, known once ipa-backup reported its directory; None before that."""
    directory_path = (status.get("ipaBackup") or {}).get("directory")
    host = (status.get("target") or {}).get("host")
    if not directory_path or not host:
        return None
    directory = freeipa.backup_directory(directory_path, spec.options.type)
    return layout.backup_keys(resource.namespace, host, directory, encrypted=spec.encryption.enabled)


def read_manifest(store: Store, keys: layout.BackupKeys) -> dict[str, Any] | None:
    try:
        with store.open_read(keys.manifest) as f:
            return layout.parse_manifest(f.read())
    except ObjectNotFound:
        return None
    except ValueError as err:
        raise StoredBackupError(f"{store.uri(keys.manifest)} is not a readable manifest: {err}") from None


def owns(manifest: Mapping[str, Any], resource: ResourceIdentity) -> bool:
    return bool(manifest.get("resource", {}).get("uid") == resource.uid)


def delete_files(store: Store, keys: layout.BackupKeys) -> list[str]:
    """Remove the backup's files, manifest first, so a half-deleted backup never looks complete."""
    removed = []
    for key in (keys.manifest, keys.archive, keys.header):
        if store.stat(key) is not None:
            store.delete(key)
            removed.append(store.uri(key))
    store.clean_incomplete(keys.directory, started_before=datetime.datetime.now(datetime.UTC))
    return removed


def delete_owned(store: Store, keys: layout.BackupKeys, resource: ResourceIdentity) -> list[str]:
    """Delete the backup's files unless its manifest names another resource; returns the URIs removed.
    Raises StoredBackupError."""
    try:
        manifest = read_manifest(store, keys)
        if manifest is not None and not owns(manifest, resource):
            raise StoredBackupError(
                f"{store.uri(keys.manifest)} belongs to another resource (uid "
                f"{manifest.get('resource', {}).get('uid')}): left in place"
            )
        return delete_files(store, keys)
    except StorageError as err:
        raise StoredBackupError(f"cannot delete the stored backup: {err}") from None


@dataclass(frozen=True)
class Located:
    """What an IdmBackup stored, found from the resource itself (its spec and status)."""

    resource: ResourceIdentity
    spec: BackupSpec
    keys: layout.BackupKeys
    realm: str | None


def locate(obj: Mapping[str, Any]) -> Located | None:
    """Where the IdmBackup `obj` (a whole resource body) stored its backup; None if it stored nothing."""
    meta, status = obj["metadata"], obj.get("status") or {}
    resource = ResourceIdentity(meta["namespace"], meta["name"], meta["uid"])
    spec = parse_backup_spec(obj["spec"])
    keys = keys_from_status(resource, spec, status)
    if keys is None:
        return None
    return Located(resource, spec, keys, (status.get("target") or {}).get("realm"))
