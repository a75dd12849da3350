"""IdmBackupSchedule on the real platform: ticks, Forbid, operator restarts, retention in S3 and the cluster.

These tests follow a `* * * * *` schedule in real time, so each takes one to three minutes.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client

from idm_backup_operator.idmbackupschedule.clock import child_name
from testbed import stack
from testbed.deploy import OperatorProcess
from tests.helpers import (
    GROUP,
    PLURAL,
    SCHEDULES,
    VERSION,
    backup_spec,
    create_backup,
    create_schedule,
    event_messages,
    events,
    get_backup,
    get_schedule,
    s3_keys,
    s3_storage,
    wait_finished,
    wait_for,
)


def children(api: client.ApiClient, namespace: str, schedule: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, label_selector=f"idm-backup.io/schedule={schedule}"
    )["items"]
    return sorted(items, key=lambda b: b["metadata"]["name"])


def ready_condition(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    conditions = get_schedule(api, namespace, name).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "Ready"), None)


def minute(moment: datetime.datetime) -> datetime.datetime:
    return moment.replace(second=0, microsecond=0)


def sleep_until(moment: datetime.datetime) -> None:
    time.sleep(max(0.0, (moment - datetime.datetime.now(datetime.UTC)).total_seconds()))


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def test_every_minute_with_a_restart_neither_loses_nor_doubles_a_tick(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
) -> None:
    freeipa()
    # Start early in a minute, so the immediate backup and the next tick are clearly apart.
    if now().second > 40:
        sleep_until(minute(now()) + datetime.timedelta(minutes=1, seconds=1))
    template = backup_spec(platform, s3_storage(platform, f"test/{namespace}"), type="Data", online=True)
    create_schedule(
        api,
        namespace,
        "nightly",
        {"schedule": "* * * * *", "immediate": True, "template": {"spec": template}},
    )
    first = wait_for("the immediate backup", lambda: children(api, namespace, "nightly"), timeout=30)
    assert len(first) == 1
    wait_finished(api, namespace, first[0]["metadata"]["name"], operator)

    second_tick = minute(now()) + datetime.timedelta(minutes=1)
    sleep_until(second_tick)
    wait_for("the next tick's backup", lambda: len(children(api, namespace, "nightly")) == 2, timeout=30)
    assert children(api, namespace, "nightly")[1]["metadata"]["name"] == child_name("nightly", second_tick)
    wait_finished(api, namespace, child_name("nightly", second_tick), operator)

    # Down across the next tick, with nothing running (or Forbid would rightly skip it): on restart
    # exactly one catch-up backup, for that tick.
    operator.kill()
    missed_tick = second_tick + datetime.timedelta(minutes=1)
    sleep_until(missed_tick + datetime.timedelta(seconds=5))
    operator.start()
    wait_for("the catch-up backup", lambda: len(children(api, namespace, "nightly")) == 3, timeout=40)
    names = [b["metadata"]["name"] for b in children(api, namespace, "nightly")]
    assert names[1:] == [child_name("nightly", second_tick), child_name("nightly", missed_tick)]
    for name in names:
        assert wait_finished(api, namespace, name, operator)["status"]["phase"] == "Succeeded"

    # No double firing after the restart. The catch-up backup's end wakes the schedule for a pass of its
    # own (recorded as lastSuccessfulBackup, with nothing active): that pass, which runs with the restart's
    # lastScheduleTime, is the one that would create a second backup. Once it is recorded, the count is
    # final until the next tick, whatever the clock says.
    def recorded_after_catch_up() -> dict[str, Any] | None:
        status: dict[str, Any] = get_schedule(api, namespace, "nightly").get("status", {})
        done = status.get("lastSuccessfulBackup") == names[-1] and not status.get("active")
        return status if done else None

    wait_for("a pass after the catch-up backup ended", recorded_after_catch_up, timeout=30)
    next_tick = missed_tick + datetime.timedelta(minutes=1)
    assert now() < next_tick, "too slow: the next tick's own backup would be counted"
    assert [b["metadata"]["name"] for b in children(api, namespace, "nightly")] == names
    status = get_schedule(api, namespace, "nightly")["status"]
    assert status["lastScheduleTime"] == missed_tick.isoformat().replace("+00:00", "Z")
    assert status["nextScheduleTime"] == (missed_tick + datetime.timedelta(minutes=1)).isoformat().replace(
        "+00:00", "Z"
    )
    assert status["lastSuccessfulBackup"] == names[-1] and status["consecutiveFailures"] == 0
    for child in children(api, namespace, "nightly"):
        owner = child["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "IdmBackupSchedule" and owner["name"] == "nightly" and owner["controller"]


def test_forbid_skips_a_tick_while_the_previous_backup_runs(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
) -> None:
    freeipa(fault="hang")
    if now().second > 40:
        sleep_until(minute(now()) + datetime.timedelta(minutes=1, seconds=1))
    template = backup_spec(
        platform, s3_storage(platform, f"test/{namespace}"), type="Full", activeDeadlineSeconds=100
    )
    create_schedule(
        api, namespace, "forbid", {"schedule": "* * * * *", "immediate": True, "template": {"spec": template}}
    )
    wait_for("the immediate backup", lambda: children(api, namespace, "forbid"), timeout=30)
    tick = minute(now()) + datetime.timedelta(minutes=1)

    # The tick's pass creates its backup (or not) before it records the skip: once lastSkipTime names the
    # tick, that pass is over and the count of backups is final.
    def skip_recorded() -> dict[str, Any] | None:
        status: dict[str, Any] = get_schedule(api, namespace, "forbid").get("status", {})
        return status if status.get("lastSkipTime") == tick.isoformat().replace("+00:00", "Z") else None

    status = wait_for(
        "the tick to be recorded as skipped", skip_recorded, timeout=(tick - now()).total_seconds() + 30
    )
    assert len(children(api, namespace, "forbid")) == 1
    assert status["active"] == [children(api, namespace, "forbid")[0]["metadata"]["name"]]
    assert "BackupSkipped" in events(api, namespace, "forbid")


def test_an_invalid_schedule_says_why(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    operator: OperatorProcess,
    secrets: None,
) -> None:
    template = backup_spec(platform, s3_storage(platform, "x"))
    create_schedule(api, namespace, "sixfields", {"schedule": "0 0 2 * * *", "template": {"spec": template}})
    condition = wait_for(
        "the Ready condition", lambda: ready_condition(api, namespace, "sixfields"), timeout=30
    )
    assert condition["status"] == "False" and condition["reason"] == "InvalidSchedule"
    assert "6 fields" in condition["message"] and "seconds" in condition["message"]
    assert children(api, namespace, "sixfields") == []


def test_an_invalid_retention_says_why_deletes_nothing_and_backups_go_on(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    operator: OperatorProcess,
    secrets: None,
) -> None:
    """The schema refuses maxAge 0d; a CRD from before that rule, or a maxAge too long for any clock, gets
    through without the webhook. It used to make every pass of the schedule raise, leaving no status."""
    template = backup_spec(platform, s3_storage(platform, "x"))
    create_schedule(
        api,
        namespace,
        "forever",
        {"schedule": "0 3 * * *", "template": {"spec": template}, "retention": {"maxAge": "99999999999d"}},
    )
    condition = wait_for(
        "the Ready condition", lambda: ready_condition(api, namespace, "forever"), timeout=30
    )
    status = get_schedule(api, namespace, "forever")["status"]
    assert (condition["status"], condition["reason"]) == ("False", "InvalidRetention")
    assert condition["message"] == (
        f"spec.retention: maxAge '99999999999d' is too long; nothing is deleted; next backup at "
        f"{status['nextScheduleTime']}"
    )
    assert status["nextScheduleTime"].endswith("T03:00:00Z")


def test_a_template_the_api_server_refuses_says_why(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    operator: OperatorProcess,
    secrets: None,
) -> None:
    """A template the schedule's own schema lets through (template labels are any strings, or a template
    stored before a CRD upgrade tightened a rule) is refused when its backup is created. That used to be
    retried every 10 s with only a line in the operator's log."""
    template = backup_spec(platform, s3_storage(platform, "x"))
    create_schedule(
        api,
        namespace,
        "badlabel",
        {
            "schedule": "0 3 * * *",
            "immediate": True,
            "template": {"metadata": {"labels": {"team": "not a label value"}}, "spec": template},
        },
    )
    condition = wait_for(
        "the Ready condition", lambda: ready_condition(api, namespace, "badlabel"), timeout=30
    )
    assert (condition["status"], condition["reason"]) == ("False", "InvalidTemplate")
    assert condition["message"].startswith("the backup this schedule creates is refused: IdmBackup")
    assert 'metadata.labels: Invalid value: "not a label value"' in condition["message"]
    assert children(api, namespace, "badlabel") == []


