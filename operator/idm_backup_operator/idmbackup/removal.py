"""Deleting what an IdmBackup stored, for its finalizer (deletionPolicy: Delete) and for retention."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.spec import BackupSpec
from idm_backup_operator.archive import stored
from idm_backup_operator.kube import references
from idm_backup_operator.kube.services import Services


def delete_stored_backup(
    services: Services, resource: ResourceIdentity, spec: BackupSpec, status: Mapping[str, Any]
) -> list[str]:
    """Delete what this resource stored; returns the URIs removed. Raises stored.StoredBackupError."""
    keys = stored.keys_from_status(resource, spec, status)
    if keys is None:
        return []
    try:
        with services.opened_store(resource.namespace, spec.storage) as store:
            return stored.delete_owned(store, keys, resource)
    except references.ResolveError as err:
        raise stored.StoredBackupError(f"cannot delete the stored backup: {err}") from None
