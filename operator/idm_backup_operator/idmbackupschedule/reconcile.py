"""Following an IdmBackupSchedule: create the tick's IdmBackup, track the children, apply retention.

`reconcile` reads the schedule and its children, asks the pure clock (scheduling) and retention
(retention) what to do, does it, and writes the status. It is idempotent: children are named from
their tick, so a repeated create is a harmless conflict, and lastScheduleTime is written after the
child exists, so a crash in between never loses a tick and a restart never doubles one.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import (
    GROUP,
    IDMBACKUP,
    IDMBACKUPSCHEDULE,
    PINNED_LABEL,
    SCHEDULE_LABEL,
    TICK_ANNOTATION,
    VERSION,
)
from idm_backup_operator.api.phase import Phase, is_finished
from idm_backup_operator.api.spec import parse_backup_spec
from idm_backup_operator.api.times import format_time, parse_time
from idm_backup_operator.archive import stored
from idm_backup_operator.idmbackup import removal
from idm_backup_operator.idmbackupschedule import clock, retention
from idm_backup_operator.idmbackupschedule.spec import parse_schedule_spec, retention_policy
from idm_backup_operator.kube.backups import IdmBackups, NameTaken, Refused
from idm_backup_operator.kube.errors import ApiError
from idm_backup_operator.kube.services import Reporter, Services

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Child:
    name: str
    uid: str
    phase: str | None
    completed: datetime.datetime | None
    pinned: bool
    body: Mapping[str, Any]

    @property
    def finished(self) -> bool:
        return is_finished(self.phase)


def list_children(backups: IdmBackups, schedule: ResourceIdentity) -> list[Child]:
    """The schedule's IdmBackups: labelled with its name and owned by its uid (not a namesake's)."""
    children = []
    for item in backups.owned_by(schedule):
        meta = item["metadata"]
        status = item.get("status") or {}
        children.append(
            Child(
                name=meta["name"],
                uid=meta["uid"],
                phase=status.get("phase"),
                completed=parse_time(status.get("completionTime")),
                pinned=(meta.get("labels") or {}).get(PINNED_LABEL) == "true",
                body=item,
            )
        )
    return children


def history_status(children: Sequence[Child]) -> dict[str, Any]:
    done = sorted((c.completed, c) for c in children if c.finished and c.completed is not None)
    fields: dict[str, Any] = {"active": sorted(c.name for c in children if not c.finished)}
    succeeded = [(at, c) for at, c in done if c.phase == Phase.SUCCEEDED]
    failed = [(at, c) for at, c in done if c.phase == Phase.FAILED]
    if succeeded:
        fields["lastSuccessfulTime"] = format_time(succeeded[-1][0])
        fields["lastSuccessfulBackup"] = succeeded[-1][1].name
    if failed:
        fields["lastFailedTime"] = format_time(failed[-1][0])
        fields["lastFailedBackup"] = failed[-1][1].name
    streak = 0
    for _, child in reversed(done):
        if child.phase != Phase.FAILED:
            break
        streak += 1
    fields["consecutiveFailures"] = streak
    return fields


def child_body(schedule: Mapping[str, Any], name: str, tick: datetime.datetime) -> dict[str, Any]:
    meta, spec = schedule["metadata"], schedule["spec"]
    template = spec["template"]
    template_meta = template.get("metadata") or {}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": IDMBACKUP,
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {**(template_meta.get("labels") or {}), SCHEDULE_LABEL: meta["name"]},
            "annotations": {**(template_meta.get("annotations") or {}), TICK_ANNOTATION: format_time(tick)},
            # Owned, so that deleting the schedule deletes its backups' resources; their own
            # deletionPolicy decides whether the stored archives go too.
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": IDMBACKUPSCHEDULE,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template["spec"],
    }


def apply_retention(
    services: Services,
    backups: IdmBackups,
    policy: retention.RetentionPolicy,
    children: Sequence[Child],
    now: datetime.datetime,
    tz: ZoneInfo,
) -> dict[str, Any] | None:
    """Delete the backups the policy lets go, stored files first; None when there is nothing to do."""
    records = [
        retention.BackupRecord(
            name=c.name, completed=c.completed, succeeded=c.phase == Phase.SUCCEEDED, pinned=c.pinned
        )
        for c in children
    ]
    plan = retention.plan_retention(records, policy, now=now, tz=tz)
    if not plan.delete:
        return None
    by_name = {c.name: c for c in children}
    deleted, problems = [], []
    for name in plan.delete:
        child = by_name[name]
        resource = ResourceIdentity(child.body["metadata"]["namespace"], name, child.uid)
        try:
            removal.delete_stored_backup(
                services, resource, parse_backup_spec(child.body["spec"]), child.body.get("status") or {}
            )
            backups.delete(resource.namespace, name)
            deleted.append(name)
        except (stored.StoredBackupError, ApiError) as err:
            # Kept rather than half-deleted: the resource stays as the record of what is still stored.
            problems.append(f"{name}: {err}")
    message = retention.summarize(plan) if not problems else f"could not delete: {'; '.join(problems)}"
    return {"time": format_time(now), "deleted": deleted, "kept": len(plan.keep), "message": message}


@dataclass(frozen=True)
class Tick:
    """What the first, urgent half of a pass decided and did."""

    decision: clock.Decision
    # The schedule's time zone, as this pass parsed it: retention's days and weeks are counted in it.
    tz: ZoneInfo
    children: list[Child] | None
    due_name: str | None
    created: bool
    # Why the due backup could not be created, when its name was taken by another IdmBackup.
    problem: str | None = None


@dataclass(frozen=True)
class Invalid:
    """Why the schedule cannot create backups: the reason and message of its Ready condition."""

    reason: str
    message: str


def take_tick(backups: IdmBackups, schedule: Mapping[str, Any], now: datetime.datetime) -> Tick | Invalid:
    """Create the due tick's backup, if any; Invalid says why the schedule cannot.

    Nothing else is read or written before the create: when many schedules fire together, every call
    before it is lateness. The children are listed first only when the last pass saw one still running,
    which Forbid must know about. (A backup started by hand since then is not seen here; it still never
    overlaps with this one, through the server's Lease.)
    """
    meta, spec, status = schedule["metadata"], schedule["spec"], schedule.get("status") or {}
    try:
        parsed = parse_schedule_spec(spec)
    except clock.InvalidSchedule as err:
        return Invalid("InvalidSchedule", str(err))
    identity = ResourceIdentity(meta["namespace"], meta["name"], meta["uid"])
    children = list_children(backups, identity) if status.get("active") else None
    decision = clock.decide(
        parsed.cron,
        parsed.tz,
        now=now,
        state=clock.ScheduleState(
            last_schedule_time=parse_time(status.get("lastScheduleTime")),
            created=parse_time(meta["creationTimestamp"]),
            active=tuple(history_status(children)["active"]) if children is not None else (),
        ),
        suspend=parsed.suspend,
        immediate=parsed.immediate,
        concurrency=parsed.concurrency,
        starting_deadline=parsed.starting_deadline,
    )
    due_name, created = None, False
    if decision.due is not None and not decision.skipped_for_concurrency:
        due_name = clock.child_name(meta["name"], decision.due)
        try:
            created = backups.create(child_body(schedule, due_name, decision.due))
        except Refused as err:
            # The API server's schema or the webhook refuses the template (e.g. a template stored before
            # a CRD upgrade that tightened a rule): retrying every few seconds would only repeat that.
            return Invalid("InvalidTemplate", f"the backup this schedule creates is refused: {err}")
        except NameTaken as err:
            return Tick(
                decision,
                parsed.tz,
                children,
                None,
                False,
                f"the backup for {decision.due:%Y-%m-%d %H:%M} UTC: {err}",
            )
    return Tick(decision, parsed.tz, children, due_name, created)


def record(
    services: Services,
    backups: IdmBackups,
    schedule: Mapping[str, Any],
    report: Reporter,
    now: datetime.datetime,
    tick: Tick | Invalid,
) -> datetime.datetime:
    """The second half of a pass: status, Events and retention; returns when the next pass is due.

    Safe to delay: lastScheduleTime is only a record, since a tick's backup has a fixed name and a
    second create of it is refused.
    """
    if isinstance(tick, Invalid):
        report.condition("Ready", False, tick.reason, tick.message)
        return now + datetime.timedelta(hours=1)
    meta, spec, status = schedule["metadata"], schedule["spec"], schedule.get("status") or {}
    decision = tick.decision
    children = tick.children if tick.children is not None and not tick.created else None
    if children is None:
        children = list_children(backups, ResourceIdentity(meta["namespace"], meta["name"], meta["uid"]))
    fields = history_status(children)
    fields["nextScheduleTime"] = format_time(decision.next_time)
    if decision.missed:
        fields["missedTicks"] = status.get("missedTicks", 0) + decision.missed
        report.event("BackupsMissed", decision.reason, warning=True)
    if decision.due is not None and decision.skipped_for_concurrency:
        fields["lastSkipTime"] = format_time(decision.due)
        report.event("BackupSkipped", decision.reason)
    if tick.problem is not None:
        report.event("BackupNameTaken", tick.problem, warning=True)
    if tick.due_name is not None:
        if tick.created:
            report.event("BackupCreated", f"created IdmBackup {tick.due_name}: {decision.reason}")
        fields["active"] = sorted({*fields["active"], tick.due_name})
    if decision.last_schedule_time is not None:
        # Also advanced for a tick missed past its deadline, so each miss is reported only once.
        fields["lastScheduleTime"] = format_time(decision.last_schedule_time)
    next_backup = f"next backup at {fields['nextScheduleTime']}"
    try:
        policy = retention_policy(spec)
    except ValueError as err:
        # Backups go on: a typo in what to delete must neither delete anything nor stop new backups.
        ready = (False, "InvalidRetention", f"spec.retention: {err}; nothing is deleted; {next_backup}")
    else:
        pruned = apply_retention(services, backups, policy, children, now, tick.tz)
        if pruned is not None:
            fields["retention"] = pruned
            report.event(
                "RetentionApplied", pruned["message"], warning=pruned["message"].startswith("could not")
            )
        ready = (
            (False, "BackupNameTaken", f"{tick.problem}; {next_backup}")
            if tick.problem is not None
            else (True, "Scheduled", next_backup)
        )
    report.update(**fields)
    report.condition("Ready", *ready)
    last_ok = fields.get("consecutiveFailures", 0) == 0
    if "lastSuccessfulTime" in fields or "lastFailedTime" in fields:
        report.condition(
            "LastBackupSucceeded",
            last_ok,
            Phase.SUCCEEDED.value if last_ok else Phase.FAILED.value,
            fields.get("lastSuccessfulBackup", "")
            if last_ok
            else f"{fields['consecutiveFailures']} failed in a row",
        )
    return decision.next_time
