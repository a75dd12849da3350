"""What the CRD schema cannot check in an IdmBackupSchedule: its cron expressions (backups and drills) and
time zones, its retention policy, and its template, checked as an IdmBackup's spec is
(idmbackup/validation.py) except that missing references only warn: GitOps may create the Secrets after
the schedule.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from idm_backup_operator.idmbackup.validation import Findings, ReferenceScope, Requester, backup_findings
from idm_backup_operator.idmbackupschedule import clock, drills
from idm_backup_operator.idmbackupschedule.spec import retention_policy


def schedule_findings(
    spec: Mapping[str, Any],
    where: ReferenceScope,
    now: datetime.datetime,
    *,
    requester: Requester | None = None,
) -> Findings:
    findings = Findings()
    cron = zone = None
    try:
        cron = clock.CronSchedule.parse(spec["schedule"])
    except clock.InvalidSchedule as err:
        findings.errors.append(f"spec.schedule: {err}")
    try:
        zone = clock.parse_time_zone(spec.get("timeZone") or "UTC")
    except clock.InvalidSchedule as err:
        findings.errors.append(f"spec.timeZone: {err}")
    if cron is not None and zone is not None:
        try:
            clock.next_tick(cron, now, zone)
        except clock.InvalidSchedule as err:
            findings.errors.append(f"spec.schedule: {err}")
    try:
        drill = drills.parse_drill_spec(spec)
        if drill is not None:
            clock.next_tick(drill.cron, now, drill.tz)
    except clock.InvalidSchedule as err:
        message = str(err)
        if not message.startswith("spec.timeZone"):  # already said above
            findings.errors.append(
                message if message.startswith("spec.") else f"spec.drill.schedule: {message}"
            )
    try:
        retention_policy(spec)
    except ValueError as err:
        findings.errors.append(f"spec.retention: {err}")
    template = spec["template"]["spec"]
    # The schedule's backups are created by the operator, which may read every Secret: whoever sets the
    # template is who must be allowed to read them.
    findings.extend(
        backup_findings(template, where, at="spec.template.spec", references="warn", requester=requester)
    )
    return findings
