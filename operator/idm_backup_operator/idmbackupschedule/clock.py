"""IdmBackupSchedule's clock: cron expressions, their ticks in a time zone, and what to do on a reconcile.

Everything here is a pure function of (spec, history, time): the caller passes `now`, nothing reads the
clock, and all instants going in and out are timezone-aware (returned in UTC).

Cron dialect: the standard 5 fields (minute hour day-of-month month day-of-week) with `*`, lists, ranges,
steps and month/weekday names, plus the usual @-macros. A 6th field is refused rather than guessed at:
CloudNativePG's seconds-first format silently turned "daily" into "hourly" for many users. When both
day-of-month and day-of-week are restricted (neither starts with `*`) a day matches if EITHER does, as in
Vixie cron and crontab(5); otherwise both must match.

cronsim parses the fields and enumerates the matching wall-clock times. This module adds the @-macros,
refuses what cronsim would accept beyond that dialect (a seconds field, Quartz's L, W and #, `5/15`, a
step larger than its field), gives each refusal a message that names the field and value, and maps
wall-clock times to instants by the rules below. cronsim's own time zone handling is not used: it
follows Debian cron, which picks the rule by whether the minute or hour field starts with `*` (so
`*/15 2 * * *` would skip a spring-forward day and run the repeated hour twice) and can step over a
tick when an offset changes by half an hour (Australia/Lord_Howe).

Time zones and daylight saving time (the schedule's fields are wall-clock times in `timeZone`):
- A schedule whose hour field covers all 24 hours (`30 * * * *`, `*/15 * * * *`) measures real time: it
  fires at every instant whose local time matches. In spring a skipped hour simply does not happen; in
  autumn the repeated hour happens twice, so `30 * * * *` fires at 02:30 CEST and again at 02:30 CET
  (an hour apart, as "every hour" promises).
- Any other schedule names particular hours (`30 2 * * *`, `0 */6 * * *`) and fires once per matching
  local time, like cronie and systemd: a time skipped by spring-forward fires at the first instant after
  the gap (02:30 on the day Berlin jumps 02:00 -> 03:00 fires at 03:00 CEST, once even if several of the
  schedule's times fell into the gap); a time repeated by fall-back fires at its first occurrence only.

The per-reconcile decision (`decide`):
- The ticks after `lastScheduleTime` (or after the schedule's creation, if it never fired) up to `now`
  are the candidates. Only the latest one is run: after any downtime there is at most one catch-up
  backup, never a burst. The older candidates are counted as missed.
- With `startingDeadline`, the latest candidate runs only if `now - tick <= startingDeadline`; otherwise
  it is missed too, and `last_schedule_time` still advances so the misses are reported once.
- `suspend` starts nothing. Ticks that pass while suspended count as missed on resume, where (as with
  Kubernetes CronJobs) the latest of them may still run once, subject to the starting deadline.
- `immediate` with no `lastScheduleTime` takes one backup at once, for `now` truncated to the minute.
- With backups of this schedule still active: Forbid records the due tick as skipped, Replace runs it
  and names the active backups to stop, Allow just runs it.
- Results of earlier backups are not an input: a failed run never blocks the next one.
- Once the caller stores the returned `last_schedule_time`, calling again returns nothing due until the
  next tick, so a repeated reconcile never fires twice; `child_name` makes the child's name a function of
  the tick, so a retried create is a harmless conflict.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from idm_backup_operator.api.names import bounded_name

ConcurrencyPolicy = Literal["Forbid", "Allow", "Replace"]

FIVE_FIELDS = "minute hour day-of-month month day-of-week"

_ONE_SECOND = timedelta(seconds=1)
_TINY = timedelta(microseconds=1)


class InvalidSchedule(ValueError):
    """A schedule or time zone written by a user that cannot be used; the message is for that user."""


class _FieldSpec(NamedTuple):
    name: str
    low: int
    high: int
    names: tuple[str, ...]
    first_name_value: int
    names_hint: str


_MINUTE = _FieldSpec("minute", 0, 59, (), 0, "")
_HOUR = _FieldSpec("hour", 0, 23, (), 0, "")
_DAY_OF_MONTH = _FieldSpec("day-of-month", 1, 31, (), 0, "")
_MONTH = _FieldSpec(
    "month",
    1,
    12,
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    1,
    " or a month name (jan-dec)",
)
# 7 is accepted as a second Sunday, as every cron does.
_DAY_OF_WEEK = _FieldSpec(
    "day-of-week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat"), 0, " or a day name (sun-sat)"
)
_FIELDS = (_MINUTE, _HOUR, _DAY_OF_MONTH, _MONTH, _DAY_OF_WEEK)

_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}

# Any start will do for parsing: cronsim parses in its constructor.
_PARSE_AT = datetime(2000, 1, 1)


def _value(token: str, spec: _FieldSpec) -> int:
    word = token.lower()
    if word.isascii() and word.isdigit():
        number = int(word)
        if not spec.low <= number <= spec.high:
            raise InvalidSchedule(f"{spec.name} value {number} is out of range {spec.low}-{spec.high}")
        return number
    if word in spec.names:
        return spec.names.index(word) + spec.first_name_value
    if word == "?":
        raise InvalidSchedule(f"{spec.name} value '?' is Quartz syntax, not standard cron: use '*'")
    raise InvalidSchedule(f"{spec.name} value {token!r} is not a number{spec.names_hint}")


def _check_field(text: str, spec: _FieldSpec) -> str:
    """Refuse, with a message for the user, what the dialect does not allow; return the text for cronsim.

    cronsim would say only "Bad minute", and would accept L, W, #, `5/15` and oversized steps.
    """
    items = []
    for item in text.split(","):
        if not item:
            raise InvalidSchedule(f"{spec.name} field {text!r} has an empty list entry")
        base, slash, step_text = item.partition("/")
        if slash:
            if not (step_text.isascii() and step_text.isdigit()):
                raise InvalidSchedule(f"{spec.name} step {step_text!r} in {item!r} is not a number")
            step = int(step_text)
            if step < 1:
                raise InvalidSchedule(f"{spec.name} step in {item!r} must be at least 1")
            # Steps restart with each hour/day/...: "*/90" in minutes cannot mean every 90 minutes.
            if step > spec.high - spec.low + 1:
                raise InvalidSchedule(
                    f"{spec.name} step {step} in {item!r} is larger than the range {spec.low}-{spec.high}"
                )
        if base != "*":
            first, dash, last = base.partition("-")
            low = _value(first, spec)
            if dash:
                high = _value(last, spec)
                if low > high:
                    raise InvalidSchedule(f"{spec.name} range {base!r} goes backwards ({low} > {high})")
                if low == high:
                    item = first  # cronsim reads "5-5/2" as "5/2", i.e. 5-59/2
            elif slash:
                raise InvalidSchedule(
                    f"{spec.name} {item!r}: a step needs '*' or a range before the slash, "
                    f"e.g. '{base}-{spec.high}/{step}'"
                )
        items.append(item)
    return ",".join(items)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed 5-field cron expression; build one with `CronSchedule.parse`."""

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days_of_month: frozenset[int]
    months: tuple[int, ...]
    days_of_week: frozenset[int]  # 0 = Sunday
    # Vixie cron's rule: a field is "restricted" unless its text starts with `*`.
    day_of_month_restricted: bool
    day_of_week_restricted: bool
    cron: str  # the five fields as given to cronsim
    _parsed: CronSim = field(compare=False, repr=False)

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        text = expression.strip()
        if not text:
            raise InvalidSchedule(f"the schedule is empty: give 5 fields: {FIVE_FIELDS}")
        head = text.split()[0]
        if head.upper().startswith(("CRON_TZ=", "TZ=")):
            raise InvalidSchedule(
                f"time zone prefix {head!r} is not supported in the schedule: "
                "set the timeZone field instead (e.g. timeZone: Europe/Berlin)"
            )
        fields = (_expand_macro(text) if text.startswith("@") else text).split()
        if len(fields) == 6:
            raise InvalidSchedule(
                "6 fields given: this looks like a cron expression with a seconds field (as in "
                f"CloudNativePG) — use the standard 5 fields: {FIVE_FIELDS}"
            )
        if len(fields) == 7:
            raise InvalidSchedule(
                "7 fields given: this looks like a Quartz cron expression with seconds and year fields "
                f"— use the standard 5 fields: {FIVE_FIELDS}"
            )
        if len(fields) != 5:
            raise InvalidSchedule(f"{len(fields)} fields given: use the standard 5 fields: {FIVE_FIELDS}")
        cron = " ".join(_check_field(f, s) for f, s in zip(fields, _FIELDS, strict=True))
        try:
            parsed = CronSim(cron, _PARSE_AT)
        except CronSimError:
            # The fields passed the checks above: what is left is cronsim's check that, with day-of-month
            # ANDed with day-of-week, some month has one of the days.
            raise InvalidSchedule(
                f"schedule {expression!r} never fires: day-of-month {fields[2]!r} never occurs "
                f"in month {fields[3]!r}"
            ) from None
        return cls(
            expression=expression,
            minutes=tuple(sorted(parsed.minutes)),
            hours=tuple(sorted(parsed.hours)),
            days_of_month=frozenset(parsed.days),
            months=tuple(sorted(parsed.months)),
            days_of_week=frozenset(d % 7 for d in parsed.weekdays if isinstance(d, int)),
            day_of_month_restricted=not fields[2].startswith("*"),
            day_of_week_restricted=not fields[4].startswith("*"),
            cron=cron,
            _parsed=parsed,
        )

    @property
    def every_hour(self) -> bool:
        """True if the schedule runs in every hour; such schedules follow real time across DST changes."""
        return len(self.hours) == 24

    def matches_day(self, day: date) -> bool:
        return day.month in self.months and self._parsed.match_day(day)


