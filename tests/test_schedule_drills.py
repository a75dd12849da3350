"""Scheduled restore drills (IdmBackupSchedule.spec.drill): the pure decisions, then the real thing.

The platform test follows a `* * * * *` drill cron in real time: one minute tick at most, and the drills
themselves (a scratch stand-in pod each), so it takes one to two minutes.
"""

from __future__ import annotations

import datetime
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from idm_backup_operator.api.names import NAME_LIMIT
from idm_backup_operator.idmbackupschedule import clock, drills
from idm_backup_operator.kube.backups import DrillRestores, IdmBackups
from idm_backup_operator.kube.errors import ApiError
from testbed import processes, stack
from testbed.deploy import OperatorProcess
from testbed.ldap_server import DirectoryServer
from tests.helpers import (
    GROUP,
    VERSION,
    apply,
    condition,
    create_schedule,
    events,
    get_schedule,
    wait_for,
)
from tests.test_restore import (  # noqa: F401 (fixtures)
    DRILL_DM_SECRET,
    RESTORES,
    data_backup,
    directory,
    drill_directory,
    drill_spec,
    scratch_objects,
    server,
)

UTC = datetime.UTC
T0 = datetime.datetime(2026, 11, 28, 6, 0, tzinfo=UTC)


def at(days: float = 0, minutes: float = 0) -> datetime.datetime:
    return T0 - datetime.timedelta(days=days, minutes=minutes)


# -- picking a backup -------------------------------------------------------------------------------------


def backups(*days_ago: float) -> list[drills.Candidate]:
    return [drills.Candidate(f"b-{d:g}", at(days=d)) for d in days_ago]


def test_latest_picks_the_newest_succeeded_backup_and_nothing_without_one() -> None:
    assert drills.pick_backup(backups(3, 0.5, 2), "Latest", None, tick=T0, seed="u") == "b-0.5"
    assert drills.pick_backup([], "Latest", None, tick=T0, seed="u") is None
    # Only Succeeded backups with a completion time are candidates.
    bodies = [
        {
            "metadata": {"name": "ok"},
            "status": {"phase": "Succeeded", "completionTime": "2026-11-27T02:00:00Z"},
        },
        {
            "metadata": {"name": "failed"},
            "status": {"phase": "Failed", "completionTime": "2026-11-28T02:00:00Z"},
        },
        {"metadata": {"name": "running"}, "status": {"phase": "Running"}},
    ]
    assert [c.name for c in drills.candidates(bodies)] == ["ok"]


def test_random_picks_within_the_window_the_same_for_the_same_tick() -> None:
    found = backups(0.1, 1, 2, 3, 6.5, 8, 30)
    picks = {
        drills.pick_backup(found, "Random", 7, tick=T0 - datetime.timedelta(hours=h), seed="u")
        for h in range(24)
    }
    # Every pick completed within 7 days before its tick; over 24 ticks, more than one is picked.
    assert picks <= {"b-0.1", "b-1", "b-2", "b-3", "b-6.5"} and len(picks) > 1
    # A retried tick picks the same, whatever order the API listed the backups in.
    first = drills.pick_backup(found, "Random", 7, tick=T0, seed="u")
    assert all(
        drills.pick_backup(list(reversed(found)), "Random", 7, tick=T0, seed="u") == first for _ in range(5)
    )
    # Nothing in the window: no pick (the tick is skipped), even if older backups exist.
    assert drills.pick_backup(backups(8, 30), "Random", 7, tick=T0, seed="u") is None
    # A backup completed after the tick is not a candidate for it.
    assert (
        drills.pick_backup(
            [drills.Candidate("later", T0 + datetime.timedelta(minutes=1))], "Random", 7, tick=T0, seed="u"
        )
        is None
    )


def test_a_drill_is_named_from_its_tick_and_fits_a_name() -> None:
    assert drills.drill_name("nightly", T0) == "nightly-drill-202611280600"
    berlin = T0.astimezone(clock.parse_time_zone("Europe/Berlin"))
    assert drills.drill_name("nightly", berlin) == "nightly-drill-202611280600"  # always UTC
    long = drills.drill_name("x" * 80, T0)
    assert len(long) <= NAME_LIMIT and long.endswith("-drill-202611280600")
    assert long != drills.drill_name("x" * 79 + "y", T0)


