"""Scheduled restore drills (IdmBackupSchedule.spec.drill): at each drill tick, an IdmRestore of mode Drill.

A schedule proves its backups restore by creating, at each tick of its drill cron, an IdmRestore with
`mode: Drill` from one of its own Succeeded backups; the IdmRestore's pipeline (idmrestore/pipeline.py)
does the drill. This module decides and records, as pure functions where it can:

- the ticks come from clock.decide, the schedule's own clock, with the drill's cron and time zone,
  concurrency Forbid (a drill still running skips the tick) and no immediate run;
- `pick_backup`: Latest, the newest Succeeded backup; or Random, one completed within `withinDays` before
  the tick, drawn with a generator seeded by the schedule's uid and the tick, so a retried tick picks the
  same backup;
- `drill_name`: `<schedule>-drill-<YYYYMMDDhhmm>` (UTC), bounded like a backup's tick name; a retried create
  of it is a harmless conflict;
- `fold_outcomes`: the finished drills not yet recorded, oldest first, folded into status.lastDrill,
  lastSuccessfulDrill, lastFailedDrill and consecutiveDrillFailures, each once (and so each one's Event);
- `drills_to_delete`: only the KEEP newest finished drills stay; those still running are never touched.

Everything the schedule status says about drills survives the drills themselves: the metrics and the
RestoreVerified condition are read from the schedule, not from its (pruned) IdmRestores.
"""

from __future__ import annotations

import datetime
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import (
    GROUP,
    IDMBACKUPSCHEDULE,
    IDMRESTORE,
    SCHEDULE_LABEL,
    TICK_ANNOTATION,
    VERSION,
    bounded_name,
)
from idm_backup_operator.api.phase import Phase, is_finished
from idm_backup_operator.api.times import format_time, parse_time
from idm_backup_operator.idmbackupschedule import clock
from idm_backup_operator.kube.backups import DrillRestores, IdmBackups, NameTaken, Refused
from idm_backup_operator.kube.errors import ApiError, api_message
from idm_backup_operator.kube.services import Reporter

log = logging.getLogger(__name__)

Pick = Literal["Latest", "Random"]
# How many finished drills of a schedule stay as IdmRestores; older ones are deleted.
KEEP = 3
CONDITION = "RestoreVerified"


# -- the spec --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrillSchedule:
    cron: clock.CronSchedule
    tz: ZoneInfo
    pick: Pick
    within_days: int | None


def parse_drill_spec(spec: Mapping[str, Any]) -> DrillSchedule | None:
    """The schedule's drill clock and pick, None without spec.drill; raises clock.InvalidSchedule, with the
    field named, for a cron or time zone that cannot be followed."""
    drill = spec.get("drill")
    if not drill:
        return None
    try:
        cron = clock.CronSchedule.parse(drill["schedule"])
    except clock.InvalidSchedule as err:
        raise clock.InvalidSchedule(f"spec.drill.schedule: {err}") from None
    zone = drill.get("timeZone") or spec.get("timeZone") or "UTC"
    try:
        tz = clock.parse_time_zone(zone)
    except clock.InvalidSchedule as err:
        field = "spec.drill.timeZone" if drill.get("timeZone") else "spec.timeZone"
        raise clock.InvalidSchedule(f"{field}: {err}") from None
    pick: Pick = "Random" if drill.get("pick") == "Random" else "Latest"
    within = drill.get("withinDays")
    if pick == "Random" and not (isinstance(within, int) and within >= 1):
        raise clock.InvalidSchedule("spec.drill.withinDays: pick Random needs withinDays of at least 1")
    return DrillSchedule(cron, tz, pick, within if pick == "Random" else None)


# -- pure decisions ----------------------------------------------------------------------------------------


def drill_name(schedule_name: str, tick: datetime.datetime) -> str:
    """`<schedule>-drill-<YYYYMMDDhhmm>` (UTC), at most 63 characters, like a backup's tick name."""
    return bounded_name(schedule_name, f"-drill-{tick.astimezone(datetime.UTC):%Y%m%d%H%M}")


