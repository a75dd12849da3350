"""How an IdmRestore ends, written in one place, with the same fields as an IdmBackup's ending."""

from __future__ import annotations

import datetime

from idm_backup_operator.api.phase import Phase
from idm_backup_operator.archive.verify import Verdict
from idm_backup_operator.idmbackup.status import finished_fields
from idm_backup_operator.kube.services import Reporter

SUCCEEDED = "RestoreSucceeded"


def set_succeeded(report: Reporter, started: datetime.datetime | None, host: str, verdict: Verdict) -> None:
    entries = ", ".join(f"{backend} {count}" for backend, count in sorted(verdict.ldif_entries.items()))
    message = f"restored {verdict.location} into {host}; entries checked over LDAP: {entries}"
    report.condition("Completed", True, SUCCEEDED, message)
    report.update(
        phase=Phase.SUCCEEDED.value,
        step="done",
        **finished_fields(started),
        reason=SUCCEEDED,
        message=message,
    )
    report.event("RestoreCompleted", message)


def set_failed(report: Reporter, started: datetime.datetime | None, reason: str, message: str) -> None:
    report.condition("Completed", False, reason, message)
    report.update(phase=Phase.FAILED.value, **finished_fields(started), reason=reason, message=message)
    report.event("RestoreFailed", message, warning=True)