def finished_or_gone(api: client.ApiClient, namespace: str, name: str) -> bool:
    try:
        return get_backup(api, namespace, name).get("status", {}).get("phase") in ("Succeeded", "Failed")
    except client.ApiException as err:
        return err.status == 404


def test_retention_leaves_exactly_the_expected_backups_in_s3_and_the_cluster(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    s3: Any,
) -> None:
    freeipa()
    prefix = f"test/{namespace}"
    template = backup_spec(platform, s3_storage(platform, prefix), type="Data", online=True)
    schedule = create_schedule(
        api,
        namespace,
        "kept",
        {
            "schedule": "0 3 * * *",
            "suspend": True,
            "template": {"spec": template},
            "retention": {"keepLast": 2, "failedHistoryLimit": 0},
        },
    )
    owner = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "IdmBackupSchedule",
        "name": "kept",
        "uid": schedule["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    failing = {**template, "encryption": {"publicKeysSecretRef": {"name": "no-such-secret"}}}
    plan = [
        ("b1", template, False),
        ("b2", template, True),
        ("b3", failing, False),
        ("b4", template, False),
        ("b5", template, False),
    ]
    for name, spec, pinned in plan:
        labels = {"idm-backup.io/schedule": "kept", **({"idm-backup.io/pinned": "true"} if pinned else {})}
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "IdmBackup",
            "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
            "spec": spec,
        }
        client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        wait_for(
            f"{name} to finish (or, failed, to be pruned at once)",
            lambda n=name: finished_or_gone(api, namespace, n),
        )
        time.sleep(1.1)  # distinct completion times, to the second
    expected = ["b2", "b4", "b5"]  # the two newest successful ones and the pinned one; b1 and failed b3 go

    def settled() -> bool:
        return [b["metadata"]["name"] for b in children(api, namespace, "kept")] == expected

    wait_for("retention to settle", settled, timeout=60)
    directories = sorted({k.rsplit("/", 1)[0] for k in s3_keys(s3, platform.s3_bucket, prefix)})
    kept_dirs = sorted(
        get_backup(api, namespace, n)["status"]["archive"]["uri"].rsplit("/", 1)[0].split("/", 3)[3]
        for n in expected
    )
    assert directories == kept_dirs
    assert len(s3_keys(s3, platform.s3_bucket, prefix)) == 3 * len(expected)
    # Every deletion, pass by pass, from the RetentionApplied events ("deleted 1 backup: b3; kept 3"):
    # together exactly b1 and b3, each once. The status keeps the last pass that deleted something.
    passes = [
        (m.group(1).split(", "), message)
        for message in event_messages(api, namespace, "kept", "RetentionApplied")
        if (m := re.fullmatch(r"deleted \d+ backups?: (.+); kept \d+", message))
    ]
    assert sorted(name for names, _ in passes for name in names) == ["b1", "b3"], passes
    retention = get_schedule(api, namespace, "kept")["status"]["retention"]
    assert (retention["deleted"], retention["message"]) == passes[-1]


