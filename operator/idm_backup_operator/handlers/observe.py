"""Every change of an IdmBackup or IdmBackupSchedule updates the metrics (idm_backup_operator.metrics).

Event handlers, not change handlers: they see every watch event, including the initial listing and
deletions, carry no kopf state in the objects, and may run any number of times for the same state
(the metrics count each backup once by its uid).
"""

from __future__ import annotations

from typing import Any

import kopf

from idm_backup_operator.api.names import GROUP, IDMBACKUPS, IDMBACKUPSCHEDULES, VERSION
from idm_backup_operator.idmbackupschedule.storagecheck import StorageChecks
from idm_backup_operator.metrics import BackupMetrics


def _metrics(memo: kopf.Memo) -> BackupMetrics | None:
    # None when start-up did not create them (e.g. the handlers loaded by another entry point).
    metrics: BackupMetrics | None = memo.get("metrics")
    return metrics


def _storage_checks(memo: kopf.Memo) -> StorageChecks | None:
    checks: StorageChecks | None = memo.get("storage_checks")
    return checks


@kopf.on.event(GROUP, VERSION, IDMBACKUPS)
async def backup_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if (metrics := _metrics(memo)) is None:
        return
    if type == "DELETED":
        metrics.forget_backup(body)
    else:
        # kopf marks the objects of a (re-)listing with type None: a backup first seen there was
        # already in that state before this process watched it, and is not counted again.
        metrics.observe_backup(body, initial=type is None)


@kopf.on.event(GROUP, VERSION, IDMBACKUPSCHEDULES)
async def schedule_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED" and (checks := _storage_checks(memo)) is not None:
        # Its storage check's last result (handlers/storagecheck.py): a new schedule of the same name
        # starts afresh.
        checks.forget(body.metadata.uid or "")
    if (metrics := _metrics(memo)) is None:
        return
    if type == "DELETED":
        metrics.forget_schedule(body)
    else:
        metrics.observe_schedule(body)