@dataclass(frozen=True)
class Candidate:
    """A Succeeded backup of the schedule, as a drill may pick it."""

    name: str
    completed: datetime.datetime


def candidates(backups: Sequence[Mapping[str, Any]]) -> list[Candidate]:
    found = []
    for body in backups:
        status = body.get("status") or {}
        completed = parse_time(status.get("completionTime"))
        if status.get("phase") == Phase.SUCCEEDED and completed is not None:
            found.append(Candidate(body["metadata"]["name"], completed))
    return found


def pick_backup(
    backups: Sequence[Candidate],
    pick: Pick,
    within_days: int | None,
    *,
    tick: datetime.datetime,
    seed: str,
) -> str | None:
    """The backup the tick's drill restores; None when there is none to pick.

    Random draws from the backups completed in [tick - withinDays, tick], in a fixed order, with a
    generator seeded by `seed` (the schedule's uid) and the tick: the same tick always picks the same.
    """
    ordered = sorted(backups, key=lambda c: (c.completed, c.name))
    if pick == "Latest":
        return ordered[-1].name if ordered else None
    since = tick - datetime.timedelta(days=within_days or 1)
    window = [c for c in ordered if since <= c.completed <= tick]
    if not window:
        return None
    return random.Random(f"{seed}/{format_time(tick)}").choice(window).name


