"""Metrics: pure tests of the state (object bodies in, exposition out), and the real operator's /metrics."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform as python_platform
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from idm_backup_operator import __version__
from idm_backup_operator.metrics import DURATION_BUCKETS, BackupMetrics, MetricsConfig, MetricsServer
from testbed import processes, stack
from testbed.deploy import OperatorProcess
from tests.helpers import (
    GROUP,
    VERSION,
    backup_spec,
    create_backup,
    create_schedule,
    s3_storage,
    wait_finished,
    wait_for,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
NS = "identity"
T1, T2 = "2026-11-26T02:03:04Z", "2026-11-27T02:05:00Z"


def ts(value: str) -> float:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def samples(metrics: BackupMetrics) -> Samples:
    return parse(metrics.exposition().decode())


def value(
    found: Samples, name: str, schedule: str | None = "nightly", namespace: str = NS, **labels: str
) -> float:
    wanted = {"namespace": namespace, **labels}
    if schedule is not None:
        wanted["schedule"] = schedule
    return found[(name, tuple(sorted(wanted.items())))]


def names(found: Samples) -> set[str]:
    return {name for name, _ in found}


def schedule(name: str = "nightly", uid: str = "s-1", next_run: str | None = T2) -> dict[str, Any]:
    status = {"nextScheduleTime": next_run} if next_run else {}
    return {"metadata": {"name": name, "namespace": NS, "uid": uid}, "status": status}


def backup(
    uid: str,
    phase: str | None,
    *,
    schedule: str | None = "nightly",
    owner: str | None = "s-1",
    completed: str | None = None,
    size: int | None = None,
    duration: float | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"b-{uid}", "namespace": NS, "uid": uid, "labels": {}}
    if schedule:
        meta["labels"]["idm-backup.io/schedule"] = schedule
    if owner:
        meta["ownerReferences"] = [{"kind": "IdmBackupSchedule", "uid": owner, "name": schedule}]
    status: dict[str, Any] = {}
    if phase:
        status["phase"] = phase
    if completed:
        status["completionTime"] = completed
    if size is not None:
        status["archive"] = {"sizeBytes": size}
    if duration is not None:
        status["durationSeconds"] = duration
    return {"metadata": meta, "status": status}


def test_gauges_are_rebuilt_from_the_resources_and_nothing_old_is_counted() -> None:
    metrics = BackupMetrics()
    metrics.seed(
        [
            backup("a", "Succeeded", completed=T1, size=1000, duration=60),
            backup("b", "Failed", completed=T2, duration=5),
            backup("c", "Running"),
            backup("d", "Succeeded", schedule=None, owner=None, completed=T1, size=7),
        ],
        [schedule()],
    )
    found = samples(metrics)
    assert value(found, "idm_backup_last_successful_timestamp_seconds") == ts(T1)
    assert value(found, "idm_backup_last_failure_timestamp_seconds") == ts(T2)
    assert value(found, "idm_backup_last_status") == 0  # the failure is the latest
    assert value(found, "idm_backup_archive_size_bytes") == 1000
    assert value(found, "idm_backup_in_progress") == 1
    assert value(found, "idm_backup_schedule_next_run_timestamp_seconds") == ts(T2)
    assert value(found, "idm_backup_schedules", schedule=None) == 1
    # A backup made by hand has the schedule label "".
    assert value(found, "idm_backup_last_status", schedule="") == 1
    assert value(found, "idm_backup_archive_size_bytes", schedule="") == 7
    # Finished before this process started: the previous process counted them.
    for counter in ("idm_backup_attempt_total", "idm_backup_success_total", "idm_backup_failure_total"):
        assert value(found, counter) == 0
    assert value(found, "idm_backup_duration_seconds_count") == 0


def test_each_backup_is_counted_once_whatever_the_events_repeat() -> None:
    metrics = BackupMetrics()
    metrics.seed([backup("old", "Running")], [schedule()])
    for _ in range(2):
        metrics.observe_backup(backup("new", None))
        metrics.observe_backup(backup("new", "Pending"))
        metrics.observe_backup(backup("new", "Running"))
    assert value(samples(metrics), "idm_backup_in_progress") == 2
    assert value(samples(metrics), "idm_backup_attempt_total") == 1  # "old" was started by another process
    done = backup("new", "Succeeded", completed=T1, size=42, duration=90)
    for _ in range(3):
        metrics.observe_backup(done)
    # A re-listing (kopf's type None) of a backup this process already knows still counts its transition.
    metrics.observe_backup(backup("old", "Failed", completed=T2, duration=4000), initial=True)
    metrics.observe_backup(backup("old", "Failed", completed=T2, duration=4000))
    # First seen finished in a listing: another replica's, or the last process's; not counted here.
    metrics.observe_backup(backup("elsewhere", "Succeeded", completed="2026-11-25T00:00:00Z"), initial=True)
    found = samples(metrics)
    assert value(found, "idm_backup_attempt_total") == 1
    assert value(found, "idm_backup_success_total") == 1
    assert value(found, "idm_backup_failure_total") == 1
    assert value(found, "idm_backup_in_progress") == 0
    assert value(found, "idm_backup_last_status") == 0
    assert value(found, "idm_backup_archive_size_bytes") == 42
    assert value(found, "idm_backup_duration_seconds_count") == 2
    assert value(found, "idm_backup_duration_seconds_sum") == 4090
    assert value(found, "idm_backup_duration_seconds_bucket", le="60.0") == 0
    assert value(found, "idm_backup_duration_seconds_bucket", le="120.0") == 1
    assert value(found, "idm_backup_duration_seconds_bucket", le="7200.0") == 2
    assert value(found, "idm_backup_duration_seconds_bucket", le="+Inf") == 2
    assert DURATION_BUCKETS[0] <= 60 and DURATION_BUCKETS[-1] >= 8 * 3600


def test_deleting_a_backup_or_a_schedule_removes_what_depended_on_it() -> None:
    metrics = BackupMetrics()
    metrics.seed([backup("a", "Succeeded", completed=T1, size=1)], [schedule(), schedule("other", "s-2")])
    metrics.observe_backup(backup("b", "Running"))
    metrics.observe_backup(backup("b", "Succeeded", completed=T2, size=2))
    assert value(samples(metrics), "idm_backup_last_successful_timestamp_seconds") == ts(T2)
    metrics.forget_backup(backup("b", "Succeeded"))
    assert value(samples(metrics), "idm_backup_last_successful_timestamp_seconds") == ts(T1)
    assert value(samples(metrics), "idm_backup_success_total") == 1  # a counter does not go down

    metrics.forget_schedule(schedule())
    # Its backups' late events, while Kubernetes garbage-collects them, bring nothing back.
    metrics.observe_backup(backup("a", "Succeeded", completed=T1, size=1))
    metrics.observe_backup(backup("c", "Running"))
    found = samples(metrics)
    assert not [key for key in found if ("schedule", "nightly") in key[1]]
    assert value(found, "idm_backup_schedules", schedule=None) == 1
    assert value(found, "idm_backup_schedule_next_run_timestamp_seconds", schedule="other") == ts(T2)
    metrics.forget_schedule(schedule("other", "s-2"))
    found = samples(metrics)
    assert "idm_backup_schedules" not in names(found)
    assert "idm_backup_schedule_next_run_timestamp_seconds" not in names(found)


def test_a_backup_by_hand_keeps_its_counters_only_once_it_counted_something() -> None:
    """The counters are prometheus-client's own, with a child per key; which keys have children is
    what it was with the hand-written counters: schedules, backups known now, and keys that counted."""
    metrics = BackupMetrics()
    metrics.seed([backup("old", "Succeeded", schedule=None, owner=None, completed=T1)], [])
    assert value(samples(metrics), "idm_backup_attempt_total", schedule="") == 0
    metrics.forget_backup(backup("old", None, schedule=None, owner=None))
    assert not [key for key in samples(metrics) if ("schedule", "") in key[1]]  # never counted: gone
    metrics.observe_backup(backup("new", "Running", schedule=None, owner=None))
    metrics.forget_backup(backup("new", None, schedule=None, owner=None))
    found = samples(metrics)
    assert value(found, "idm_backup_attempt_total", schedule="") == 1  # counted: a counter stays
    assert value(found, "idm_backup_in_progress", schedule="") == 0
    assert value(found, "idm_backup_duration_seconds_count", schedule="") == 0


def full_state() -> BackupMetrics:
    """Every kind of series the operator exports, each at least once."""
    metrics = BackupMetrics()
    metrics.seed([], [schedule()])
    metrics.observe_backup(backup("a", "Running"))
    metrics.observe_backup(backup("a", "Succeeded", completed=T1, size=10, duration=60))
    metrics.observe_backup(backup("b", "Running"))
    metrics.observe_backup(backup("b", "Failed", completed=T2, duration=5))
    metrics.observe_storage("s-1", ("nightly", NS), "s3://idm-backups/prod", available=True, checked=ts(T2))
    return metrics


def test_process_gc_platform_and_build_info_series_are_exported() -> None:
    found = samples(full_state())
    exported = names(found)
    # prometheus-client's process, platform and garbage-collector collectors, as the default registry has.
    assert {
        "process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
        "process_open_fds", "python_info", "python_gc_collections_total", "python_gc_objects_collected_total",
    } <= exported  # fmt: skip
    assert [(labels, v) for (name, labels), v in found.items() if name == "idm_backup_build_info"] == [
        (
            tuple(
                sorted(
                    {
                        "version": __version__,
                        "python": python_platform.python_version(),
                        "kopf": importlib.metadata.version("kopf"),
                    }.items()
                )
            ),
            1.0,
        )
    ]
    assert found[("process_start_time_seconds", ())] > ts(T1)


def test_unix_timestamps_end_in_timestamp_seconds_and_the_old_names_are_gone() -> None:
    families = list(text_string_to_metric_families(full_state().exposition().decode()))
    ours = {f.name: f for f in families if f.name.startswith("idm_backup_")}
    timestamps = {name for name, family in ours.items() if "Unix seconds" in family.documentation}
    assert timestamps == {
        "idm_backup_last_successful_timestamp_seconds",
        "idm_backup_last_failure_timestamp_seconds",
        "idm_backup_schedule_next_run_timestamp_seconds",
        "idm_backup_storage_last_check_timestamp_seconds",
        "idm_backup_last_services_check_timestamp_seconds",
        "idm_backup_drill_last_successful_timestamp_seconds",
        "idm_backup_drill_last_failure_timestamp_seconds",
    }
    assert {name for name in ours if "timestamp" in name} == timestamps
    exported = names(samples(full_state()))
    for old in (
        "idm_backup_last_successful_timestamp",
        "idm_backup_last_failure_timestamp",
        "idm_backup_schedule_next_run_timestamp",
    ):
        assert old not in exported


def test_counters_and_histogram_keep_their_exposition_without_created_samples() -> None:
    text = full_state().exposition().decode()
    for counter in ("idm_backup_attempt_total", "idm_backup_success_total", "idm_backup_failure_total"):
        assert f"# TYPE {counter} counter" in text
    assert "# TYPE idm_backup_duration_seconds histogram" in text
    assert "_created" not in "".join(line for line in text.splitlines() if line.startswith("idm_backup_"))
    found = parse(text)
    assert value(found, "idm_backup_attempt_total") == 2
    assert value(found, "idm_backup_failure_total") == 1
    assert value(found, "idm_backup_duration_seconds_bucket", le="10.0") == 1
    assert value(found, "idm_backup_duration_seconds_bucket", le="+Inf") == 2
    assert value(found, "idm_backup_duration_seconds_sum") == 65


def test_storage_check_series_follow_the_last_check_and_go_with_the_schedule() -> None:
    metrics = BackupMetrics()
    metrics.seed([], [schedule(), schedule("other", "s-2")])
    metrics.observe_storage("s-1", ("nightly", NS), "s3://idm-backups/prod", available=True, checked=100.0)
    found = samples(metrics)
    where = {"location": "s3://idm-backups/prod"}
    assert value(found, "idm_backup_storage_available", **where) == 1
    assert value(found, "idm_backup_storage_last_check_timestamp_seconds", **where) == 100.0
    metrics.observe_storage("s-1", ("nightly", NS), "s3://idm-backups/prod", available=False, checked=400.0)
    assert value(samples(metrics), "idm_backup_storage_available", **where) == 0
    # The template now names another bucket: one series per schedule, the old location's goes.
    metrics.observe_storage("s-1", ("nightly", NS), "s3://elsewhere", available=True, checked=700.0)
    metrics.observe_storage("s-2", ("other", NS), "pvc://backups/idm", available=True, checked=700.0)
    found = samples(metrics)
    storage = {dict(labels)["location"]: v for (n, labels), v in found.items() if n.endswith("_available")}
    assert storage == {"s3://elsewhere": 1, "pvc://backups/idm": 1}
    assert value(found, "idm_backup_storage_available", "other", location="pvc://backups/idm") == 1
    metrics.forget_storage("s-2")  # suspended: not checked, no series
    metrics.forget_schedule(schedule())
    # A check that ends after its schedule was deleted brings nothing back.
    metrics.observe_storage("s-1", ("nightly", NS), "s3://elsewhere", available=False, checked=900.0)
    found = samples(metrics)
    assert not {name for name, _ in found if name.startswith("idm_backup_storage_")}


def test_the_endpoint_serves_the_exposition_on_loopback() -> None:
    metrics = BackupMetrics()
    metrics.seed([], [schedule()])
    server = MetricsServer(metrics, MetricsConfig(port=0, address="127.0.0.1"))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
            found = parse(response.read().decode())
    finally:
        server.stop()
    assert value(found, "idm_backup_schedules", schedule=None) == 1


# -- on the platform -------------------------------------------------------------------------------------


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def try_scrape(port: int) -> Samples | None:
    try:
        return scrape(port)
    except OSError:
        return None


@pytest.fixture
def metrics_operator(
    platform: stack.Platform, crds: None, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[OperatorProcess, int]]:
    port = processes.free_port()
    # OperatorProcess passes its environment on: the operator reads its metrics settings from there.
    monkeypatch.setenv("IDM_BACKUP_METRICS_PORT", str(port))
    monkeypatch.setenv("IDM_BACKUP_METRICS_ADDRESS", "127.0.0.1")
    (tmp_path / "pvc").mkdir()
    proc = OperatorProcess(namespace, platform.kubeconfig, tmp_path / "pvc", tmp_path / "operator.log")
    proc.start()
    yield proc, port
    proc.stop()


@pytest.mark.platform
def test_operator_metrics_survive_a_restart_and_follow_schedules(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    metrics_operator: tuple[OperatorProcess, int],
    secrets: None,
) -> None:
    operator, port = metrics_operator
    freeipa()
    storage = s3_storage(platform, f"test/{namespace}")
    create_backup(api, namespace, "good", backup_spec(platform, storage, type="Data", online=True))
    create_backup(
        api, namespace, "bad", backup_spec(platform, storage, type="Data", target={"podName": "nope"})
    )
    good = wait_finished(api, namespace, "good", operator)
    bad = wait_finished(api, namespace, "bad", operator)
    assert good["status"]["phase"] == "Succeeded" and bad["status"]["phase"] == "Failed"
    custom = client.CustomObjectsApi(api)
    create_schedule(
        api,
        namespace,
        "nightly",
        {"schedule": "0 2 * * *", "template": {"spec": backup_spec(platform, storage, type="Data")}},
    )

    def settled() -> Samples | None:
        found = try_scrape(port)
        if found is None:
            return None
        next_run_key = (
            "idm_backup_schedule_next_run_timestamp_seconds",
            (("namespace", namespace), ("schedule", "nightly")),
        )
        failures_key = ("idm_backup_failure_total", (("namespace", namespace), ("schedule", "")))
        return found if next_run_key in found and found.get(failures_key) == 1 else None

    found = wait_for("metrics of both backups and the schedule", settled, timeout=60)
    completed = {name: ts(obj["status"]["completionTime"]) for name, obj in (("good", good), ("bad", bad))}
    assert value(found, "idm_backup_attempt_total", "", namespace) == 2
    assert value(found, "idm_backup_success_total", "", namespace) == 1
    assert value(found, "idm_backup_last_successful_timestamp_seconds", "", namespace) == completed["good"]
    assert value(found, "idm_backup_last_failure_timestamp_seconds", "", namespace) == completed["bad"]
    # Timestamps have 1 s resolution: ties are broken by creation time, then name, the same way after a
    # restart as before it.
    order = {
        name: (completed[name], obj["metadata"]["creationTimestamp"], name)
        for name, obj in (("good", good), ("bad", bad))
    }
    assert value(found, "idm_backup_last_status", "", namespace) == (1 if order["good"] > order["bad"] else 0)
    assert (
        value(found, "idm_backup_archive_size_bytes", "", namespace) == good["status"]["archive"]["sizeBytes"]
    )
    assert value(found, "idm_backup_in_progress", "", namespace) == 0
    assert value(found, "idm_backup_duration_seconds_count", "", namespace) >= 1
    assert value(found, "idm_backup_schedules", None, namespace) == 1
    next_run = custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "idmbackupschedules", "nightly"
    )["status"]["nextScheduleTime"]
    assert value(found, "idm_backup_schedule_next_run_timestamp_seconds", "nightly", namespace) == ts(
        next_run
    )

    # The real process serves the standard series and its build, besides the backups'.
    assert {"process_start_time_seconds", "process_cpu_seconds_total", "python_info"} <= names(found)
    assert [v for (name, _), v in found.items() if name == "idm_backup_build_info"] == [1.0]

    def gauges(samples: Samples) -> Samples:
        # The gauges computed from the resources; not the process's own series, nor the storage check's
        # (a check's time, which a restart repeats: tests/test_storagecheck.py).
        return {
            k: v
            for k, v in samples.items()
            if k[0].startswith("idm_backup_")
            and not k[0].startswith("idm_backup_storage_")
            and not k[0].endswith(("_total", "_count", "_sum", "_bucket"))
        }

    operator.stop()
    operator.start()
    restarted = wait_for("metrics after the restart", lambda: try_scrape(port), timeout=60)
    assert gauges(restarted) == gauges(found)
    # Counters restart from zero (a counter reset, as Prometheus expects), never from a recount.
    assert value(restarted, "idm_backup_success_total", "", namespace) == 0

    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "idmbackupschedules", "nightly")

    def schedule_gone() -> bool:
        found = scrape(port)
        return not any(("schedule", "nightly") in labels for _, labels in found) and not any(
            name == "idm_backup_schedules" and ("namespace", namespace) in labels for name, labels in found
        )

    wait_for("the deleted schedule's series to go", schedule_gone, timeout=60)


def test_services_running_follows_the_newest_backup_that_checked_them() -> None:
    """From the ServicesRunning condition of the newest finished backup that set one: an online backup,
    which never stops IPA and sets none, does not hide an earlier one that found IPA down."""
    down = {"type": "ServicesRunning", "status": "False", "reason": "ServicesDown"}
    up = {"type": "ServicesRunning", "status": "True", "reason": "StartedByIpaBackup"}
    metrics = BackupMetrics()
    metrics.seed([backup("a", "Failed", completed=T1)], [schedule()])
    assert "idm_backup_last_services_running" not in names(samples(metrics))  # no backup checked them
    down_backup = backup("b", "Failed", completed=T1)
    down_backup["status"]["conditions"] = [down]
    metrics.observe_backup(down_backup)
    metrics.observe_backup(backup("c", "Succeeded", completed=T2))  # online: no condition
    found = samples(metrics)
    assert value(found, "idm_backup_last_services_running") == 0
    assert value(found, "idm_backup_last_services_check_timestamp_seconds") == ts(T1)
    up_backup = backup("d", "Succeeded", completed=T2)
    up_backup["status"]["conditions"] = [up]
    metrics.observe_backup(up_backup)
    found = samples(metrics)
    assert value(found, "idm_backup_last_services_running") == 1
    assert value(found, "idm_backup_last_services_check_timestamp_seconds") == ts(T2)


# -- restore drills: from the schedule's status ------------------------------------------------------------


def drilled_schedule(**status: Any) -> dict[str, Any]:
    body = schedule()
    body["spec"] = {"drill": {"schedule": "0 6 * * 0"}}
    body["status"].update(status)
    return body


def test_drill_gauges_follow_the_schedules_status_and_exist_only_with_drills() -> None:
    metrics = BackupMetrics()
    metrics.seed([], [schedule("plain", uid="s-0"), drilled_schedule()])
    found = samples(metrics)
    # Before the first drill: only the failure count, 0; a schedule without drills has none at all.
    assert value(found, "idm_backup_drill_consecutive_failures") == 0
    assert {k for k in found if k[0].startswith("idm_backup_drill_")} == {
        ("idm_backup_drill_consecutive_failures", (("namespace", NS), ("schedule", "nightly")))
    }

    ok = {"name": "d-1", "time": T1, "result": "Succeeded", "restoreSeconds": 42.5, "entries": 120}
    metrics.observe_schedule(
        drilled_schedule(lastDrill=ok, lastSuccessfulDrill=ok, consecutiveDrillFailures=0)
    )
    found = samples(metrics)
    assert value(found, "idm_backup_drill_last_successful_timestamp_seconds") == ts(T1)
    assert value(found, "idm_backup_drill_last_status") == 1
    assert value(found, "idm_backup_drill_last_duration_seconds") == 42.5
    assert (
        "idm_backup_drill_last_failure_timestamp_seconds",
        (("namespace", NS), ("schedule", "nightly")),
    ) not in found

    bad = {"name": "d-2", "time": T2, "result": "Failed", "reason": "EntryCountMismatch"}
    metrics.observe_schedule(
        drilled_schedule(
            lastDrill=bad, lastSuccessfulDrill=ok, lastFailedDrill=bad, consecutiveDrillFailures=2
        )
    )
    found = samples(metrics)
    assert value(found, "idm_backup_drill_last_status") == 0
    assert value(found, "idm_backup_drill_last_failure_timestamp_seconds") == ts(T2)
    # The last successful drill's time and restore time stay: they come from lastSuccessfulDrill.
    assert value(found, "idm_backup_drill_last_successful_timestamp_seconds") == ts(T1)
    assert value(found, "idm_backup_drill_last_duration_seconds") == 42.5
    assert value(found, "idm_backup_drill_consecutive_failures") == 2

    # Drills removed from the spec: their series go; a deleted schedule takes everything with it.
    metrics.observe_schedule(schedule())
    assert not {k for k in samples(metrics) if k[0].startswith("idm_backup_drill_")}
    metrics.observe_schedule(drilled_schedule(lastDrill=bad, lastFailedDrill=bad))
    metrics.forget_schedule(drilled_schedule())
    assert not {k for k in samples(metrics) if k[0].startswith("idm_backup_drill_")}