# -- recording outcomes and keeping the last few -------------------------------------------------------


def drill(name: str, phase: str | None, minutes_ago: float | None = None, **kw: Any) -> drills.Drill:
    completed = at(minutes=minutes_ago) if minutes_ago is not None else None
    return drills.Drill(name, phase, completed, backup="b", **kw)


def test_only_the_three_newest_finished_drills_are_kept_and_running_ones_never_deleted() -> None:
    found = [
        drill("d1", "Succeeded", 50),
        drill("d2", "Failed", 40),
        drill("d3", "Succeeded", 30),
        drill("d4", "Failed", 20),
        drill("d5", "Succeeded", 10),
        drill("d6", "Running"),
        drill("d7", "Pending"),
    ]
    assert drills.drills_to_delete(found) == ["d1", "d2"]
    assert drills.drills_to_delete(found[:3]) == []
    assert drills.drills_to_delete(found, keep=1) == ["d1", "d2", "d3", "d4"]


def test_each_finished_drill_is_recorded_once_and_the_failure_streak_counts() -> None:
    ok = drill(
        "d1", "Succeeded", 30, restore_seconds=12.5, entries=140, duration=40.0, reason="RestoreSucceeded"
    )
    bad = drill("d2", "Failed", 20, reason="EntryCountMismatch", message="userRoot: 3 expected, 2 found")
    worse = drill("d3", "Failed", 10, reason="ScratchServerFailed", message="not ready")
    running = drill("d4", "Running")

    fields, new = drills.fold_outcomes({}, [running, bad, ok])
    assert [d.name for d in new] == ["d1", "d2"]
    assert fields["lastDrill"]["name"] == "d2" and fields["lastDrill"]["result"] == "Failed"
    assert fields["lastSuccessfulDrill"] == {
        "name": "d1",
        "time": "2026-11-28T05:30:00Z",
        "result": "Succeeded",
        "backup": "b",
        "reason": "RestoreSucceeded",
        "durationSeconds": 40.0,
        "restoreSeconds": 12.5,
        "entries": 140,
    }
    assert fields["consecutiveDrillFailures"] == 1 and fields["activeDrills"] == ["d4"]

    # The next pass, with the first two recorded: only d3 is new, and the streak goes on from 1.
    status = {**fields}
    fields, new = drills.fold_outcomes(status, [ok, bad, worse])
    assert [d.name for d in new] == ["d3"] and fields["consecutiveDrillFailures"] == 2
    assert "lastSuccessfulDrill" not in fields  # unchanged: not written again
    # Nothing new: nothing recorded, the streak stays.
    fields, new = drills.fold_outcomes({**status, **fields}, [ok, bad, worse])
    assert new == [] and fields["consecutiveDrillFailures"] == 2 and "lastDrill" not in fields


def test_restore_verified_is_unknown_before_the_first_drill_then_follows_the_last() -> None:
    assert drills.verified(None)[0:2] == ("Unknown", "NoDrillYet")
    ok = drill("d1", "Succeeded", 5, restore_seconds=12.5, entries=140).record()
    assert drills.verified(ok) == (
        "True",
        "DrillSucceeded",
        "drill d1 restored backup b in 12.5 s, 140 entries",
    )
    bad = drill(
        "d2", "Failed", 1, reason="EntryCountMismatch", message="userRoot: 3 expected, 2 found"
    ).record()
    assert drills.verified(bad) == (
        "False",
        "EntryCountMismatch",
        "drill d2 of backup b failed: userRoot: 3 expected, 2 found",
    )
    ready = {"type": "Ready", "status": "True"}
    spec = {"drill": {"schedule": "* * * * *"}}
    (_, unknown) = drills.with_drill_condition(spec, {"conditions": [ready]}, T0)
    assert unknown["type"] == "RestoreVerified" and unknown["status"] == "Unknown"
    # A schedule without drills has no such condition.
    assert drills.with_drill_condition({}, {"conditions": [ready, unknown]}, T0) == [ready]