@dataclass(frozen=True)
class Drill:
    """One of the schedule's drills (an IdmRestore), as its status tells."""

    name: str
    phase: str | None
    completed: datetime.datetime | None
    backup: str | None
    reason: str | None = None
    message: str | None = None
    duration: float | None = None
    restore_seconds: float | None = None
    entries: int | None = None

    @property
    def finished(self) -> bool:
        return is_finished(self.phase) and self.completed is not None

    @property
    def succeeded(self) -> bool:
        return self.phase == Phase.SUCCEEDED

    def record(self) -> dict[str, Any]:
        """The drill as status.lastDrill shows it."""
        assert self.completed is not None
        fields: dict[str, Any] = {
            "name": self.name,
            "time": format_time(self.completed),
            "result": Phase.SUCCEEDED.value if self.succeeded else Phase.FAILED.value,
        }
        optional = {
            "backup": self.backup,
            "reason": self.reason,
            "message": self.message,
            "durationSeconds": self.duration,
            "restoreSeconds": self.restore_seconds,
            "entries": self.entries,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        return fields


def drill_of(body: Mapping[str, Any]) -> Drill:
    status = body.get("status") or {}
    drill = status.get("drill") or {}
    backup = (status.get("source") or {}).get("backup") or (
        ((body.get("spec") or {}).get("source") or {}).get("backupRef") or {}
    ).get("name")
    succeeded = status.get("phase") == Phase.SUCCEEDED
    return Drill(
        name=body["metadata"]["name"],
        phase=status.get("phase"),
        completed=parse_time(status.get("completionTime")),
        backup=backup,
        reason=status.get("reason"),
        message=status.get("message"),
        duration=status.get("durationSeconds"),
        restore_seconds=drill.get("restoreSeconds") if succeeded else None,
        entries=drill.get("entries") if succeeded else None,
    )


def _order(drill: Drill) -> tuple[datetime.datetime, str]:
    assert drill.completed is not None
    return (drill.completed, drill.name)


def fold_outcomes(status: Mapping[str, Any], drills: Sequence[Drill]) -> tuple[dict[str, Any], list[Drill]]:
    """The drill fields of the schedule's status after recording the finished drills it has not recorded
    yet (those finished after status.lastDrill), and those drills, oldest first, for their Events."""
    last = status.get("lastDrill") or {}
    recorded = (parse_time(last.get("time")), last.get("name") or "")
    new = sorted(
        (d for d in drills if d.finished and (recorded[0] is None or _order(d) > (recorded[0], recorded[1]))),
        key=_order,
    )
    fields: dict[str, Any] = {"activeDrills": sorted(d.name for d in drills if not d.finished)}
    streak = int(status.get("consecutiveDrillFailures") or 0)
    for drill in new:
        record = drill.record()
        fields["lastDrill"] = record
        if drill.succeeded:
            fields["lastSuccessfulDrill"] = record
            streak = 0
        else:
            fields["lastFailedDrill"] = record
            streak += 1
    fields["consecutiveDrillFailures"] = streak
    return fields, new


def drills_to_delete(drills: Sequence[Drill], keep: int = KEEP) -> list[str]:
    """The finished drills beyond the `keep` newest, oldest first; running ones always stay."""
    finished = sorted((d for d in drills if d.finished), key=_order, reverse=True)
    return [d.name for d in reversed(finished[keep:])]


def verified(last: Mapping[str, Any] | None) -> tuple[str, str, str]:
    """RestoreVerified's (status, reason, message) for status.lastDrill: Unknown before the first drill."""
    if not last:
        return ("Unknown", "NoDrillYet", "no drill of this schedule has finished yet")
    if last.get("result") == Phase.SUCCEEDED:
        entries = f", {last['entries']} entries" if last.get("entries") is not None else ""
        seconds = f" in {last['restoreSeconds']:g} s" if last.get("restoreSeconds") is not None else ""
        return (
            "True",
            "DrillSucceeded",
            f"drill {last['name']} restored backup {last.get('backup') or '?'}{seconds}{entries}",
        )
    why = f": {last['message']}" if last.get("message") else ""
    return (
        "False",
        last.get("reason") or "DrillFailed",
        f"drill {last['name']} of backup {last.get('backup') or '?'} failed{why}",
    )


def with_drill_condition(
    spec: Mapping[str, Any], status: Mapping[str, Any], now: datetime.datetime
) -> list[Any]:
    """The status's conditions with RestoreVerified as the drill fields say, for a reporter to start from:
    added as Unknown before the first drill, dropped when the schedule has no drill."""
    conditions = [c for c in status.get("conditions") or [] if c.get("type") != CONDITION]
    if not spec.get("drill"):
        return conditions
    value, reason, message = verified(status.get("lastDrill"))
    previous = next((c for c in status.get("conditions") or [] if c.get("type") == CONDITION), None)
    if previous is not None and previous.get("status") == value:
        return [*conditions, previous]
    return [
        *conditions,
        {
            "type": CONDITION,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": format_time(now),
        },
    ]


def drill_body(
    schedule: Mapping[str, Any], name: str, tick: datetime.datetime, backup: str
) -> dict[str, Any]:
    meta, drill = schedule["metadata"], schedule["spec"]["drill"]
    spec: dict[str, Any] = {
        "mode": "Drill",
        "source": {"backupRef": {"name": backup}},
        "drill": drill["restore"],
    }
    for field in ("decryption", "activeDeadlineSeconds"):
        if drill.get(field) is not None:
            spec[field] = drill[field]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": IDMRESTORE,
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {SCHEDULE_LABEL: meta["name"]},
            "annotations": {TICK_ANNOTATION: format_time(tick)},
            # Owned: deleting the schedule deletes its drills (and, through theirs, any scratch server).
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
        "spec": spec,
    }


# -- the cluster ---------------------------------------------------------------------------------------------