def _expand_macro(text: str) -> str:
    word = text.split()[0].lower()
    if word in _MACROS:
        if len(text.split()) > 1:
            raise InvalidSchedule(f"{word} takes no further fields: {text!r}")
        return _MACROS[word]
    supported = ", ".join(_MACROS)
    if word == "@every":
        raise InvalidSchedule(
            f"'@every' is not supported: write the interval as a 5-field cron expression "
            f"(e.g. '*/15 * * * *') or use one of {supported}"
        )
    if word == "@reboot":
        raise InvalidSchedule(
            "'@reboot' is not supported: a backup schedule needs clock times; "
            "use 'immediate: true' for a backup as soon as the schedule is created"
        )
    raise InvalidSchedule(f"unknown macro {word!r}; supported: {supported}")


def parse_time_zone(name: str) -> ZoneInfo:
    """The IANA time zone `name` (e.g. "Europe/Berlin"); the caller supplies "UTC" when none is set."""
    # "localtime" would silently mean the operator host's zone, which is exactly the confusion to avoid.
    if name == "localtime":
        raise InvalidSchedule("unknown time zone 'localtime': give an IANA name such as 'Europe/Berlin'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidSchedule(f"unknown time zone {name!r}") from None


# --- ticks --------------------------------------------------------------------------------------------


def _utc(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {moment!r}")
    return moment.astimezone(UTC)


def _wall(instant: datetime, tz: ZoneInfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None, fold=0)


def _floor_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _offset_spread(tz: ZoneInfo, instant: datetime) -> timedelta:
    """How far local time may be displaced around `instant`: the largest offset change within 2 days.

    Wall-clock order and real-time order only disagree near an offset change, and by at most its size;
    searches use this as their safety margin. Assumes no two changes within a day cancel out.
    """
    offsets = [
        (instant + timedelta(days=d)).astimezone(tz).utcoffset() or timedelta() for d in (-2, -1, 0, 1, 2)
    ]
    return max(offsets) - min(offsets)


def _walls_from(schedule: CronSchedule, start: datetime) -> Iterator[datetime]:
    """Matching naive wall-clock times >= `start`, ascending, for at most 50 years (cronsim's limit)."""
    return CronSim(schedule.cron, start - _ONE_SECOND)


def _walls_until(schedule: CronSchedule, end: datetime) -> Iterator[datetime]:
    """Matching naive wall-clock times <= `end`, descending, for at most 50 years."""
    return CronSim(schedule.cron, _floor_minute(end) + _ONE_SECOND, reverse=True)


def _transition_between(tz: ZoneInfo, low: datetime, high: datetime) -> datetime:
    """The first instant in (low, high] whose UTC offset differs from low's (offsets differ at the ends)."""
    before = low.astimezone(tz).utcoffset()
    lo, hi = 0, int((high - low) / _ONE_SECOND)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (low + mid * _ONE_SECOND).astimezone(tz).utcoffset() == before:
            lo = mid
        else:
            hi = mid
    return low + hi * _ONE_SECOND


def _instants(schedule: CronSchedule, tz: ZoneInfo, wall: datetime) -> list[datetime]:
    """When the matching wall-clock time `wall` fires, in UTC, under the DST rules of the module docstring."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if first == second:
        return [first]
    earlier, later = min(first, second), max(first, second)
    if _wall(first, tz) == wall:  # repeated by fall-back
        return [earlier, later] if schedule.every_hour else [earlier]
    # Skipped by spring-forward.
    return [] if schedule.every_hour else [_transition_between(tz, earlier, later)]


def next_tick(schedule: CronSchedule, after: datetime, tz: ZoneInfo) -> datetime:
    """The first tick strictly after `after`, in UTC."""
    after = _utc(after, "after")
    start = _floor_minute(_wall(after, tz) - _offset_spread(tz, after))
    best: datetime | None = None
    limit: datetime | None = None
    for wall in _walls_from(schedule, start):
        if limit is not None and wall > limit:
            break
        for instant in _instants(schedule, tz, wall):
            if instant > after and (best is None or instant < best):
                best = instant
                limit = _wall(best, tz) + _offset_spread(tz, best)
    if best is None:
        raise InvalidSchedule(f"schedule {schedule.expression!r} has no tick after {after.isoformat()}")
    return best


def previous_tick(schedule: CronSchedule, at_or_before: datetime, tz: ZoneInfo) -> datetime | None:
    """The latest tick at or before `at_or_before`, in UTC (None if there is none in 50 years)."""
    at = _utc(at_or_before, "at_or_before")
    end = _wall(at, tz) + _offset_spread(tz, at)
    best: datetime | None = None
    limit: datetime | None = None
    for wall in _walls_until(schedule, end):
        if limit is not None and wall < limit:
            break
        for instant in _instants(schedule, tz, wall):
            if instant <= at and (best is None or instant > best):
                best = instant
                limit = _wall(best, tz) - _offset_spread(tz, best)
    return best


def _midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


def count_ticks(schedule: CronSchedule, tz: ZoneInfo, after: datetime, until: datetime) -> int:
    """How many ticks fall in (after, until].

    Days far from any offset change are counted arithmetically; only partial days and days near a DST
    change are enumerated, so a year of downtime costs milliseconds, not a scan of every minute.
    """
    low = _utc(after, "after") + _TINY  # ticks in (after, until] are those in [low, high)
    high = _utc(until, "until") + _TINY
    if high <= low:
        return 0
    per_day = len(schedule.hours) * len(schedule.minutes)
    first_day, last_day = _wall(low, tz).date(), _wall(high, tz).date()
    count = 0
    walk_from: datetime | None = None  # start of a stretch still to be walked tick by tick
    piece_start = low
    day = first_day
    while piece_start < high:
        next_midnight = _midnight(day + timedelta(days=1), tz)
        piece_end = high if day >= last_day else min(max(next_midnight, piece_start), high)
        whole_day = piece_start == _midnight(day, tz) and piece_end == next_midnight
        if whole_day and _offset_spread(tz, piece_start) == _offset_spread(tz, piece_end) == timedelta():
            if walk_from is not None:
                count += _walk_count(schedule, tz, walk_from, piece_start)
                walk_from = None
            count += per_day if schedule.matches_day(day) else 0
        elif walk_from is None:
            walk_from = piece_start
        piece_start = piece_end
        day += timedelta(days=1)
    if walk_from is not None:
        count += _walk_count(schedule, tz, walk_from, high)
    return count


def _walk_count(schedule: CronSchedule, tz: ZoneInfo, low: datetime, high: datetime) -> int:
    """Ticks in [low, high), by looking at every matching wall-clock time that could land there."""
    last = _wall(high, tz) + _offset_spread(tz, high)
    ticks: set[datetime] = set()  # a set: several skipped times can fire at the same instant
    for wall in _walls_from(schedule, _floor_minute(_wall(low, tz) - _offset_spread(tz, low))):
        if wall > last:
            break
        ticks.update(t for t in _instants(schedule, tz, wall) if low <= t < high)
    return len(ticks)


# --- the per-reconcile decision ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleState:
    """What the schedule's status and its children tell."""

    last_schedule_time: datetime | None  # the last tick a backup was created for, skipped for, or missed
    created: datetime  # the schedule resource's creation time
    active: tuple[str, ...] = ()  # names of its backups still Pending/Running


@dataclass(frozen=True)
class Decision:
    due: datetime | None  # the tick to take a backup for now (at most one), in UTC
    missed: int  # ticks that passed and are not run: older than `due`, or past the starting deadline
    skipped_for_concurrency: bool  # Forbid with an active backup: `due` is recorded as skipped, not run
    stop_active: tuple[str, ...]  # Replace: active backups to stop before creating the one for `due`
    next_time: datetime  # the next tick after now: status.nextScheduleTime and when to requeue
    last_schedule_time: datetime | None  # the new status.lastScheduleTime; None = leave it unchanged
    reason: str  # for status and the Event


def _show(instant: datetime, tz: ZoneInfo) -> str:
    local = instant.astimezone(tz)
    return f"{local:%Y-%m-%d %H:%M} {local.tzname()}"


def _ticks(n: int) -> str:
    return f"{n} tick" if n == 1 else f"{n} ticks"


def decide(
    schedule: CronSchedule,
    tz: ZoneInfo,
    *,
    now: datetime,
    state: ScheduleState,
    suspend: bool,
    immediate: bool,
    concurrency: ConcurrencyPolicy,
    starting_deadline: timedelta | None,
) -> Decision:
    """What to do for this schedule at `now`; the semantics are in the module docstring."""
    now = _utc(now, "now")
    created = _utc(state.created, "state.created")
    next_time = next_tick(schedule, now, tz)
    upcoming = f"next backup at {_show(next_time, tz)}"

    def nothing(reason: str, missed: int = 0, record: datetime | None = None) -> Decision:
        return Decision(None, missed, False, (), next_time, record, reason)

    if suspend:
        return nothing(f"suspended; the schedule's next tick is {_show(next_time, tz)}")

    if immediate and state.last_schedule_time is None:
        due = _floor_minute(now)
        missed = count_ticks(schedule, tz, created, due - _TINY)
        reason = "immediate backup on creation"
        if missed:
            reason += f" ({_ticks(missed)} since creation superseded by it)"
    else:
        since = (
            created
            if state.last_schedule_time is None
            else _utc(state.last_schedule_time, "lastScheduleTime")
        )
        latest = previous_tick(schedule, now, tz)
        if latest is None or latest <= since:
            return nothing(upcoming)
        candidates = count_ticks(schedule, tz, since, now)
        if starting_deadline is not None and now - latest > starting_deadline:
            return nothing(
                f"{_ticks(candidates)} missed; the latest, {_show(latest, tz)}, is more than "
                f"{int(starting_deadline.total_seconds())}s past (startingDeadlineSeconds); {upcoming}",
                missed=candidates,
                record=latest,
            )
        due = latest
        missed = candidates - 1
        if missed:
            reason = f"{_ticks(missed)} missed; running one catch-up backup for {_show(due, tz)}"
        else:
            reason = f"backup for {_show(due, tz)}"

    if state.active and concurrency == "Forbid":
        names = ", ".join(state.active)
        return Decision(
            due,
            missed,
            True,
            (),
            next_time,
            due,
            f"skipped the backup for {_show(due, tz)}: {names} still running (concurrencyPolicy Forbid)",
        )
    stop: tuple[str, ...] = ()
    if state.active and concurrency == "Replace":
        stop = state.active
        reason += f"; stopping {', '.join(stop)} (concurrencyPolicy Replace)"
    elif state.active:
        reason += f"; {', '.join(state.active)} still running too (concurrencyPolicy Allow)"
    return Decision(due, missed, False, stop, next_time, due, reason)


def child_name(schedule_name: str, tick: datetime) -> str:
    """`<schedule>-<YYYYMMDDhhmm>` (UTC), at most 63 characters; a long name is cut and given a hash."""
    return bounded_name(schedule_name, f"-{_utc(tick, 'tick'):%Y%m%d%H%M}")