def test_the_drill_spec_defaults_to_the_schedules_zone_and_random_needs_a_window() -> None:
    parsed = drills.parse_drill_spec({"timeZone": "Europe/Berlin", "drill": {"schedule": "0 6 * * 0"}})
    assert parsed is not None and str(parsed.tz) == "Europe/Berlin" and parsed.pick == "Latest"
    assert drills.parse_drill_spec({"schedule": "@daily"}) is None
    with pytest.raises(clock.InvalidSchedule, match="withinDays"):
        drills.parse_drill_spec({"drill": {"schedule": "@daily", "pick": "Random"}})
    with pytest.raises(clock.InvalidSchedule, match=r"spec\.drill\.schedule: 6 fields"):
        drills.parse_drill_spec({"drill": {"schedule": "0 0 6 * * 0"}})


# -- one pass, against fakes of the API ------------------------------------------------------------------


class FakeCustom:
    """IdmBackups and IdmRestores of one namespace, as the CustomObjectsApi calls see them."""

    def __init__(self, backups: list[dict[str, Any]]) -> None:
        self.objects: dict[str, dict[str, dict[str, Any]]] = {
            "idmbackups": {b["metadata"]["name"]: b for b in backups},
            "idmrestores": {},
        }
        self.created: list[str] = []

    def list_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, **kw: Any) -> Any:
        return {"items": list(self.objects[plural].values())}

    def create_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, body: Any, **kw: Any
    ) -> Any:
        if body["metadata"]["name"] in self.objects[plural]:
            raise ApiError(status=409, reason="Conflict")
        self.objects[plural][body["metadata"]["name"]] = body
        self.created.append(body["metadata"]["name"])
        return body

    def get_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str, **kw: Any
    ) -> Any:
        return self.objects[plural][name]

    def delete_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str, **kw: Any
    ) -> Any:
        del self.objects[plural][name]


class FakeReport:
    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.events: list[tuple[str, str, bool]] = []
        self.conditions: dict[str, tuple[bool, str, str]] = {}

    def update(self, **status: Any) -> None:
        self.status.update(status)

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.conditions[type_] = (status, reason, message)

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append((reason, message, warning))

    def cancelled(self) -> bool:
        return False


OWNER = [{"kind": "IdmBackupSchedule", "uid": "s-uid", "name": "nightly"}]


def owned_backup(name: str, completed: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"idm-backup.io/schedule": "nightly"}, "ownerReferences": OWNER},
        "status": {"phase": "Succeeded", "completionTime": completed},
    }


def a_schedule(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "nightly",
            "namespace": "identity",
            "uid": "s-uid",
            "creationTimestamp": "2026-11-28T05:00:30Z",
        },
        "spec": {
            "schedule": "0 2 * * *",
            "template": {"spec": {}},
            "drill": {
                "schedule": "* * * * *",
                "decryption": {"secretKeySecretRef": {"name": "key"}},
                "restore": {"podTemplate": {"spec": {}}, "ldap": {"url": "ldap://x"}},
            },
        },
        "status": {"nextDrillTime": "2026-11-28T05:01:00Z", **(status or {})},
    }


def one_pass(custom: FakeCustom, schedule: dict[str, Any], now: datetime.datetime) -> FakeReport:
    report = FakeReport()
    drills.reconcile_drills(DrillRestores(custom), IdmBackups(custom), schedule, report, now)  # type: ignore[arg-type]
    return report


def test_a_pass_creates_the_ticks_drill_once_owned_and_labelled_from_the_latest_backup() -> None:
    custom = FakeCustom(
        [owned_backup("old", "2026-11-27T02:05:00Z"), owned_backup("new", "2026-11-28T02:05:00Z")]
    )
    now = T0 + datetime.timedelta(seconds=3)
    report = one_pass(custom, a_schedule({"lastDrillScheduleTime": "2026-11-28T05:59:00Z"}), now)
    (name,) = custom.created
    assert name == "nightly-drill-202611280600"
    body = custom.objects["idmrestores"][name]
    assert body["spec"]["mode"] == "Drill" and body["spec"]["source"] == {"backupRef": {"name": "new"}}
    assert body["spec"]["decryption"] == {"secretKeySecretRef": {"name": "key"}}
    assert body["metadata"]["labels"] == {"idm-backup.io/schedule": "nightly"}
    assert body["metadata"]["ownerReferences"][0]["uid"] == "s-uid"
    assert report.status["lastDrillScheduleTime"] == "2026-11-28T06:00:00Z"
    assert report.status["activeDrills"] == [name]
    assert [e[0] for e in report.events] == ["DrillCreated"]
    # A retry of the same tick (its status not written) creates nothing new and says nothing.
    again = one_pass(custom, a_schedule({"lastDrillScheduleTime": "2026-11-28T05:59:00Z"}), now)
    assert custom.created == [name] and again.events == []