def test_deleting_a_schedule_removes_its_backups_but_keeps_archives_they_retain(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    s3: Any,
) -> None:
    freeipa()
    prefix = f"test/{namespace}"
    template = backup_spec(platform, s3_storage(platform, prefix), type="Data", online=True)
    create_schedule(
        api, namespace, "gone", {"schedule": "0 3 * * *", "immediate": True, "template": {"spec": template}}
    )
    backup = wait_for("the immediate backup", lambda: children(api, namespace, "gone"), timeout=30)[0]
    assert (
        wait_finished(api, namespace, backup["metadata"]["name"], operator)["status"]["phase"] == "Succeeded"
    )
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, SCHEDULES, "gone", propagation_policy="Foreground"
    )
    # The controller-manager's garbage collector deletes the owned IdmBackup; deletionPolicy Retain
    # (the default) keeps what it stored.
    wait_for(
        "the backup resource to be garbage-collected",
        lambda: not children(api, namespace, "gone"),
        timeout=60,
    )
    assert len(s3_keys(s3, platform.s3_bucket, prefix)) == 3


def test_a_changed_schedule_takes_effect_at_once(
    api: client.ApiClient, namespace: str, platform: stack.Platform, operator: OperatorProcess, secrets: None
) -> None:
    template = backup_spec(platform, s3_storage(platform, "x"))
    create_schedule(api, namespace, "edited", {"schedule": "0 3 * * *", "template": {"spec": template}})
    wait_for(
        "the first pass",
        lambda: get_schedule(api, namespace, "edited").get("status", {}).get("nextScheduleTime"),
    )
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, SCHEDULES, "edited", {"spec": {"schedule": "*/5 * * * *"}}
    )
    # The task was asleep until 03:00 (capped at five minutes): the change must wake it.
    upcoming = minute(now())
    upcoming += datetime.timedelta(minutes=5 - upcoming.minute % 5)

    def rescheduled() -> bool:
        status = get_schedule(api, namespace, "edited").get("status", {})
        return status.get("nextScheduleTime") == upcoming.isoformat().replace("+00:00", "Z")

    wait_for("nextScheduleTime to follow the new cron", rescheduled, timeout=10)


