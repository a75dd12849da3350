"""Typed views of an IdmBackupSchedule's spec: its clock settings and its retention policy.

As with IdmBackup's spec (api/spec.py), the CRD schema has applied defaults and rules already; what it
cannot check (a cron expression's meaning, a time zone's existence, a duration's size) raises here, with
the field named, for the webhook to refuse and the reconciler to report.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from idm_backup_operator.idmbackupschedule import clock, retention

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
class ScheduleSpec:
    cron: clock.CronSchedule
    tz: ZoneInfo
    suspend: bool
    immediate: bool
    concurrency: clock.ConcurrencyPolicy
    starting_deadline: datetime.timedelta | None


def parse_schedule_spec(spec: Mapping[str, Any]) -> ScheduleSpec:
    """Raises clock.InvalidSchedule for a schedule or time zone that cannot be followed."""
    deadline = spec.get("startingDeadlineSeconds")
    return ScheduleSpec(
        cron=clock.CronSchedule.parse(spec["schedule"]),
        tz=clock.parse_time_zone(spec.get("timeZone") or "UTC"),
        suspend=spec.get("suspend", False),
        immediate=spec.get("immediate", False),
        concurrency=spec.get("concurrencyPolicy", "Forbid"),
        starting_deadline=datetime.timedelta(seconds=min(deadline, MAX_STARTING_DEADLINE_SECONDS))
        if deadline
        else None,
    )
