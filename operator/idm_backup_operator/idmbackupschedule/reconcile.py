"""Following an IdmBackupSchedule: create the tick's IdmBackup, track the children, apply retention.

`reconcile` reads the schedule and its children, asks the pure clock (scheduling) and retention
(retention) what to do, does it, and writes the status. It is idempotent: children are named from
their tick, so a repeated create is a harmless conflict, and lastScheduleTime is written after the
child exists, so a crash in between never loses a tick and a restart never doubles one.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from idm_backup_operator.api.spec import (
    GROUP,
    IDMBACKUPS,
    VERSION,
    format_time,
    parse_backup_spec,
    parse_time,
)
from idm_backup_operator.archive import stored
from idm_backup_operator.archive.layout import ResourceIdentity
from idm_backup_operator.idmbackup.pipeline import Reporter, Services
from idm_backup_operator.idmbackupschedule import clock, retention

log = logging.getLogger(__name__)

SCHEDULE_LABEL = "idm-backup.io/schedule"
PINNED_LABEL = "idm-backup.io/pinned"
TICK_ANNOTATION = "idm-backup.io/scheduled-for"
_DURATION_UNITS = {
    "h": datetime.timedelta(hours=1),
    "d": datetime.timedelta(days=1),
    "w": datetime.timedelta(weeks=1),
}
_DURATION = re.compile(r"([0-9]+)([hdw])")
# The CRD's maximum. A CRD from before it let 2**62 through, which overflows a timedelta; any deadline
# this long already means "take a missed tick late, whenever".
MAX_STARTING_DEADLINE_SECONDS = 366 * 24 * 3600


def parse_duration(text: str) -> datetime.timedelta:
    """Raises ValueError for anything but a number of hours, days or weeks that a timedelta can hold."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a number followed by h, d or w, e.g. 90d")
    try:
        return int(match[1]) * _DURATION_UNITS[match[2]]
    except OverflowError:
        raise ValueError(f"{text!r} is too long") from None


def retention_policy(spec: Mapping[str, Any]) -> retention.RetentionPolicy:
    """Raises ValueError naming the field: older CRDs, without the webhook, let such policies through."""
    keep = spec.get("retention") or {}
    max_age = keep.get("maxAge")
    try:
        age = parse_duration(max_age) if max_age else None
    except ValueError as err:
        raise ValueError(f"maxAge {err}") from None
    return retention.RetentionPolicy(
        keep_last=keep.get("keepLast"),
        keep_daily=keep.get("keepDaily"),
        keep_weekly=keep.get("keepWeekly"),
        keep_monthly=keep.get("keepMonthly"),
        max_age=age,
        min_successful=keep.get("minSuccessful", 1),
        failed_history_limit=keep.get("failedHistoryLimit", 3),
    )


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
        return self.phase in ("Succeeded", "Failed")


def list_children(custom: client.CustomObjectsApi, schedule: ResourceIdentity) -> list[Child]:
    """The schedule's IdmBackups: labelled with its name and owned by its uid (not a namesake's)."""
    items = custom.list_namespaced_custom_object(
        GROUP, VERSION, schedule.namespace, IDMBACKUPS, label_selector=f"{SCHEDULE_LABEL}={schedule.name}"
    )["items"]
    children = []
    for item in items:
        meta = item["metadata"]
        if not any(ref.get("uid") == schedule.uid for ref in meta.get("ownerReferences") or []):
            continue
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
    done = sorted((c for c in children if c.finished and c.completed), key=lambda c: c.completed)  # type: ignore[arg-type,return-value]
    fields: dict[str, Any] = {"active": sorted(c.name for c in children if not c.finished)}
    succeeded = [c for c in done if c.phase == "Succeeded"]
    failed = [c for c in done if c.phase == "Failed"]
    if succeeded:
        fields["lastSuccessfulTime"] = format_time(succeeded[-1].completed)  # type: ignore[arg-type]
        fields["lastSuccessfulBackup"] = succeeded[-1].name
    if failed:
        fields["lastFailedTime"] = format_time(failed[-1].completed)  # type: ignore[arg-type]
        fields["lastFailedBackup"] = failed[-1].name
    streak = 0
    for child in reversed(done):
        if child.phase != "Failed":
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
        "kind": "IdmBackup",
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
                    "kind": "IdmBackupSchedule",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template["spec"],
    }


def create_child(custom: client.CustomObjectsApi, body: dict[str, Any]) -> bool:
    """Create the tick's backup; False if it exists already (a retry after a crash): never a second one."""
    try:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, body["metadata"]["namespace"], IDMBACKUPS, body
        )
    except client.ApiException as err:
        if err.status == 409:
            return False
        raise
    return True