def test_an_idmbackup_made_first_under_a_ticks_name_is_not_taken_for_the_ticks_own(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
) -> None:
    """Someone who may create IdmBackups in the namespace creates one under the next tick's name: the
    schedule must neither adopt it (its spec, target and storage are whoever made it's) nor believe its
    tick ran. It says so, and records the tick as passed, so that the next one runs as usual."""
    freeipa()
    if now().second > 45:
        sleep_until(minute(now()) + datetime.timedelta(minutes=1, seconds=1))
    tick = minute(now()) + datetime.timedelta(minutes=1)
    template = backup_spec(platform, s3_storage(platform, f"test/{namespace}"), type="Data", online=True)
    squatter = child_name("every", tick)
    create_backup(api, namespace, squatter, template)
    create_schedule(api, namespace, "every", {"schedule": "* * * * *", "template": {"spec": template}})
    message = wait_for(
        "the schedule's report of the taken name",
        lambda: event_messages(api, namespace, "every", "BackupNameTaken"),
        timeout=90,
    )[0]
    assert message == (
        f"the backup for {tick:%Y-%m-%d %H:%M} UTC: IdmBackup {namespace}/{squatter} exists and is not this "
        "schedule's"
    )
    ready = ready_condition(api, namespace, "every")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "BackupNameTaken")
    # Not adopted: no owner, no schedule label, and the schedule does not count it as its own.
    taken = get_backup(api, namespace, squatter)["metadata"]
    assert not taken.get("ownerReferences") and "idm-backup.io/schedule" not in (taken.get("labels") or {})
    status = get_schedule(api, namespace, "every").get("status", {})
    assert (
        squatter not in status.get("active", [])
        and status.get("lastScheduleTime") == f"{tick:%Y-%m-%dT%H:%M:%SZ}"
    )
