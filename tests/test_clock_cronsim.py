"""The clock on cronsim gives the same ticks, fields and messages as the hand-written parser it replaced.

tests/data/cron_ticks.json was produced by the hand-written clock.py at commit
6ceca384d6ef47938d0761676b4e1b124c4ca434 (operator/idm_backup_operator/idmbackupschedule/clock.py), with a
one-off script that imported that file and is not kept, as it cannot run without the old code:
- "series": for 45 expressions (every field form: `*`, lists, ranges, steps, month and day names, 7 as
  Sunday, day-of-month with day-of-week in both the OR and the AND form, every @-macro) in 4 zones
  (Europe/Berlin, America/New_York, Australia/Lord_Howe with its 30-minute DST, UTC), starting a little
  before each of the zone's 2026 spring-forward and fall-back changes (UTC: the Berlin instants), the
  first 10 `next_tick` results after `after`, chained: 360 series, 3600 ticks.
- "parsed": `CronSchedule.parse`'s fields for those expressions and some rarer valid ones.
- "errors": the `InvalidSchedule` message for malformed or refused expressions, including forms cronsim
  accepts (L, W, #, a seconds field, `5/15`, steps larger than the field).
Regenerate only from that commit's clock.py: the point is that the table does not come from the code
under test.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from idm_backup_operator.idmbackupschedule.clock import (
    CronSchedule,
    InvalidSchedule,
    count_ticks,
    next_tick,
    previous_tick,
)

TABLE: dict[str, list[dict[str, Any]]] = json.loads(
    (Path(__file__).parent / "data" / "cron_ticks.json").read_text(encoding="utf-8")
)
EXPRESSIONS = list(dict.fromkeys(series["expression"] for series in TABLE["series"]))


def instant(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%MZ").replace(tzinfo=UTC)


def test_the_table_is_large_enough() -> None:
    assert sum(len(series["ticks"]) for series in TABLE["series"]) >= 1200
    assert {series["zone"] for series in TABLE["series"]} == {
        "Europe/Berlin",
        "America/New_York",
        "Australia/Lord_Howe",
        "UTC",
    }


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_ticks_match_the_hand_written_clock(expression: str) -> None:
    schedule = CronSchedule.parse(expression)
    for series in (s for s in TABLE["series"] if s["expression"] == expression):
        tz, after = ZoneInfo(series["zone"]), instant(series["after"])
        expected = [instant(t) for t in series["ticks"]]
        got, t = [], after
        for _ in expected:
            t = next_tick(schedule, t, tz)
            got.append(t)
        where = f"{expression!r} in {series['zone']} after {series['after']}"
        assert got == expected, where
        # previous_tick and count_ticks walk the same ticks from the other end and arithmetically.
        for earlier, tick in zip([None, *expected], expected, strict=False):
            assert previous_tick(schedule, tick, tz) == tick, where
            before = previous_tick(schedule, tick - timedelta(seconds=1), tz)
            if earlier is None:
                assert before is None or before <= after, where
            else:
                assert before == earlier, where
        assert count_ticks(schedule, tz, after, expected[-1]) == len(expected), where


@pytest.mark.parametrize("fields", TABLE["parsed"], ids=lambda fields: fields["expression"])
def test_parsed_fields_match_the_hand_written_parser(fields: dict[str, Any]) -> None:
    schedule = CronSchedule.parse(fields["expression"])
    assert {
        "expression": schedule.expression,
        "minutes": list(schedule.minutes),
        "hours": list(schedule.hours),
        "days_of_month": sorted(schedule.days_of_month),
        "months": list(schedule.months),
        "days_of_week": sorted(schedule.days_of_week),
        "day_of_month_restricted": schedule.day_of_month_restricted,
        "day_of_week_restricted": schedule.day_of_week_restricted,
    } == fields


@pytest.mark.parametrize("error", TABLE["errors"], ids=lambda error: error["expression"])
def test_refusals_keep_the_hand_written_messages(error: dict[str, str]) -> None:
    with pytest.raises(InvalidSchedule) as caught:
        CronSchedule.parse(error["expression"])
    assert str(caught.value) == error["message"]
