"""Uploads that no backup will finish: aborted when the operator starts.

A backup killed with its operator (SIGKILL, a lost node) leaves an S3 multipart upload, invisible in
listings and billed until aborted, or a `.partial` file on a PVC. The backup's own recovery removes what it
knows of; this sweep catches the rest, under each `<namespace>/` prefix of every storage the cluster's
backups and schedules name. Only what is older than the longest a backup may run (activeDeadlineSeconds
is at most 7 days) is touched, so an upload another operator (a peer, another cluster sharing the bucket)
is still writing is never aborted.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

from idm_backup_operator.kube import references
from idm_backup_operator.kube.backups import IdmBackups
from idm_backup_operator.kube.errors import ApiError
from idm_backup_operator.kube.services import Services
from idm_backup_operator.storage import StorageError

log = logging.getLogger(__name__)

# The CRD's maximum activeDeadlineSeconds: no backup writes for longer.
DEFAULT_AGE = datetime.timedelta(seconds=604800)


def clean_leftovers(
    services: Services, namespaces: Sequence[str], *, older_than: datetime.timedelta
) -> list[str]:
    """Abort or remove incomplete uploads older than `older_than`; the URIs of what was cleaned."""
    cutoff = datetime.datetime.now(datetime.UTC) - older_than
    try:
        storages = IdmBackups(services.custom).storages(namespaces)
    except ApiError as err:
        log.warning(
            "cannot list the backups' storages to clean leftover uploads: %s %s", err.status, err.reason
        )
        return []
    cleaned: list[str] = []
    for namespace, storage in storages:
        try:
            with services.opened_store(namespace, storage) as store:
                cleaned += [
                    store.uri(key) for key in store.clean_incomplete(f"{namespace}/", started_before=cutoff)
                ]
        except (references.ResolveError, StorageError) as err:
            log.warning("cannot clean leftover uploads of namespace %s: %s", namespace, err)
    for uri in cleaned:
        log.info("removed an upload no backup will finish: %s", uri)
    log.info(
        "checked %d storages for uploads older than %s: %d removed", len(storages), older_than, len(cleaned)
    )
    return cleaned
