"""The validating admission webhook: refuses, at kubectl apply, what would only fail at backup time.

Registered only when the operator runs with --webhook-port (kopf refuses validation handlers without a
server). The handler ids are the URL paths: /validate-idmbackup and /validate-idmbackupschedule.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import kopf

from idm_backup_operator import validation
from idm_backup_operator.backup import Services
from idm_backup_operator.model import GROUP, IDMBACKUPS, VERSION
from idm_backup_operator.schedules import SCHEDULE_LABEL

IDMBACKUPSCHEDULES = "idmbackupschedules"


def _unchanged_or_leaving(body: kopf.Body, old: kopf.Body | None, operation: str | None) -> bool:
    """The operator's own writes (finalizers, annotations) and deletions must never be blocked: a Secret
    deleted since the object was created would otherwise pin it, and its finalizer, for ever."""
    if body.metadata.get("deletionTimestamp"):
        return True
    return operation == "UPDATE" and old is not None and old.get("spec") == body.get("spec")


def _cluster(body: kopf.Body, memo: kopf.Memo) -> validation.Cluster:
    services: Services = memo.services
    return validation.Cluster(
        services.core, body.metadata.namespace or "", services.pvc_root, services.ambient_s3_credentials
    )


def _answer(kind: str, body: kopf.Body, findings: validation.Findings, warnings: list[str]) -> None:
    warnings.extend(findings.warnings)
    if findings.errors:
        raise kopf.AdmissionError(validation.refusal(kind, body.metadata.name or "", findings), code=422)


@kopf.on.validate(GROUP, VERSION, IDMBACKUPS, id="validate-idmbackup", operations=["CREATE", "UPDATE"])
async def validate_backup(
    body: kopf.Body,
    warnings: list[str],
    memo: kopf.Memo,
    old: kopf.Body | None = None,
    operation: str | None = None,
    **_: Any,
) -> None:
    if _unchanged_or_leaving(body, old, operation):
        return
    # A schedule's backup is created by the operator itself: its problems belong in its Failed status,
    # where metrics and alerts see them, not in a refusal only the operator's log would show.
    by_schedule = SCHEDULE_LABEL in (body.metadata.labels or {})
    findings = await asyncio.to_thread(
        validation.backup_findings,
        body.spec,
        _cluster(body, memo),
        references="skip" if by_schedule else "refuse",
    )
    _answer("IdmBackup", body, findings, warnings)


@kopf.on.validate(
    GROUP, VERSION, IDMBACKUPSCHEDULES, id="validate-idmbackupschedule", operations=["CREATE", "UPDATE"]
)
async def validate_schedule(
    body: kopf.Body,
    warnings: list[str],
    memo: kopf.Memo,
    old: kopf.Body | None = None,
    operation: str | None = None,
    **_: Any,
) -> None:
    if _unchanged_or_leaving(body, old, operation):
        return
    now = datetime.datetime.now(datetime.UTC)
    findings = await asyncio.to_thread(validation.schedule_findings, body.spec, _cluster(body, memo), now)
    _answer("IdmBackupSchedule", body, findings, warnings)