def apply_retention(
    services: Services,
    custom: client.CustomObjectsApi,
    policy: retention.RetentionPolicy,
    children: Sequence[Child],
    now: datetime.datetime,
    tz: Any,
) -> dict[str, Any] | None:
    """Delete the backups the policy lets go, stored files first; None when there is nothing to do."""
    records = [
        retention.BackupRecord(
            name=c.name, completed=c.completed, succeeded=c.phase == "Succeeded", pinned=c.pinned
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
            stored.delete_stored_backup(
                services.core,
                services.pvc_root,
                resource,
                parse_backup_spec(child.body["spec"]),
                child.body.get("status") or {},
                ambient_credentials=services.ambient_s3_credentials,
            )
            custom.delete_namespaced_custom_object(GROUP, VERSION, resource.namespace, IDMBACKUPS, name)
            deleted.append(name)
        except (stored.StoredBackupError, client.ApiException) as err:
            # Kept rather than half-deleted: the resource stays as the record of what is still stored.
            problems.append(f"{name}: {err}")
    message = retention.summarize(plan) if not problems else f"could not delete: {'; '.join(problems)}"
    return {"time": format_time(now), "deleted": deleted, "kept": len(plan.keep), "message": message}


@dataclass(frozen=True)
class Tick:
    """What the first, urgent half of a pass decided and did."""

    decision: clock.Decision
    children: list[Child] | None
    due_name: str | None
    created: bool


@dataclass(frozen=True)
class Invalid:
    """Why the schedule cannot create backups: the reason and message of its Ready condition."""

    reason: str
    message: str


def _api_message(err: client.ApiException) -> str:
    try:
        message = json.loads(err.body or "")["message"]
    except (ValueError, KeyError, TypeError):
        return f"{err.status} {err.reason}"
    return str(message)


def take_tick(
    custom: client.CustomObjectsApi, schedule: Mapping[str, Any], now: datetime.datetime
) -> Tick | Invalid:
    """Create the due tick's backup, if any; Invalid says why the schedule cannot.

    Nothing else is read or written before the create: when many schedules fire together, every call
    before it is lateness. The children are listed first only when the last pass saw one still running,
    which Forbid must know about. (A backup started by hand since then is not seen here; it still never
    overlaps with this one, through the server's Lease.)
    """
    meta, spec, status = schedule["metadata"], schedule["spec"], schedule.get("status") or {}
    try:
        cron = clock.CronSchedule.parse(spec["schedule"])
        tz = clock.parse_time_zone(spec.get("timeZone") or "UTC")
    except clock.InvalidSchedule as err:
        return Invalid("InvalidSchedule", str(err))
    identity = ResourceIdentity(meta["namespace"], meta["name"], meta["uid"])
    children = list_children(custom, identity) if status.get("active") else None
    deadline = spec.get("startingDeadlineSeconds")
    decision = clock.decide(
        cron,
        tz,
        now=now,
        state=clock.ScheduleState(
            last_schedule_time=parse_time(status.get("lastScheduleTime")),
            created=parse_time(meta["creationTimestamp"]),  # type: ignore[arg-type]
            active=tuple(history_status(children)["active"]) if children is not None else (),
        ),
        suspend=spec.get("suspend", False),
        immediate=spec.get("immediate", False),
        concurrency=spec.get("concurrencyPolicy", "Forbid"),
        starting_deadline=datetime.timedelta(seconds=min(deadline, MAX_STARTING_DEADLINE_SECONDS))
        if deadline
        else None,
    )
    due_name, created = None, False
    if decision.due is not None and not decision.skipped_for_concurrency:
        due_name = clock.child_name(meta["name"], decision.due)
        try:
            created = create_child(custom, child_body(schedule, due_name, decision.due))
        except client.ApiException as err:
            if err.status != 422:
                raise
            # The API server's schema or the webhook refuses the template (e.g. a template stored before
            # a CRD upgrade that tightened a rule): retrying every few seconds would only repeat that.
            return Invalid(
                "InvalidTemplate", f"the backup this schedule creates is refused: {_api_message(err)}"
            )
    return Tick(decision, children, due_name, created)


def record(
    services: Services,
    custom: client.CustomObjectsApi,
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
        children = list_children(custom, ResourceIdentity(meta["namespace"], meta["name"], meta["uid"]))
    fields = history_status(children)
    fields["nextScheduleTime"] = format_time(decision.next_time)
    if decision.missed:
        fields["missedTicks"] = status.get("missedTicks", 0) + decision.missed
        report.event("BackupsMissed", decision.reason, warning=True)
    if decision.due is not None and decision.skipped_for_concurrency:
        fields["lastSkipTime"] = format_time(decision.due)
        report.event("BackupSkipped", decision.reason)
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
        tz = clock.parse_time_zone(spec.get("timeZone") or "UTC")
        pruned = apply_retention(services, custom, policy, children, now, tz)
        if pruned is not None:
            fields["retention"] = pruned
            report.event(
                "RetentionApplied", pruned["message"], warning=pruned["message"].startswith("could not")
            )
        ready = (True, "Scheduled", next_backup)
    report.update(**fields)
    report.condition("Ready", *ready)
    last_ok = fields.get("consecutiveFailures", 0) == 0
    if "lastSuccessfulTime" in fields or "lastFailedTime" in fields:
        report.condition(
            "LastBackupSucceeded",
            last_ok,
            "Succeeded" if last_ok else "Failed",
            fields.get("lastSuccessfulBackup", "")
            if last_ok
            else f"{fields['consecutiveFailures']} failed in a row",
        )
    return decision.next_time
