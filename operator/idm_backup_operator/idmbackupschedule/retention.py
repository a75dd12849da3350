"""Which of a schedule's backups to delete: a pure function of the backups, the policy and the time.

Rules, in order of strength:
1. Backups that have not finished (no completion time) are never touched.
2. Pinned backups are always kept. They stand outside the keep rules: a pinned backup neither uses up a
   keepLast/keepDaily/... slot nor stands in for one, so pinning last year's backup never costs a recent one.
3. The floor: the newest `min_successful` successful backups (pinned or not) are never deleted, not even
   by maxAge. Retention can therefore never delete the last good backup, whatever the policy says.
4. Successful backups: the keep rules select a union, restic-style, from the unpinned successful backups,
   newest first. keepLast N keeps the N newest; keepDaily N keeps the newest backup of each of the N most
   recent days that have one (days in the schedule's time zone), keepWeekly the same per ISO week,
   keepMonthly per calendar month. Whatever no rule selects is deleted. With no keep rule set, every
   successful backup is selected (retention by age only, or none at all).
   maxAge is a ceiling on top: a successful backup older than maxAge is deleted even if a keep rule
   selected it. (Were keep rules to beat maxAge, maxAge would do nothing as soon as any keep rule is set,
   since the rules already delete everything they do not select.)
5. Failed backups are history only: the `failed_history_limit` most recent are kept, older ones deleted.
   Only successful ("Succeeded and verified") backups count for the keep rules and the floor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class BackupRecord:
    name: str
    completed: datetime | None  # completion time; None while it has not finished
    succeeded: bool  # Succeeded AND verified
    pinned: bool = False  # never deleted by retention


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    max_age: timedelta | None = None
    min_successful: int = 1
    failed_history_limit: int = 3

    def __post_init__(self) -> None:
        counts = {
            "keepLast": self.keep_last,
            "keepDaily": self.keep_daily,
            "keepWeekly": self.keep_weekly,
            "keepMonthly": self.keep_monthly,
            "failedHistoryLimit": self.failed_history_limit,
        }
        for name, value in counts.items():
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if self.min_successful < 1:
            raise ValueError(f"minSuccessful must be at least 1, got {self.min_successful}")
        if self.max_age is not None and self.max_age <= timedelta():
            raise ValueError(f"maxAge must be positive, got {_duration(self.max_age)}")

    @property
    def has_keep_rule(self) -> bool:
        return any(
            n is not None for n in (self.keep_last, self.keep_daily, self.keep_weekly, self.keep_monthly)
        )


@dataclass(frozen=True)
class RetentionPlan:
    keep: dict[str, list[str]]  # every backup not deleted -> why it stays
    delete: list[str]  # oldest first
    delete_reasons: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return summarize(self)


_LISTED_NAMES = 10


def summarize(plan: RetentionPlan) -> str:
    """One line for an Event: "deleted 3 backups: a, b, c; kept 7"."""
    kept = f"kept {len(plan.keep)}"
    if not plan.delete:
        return f"deleted nothing; {kept}"
    names = ", ".join(plan.delete[:_LISTED_NAMES])
    if len(plan.delete) > _LISTED_NAMES:
        names += f" and {len(plan.delete) - _LISTED_NAMES} more"
    noun = "backup" if len(plan.delete) == 1 else "backups"
    return f"deleted {len(plan.delete)} {noun}: {names}; {kept}"


def _newest_first(records: Sequence[BackupRecord]) -> list[BackupRecord]:
    # The name breaks ties so that the plan does not depend on the order the API listed them in.
    return sorted(
        records, key=lambda r: (r.completed or datetime.min.replace(tzinfo=UTC), r.name), reverse=True
    )


def _per_period(
    newest_first: Sequence[BackupRecord], count: int, period: Callable[[datetime], str]
) -> dict[str, str]:
    """The newest backup of each of the `count` most recent periods that have one -> its period."""
    chosen: dict[str, str] = {}
    seen: set[str] = set()
    for record in newest_first:
        assert record.completed is not None
        key = period(record.completed)
        if key in seen:
            continue
        if len(seen) == count:
            break
        seen.add(key)
        chosen[record.name] = key
    return chosen


def plan_retention(
    backups: Sequence[BackupRecord], policy: RetentionPolicy, *, now: datetime, tz: ZoneInfo
) -> RetentionPlan:
    """Which backups to keep and which to delete, and why; the rules are in the module docstring."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    names = [b.name for b in backups]
    if len(set(names)) != len(names):
        raise ValueError("backup names must be unique")
    for b in backups:
        if b.completed is not None and b.completed.tzinfo is None:
            raise ValueError(f"completion time of {b.name} must be timezone-aware")

    keep: dict[str, list[str]] = {}
    delete_reasons: dict[str, str] = {}

    def kept(record: BackupRecord, reason: str) -> None:
        keep.setdefault(record.name, []).append(reason)

    finished = [b for b in backups if b.completed is not None]
    for b in backups:
        if b.completed is None:
            kept(b, "not finished")
        elif b.pinned:
            kept(b, "pinned")

    successful = _newest_first([b for b in finished if b.succeeded])
    for b in successful[: policy.min_successful]:
        kept(b, f"newest {policy.min_successful} successful (minSuccessful)")
    floor = {b.name for b in successful[: policy.min_successful]}

    candidates = [b for b in successful if not b.pinned]
    selected = _select(candidates, policy, tz)
    for b in candidates:
        assert b.completed is not None
        if policy.max_age is not None and now - b.completed > policy.max_age:
            verdict = f"older than maxAge {_duration(policy.max_age)}"
        elif b.name in selected:
            keep.setdefault(b.name, []).extend(selected[b.name])
            continue
        else:
            verdict = "not selected by any keep rule"
        if b.name not in floor:
            delete_reasons[b.name] = verdict

    failed = _newest_first([b for b in finished if not b.succeeded and not b.pinned])
    limit = policy.failed_history_limit
    for b in failed[:limit]:
        kept(b, f"recent failure (failedHistoryLimit {limit})")
    for b in failed[limit:]:
        delete_reasons[b.name] = f"failed, beyond failedHistoryLimit {limit}"

    delete = [b.name for b in reversed(_newest_first([b for b in finished if b.name in delete_reasons]))]
    return RetentionPlan(keep=keep, delete=delete, delete_reasons=delete_reasons)


def _select(
    newest_first: Sequence[BackupRecord], policy: RetentionPolicy, tz: ZoneInfo
) -> dict[str, list[str]]:
    """The union of what the keep rules select -> the rules that selected each one."""
    if not policy.has_keep_rule:
        return {b.name: ["no keep rule set"] for b in newest_first}
    selected: dict[str, list[str]] = {}
    if policy.keep_last is not None:
        for b in newest_first[: policy.keep_last]:
            selected.setdefault(b.name, []).append("keepLast")

    def day(moment: datetime) -> str:
        return moment.astimezone(tz).date().isoformat()

    def week(moment: datetime) -> str:
        year, number, _ = moment.astimezone(tz).isocalendar()
        return f"{year}-W{number:02d}"

    def month(moment: datetime) -> str:
        return f"{moment.astimezone(tz):%Y-%m}"

    rules = (("keepDaily", policy.keep_daily, day), ("keepWeekly", policy.keep_weekly, week))
    for rule, count, period in (*rules, ("keepMonthly", policy.keep_monthly, month)):
        if count is None:
            continue
        for name, key in _per_period(newest_first, count, period).items():
            selected.setdefault(name, []).append(f"{rule} {key}")
    return selected


def _duration(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