def test_a_pass_without_a_backup_to_pick_creates_nothing_and_says_why() -> None:
    custom = FakeCustom([])
    report = one_pass(custom, a_schedule({"lastDrillScheduleTime": "2026-11-28T05:59:00Z"}), T0)
    assert custom.created == []
    ((reason, message, warning),) = report.events
    assert reason == "DrillSkipped" and warning and "no Succeeded backup" in message
    assert report.status["lastDrillSkip"]["time"] == "2026-11-28T06:00:00Z"


def test_a_pass_records_finished_drills_and_deletes_all_but_the_last_three() -> None:
    custom = FakeCustom([owned_backup("new", "2026-11-28T02:05:00Z")])
    for minute, phase in enumerate(["Succeeded", "Succeeded", "Failed", "Succeeded", "Failed"]):
        name = f"nightly-drill-20261128055{minute}"
        custom.objects["idmrestores"][name] = {
            "metadata": {"name": name, "ownerReferences": OWNER},
            "spec": {"source": {"backupRef": {"name": "new"}}},
            "status": {
                "phase": phase,
                "completionTime": f"2026-11-28T05:5{minute}:40Z",
                "reason": "RestoreSucceeded" if phase == "Succeeded" else "EntryCountMismatch",
                "drill": {"restoreSeconds": 10.0 + minute, "entries": 100},
            },
        }
    report = one_pass(custom, a_schedule({"lastDrillScheduleTime": "2026-11-28T06:00:00Z"}), T0)
    assert sorted(custom.objects["idmrestores"]) == [f"nightly-drill-20261128055{m}" for m in (2, 3, 4)]
    assert report.status["lastDrill"]["result"] == "Failed" and report.status["consecutiveDrillFailures"] == 1
    assert report.status["lastSuccessfulDrill"]["restoreSeconds"] == 13.0
    assert report.conditions["RestoreVerified"] == (
        False,
        "EntryCountMismatch",
        "drill nightly-drill-202611280554 of backup new failed",
    )
    reasons = [e[0] for e in report.events]
    assert reasons == [
        "DrillSucceeded",
        "DrillSucceeded",
        "DrillFailed",
        "DrillSucceeded",
        "DrillFailed",
        "DrillsDeleted",
    ]
    assert custom.created == []  # the 06:00 tick was taken already


# -- on the platform ---------------------------------------------------------------------------------------

WRONG_DM_SECRET = "drill-wrong-password"


def scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, s.labels.get("schedule", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("idm_backup_drill_")
    }


