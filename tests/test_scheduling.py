"""IdmBackupSchedule's clock: cron parsing, ticks across time zones and DST, the per-reconcile decision."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from idm_backup_operator.idmbackupschedule.clock import (
    CronSchedule,
    Decision,
    InvalidSchedule,
    ScheduleState,
    child_name,
    count_ticks,
    decide,
    next_tick,
    parse_time_zone,
    previous_tick,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
KOLKATA = ZoneInfo("Asia/Kolkata")
UTC_ZONE = ZoneInfo("UTC")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(
    tz: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int, second: int = 0, *, fold: int = 0
) -> datetime:
    """A local wall-clock time as a UTC instant; fold=1 picks the second of a repeated time."""
    return datetime(year, month, day, hour, minute, second, tzinfo=tz, fold=fold).astimezone(UTC)


def ticks(expression: str, tz: ZoneInfo, after: datetime, count: int) -> list[datetime]:
    schedule = CronSchedule.parse(expression)
    result = []
    for _ in range(count):
        after = next_tick(schedule, after, tz)
        result.append(after)
    return result


def walls(instants: list[datetime], tz: ZoneInfo) -> list[str]:
    return [f"{t.astimezone(tz):%m-%d %H:%M %Z}" for t in instants]


# --- parser -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "field", "expected"),
    [
        ("*/15 * * * *", "minutes", (0, 15, 30, 45)),
        ("10-50/20 * * * *", "minutes", (10, 30, 50)),
        ("0,59 * * * *", "minutes", (0, 59)),
        ("0 9-17 * * *", "hours", tuple(range(9, 18))),
        ("0 */6 * * *", "hours", (0, 6, 12, 18)),
        ("0 0 1,15 * *", "days_of_month", frozenset({1, 15})),
        ("0 0 */10 * *", "days_of_month", frozenset({1, 11, 21, 31})),
        ("0 0 * JAN-Mar,dec *", "months", (1, 2, 3, 12)),
        ("0 0 * 2-4,Sep *", "months", (2, 3, 4, 9)),
        ("0 0 * * Mon-FRI", "days_of_week", frozenset({1, 2, 3, 4, 5})),
        ("0 0 * * 0", "days_of_week", frozenset({0})),
        ("0 0 * * 7", "days_of_week", frozenset({0})),
        ("0 0 * * 5-7", "days_of_week", frozenset({5, 6, 0})),
        ("0 0 * * sat,SUN", "days_of_week", frozenset({6, 0})),
        ("0 0 * * */2", "days_of_week", frozenset({0, 2, 4, 6})),
        ("0 0 * * *", "days_of_week", frozenset(range(7))),
        ("  0\t3  * * *  ", "hours", (3,)),
    ],
)
def test_parse_valid_forms(expression: str, field: str, expected: object) -> None:
    assert getattr(CronSchedule.parse(expression), field) == expected


@pytest.mark.parametrize(
    ("macro", "fields"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@DAILY", "0 0 * * *"),
        (" @weekly ", "0 0 * * 0"),
    ],
)
def test_macros_expand_to_their_five_fields(macro: str, fields: str) -> None:
    parsed, expanded = CronSchedule.parse(macro), CronSchedule.parse(fields)
    assert parsed.expression == macro
    assert (parsed.minutes, parsed.hours, parsed.days_of_month, parsed.months, parsed.days_of_week) == (
        expanded.minutes,
        expanded.hours,
        expanded.days_of_month,
        expanded.months,
        expanded.days_of_week,
    )


FIVE = "minute hour day-of-month month day-of-week"


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("61 * * * *", "minute value 61 is out of range 0-59"),
        ("0 24 * * *", "hour value 24 is out of range 0-23"),
        ("0 0 0 * *", "day-of-month value 0 is out of range 1-31"),
        ("0 0 32 * *", "day-of-month value 32 is out of range 1-31"),
        ("0 0 * 13 *", "month value 13 is out of range 1-12"),
        ("0 0 * 0 *", "month value 0 is out of range 1-12"),
        ("0 0 * * 8", "day-of-week value 8 is out of range 0-7"),
        ("x * * * *", "minute value 'x' is not a number"),
        ("-5 * * * *", "minute value '' is not a number"),
        ("0 0 * foo *", "month value 'foo' is not a number or a month name (jan-dec)"),
        ("0 0 * mon *", "month value 'mon' is not a number or a month name (jan-dec)"),
        ("0 0 * * jan", "day-of-week value 'jan' is not a number or a day name (sun-sat)"),
        ("0 0 * * mox", "day-of-week value 'mox' is not a number or a day name (sun-sat)"),
        ("0 0 ? * *", "day-of-month value '?' is Quartz syntax, not standard cron: use '*'"),
        ("0 0 * * 1L", "day-of-week value '1L' is not a number or a day name (sun-sat)"),
        ("0 0 * * mon-sun", "day-of-week range 'mon-sun' goes backwards (1 > 0)"),
        ("0 17-9 * * *", "hour range '17-9' goes backwards (17 > 9)"),
        ("*/0 * * * *", "minute step in '*/0' must be at least 1"),
        ("*/x * * * *", "minute step 'x' in '*/x' is not a number"),
        ("*/61 * * * *", "minute step 61 in '*/61' is larger than the range 0-59"),
        ("0 */25 * * *", "hour step 25 in '*/25' is larger than the range 0-23"),
        ("5/15 * * * *", "minute '5/15': a step needs '*' or a range before the slash, e.g. '5-59/15'"),
        ("1,,2 * * * *", "minute field '1,,2' has an empty list entry"),
        ("0 0 1, * *", "day-of-month field '1,' has an empty list entry"),
        ("", f"the schedule is empty: give 5 fields: {FIVE}"),
        ("   ", f"the schedule is empty: give 5 fields: {FIVE}"),
        ("0 0 * *", f"4 fields given: use the standard 5 fields: {FIVE}"),
        ("0", f"1 fields given: use the standard 5 fields: {FIVE}"),
        ("0 0 * * * * * *", f"8 fields given: use the standard 5 fields: {FIVE}"),
        (
            "0 0 0 * * *",
            "6 fields given: this looks like a cron expression with a seconds field (as in CloudNativePG) "
            f"— use the standard 5 fields: {FIVE}",
        ),
        (
            "0 0 2 * * ? 2026",
            "7 fields given: this looks like a Quartz cron expression with seconds and year fields "
            f"— use the standard 5 fields: {FIVE}",
        ),
        (
            "CRON_TZ=Europe/Berlin 0 2 * * *",
            "time zone prefix 'CRON_TZ=Europe/Berlin' is not supported in the schedule: "
            "set the timeZone field instead (e.g. timeZone: Europe/Berlin)",
        ),
        (
            "TZ=UTC 0 2 * * *",
            "time zone prefix 'TZ=UTC' is not supported in the schedule: "
            "set the timeZone field instead (e.g. timeZone: Europe/Berlin)",
        ),
        (
            "cron_tz=UTC @daily",
            "time zone prefix 'cron_tz=UTC' is not supported in the schedule: "
            "set the timeZone field instead (e.g. timeZone: Europe/Berlin)",
        ),
        (
            "@every 1h",
            "'@every' is not supported: write the interval as a 5-field cron expression "
            "(e.g. '*/15 * * * *') or use one of @hourly, @daily, @midnight, @weekly, @monthly, @yearly, "
            "@annually",
        ),
        (
            "@reboot",
            "'@reboot' is not supported: a backup schedule needs clock times; "
            "use 'immediate: true' for a backup as soon as the schedule is created",
        ),
        (
            "@fortnightly",
            "unknown macro '@fortnightly'; supported: @hourly, @daily, @midnight, @weekly, @monthly, "
            "@yearly, @annually",
        ),
        ("@daily 0", "@daily takes no further fields: '@daily 0'"),
        ("0 0 30 2 *", "schedule '0 0 30 2 *' never fires: day-of-month '30' never occurs in month '2'"),
        (
            "0 0 31 4,6,9,11 *",
            "schedule '0 0 31 4,6,9,11 *' never fires: day-of-month '31' never occurs in month '4,6,9,11'",
        ),
        (
            "0 0 30,31 feb */2",
            "schedule '0 0 30,31 feb */2' never fires: day-of-month '30,31' never occurs in month 'feb'",
        ),
    ],
)
def test_parse_errors_name_the_field_and_value(expression: str, message: str) -> None:
    with pytest.raises(InvalidSchedule) as caught:
        CronSchedule.parse(expression)
    assert str(caught.value) == message


def test_invalid_schedule_is_a_value_error() -> None:
    assert issubclass(InvalidSchedule, ValueError)


@pytest.mark.parametrize("expression", ["0 0 29 2 *", "0 0 31 2,3 *", "0 0 30 2 1", "0 0 30 2 mon"])
def test_rare_but_possible_dates_are_accepted(expression: str) -> None:
    CronSchedule.parse(expression)


def test_restriction_follows_vixie_star_rule() -> None:
    both = CronSchedule.parse("0 0 1 * 1")
    assert both.day_of_month_restricted and both.day_of_week_restricted
    stepped = CronSchedule.parse("0 0 */2 * 1")
    assert not stepped.day_of_month_restricted and stepped.day_of_week_restricted


def test_day_of_month_or_day_of_week_when_both_restricted() -> None:
    # Fridays, and the 13th whatever the weekday (2026-01-13 is a Tuesday).
    got = ticks("0 0 13 * 5", UTC_ZONE, utc(2026, 1, 1), 5)
    assert got == [utc(2026, 1, 2), utc(2026, 1, 9), utc(2026, 1, 13), utc(2026, 1, 16), utc(2026, 1, 23)]


def test_day_of_month_and_day_of_week_when_one_starts_with_star() -> None:
    # `*/5` in day-of-week = Sunday and Friday; it starts with `*`, so both fields must match.
    got = ticks("0 0 13 * */5", UTC_ZONE, utc(2026, 1, 1), 5)
    assert got == [utc(2026, 2, 13), utc(2026, 3, 13), utc(2026, 9, 13), utc(2026, 11, 13), utc(2026, 12, 13)]
    assert {t.weekday() for t in got} <= {4, 6}


def test_weekday_only_schedule() -> None:
    got = ticks("30 4 * * mon", UTC_ZONE, utc(2026, 1, 1), 3)
    assert got == [utc(2026, 1, 5, 4, 30), utc(2026, 1, 12, 4, 30), utc(2026, 1, 19, 4, 30)]


# --- time zones -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Etc/GMT+5"]
)
def test_parse_time_zone_accepts_iana_names(name: str) -> None:
    assert parse_time_zone(name) == ZoneInfo(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Europe/Berln", "unknown time zone 'Europe/Berln'"),
        ("Europe", "unknown time zone 'Europe'"),
        ("", "unknown time zone ''"),
        ("../../etc/passwd", "unknown time zone '../../etc/passwd'"),
        ("/etc/localtime", "unknown time zone '/etc/localtime'"),
        ("localtime", "unknown time zone 'localtime': give an IANA name such as 'Europe/Berlin'"),
        ("CET ", "unknown time zone 'CET '"),
    ],
)
def test_parse_time_zone_refuses_unknown_names(name: str, message: str) -> None:
    with pytest.raises(InvalidSchedule) as caught:
        parse_time_zone(name)
    assert str(caught.value) == message


# --- next_tick / previous_tick ------------------------------------------------------------------------------


def test_next_tick_is_strictly_after_and_utc() -> None:
    schedule = CronSchedule.parse("*/15 * * * *")
    assert next_tick(schedule, utc(2026, 5, 1, 10, 7), UTC_ZONE) == utc(2026, 5, 1, 10, 15)
    assert next_tick(schedule, utc(2026, 5, 1, 10, 15), UTC_ZONE) == utc(2026, 5, 1, 10, 30)
    assert next_tick(schedule, utc(2026, 5, 1, 10, 14, 59), UTC_ZONE) == utc(2026, 5, 1, 10, 15)
    assert next_tick(schedule, utc(2026, 5, 1, 23, 50), UTC_ZONE) == utc(2026, 5, 2, 0, 0)
    result = next_tick(schedule, datetime(2026, 5, 1, 12, 7, tzinfo=BERLIN), BERLIN)
    assert result.tzinfo is UTC
    assert result == utc(2026, 5, 1, 10, 15)


def test_next_tick_accepts_after_in_any_zone() -> None:
    schedule = CronSchedule.parse("0 3 * * *")
    assert next_tick(schedule, datetime(2026, 5, 1, 22, tzinfo=NEW_YORK), UTC_ZONE) == utc(2026, 5, 2, 3)


def test_next_tick_requires_aware_datetimes() -> None:
    schedule = CronSchedule.parse("@daily")
    with pytest.raises(ValueError, match="timezone-aware"):
        next_tick(schedule, datetime(2026, 1, 1), UTC_ZONE)
    with pytest.raises(ValueError, match="timezone-aware"):
        previous_tick(schedule, datetime(2026, 1, 1), UTC_ZONE)


def test_year_rollover() -> None:
    assert ticks("0 0 1 * *", UTC_ZONE, utc(2026, 12, 15), 2) == [utc(2027, 1, 1), utc(2027, 2, 1)]
    assert ticks("@yearly", UTC_ZONE, utc(2026, 1, 1), 2) == [utc(2027, 1, 1), utc(2028, 1, 1)]


def test_31st_skips_shorter_months() -> None:
    got = ticks("0 0 31 * *", UTC_ZONE, utc(2026, 1, 1), 8)
    assert [t.month for t in got] == [1, 3, 5, 7, 8, 10, 12, 1]


def test_leap_day_schedule_waits_for_leap_years() -> None:
    assert ticks("0 0 29 2 *", UTC_ZONE, utc(2026, 3, 1), 3) == [
        utc(2028, 2, 29),
        utc(2032, 2, 29),
        utc(2036, 2, 29),
    ]
    assert previous_tick(CronSchedule.parse("0 0 29 2 *"), utc(2026, 3, 1), UTC_ZONE) == utc(2024, 2, 29)


def test_kolkata_half_hour_offset() -> None:
    got = ticks("30 2 * * *", KOLKATA, utc(2026, 6, 1), 2)
    assert got == [utc(2026, 6, 1, 21, 0), utc(2026, 6, 2, 21, 0)]
    assert ticks("0 * * * *", KOLKATA, utc(2026, 6, 1), 2) == [utc(2026, 6, 1, 0, 30), utc(2026, 6, 1, 1, 30)]


# Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET.


def test_daily_at_skipped_time_fires_once_after_the_gap() -> None:
    got = ticks("30 2 * * *", BERLIN, local(BERLIN, 2026, 3, 27, 12, 0), 3)
    assert walls(got, BERLIN) == ["03-28 02:30 CET", "03-29 03:00 CEST", "03-30 02:30 CEST"]
    assert got[1] == utc(2026, 3, 29, 1, 0)


def test_daily_at_repeated_time_fires_once_at_first_occurrence() -> None:
    got = ticks("30 2 * * *", BERLIN, local(BERLIN, 2026, 10, 24, 12, 0), 3)
    assert walls(got, BERLIN) == ["10-25 02:30 CEST", "10-26 02:30 CET", "10-27 02:30 CET"]
    assert got[0] == utc(2026, 10, 25, 0, 30)


def test_hourly_skips_the_hour_that_does_not_happen() -> None:
    got = ticks("30 * * * *", BERLIN, local(BERLIN, 2026, 3, 29, 0, 45), 3)
    assert walls(got, BERLIN) == ["03-29 01:30 CET", "03-29 03:30 CEST", "03-29 04:30 CEST"]
    assert [b - a for a, b in itertools.pairwise(got)] == [timedelta(hours=1)] * 2


def test_hourly_fires_in_both_repeated_hours() -> None:
    got = ticks("30 * * * *", BERLIN, local(BERLIN, 2026, 10, 25, 1, 0), 4)
    assert walls(got, BERLIN) == [
        "10-25 01:30 CEST",
        "10-25 02:30 CEST",
        "10-25 02:30 CET",
        "10-25 03:30 CET",
    ]
    assert [b - a for a, b in itertools.pairwise(got)] == [timedelta(hours=1)] * 3


def test_every_15_minutes_keeps_real_time_across_spring_forward() -> None:
    got = ticks("*/15 * * * *", BERLIN, local(BERLIN, 2026, 3, 29, 1, 20), 4)
    assert walls(got, BERLIN) == [
        "03-29 01:30 CET",
        "03-29 01:45 CET",
        "03-29 03:00 CEST",
        "03-29 03:15 CEST",
    ]
    assert {b - a for a, b in itertools.pairwise(got)} == {timedelta(minutes=15)}


def test_every_15_minutes_keeps_real_time_across_fall_back() -> None:
    got = ticks("*/15 * * * *", BERLIN, local(BERLIN, 2026, 10, 25, 2, 40), 6)
    assert walls(got, BERLIN) == [
        "10-25 02:45 CEST",
        "10-25 02:00 CET",
        "10-25 02:15 CET",
        "10-25 02:30 CET",
        "10-25 02:45 CET",
        "10-25 03:00 CET",
    ]
    assert {b - a for a, b in itertools.pairwise(got)} == {timedelta(minutes=15)}


def test_fixed_hour_with_minute_steps_fires_once_for_a_skipped_hour() -> None:
    got = ticks("*/15 2 * * *", BERLIN, local(BERLIN, 2026, 3, 28, 12, 0), 2)
    assert walls(got, BERLIN) == ["03-29 03:00 CEST", "03-30 02:00 CEST"]


def test_fixed_hour_with_minute_steps_runs_a_repeated_hour_once() -> None:
    got = ticks("*/15 2 * * *", BERLIN, local(BERLIN, 2026, 10, 25, 0, 0), 5)
    assert walls(got, BERLIN) == [
        "10-25 02:00 CEST",
        "10-25 02:15 CEST",
        "10-25 02:30 CEST",
        "10-25 02:45 CEST",
        "10-26 02:00 CET",
    ]


def test_skipped_and_existing_times_at_the_same_instant_fire_once() -> None:
    got = ticks("0,30 2,3 * * *", BERLIN, local(BERLIN, 2026, 3, 29, 0, 0), 2)
    assert walls(got, BERLIN) == ["03-29 03:00 CEST", "03-29 03:30 CEST"]


def test_new_york_spring_forward_and_fall_back() -> None:
    # 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
    assert walls(ticks("30 2 * * *", NEW_YORK, utc(2026, 3, 7, 12), 2), NEW_YORK) == [
        "03-08 03:00 EDT",
        "03-09 02:30 EDT",
    ]
    assert walls(ticks("30 1 * * *", NEW_YORK, utc(2026, 10, 31, 12), 2), NEW_YORK) == [
        "11-01 01:30 EDT",
        "11-02 01:30 EST",
    ]
    assert walls(ticks("30 * * * *", NEW_YORK, local(NEW_YORK, 2026, 11, 1, 0, 45), 3), NEW_YORK) == [
        "11-01 01:30 EDT",
        "11-01 01:30 EST",
        "11-01 02:30 EST",
    ]


def test_lord_howe_half_hour_dst() -> None:
    # Spring 2026-10-04: 02:00 -> 02:30 (+10:30 -> +11). Autumn 2026-04-05: 02:00 -> 01:30.
    assert walls(ticks("15 2 * * *", LORD_HOWE, utc(2026, 10, 2), 2), LORD_HOWE) == [
        "10-03 02:15 +1030",
        "10-04 02:30 +11",
    ]
    assert walls(ticks("45 1 * * *", LORD_HOWE, utc(2026, 4, 3), 3), LORD_HOWE) == [
        "04-04 01:45 +11",
        "04-05 01:45 +11",
        "04-06 01:45 +1030",
    ]
    repeated = ticks("45 * * * *", LORD_HOWE, local(LORD_HOWE, 2026, 4, 5, 0, 50), 3)
    assert walls(repeated, LORD_HOWE) == ["04-05 01:45 +11", "04-05 01:45 +1030", "04-05 02:45 +1030"]
    assert repeated[1] - repeated[0] == timedelta(minutes=30)
    skipped = ticks("0 * * * *", LORD_HOWE, local(LORD_HOWE, 2026, 10, 4, 0, 30), 3)
    assert walls(skipped, LORD_HOWE) == ["10-04 01:00 +1030", "10-04 03:00 +11", "10-04 04:00 +11"]


def test_previous_tick() -> None:
    schedule = CronSchedule.parse("0 2 * * *")
    assert previous_tick(schedule, utc(2026, 1, 5, 2), UTC_ZONE) == utc(2026, 1, 5, 2)
    assert previous_tick(schedule, utc(2026, 1, 5, 1, 59), UTC_ZONE) == utc(2026, 1, 4, 2)
    assert previous_tick(schedule, utc(2026, 1, 1), UTC_ZONE) == utc(2025, 12, 31, 2)
    hourly = CronSchedule.parse("30 * * * *")
    second = local(BERLIN, 2026, 10, 25, 2, 30, fold=1)
    assert previous_tick(hourly, second + timedelta(minutes=10), BERLIN) == second
    assert previous_tick(hourly, second - timedelta(seconds=1), BERLIN) == local(BERLIN, 2026, 10, 25, 2, 30)
    daily = CronSchedule.parse("30 2 * * *")
    assert previous_tick(daily, local(BERLIN, 2026, 3, 29, 3, 5), BERLIN) == utc(2026, 3, 29, 1)


def test_sparse_schedule_is_found_fast() -> None:
    # Feb 29 that is also a Sunday: years apart; found by skipping, not by scanning minutes.
    schedule = CronSchedule.parse("0 0 29 2 */7")
    assert next_tick(schedule, utc(2026, 1, 1), UTC_ZONE) == utc(2032, 2, 29)
    assert previous_tick(schedule, utc(2026, 1, 1), UTC_ZONE) == utc(2004, 2, 29)


@pytest.mark.parametrize(
    ("expression", "tz", "expected"),
    [
        ("* * * * *", BERLIN, 365 * 1440),  # real minutes: the lost and the repeated hour cancel out
        ("*/15 * * * *", LORD_HOWE, 365 * 96),
        ("30 2 * * *", BERLIN, 365),
        ("*/15 2 * * *", BERLIN, 365 * 4 - 3),  # the skipped 02:xx fire once, the repeated once
        ("0 0 31 * *", UTC_ZONE, 7),
        ("@hourly", NEW_YORK, 365 * 24),
    ],
)
def test_count_ticks_over_a_year(expression: str, tz: ZoneInfo, expected: int) -> None:
    assert count_ticks(CronSchedule.parse(expression), tz, utc(2025, 1, 1), utc(2026, 1, 1)) == expected


def test_count_ticks_bounds() -> None:
    schedule = CronSchedule.parse("0 * * * *")
    assert count_ticks(schedule, UTC_ZONE, utc(2026, 1, 1, 0), utc(2026, 1, 1, 3)) == 3  # (after, until]
    assert count_ticks(schedule, UTC_ZONE, utc(2026, 1, 1, 3), utc(2026, 1, 1, 0)) == 0
    assert count_ticks(schedule, UTC_ZONE, utc(2026, 1, 1, 3), utc(2026, 1, 1, 3)) == 0


# --- a reference: minute by minute in real time ----------------------------------------------------------


def reference_ticks(schedule: CronSchedule, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """Ticks in (start, end] by the module's DST rules, stated differently: walk real minutes forward,
    fire when the local time matches (only its first occurrence, unless the schedule runs every hour),
    and, for schedules that name hours, once right after a gap that swallowed a matching local time."""

    def matches(wall: datetime) -> bool:
        return (
            wall.minute in schedule.minutes
            and wall.hour in schedule.hours
            and schedule.matches_day(wall.date())
        )

    seen: set[datetime] = set()
    found = []
    t = start - timedelta(hours=6)
    previous_wall = t.astimezone(tz).replace(tzinfo=None)
    while t <= end:
        t += timedelta(minutes=1)
        wall = t.astimezone(tz).replace(tzinfo=None, fold=0)
        fires = matches(wall) and (schedule.every_hour or wall not in seen)
        if not schedule.every_hour and wall - previous_wall > timedelta(minutes=1):
            skipped = previous_wall + timedelta(minutes=1)
            while skipped < wall:
                fires = fires or matches(skipped)
                skipped += timedelta(minutes=1)
        seen.add(wall)
        previous_wall = wall
        if fires and start < t <= end:
            found.append(t)
    return found


def iterate_ticks(schedule: CronSchedule, tz: ZoneInfo, start: datetime, end: datetime) -> Iterator[datetime]:
    t = next_tick(schedule, start, tz)
    while t <= end:
        yield t
        t = next_tick(schedule, t, tz)


def random_expression(rng: random.Random) -> str:
    minute = rng.choice(["*/15", "0", "30", "0,30", "5-50/15", "*/7", "59", "*/20"])
    hour = rng.choice(["*", "*", "2", "1-3", "*/2", "0,2,23", "3", "1", "2-4/2"])
    dom = rng.choice(["*", "*", "*", "25-31", "*/3", "29", "1-31"])
    month = rng.choice(["*", "*", "*", "3,4,10,11"])
    dow = rng.choice(["*", "*", "*", "0", "1-5", "sun,sat", "*/2"])
    return f"{minute} {hour} {dom} {month} {dow}"


TRANSITIONS = [
    (BERLIN, utc(2026, 3, 29, 1)),
    (BERLIN, utc(2026, 10, 25, 1)),
    (NEW_YORK, utc(2026, 3, 8, 7)),
    (NEW_YORK, utc(2026, 11, 1, 6)),
    (LORD_HOWE, utc(2026, 4, 4, 15)),
    (LORD_HOWE, utc(2026, 10, 3, 15, 30)),
    (KOLKATA, utc(2026, 3, 29, 1)),
]


@pytest.mark.parametrize(("tz", "transition"), TRANSITIONS, ids=lambda v: str(v))
def test_next_tick_matches_minute_by_minute_reference(tz: ZoneInfo, transition: datetime) -> None:
    rng = random.Random(f"{tz.key}{transition}")
    start, end = transition - timedelta(days=2), transition + timedelta(days=2)
    for expression in [
        *(random_expression(rng) for _ in range(8)),
        "30 2 * * *",
        "30 * * * *",
        "*/15 2 * * *",
    ]:
        schedule = CronSchedule.parse(expression)
        expected = reference_ticks(schedule, tz, start, end)
        assert list(iterate_ticks(schedule, tz, start, end)) == expected, expression
        assert count_ticks(schedule, tz, start, end) == len(expected), expression
        for _ in range(20):
            moment = start + timedelta(seconds=rng.randrange(int((end - start).total_seconds())))
            earlier = [t for t in expected if t <= moment]
            if earlier:
                assert previous_tick(schedule, moment, tz) == earlier[-1], (expression, moment)


# --- decide -------------------------------------------------------------------------------------------------

DAILY = CronSchedule.parse("0 2 * * *")
CREATED = utc(2026, 1, 1)


def run(
    now: datetime,
    last: datetime | None = None,
    *,
    schedule: CronSchedule = DAILY,
    tz: ZoneInfo = UTC_ZONE,
    created: datetime = CREATED,
    active: tuple[str, ...] = (),
    suspend: bool = False,
    immediate: bool = False,
    concurrency: str = "Forbid",
    deadline: timedelta | None = None,
) -> Decision:
    return decide(
        schedule,
        tz,
        now=now,
        state=ScheduleState(last_schedule_time=last, created=created, active=active),
        suspend=suspend,
        immediate=immediate,
        concurrency=concurrency,  # type: ignore[arg-type]
        starting_deadline=deadline,
    )


def test_decide_normal_tick() -> None:
    d = run(utc(2026, 1, 2, 2, 0, 5), last=utc(2026, 1, 1, 2))
    assert d == Decision(
        due=utc(2026, 1, 2, 2),
        missed=0,
        skipped_for_concurrency=False,
        stop_active=(),
        next_time=utc(2026, 1, 3, 2),
        last_schedule_time=utc(2026, 1, 2, 2),
        reason="backup for 2026-01-02 02:00 UTC",
    )


def test_decide_not_yet_due() -> None:
    d = run(utc(2026, 1, 2, 1, 59), last=utc(2026, 1, 1, 2))
    assert (d.due, d.missed, d.last_schedule_time) == (None, 0, None)
    assert d.next_time == utc(2026, 1, 2, 2)
    assert d.reason == "next backup at 2026-01-02 02:00 UTC"


def test_decide_first_tick_after_creation() -> None:
    assert run(utc(2026, 1, 1, 2, 0, 30)).due == utc(2026, 1, 1, 2)
    # Created after the day's tick: that tick is not this schedule's to run.
    assert run(utc(2026, 1, 1, 3, 0, 5), created=utc(2026, 1, 1, 3)).due is None


def test_decide_long_downtime_runs_one_catch_up() -> None:
    d = run(utc(2026, 1, 10, 12), last=utc(2026, 1, 1, 2))
    assert d.due == utc(2026, 1, 10, 2)
    assert d.missed == 8
    assert d.last_schedule_time == d.due
    assert d.reason == "8 ticks missed; running one catch-up backup for 2026-01-10 02:00 UTC"
    again = run(utc(2026, 1, 10, 12, 1), last=d.last_schedule_time)
    assert (again.due, again.missed) == (None, 0)


def test_decide_one_missed_tick_wording() -> None:
    d = run(utc(2026, 1, 3, 2, 5), last=utc(2026, 1, 1, 2))
    assert d.reason == "1 tick missed; running one catch-up backup for 2026-01-03 02:00 UTC"


def test_decide_starting_deadline_exceeded() -> None:
    d = run(utc(2026, 1, 10, 12), last=utc(2026, 1, 1, 2), deadline=timedelta(hours=1))
    assert d.due is None
    assert d.missed == 9
    assert d.last_schedule_time == utc(2026, 1, 10, 2)  # so the misses are reported once
    assert d.reason == (
        "9 ticks missed; the latest, 2026-01-10 02:00 UTC, is more than 3600s past "
        "(startingDeadlineSeconds); next backup at 2026-01-11 02:00 UTC"
    )
    again = run(utc(2026, 1, 10, 12, 5), last=d.last_schedule_time, deadline=timedelta(hours=1))
    assert (again.due, again.missed, again.last_schedule_time) == (None, 0, None)


def test_decide_starting_deadline_boundaries() -> None:
    last = utc(2026, 1, 1, 2)
    assert run(utc(2026, 1, 2, 3), last=last, deadline=timedelta(hours=1)).due == utc(2026, 1, 2, 2)
    late = run(utc(2026, 1, 2, 3, 0, 1), last=last, deadline=timedelta(hours=1))
    assert (late.due, late.missed) == (None, 1)


def test_decide_suspended_starts_nothing_but_knows_the_next_tick() -> None:
    d = run(utc(2026, 1, 5, 12), last=utc(2026, 1, 1, 2), suspend=True, immediate=True)
    assert (d.due, d.missed, d.last_schedule_time) == (None, 0, None)
    assert d.next_time == utc(2026, 1, 6, 2)
    assert d.reason == "suspended; the schedule's next tick is 2026-01-06 02:00 UTC"


def test_decide_resume_after_suspension_runs_at_most_one() -> None:
    d = run(utc(2026, 1, 10, 12), last=utc(2026, 1, 1, 2))
    assert (d.due, d.missed) == (utc(2026, 1, 10, 2), 8)
    with_deadline = run(utc(2026, 1, 10, 12), last=utc(2026, 1, 1, 2), deadline=timedelta(minutes=30))
    assert (with_deadline.due, with_deadline.missed) == (None, 9)


def simulate(
    schedule: CronSchedule, tz: ZoneInfo, start: datetime, end: datetime, step: timedelta, **options: object
) -> list[datetime]:
    """A reconcile loop that stores what `decide` returns; the ticks it created backups for."""
    created: list[datetime] = []
    last: datetime | None = None
    now = start
    while now <= end:
        d = run(now, last, schedule=schedule, tz=tz, created=start, **options)  # type: ignore[arg-type]
        if d.due is not None and not d.skipped_for_concurrency:
            created.append(d.due)
        if d.last_schedule_time is not None:
            last = d.last_schedule_time
        assert d.next_time > now
        now += step
    return created


def test_repeated_reconciles_never_double_fire() -> None:
    schedule = CronSchedule.parse("*/30 * * * *")
    start, end = local(BERLIN, 2026, 10, 24, 22, 0), local(BERLIN, 2026, 10, 25, 6, 0)
    created = simulate(schedule, BERLIN, start, end, timedelta(seconds=50))
    assert created == list(iterate_ticks(schedule, BERLIN, start, end))
    assert len(created) == len(set(created)) == 8 * 2 + 2  # one extra real hour that night


def test_no_burst_after_downtime_in_a_reconcile_loop() -> None:
    # Reconciles every 6 hours: each pass runs only the latest of the ticks since the last one.
    created = simulate(
        CronSchedule.parse("0 * * * *"), UTC_ZONE, CREATED, utc(2026, 1, 2), timedelta(hours=6)
    )
    assert created == [utc(2026, 1, 1, 6), utc(2026, 1, 1, 12), utc(2026, 1, 1, 18), utc(2026, 1, 2)]


def test_decide_immediate_on_creation() -> None:
    created = utc(2026, 1, 1, 10, 15, 20)
    d = run(utc(2026, 1, 1, 10, 15, 42), created=created, immediate=True)
    assert d.due == utc(2026, 1, 1, 10, 15)
    assert d.last_schedule_time == d.due
    assert d.reason == "immediate backup on creation"
    assert d.missed == 0
    again = run(utc(2026, 1, 1, 10, 16), last=d.last_schedule_time, created=created, immediate=True)
    assert again.due is None
    nightly = run(utc(2026, 1, 2, 2, 0, 5), last=d.last_schedule_time, created=created, immediate=True)
    assert nightly.due == utc(2026, 1, 2, 2)


def test_decide_immediate_supersedes_ticks_missed_since_creation() -> None:
    d = run(utc(2026, 1, 3, 12, 0, 30), immediate=True)
    assert (d.due, d.missed) == (utc(2026, 1, 3, 12), 3)
    assert d.reason == "immediate backup on creation (3 ticks since creation superseded by it)"


def test_decide_immediate_only_before_the_first_backup() -> None:
    d = run(utc(2026, 1, 2, 12), last=utc(2026, 1, 2, 2), immediate=True)
    assert d.due is None


@pytest.mark.parametrize("concurrency", ["Forbid", "Allow", "Replace"])
def test_decide_without_active_backups_ignores_policy(concurrency: str) -> None:
    d = run(utc(2026, 1, 2, 2), last=utc(2026, 1, 1, 2), concurrency=concurrency)
    assert (d.due, d.skipped_for_concurrency, d.stop_active) == (utc(2026, 1, 2, 2), False, ())


def test_decide_forbid_with_active_backup_skips_the_tick() -> None:
    d = run(utc(2026, 1, 2, 2), last=utc(2026, 1, 1, 2), active=("nightly-202601010200",))
    assert d.due == utc(2026, 1, 2, 2)
    assert d.skipped_for_concurrency
    assert d.last_schedule_time == d.due
    assert d.stop_active == ()
    assert d.reason == (
        "skipped the backup for 2026-01-02 02:00 UTC: nightly-202601010200 still running "
        "(concurrencyPolicy Forbid)"
    )
    again = run(utc(2026, 1, 2, 2, 5), last=d.last_schedule_time, active=("nightly-202601010200",))
    assert again.due is None


def test_decide_allow_with_active_backup_runs() -> None:
    d = run(utc(2026, 1, 2, 2), last=utc(2026, 1, 1, 2), active=("a",), concurrency="Allow")
    assert (d.due, d.skipped_for_concurrency, d.stop_active) == (utc(2026, 1, 2, 2), False, ())
    assert d.reason == "backup for 2026-01-02 02:00 UTC; a still running too (concurrencyPolicy Allow)"


def test_decide_replace_with_active_backup_stops_it() -> None:
    d = run(utc(2026, 1, 2, 2), last=utc(2026, 1, 1, 2), active=("a", "b"), concurrency="Replace")
    assert (d.due, d.skipped_for_concurrency, d.stop_active) == (utc(2026, 1, 2, 2), False, ("a", "b"))
    assert d.reason == "backup for 2026-01-02 02:00 UTC; stopping a, b (concurrencyPolicy Replace)"


def test_a_failed_run_does_not_block_the_next() -> None:
    # Results are not an input: a failed child is simply no longer active.
    d = run(utc(2026, 1, 3, 2), last=utc(2026, 1, 2, 2), active=())
    assert d.due == utc(2026, 1, 3, 2)


def test_decide_in_a_time_zone_across_spring_forward() -> None:
    schedule = CronSchedule.parse("30 2 * * *")
    d = run(
        local(BERLIN, 2026, 3, 29, 3, 0, 10),
        last=local(BERLIN, 2026, 3, 28, 2, 30),
        schedule=schedule,
        tz=BERLIN,
    )
    assert d.due == utc(2026, 3, 29, 1)
    assert d.reason == "backup for 2026-03-29 03:00 CEST"
    assert d.next_time == local(BERLIN, 2026, 3, 30, 2, 30)
    assert child_name("nightly", d.due) == "nightly-202603290100"


def test_decide_requires_aware_times() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        run(datetime(2026, 1, 2))


# --- child names --------------------------------------------------------------------------------------------


def test_child_name_is_the_tick_in_utc() -> None:
    assert child_name("nightly", utc(2026, 3, 29, 1, 0)) == "nightly-202603290100"
    assert child_name("nightly", datetime(2026, 3, 29, 3, 0, 59, tzinfo=BERLIN)) == "nightly-202603290100"


def test_child_name_fits_63_characters() -> None:
    fits = "n" * 50
    assert child_name(fits, utc(2026, 1, 1)) == f"{fits}-202601010000"
    long_a, long_b = "a" * 60 + "-one", "a" * 60 + "-two"
    name_a, name_b = child_name(long_a, utc(2026, 1, 1)), child_name(long_b, utc(2026, 1, 1))
    assert len(name_a) == len(name_b) == 63
    assert name_a != name_b
    assert name_a.endswith("-202601010000") and name_a.startswith("a" * 41)
    assert child_name(long_a, utc(2026, 1, 1)) == name_a


def test_child_name_does_not_leave_a_dangling_separator() -> None:
    name = child_name("x" * 40 + "-" + "y" * 30, utc(2026, 1, 1))
    assert "--" not in name and len(name) <= 63
