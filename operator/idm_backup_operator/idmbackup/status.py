"""How an IdmBackup's work ends, written in one place so that every ending carries the same fields.

Like CloudNativePG's SetAsFailed/SetAsCompleted: the Completed condition first (whoever sees the phase
change also sees it), then the phase with completionTime, durationSeconds (when the start is known),
reason and message, then an Event. The backup's pipeline, its recovery after a restart and the kopf
handler all end a backup through these two functions.
"""

from __future__ import annotations

import datetime

from idm_backup_operator.api.phase import Phase
from idm_backup_operator.api.times import format_time
from idm_backup_operator.kube.services import Reporter

SUCCEEDED = "BackupSucceeded"


def finished_fields(started: datetime.datetime | None) -> dict[str, object]:
    now = datetime.datetime.now(datetime.UTC)
    fields: dict[str, object] = {"completionTime": format_time(now)}
    if started is not None:
        fields["durationSeconds"] = round((now - started).total_seconds(), 1)
    return fields


def set_succeeded(
    report: Reporter,
    started: datetime.datetime | None,
    archive_uri: str,
    *,
    note: str = "",
    event_note: str = "",
) -> None:
    report.condition("Completed", True, SUCCEEDED, f"stored and verified {archive_uri}")
    report.update(
        phase=Phase.SUCCEEDED.value,
        step="done",
        **finished_fields(started),
        reason=SUCCEEDED,
        message=f"stored {archive_uri}{note}",
    )
    report.event("BackupCompleted", f"stored and verified {archive_uri}{event_note}")


def set_failed(report: Reporter, started: datetime.datetime | None, reason: str, message: str) -> None:
    report.condition("Completed", False, reason, message)
    report.update(phase=Phase.FAILED.value, **finished_fields(started), reason=reason, message=message)
    report.event("BackupFailed", message, warning=True)