def test_scheduled_drills_prove_restores_and_a_failing_one_shows_in_status_events_and_metrics(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,  # noqa: F811
    drill_directory: DirectoryServer,  # noqa: F811
    server: Callable[..., str],  # noqa: F811
    operator: OperatorProcess,
    secrets: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = processes.free_port()
    monkeypatch.setenv("IDM_BACKUP_ENABLE_DRILLS", "true")
    monkeypatch.setenv("IDM_BACKUP_METRICS_PORT", str(port))
    monkeypatch.setenv("IDM_BACKUP_METRICS_ADDRESS", "127.0.0.1")
    operator.stop()
    operator.start()
    server()
    secret = {"apiVersion": "v1", "kind": "Secret", "stringData": {"password": drill_directory.password}}
    apply(api, namespace, {**secret, "metadata": {"name": DRILL_DM_SECRET}})
    apply(
        api, namespace, {**secret, "metadata": {"name": WRONG_DM_SECRET}, "stringData": {"password": "wrong"}}
    )

    def drill_of(name: str, **ldap: Any) -> dict[str, Any]:
        (tmp_path / name).mkdir()
        restore = drill_spec(drill_directory, tmp_path / name, {"backupRef": {"name": "unused"}})
        restore["drill"]["ldap"].update(ldap)
        return {"schedule": "* * * * *", "decryption": restore["decryption"], "restore": restore["drill"]}

    template = {"spec": data_backup(platform, directory, f"drills/{namespace}")}
    yearly = {"schedule": "0 0 1 1 *", "immediate": True, "template": template}
    create_schedule(api, namespace, "good", {**yearly, "drill": drill_of("good")})
    # The scratch server comes up, but the drill's LDAP password is wrong: the check cannot read it.
    create_schedule(
        api,
        namespace,
        "bad",
        {**yearly, "drill": drill_of("bad", passwordSecretRef={"name": WRONG_DM_SECRET})},
    )
    # Every backup of this one fails: a drill tick finds nothing to restore.
    broken = {"spec": {**template["spec"], "target": {**template["spec"]["target"], "podName": "nope"}}}
    create_schedule(api, namespace, "empty", {**yearly, "template": broken, "drill": drill_of("empty")})
    first = wait_for("good's first pass", lambda: condition(get_schedule(api, namespace, "good"), "Ready"))
    assert first and condition(get_schedule(api, namespace, "good"), "RestoreVerified")["status"] in (
        "Unknown",
        "True",
    )

    def last_drill(name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = get_schedule(api, namespace, name).get("status", {}).get("lastDrill")
        return found

    good = wait_for("good's first drill", lambda: last_drill("good"), timeout=150)
    bad = wait_for("bad's first drill", lambda: last_drill("bad"), timeout=60)

    assert good["result"] == "Succeeded", good
    assert (
        good["restoreSeconds"] > 0
        and good["entries"] > 0
        and good["durationSeconds"] >= good["restoreSeconds"]
    )
    assert good["backup"].startswith("good-") and good["name"].startswith("good-drill-")
    schedule = get_schedule(api, namespace, "good")
    verified = condition(schedule, "RestoreVerified")
    assert verified["status"] == "True" and verified["reason"] == "DrillSucceeded", verified
    assert schedule["status"]["consecutiveDrillFailures"] == 0
    restore = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, RESTORES, good["name"]
    )
    assert restore["spec"]["mode"] == "Drill" and restore["spec"]["source"] == {
        "backupRef": {"name": good["backup"]}
    }
    assert restore["metadata"]["labels"]["idm-backup.io/schedule"] == "good"
    assert restore["metadata"]["ownerReferences"][0]["uid"] == schedule["metadata"]["uid"]
    assert {"DrillCreated", "DrillSucceeded"} <= set(events(api, namespace, "good"))

    assert bad["result"] == "Failed" and bad["reason"] != "RestoreSucceeded", bad
    verified = condition(get_schedule(api, namespace, "bad"), "RestoreVerified")
    assert verified["status"] == "False" and verified["reason"] == bad["reason"], verified
    warnings = (
        client.CoreV1Api(api)
        .list_namespaced_event(namespace, field_selector="involvedObject.name=bad,reason=DrillFailed")
        .items
    )
    assert warnings and warnings[0].type == "Warning" and bad["name"] in warnings[0].message

    skip = get_schedule(api, namespace, "empty")["status"]["lastDrillSkip"]
    assert "no Succeeded backup" in skip["message"]
    assert "DrillSkipped" in events(api, namespace, "empty")
    assert not client.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, RESTORES, label_selector="idm-backup.io/schedule=empty"
    )["items"]

    found = wait_for(
        "the drill metrics",
        lambda: (
            (m := scrape(port)).get(("idm_backup_drill_last_status", "bad")) == 0
            and m.get(("idm_backup_drill_last_status", "good")) == 1
            and m
        ),
    )
    assert found[("idm_backup_drill_last_duration_seconds", "good")] == good["restoreSeconds"]
    assert found[("idm_backup_drill_consecutive_failures", "bad")] >= 1
    assert ("idm_backup_drill_last_successful_timestamp_seconds", "bad") not in found
    # Every scratch pod, claim and policy of the finished drills is gone (a next minute's drill may run).
    finished = {good["name"], bad["name"]}
    wait_for(
        "the scratch servers to be gone",
        lambda: (
            not any(
                o.split("/", 1)[1].removesuffix("-drill") in finished for o in scratch_objects(api, namespace)
            )
        ),
        timeout=60,
    )
