"""Which backups retention deletes: each rule, their union, and the guarantees that always hold."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import yaml

from idm_backup_operator.idmbackupschedule.retention import (
    BackupRecord,
    RetentionPlan,
    RetentionPolicy,
    plan_retention,
    summarize,
)
from testbed.deploy import REPO

NOW = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)  # a Tuesday
UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def ok(name: str, completed: datetime, pinned: bool = False) -> BackupRecord:
    return BackupRecord(name=name, completed=completed, succeeded=True, pinned=pinned)


def failed(name: str, completed: datetime, pinned: bool = False) -> BackupRecord:
    return BackupRecord(name=name, completed=completed, succeeded=False, pinned=pinned)


def running(name: str) -> BackupRecord:
    return BackupRecord(name=name, completed=None, succeeded=False, pinned=False)


def daily(count: int, hour: int = 2) -> list[BackupRecord]:
    """One successful backup a day, d0 today back to d{count-1}."""
    return [ok(f"d{i}", datetime(2026, 3, 31, hour, tzinfo=UTC) - timedelta(days=i)) for i in range(count)]


def plan(backups: list[BackupRecord], tz: ZoneInfo = UTC_ZONE, **policy: object) -> RetentionPlan:
    return plan_retention(backups, RetentionPolicy(**policy), now=NOW, tz=tz)  # type: ignore[arg-type]


def test_empty_input() -> None:
    result = plan([], keep_last=3)
    assert (result.keep, result.delete) == ({}, [])
    assert summarize(result) == "deleted nothing; kept 0"


def test_no_rule_and_no_max_age_deletes_nothing_successful() -> None:
    result = plan(daily(30))
    assert result.delete == []
    assert len(result.keep) == 30


def test_keep_last() -> None:
    result = plan(daily(10), keep_last=3)
    assert result.delete == ["d9", "d8", "d7", "d6", "d5", "d4", "d3"]  # oldest first
    assert result.keep == {
        "d0": ["newest 1 successful (minSuccessful)", "keepLast"],
        "d1": ["keepLast"],
        "d2": ["keepLast"],
    }
    assert result.delete_reasons["d3"] == "not selected by any keep rule"


def test_keep_daily_takes_the_newest_of_each_day_that_has_a_backup() -> None:
    backups = [
        ok("mar31-late", datetime(2026, 3, 31, 10, tzinfo=UTC)),
        ok("mar31-early", datetime(2026, 3, 31, 2, tzinfo=UTC)),
        ok("mar30", datetime(2026, 3, 30, 2, tzinfo=UTC)),
        # No backups on Mar 29-27: days without one do not use up a slot.
        ok("mar26-late", datetime(2026, 3, 26, 23, tzinfo=UTC)),
        ok("mar26-early", datetime(2026, 3, 26, 1, tzinfo=UTC)),
        ok("mar25", datetime(2026, 3, 25, 2, tzinfo=UTC)),
    ]
    result = plan(backups, keep_daily=3)
    assert result.delete == ["mar25", "mar26-early", "mar31-early"]
    assert result.keep["mar26-late"] == ["keepDaily 2026-03-26"]
    assert result.keep["mar30"] == ["keepDaily 2026-03-30"]


def test_keep_weekly_uses_iso_weeks() -> None:
    backups = [
        ok("mon-w14", datetime(2026, 3, 30, 2, tzinfo=UTC)),  # Monday, ISO week 14
        ok("sun-w13", datetime(2026, 3, 29, 2, tzinfo=UTC)),  # Sunday, week 13
        ok("mon-w13", datetime(2026, 3, 23, 2, tzinfo=UTC)),
        ok("sun-w12", datetime(2026, 3, 22, 2, tzinfo=UTC)),
    ]
    result = plan(backups, keep_weekly=2)
    assert result.keep["mon-w14"][-1] == "keepWeekly 2026-W14"
    assert result.keep["sun-w13"] == ["keepWeekly 2026-W13"]
    assert result.delete == ["sun-w12", "mon-w13"]


def test_keep_weekly_across_the_year_boundary() -> None:
    backups = [ok("jan1", datetime(2027, 1, 1, tzinfo=UTC)), ok("dec28", datetime(2026, 12, 28, tzinfo=UTC))]
    # 2027-01-01 is in ISO week 2026-W53, like Monday 2026-12-28.
    result = plan_retention(
        backups, RetentionPolicy(keep_weekly=5), now=datetime(2027, 1, 2, tzinfo=UTC), tz=UTC_ZONE
    )
    assert result.keep["jan1"][-1] == "keepWeekly 2026-W53"
    assert result.delete == ["dec28"]


def test_keep_monthly_uses_calendar_months() -> None:
    backups = [
        ok("mar-b", datetime(2026, 3, 30, tzinfo=UTC)),
        ok("mar-a", datetime(2026, 3, 1, tzinfo=UTC)),
        ok("feb", datetime(2026, 2, 28, tzinfo=UTC)),
        ok("jan", datetime(2026, 1, 31, tzinfo=UTC)),
        ok("dec", datetime(2025, 12, 31, tzinfo=UTC)),
    ]
    result = plan(backups, keep_monthly=3)
    assert result.delete == ["dec", "mar-a"]
    assert result.keep["jan"] == ["keepMonthly 2026-01"]


def test_keep_rules_are_a_union() -> None:
    result = plan(daily(70), keep_last=2, keep_daily=5, keep_weekly=3, keep_monthly=3)
    kept = set(result.keep)
    # last 2, days d0-d4, newest of weeks 14 (d0), 13 (d2 = Sun Mar 29), 12 (d9 = Sun Mar 22),
    # newest of March (d0), February (d31 = Feb 28), January (d59 = Jan 31).
    assert kept == {"d0", "d1", "d2", "d3", "d4", "d9", "d31", "d59"}
    assert result.keep["d2"] == ["keepDaily 2026-03-29", "keepWeekly 2026-W13"]
    assert result.keep["d0"] == [
        "newest 1 successful (minSuccessful)",
        "keepLast",
        "keepDaily 2026-03-31",
        "keepWeekly 2026-W14",
        "keepMonthly 2026-03",
    ]
    assert len(result.delete) == 70 - len(kept)


def test_zero_keeps_nothing_but_the_floor() -> None:
    result = plan(daily(5), keep_last=0)
    assert list(result.keep) == ["d0"]
    assert result.delete == ["d4", "d3", "d2", "d1"]


def test_max_age_alone() -> None:
    result = plan(daily(10, hour=12), max_age=timedelta(days=7))
    # d7 completed exactly 7 days ago: not older than maxAge.
    assert result.delete == ["d9", "d8"]
    assert result.delete_reasons["d8"] == "older than maxAge 7d"
    assert "d7" in result.keep


def test_max_age_is_a_ceiling_over_keep_rules() -> None:
    result = plan(daily(70), keep_monthly=12, max_age=timedelta(days=30))
    assert set(result.keep) == {"d0"}  # February's and January's monthly backups are too old
    assert "d31" in result.delete and "d59" in result.delete
    assert result.delete_reasons["d31"].startswith("older than maxAge")
    assert result.delete_reasons["d1"] == "not selected by any keep rule"


def test_the_crd_says_what_max_age_does() -> None:
    """The CRD (and kubectl explain, and the API reference made from it) once said maxAge applied "unless a
    keep rule or the floor keeps them", while retention deleted those backups: with keepMonthly 6 and
    maxAge 30d, the older monthly backups went. The text now says ceiling, and its own example holds."""
    crd = yaml.safe_load((REPO / "crds" / "idm-backup.io_idmbackupschedules.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    description = schema["properties"]["retention"]["properties"]["maxAge"]["description"]
    assert "A ceiling" in description and "even when a keep rule selects them" in description
    assert "keepMonthly 6 with maxAge 30d keeps about one month" in description
    result = plan(daily(200), keep_monthly=6, max_age=timedelta(days=30))
    kept = [b for b in daily(200) if b.name in result.keep]
    assert kept and all(b.completed is not None and NOW - b.completed <= timedelta(days=30) for b in kept)
    assert result.delete_reasons["d31"].startswith("older than maxAge")  # February 28: its monthly backup
    assert "d31" in result.delete
    assert "Only the floor (the minSuccessful newest successful backups) and pinned backups" in description
    assert "old0" in plan([ok("old0", NOW - timedelta(days=90))], max_age=timedelta(days=30)).keep


def test_floor_beats_max_age() -> None:
    old = [ok(f"old{i}", NOW - timedelta(days=100 + i)) for i in range(5)]
    assert list(plan(old, max_age=timedelta(days=7)).keep) == ["old0"]
    result = plan(old, max_age=timedelta(days=7), min_successful=3)
    assert list(result.keep) == ["old0", "old1", "old2"]
    assert result.keep["old2"] == ["newest 3 successful (minSuccessful)"]
    assert result.delete == ["old4", "old3"]


def test_the_last_good_backup_survives_any_policy() -> None:
    backups = [
        failed("f0", NOW - timedelta(hours=1)),
        failed("f1", NOW - timedelta(days=1)),
        ok("good", NOW - timedelta(days=400)),
        failed("f2", NOW - timedelta(days=500)),
    ]
    result = plan(backups, keep_last=0, keep_daily=0, max_age=timedelta(hours=1), failed_history_limit=0)
    assert list(result.keep) == ["good"]
    assert result.delete == ["f2", "f1", "f0"]


def test_failed_backups_do_not_count_for_keep_rules_or_the_floor() -> None:
    backups = [failed("f0", NOW - timedelta(hours=1)), *daily(4)]
    result = plan(backups, keep_last=2)
    assert result.keep["f0"] == ["recent failure (failedHistoryLimit 3)"]
    assert {"d0", "d1"} <= set(result.keep)
    assert result.delete == ["d3", "d2"]


def test_pinned_backups_are_always_kept() -> None:
    backups = [*daily(3), ok("pinned-old", NOW - timedelta(days=900), pinned=True)]
    result = plan(backups, keep_last=1, max_age=timedelta(days=1))
    assert result.keep["pinned-old"] == ["pinned"]
    assert "pinned-old" not in result.delete


def test_pinned_backups_do_not_use_up_keep_slots() -> None:
    backups = [ok("pinned-new", NOW, pinned=True), *daily(4)]
    result = plan(backups, keep_last=2)
    assert result.keep["pinned-new"] == ["pinned", "newest 1 successful (minSuccessful)"]
    assert {"d0", "d1"} <= set(result.keep)
    assert result.delete == ["d3", "d2"]
    # Nor do they stand in for a day: Mar 31's newest unpinned backup is still kept daily.
    assert plan(backups, keep_daily=1).keep["d0"] == ["keepDaily 2026-03-31"]


def test_pinned_failed_backup_is_kept_beyond_the_history_limit() -> None:
    backups = [failed(f"f{i}", NOW - timedelta(days=i), pinned=i == 4) for i in range(5)]
    result = plan(backups, failed_history_limit=1)
    assert result.keep["f4"] == ["pinned"]
    assert result.delete == ["f3", "f2", "f1"]


def test_unfinished_backups_are_never_touched() -> None:
    backups = [running("now-running"), BackupRecord("odd", None, succeeded=True, pinned=False), *daily(3)]
    result = plan(backups, keep_last=0, max_age=timedelta(seconds=1), failed_history_limit=0)
    assert result.keep["now-running"] == ["not finished"]
    assert result.keep["odd"] == ["not finished"]
    assert result.delete == ["d2", "d1"]


def test_failed_history_limit() -> None:
    backups = [failed(f"f{i}", NOW - timedelta(days=i)) for i in range(5)]
    result = plan(backups)
    assert result.delete == ["f4", "f3"]
    assert result.delete_reasons["f3"] == "failed, beyond failedHistoryLimit 3"
    assert plan(backups, failed_history_limit=0).delete == ["f4", "f3", "f2", "f1", "f0"]


def test_days_are_counted_in_the_schedule_time_zone() -> None:
    backups = [
        ok("mar30-2230z", datetime(2026, 3, 30, 22, 30, tzinfo=UTC)),  # Mar 31 00:30 in Berlin
        ok("mar30-2130z", datetime(2026, 3, 30, 21, 30, tzinfo=UTC)),  # Mar 30 23:30 in Berlin
        ok("mar29-noon", datetime(2026, 3, 29, 12, tzinfo=UTC)),
    ]
    assert plan(backups, UTC_ZONE, keep_daily=2).delete == ["mar30-2130z"]
    in_berlin = plan(backups, BERLIN, keep_daily=2)
    assert in_berlin.delete == ["mar29-noon"]
    assert in_berlin.keep["mar30-2230z"][-1] == "keepDaily 2026-03-31"


def test_weeks_and_months_are_counted_in_the_schedule_time_zone() -> None:
    # Sunday 2026-03-29 22:30 UTC is already Monday (week 14) in Berlin.
    backups = [
        ok("a", datetime(2026, 3, 30, 2, tzinfo=UTC)),
        ok("b", datetime(2026, 3, 29, 22, 30, tzinfo=UTC)),
    ]
    assert plan(backups, UTC_ZONE, keep_weekly=2).delete == []
    assert plan(backups, BERLIN, keep_weekly=2).delete == ["b"]
    # 2026-02-28 23:30 UTC is March 1 in Berlin.
    months = [ok("x", datetime(2026, 3, 2, tzinfo=UTC)), ok("y", datetime(2026, 2, 28, 23, 30, tzinfo=UTC))]
    assert plan(months, UTC_ZONE, keep_monthly=2).delete == []
    assert plan(months, BERLIN, keep_monthly=2).delete == ["y"]


def test_completion_times_in_other_zones_are_compared_as_instants() -> None:
    backups = [
        ok("a", datetime(2026, 3, 31, 3, tzinfo=BERLIN)),
        ok("b", datetime(2026, 3, 31, 2, tzinfo=UTC)),
    ]
    assert plan(backups, keep_last=1).delete == ["a"]  # 03:00 CEST is 01:00 UTC: the older one


def test_plan_does_not_depend_on_input_order() -> None:
    backups = [
        *daily(20),
        failed("f1", NOW - timedelta(hours=3)),
        running("r"),
        ok("tie", datetime(2026, 3, 28, 2, tzinfo=UTC)),
    ]
    expected = plan(backups, keep_last=3, keep_weekly=2)
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(backups)
        assert plan(backups, keep_last=3, keep_weekly=2) == expected


@pytest.mark.parametrize("seed", range(20))
def test_guarantees_hold_for_any_history_and_policy(seed: int) -> None:
    rng = random.Random(seed)
    backups = []
    for i in range(rng.randrange(0, 40)):
        completed = None if rng.random() < 0.1 else NOW - timedelta(minutes=rng.randrange(0, 200_000))
        backups.append(
            BackupRecord(f"b{i}", completed, succeeded=rng.random() < 0.7, pinned=rng.random() < 0.1)
        )

    def some() -> int | None:
        return rng.choice([None, 0, 1, 3, 7])

    policy = RetentionPolicy(
        keep_last=some(),
        keep_daily=some(),
        keep_weekly=some(),
        keep_monthly=some(),
        max_age=rng.choice([None, timedelta(days=2), timedelta(days=30)]),
        min_successful=rng.choice([1, 2, 5]),
        failed_history_limit=rng.choice([0, 1, 3]),
    )
    result = plan_retention(backups, policy, now=NOW, tz=BERLIN)
    deleted = set(result.delete)
    assert deleted.isdisjoint(result.keep)
    assert deleted | set(result.keep) == {b.name for b in backups}
    assert set(result.delete_reasons) == deleted
    by_name = {b.name: b for b in backups}
    assert all(not by_name[n].pinned and by_name[n].completed is not None for n in deleted)
    times = [by_name[n].completed or NOW for n in result.delete]
    assert times == sorted(times)
    good = sorted(
        (b for b in backups if b.succeeded and b.completed), key=lambda b: b.completed or NOW, reverse=True
    )
    assert not deleted & {b.name for b in good[: policy.min_successful]}
    if good:
        assert good[0].name not in deleted


def test_summary() -> None:
    result = plan(daily(10), keep_last=7)
    assert summarize(result) == "deleted 3 backups: d9, d8, d7; kept 7"
    assert result.summary() == summarize(result)
    assert summarize(plan(daily(2), keep_last=1)) == "deleted 1 backup: d1; kept 1"
    many = summarize(plan(daily(15), keep_last=1))
    assert many == "deleted 14 backups: d14, d13, d12, d11, d10, d9, d8, d7, d6, d5 and 4 more; kept 1"


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"keep_last": -1}, "keepLast must not be negative, got -1"),
        ({"keep_daily": -2}, "keepDaily must not be negative, got -2"),
        ({"failed_history_limit": -1}, "failedHistoryLimit must not be negative, got -1"),
        ({"min_successful": 0}, "minSuccessful must be at least 1, got 0"),
        ({"max_age": timedelta()}, "maxAge must be positive, got 0d"),
        ({"max_age": timedelta(hours=-2)}, "maxAge must be positive, got -2h"),
    ],
)
def test_policy_validation(policy: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        RetentionPolicy(**policy)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        plan_retention([], RetentionPolicy(), now=datetime(2026, 1, 1), tz=UTC_ZONE)
    with pytest.raises(ValueError, match="unique"):
        plan([ok("a", NOW), ok("a", NOW)])
    with pytest.raises(ValueError, match="timezone-aware"):
        plan([ok("a", datetime(2026, 1, 1))])