def reconcile_drills(
    restores: DrillRestores,
    backups: IdmBackups,
    schedule: Mapping[str, Any],
    report: Reporter,
    now: datetime.datetime,
) -> datetime.datetime | None:
    """One drill pass: record finished drills, create the due tick's drill, delete old ones, write the
    status; returns when the next drill is due (None without spec.drill or with an invalid one)."""
    meta, spec, status = schedule["metadata"], schedule["spec"], schedule.get("status") or {}
    identity = ResourceIdentity(meta["namespace"], meta["name"], meta["uid"])
    try:
        parsed = parse_drill_spec(spec)
    except clock.InvalidSchedule as err:
        report.condition(CONDITION, False, "InvalidDrillSchedule", str(err))
        return None
    if parsed is None:
        if any(k in status for k in ("nextDrillTime", "activeDrills")):
            report.update(nextDrillTime=None, activeDrills=None)
        return None

    drills = [drill_of(body) for body in restores.owned_by(identity)]
    fields, outcomes = fold_outcomes(status, drills)
    for drill in outcomes:
        record = drill.record()
        if drill.succeeded:
            report.event("DrillSucceeded", verified(record)[2])
        else:
            report.event("DrillFailed", verified(record)[2], warning=True)

    last_tick = parse_time(status.get("lastDrillScheduleTime"))
    # A drill added to a schedule that has run for a while starts at its next tick, not with a catch-up.
    created = parse_time(meta["creationTimestamp"]) if "nextDrillTime" in status else now
    # The drill of the tick due now, if it exists already (a retried pass), does not make the tick skip.
    due = clock.previous_tick(parsed.cron, now, parsed.tz)
    own = drill_name(meta["name"], due) if due is not None else None
    decision = clock.decide(
        parsed.cron,
        parsed.tz,
        now=now,
        state=clock.ScheduleState(
            last_schedule_time=last_tick,
            created=created,
            active=tuple(n for n in fields["activeDrills"] if n != own),
        ),
        suspend=bool(spec.get("suspend")),
        immediate=False,
        concurrency="Forbid",
        starting_deadline=None,
    )
    fields["nextDrillTime"] = format_time(decision.next_time)
    if decision.due is not None:
        fields["lastDrillScheduleTime"] = format_time(decision.due)
        at = f"{decision.due.astimezone(datetime.UTC):%Y-%m-%d %H:%M} UTC"
        if decision.skipped_for_concurrency:
            message = f"skipped the drill for {at}: {', '.join(fields['activeDrills'])} still running"
            fields["lastDrillSkip"] = {"time": format_time(decision.due), "message": message}
            report.event("DrillSkipped", message)
        else:
            chosen = pick_backup(
                candidates(backups.owned_by(identity)),
                parsed.pick,
                parsed.within_days,
                tick=decision.due,
                seed=meta["uid"],
            )
            if chosen is None:
                within = f" completed within {parsed.within_days} days" if parsed.pick == "Random" else ""
                message = (
                    f"skipped the drill for {at}: no Succeeded backup of this schedule{within} to restore"
                )
                fields["lastDrillSkip"] = {"time": format_time(decision.due), "message": message}
                report.event("DrillSkipped", message, warning=True)
            else:
                name = drill_name(meta["name"], decision.due)
                try:
                    if restores.create(drill_body(schedule, name, decision.due, chosen)):
                        report.event("DrillCreated", f"created IdmRestore {name}: a drill of backup {chosen}")
                    fields["activeDrills"] = sorted({*fields["activeDrills"], name})
                except NameTaken as err:
                    fields["lastDrillSkip"] = {"time": format_time(decision.due), "message": str(err)}
                    report.event("DrillNameTaken", str(err), warning=True)
                except (Refused, ApiError) as err:
                    if isinstance(err, ApiError) and err.status not in (400, 403):
                        raise
                    # Refused (schema, webhook, RBAC): recorded once for the tick rather than retried.
                    why = str(err) if isinstance(err, Refused) else api_message(err)
                    message = f"the drill for {at} was refused: {why}"
                    fields["lastDrillSkip"] = {"time": format_time(decision.due), "message": message}
                    report.event("DrillRefused", message, warning=True)

    old = drills_to_delete(drills)
    deleted = []
    for name in old:
        try:
            restores.delete(identity.namespace, name)
            deleted.append(name)
        except ApiError as err:
            log.warning("could not delete drill %s/%s: %s", identity.namespace, name, api_message(err))
    if deleted:
        report.event(
            "DrillsDeleted", f"deleted {len(deleted)} old drill(s): {', '.join(deleted)}; kept {KEEP}"
        )

    report.update(**fields)
    if "lastDrill" in fields:
        value, reason, message = verified(fields["lastDrill"])
        report.condition(CONDITION, value == "True", reason, message)
    return decision.next_time
