"""The periodic storage check (idmbackupschedule/storagecheck.py, handlers/storagecheck.py).

Pure tests of the checks' bookkeeping (shared probes, Events only on changes, bounds) with a store that
answers as told; a PVC checked for real; and the real operator against the platform's S3, reached through
testbed.faultproxy so that the same location can be made unreachable and reachable again, then a bucket
that does not exist: the metric, its timestamp and the schedule's Events follow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from idm_backup_operator.api.spec import PvcStorage, S3Storage
from idm_backup_operator.idmbackupschedule import storagecheck
from idm_backup_operator.idmbackupschedule.storagecheck import CheckConfig, StorageChecks
from idm_backup_operator.kube.services import Services
from idm_backup_operator.storage import DeadlineExceeded, StorageError
from testbed import processes, stack
from testbed.deploy import OperatorProcess
from testbed.faultproxy import Fault, FaultProxy
from tests.helpers import GROUP, SCHEDULES, VERSION, backup_spec, create_schedule, s3_storage, wait_for

NS = "identity"


def template(storage: dict[str, Any]) -> dict[str, Any]:
    return {
        "target": {"podName": "ipa", "ldap": {"url": "ldap://ipa", "passwordSecretRef": {"name": "dm"}}},
        "storage": storage,
    }


S3 = {"s3": {"bucket": "idm-backups", "prefix": "/prod/", "credentialsSecretRef": {"name": "s3"}}}
PVC = {"pvc": {"claimName": "backups", "subPath": "idm"}}


def schedule(
    name: str = "nightly",
    uid: str = "s-1",
    storage: dict[str, Any] | None = None,
    namespace: str = NS,
    **spec: Any,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {"schedule": "0 2 * * *", "template": {"spec": template(storage or S3)}, **spec},
    }


class FakeStore:
    def __init__(self, outcome: Exception | None) -> None:
        self.outcome = outcome
        self.deadline: float | None = None
        self.listed: list[str] = []

    def set_deadline(self, deadline: float | None) -> None:
        self.deadline = deadline

    def list_objects(self, prefix: str = "") -> Iterator[Any]:
        self.listed.append(prefix)
        if self.outcome is not None:
            raise self.outcome
        return iter(())


@dataclasses.dataclass
class FakeServices:
    """Services whose store answers as told: None (it answers), or the exception to raise."""

    outcome: Exception | None = None
    stores: list[tuple[str, Any, FakeStore]] = dataclasses.field(default_factory=list)

    @contextlib.contextmanager
    def opened_store(self, namespace: str, storage: Any) -> Iterator[FakeStore]:
        store = FakeStore(self.outcome)
        self.stores.append((namespace, storage, store))
        yield store


@dataclasses.dataclass
class Events:
    posted: list[tuple[str, str, bool]] = dataclasses.field(default_factory=list)

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.posted.append((reason, message, warning))

    def update(self, **status: Any) -> None:
        raise AssertionError("a storage check writes no status")

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        raise AssertionError("a storage check writes no condition")

    def cancelled(self) -> bool:
        return False


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def checks(interval: float = 300, timeout: float = 30) -> tuple[StorageChecks, Clock]:
    clock = Clock()
    return StorageChecks(
        CheckConfig(interval, timeout), wall_clock=lambda: 1.7e9 + clock.now, monotonic=clock
    ), clock


# -- settings and names --------------------------------------------------------------------------------


def test_settings_come_from_the_environment_and_bad_values_fall_back() -> None:
    assert CheckConfig.from_env({}) == CheckConfig(300, 30)
    config = CheckConfig.from_env({storagecheck.INTERVAL_ENV: "2.5", storagecheck.TIMEOUT_ENV: "5"})
    assert config == CheckConfig(2.5, 5) and config.enabled
    assert not CheckConfig.from_env({storagecheck.INTERVAL_ENV: "0"}).enabled
    for bad in ("five", "-1", "nan", "inf"):
        assert (
            CheckConfig.from_env({storagecheck.INTERVAL_ENV: bad, storagecheck.TIMEOUT_ENV: bad})
            == CheckConfig()
        )
    assert CheckConfig.from_env({storagecheck.TIMEOUT_ENV: "0"}).timeout == 30  # a probe needs some time


def test_a_location_is_named_by_bucket_and_prefix_or_claim_and_sub_path() -> None:
    s3 = storagecheck.storage_of(schedule())
    assert isinstance(s3, S3Storage) and storagecheck.location(s3) == "s3://idm-backups/prod"
    pvc = storagecheck.storage_of(schedule(storage=PVC))
    assert isinstance(pvc, PvcStorage) and storagecheck.location(pvc) == "pvc://backups/idm"
    bare = storagecheck.storage_of(schedule(storage={"pvc": {"claimName": "backups"}}))
    assert bare is not None and storagecheck.location(bare) == "pvc://backups"
    # Not checked: a suspended schedule, a template without storage.
    assert storagecheck.storage_of(schedule(suspend=True)) is None
    assert storagecheck.storage_of({"metadata": {}, "spec": {"template": {"spec": {"storage": {}}}}}) is None


def test_first_checks_are_spread_over_at_most_a_minute_the_same_way_every_time() -> None:
    delays = [storagecheck.first_delay(f"uid-{n}", 300) for n in range(500)]
    assert all(0 <= d < 60 for d in delays) and len(set(delays)) > 300  # 1000 steps of 60 ms
    assert max(delays) > 50 and min(delays) < 10  # spread over the minute, not bunched
    assert storagecheck.first_delay("uid-7", 300) == delays[7]  # the same after a restart
    assert all(0 <= storagecheck.first_delay(f"uid-{n}", 1) < 1 for n in range(50))  # a short interval


# -- the checks' bookkeeping ---------------------------------------------------------------------------


def test_schedules_of_one_location_share_a_probe_within_half_an_interval() -> None:
    state, clock = checks(interval=300)
    services = FakeServices()
    events = Events()
    first = state.check(services, schedule("a", "u-a"), events)
    second = state.check(services, schedule("b", "u-b"), events)
    assert first is not None and first.available and first == second
    assert first.location == "s3://idm-backups/prod" and first.checked == 1.7e9 + 1000
    assert len(services.stores) == 1
    # Read-only and bounded: one listing under the probe prefix, with a deadline `timeout` from now.
    (_, _, store) = services.stores[0]
    # (The store's deadline is in time.monotonic(), the clock the store keeps it by.)
    assert store.listed == [storagecheck.PROBE_PREFIX] and store.deadline is not None
    assert 25 < store.deadline - time.monotonic() <= 30
    # Another namespace has its own credentials: its own probe.
    state.check(services, schedule("c", "u-c", namespace="other"), events)
    assert [ns for ns, _, _ in services.stores] == [NS, "other"]
    clock.now += 151
    state.check(services, schedule("b", "u-b"), events)
    assert len(services.stores) == 3
    assert events.posted == []  # available from the start: nothing to say


def test_events_only_when_availability_changes() -> None:
    state, clock = checks(interval=10)
    services = FakeServices()
    events = Events()

    def check() -> storagecheck.Result | None:
        clock.now += 10
        return state.check(services, schedule(), events)

    check()
    services.outcome = StorageError(
        "cannot list s3://idm-backups/prod/x: bucket 'idm-backups' does not exist"
    )
    result = check()
    assert result is not None and not result.available
    assert result.message.startswith("s3://idm-backups/prod is unavailable: cannot list")
    check()
    check()
    services.outcome = None
    assert (result := check()) is not None and result.available
    check()
    assert [(reason, warning) for reason, _, warning in events.posted] == [
        ("StorageUnavailable", True),
        ("StorageAvailable", False),
    ]
    assert "does not exist" in events.posted[0][1]
    assert events.posted[1][1] == "s3://idm-backups/prod is available again"
    # Unavailable at the very first check (a new schedule, or after a restart): said at once.
    fresh = Events()
    services.outcome = StorageError("refused")
    clock.now += 10
    state.check(services, schedule("new", "u-new"), fresh)
    assert [reason for reason, _, _ in fresh.posted] == ["StorageUnavailable"]


def test_a_probe_cut_off_at_its_deadline_says_so() -> None:
    state, _ = checks(timeout=5)
    services = FakeServices(
        DeadlineExceeded("cannot list ...: it did not finish before the backup's deadline")
    )
    result = state.check(services, schedule(), Events())
    assert result is not None and not result.available
    assert result.message == "s3://idm-backups/prod did not answer within 5 s"


def test_a_check_that_cannot_run_keeps_the_last_result_and_says_nothing() -> None:
    state, clock = checks(interval=10)
    services = FakeServices()
    events = Events()
    before = state.check(services, schedule(), events)
    services.outcome = RuntimeError("the API server went away")  # not the storage's fault
    clock.now += 10
    assert state.check(services, schedule(), events) == before
    assert events.posted == []


def test_suspended_schedules_are_not_checked_and_start_afresh() -> None:
    state, clock = checks(interval=10)
    services = FakeServices(StorageError("refused"))
    events = Events()
    state.check(services, schedule(), events)
    assert state.check(services, schedule(suspend=True), events) is None
    clock.now += 10
    state.check(services, schedule(), events)
    # Resumed while still unavailable: said again, as for a new schedule.
    assert [reason for reason, _, _ in events.posted] == ["StorageUnavailable", "StorageUnavailable"]
    assert len(services.stores) == 2


def test_a_pvc_is_checked_for_real_without_writing_to_it(tmp_path: Path) -> None:
    services = Services(core=None, coordination=None, execs=None, pvc_root=tmp_path)
    volume = tmp_path / "backups"
    (volume / "idm" / NS).mkdir(parents=True)
    (volume / "idm" / NS / "kept.txt").write_text("a backup")
    before = sorted(str(p) for p in volume.rglob("*"))
    state, _ = checks()
    result = state.check(services, schedule(storage=PVC), Events())
    assert result is not None and result.available, result
    assert sorted(str(p) for p in volume.rglob("*")) == before
    events = Events()
    result = state.check(services, schedule("lost", "u-lost", {"pvc": {"claimName": "gone"}}), events)
    assert result is not None and not result.available
    assert "PVC gone is not mounted in the operator" in result.message
    assert [(reason, warning) for reason, _, warning in events.posted] == [("StorageUnavailable", True)]


# -- the real operator, the platform's S3 ----------------------------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def storage_series(port: int, name: str, namespace: str) -> dict[str, float] | None:
    """location -> value of the schedule `nightly`'s storage series `name`; None if no scrape answered."""
    found = scrape(port)
    if found is None:
        return None
    return {
        dict(labels)["location"]: v
        for (series, labels), v in found.items()
        if series == name
        and dict(labels).get("namespace") == namespace
        and dict(labels)["schedule"] == "nightly"
    }


def schedule_events(api: client.ApiClient, namespace: str) -> list[Any]:
    items = (
        client.CoreV1Api(api)
        .list_namespaced_event(
            namespace, field_selector="involvedObject.name=nightly,involvedObject.kind=IdmBackupSchedule"
        )
        .items
    )
    return sorted(
        (e for e in items if e.reason in ("StorageUnavailable", "StorageAvailable")),
        key=lambda e: int(e.metadata.resource_version),
    )


@pytest.fixture
def proxy(platform: stack.Platform) -> Iterator[FaultProxy]:
    with FaultProxy(platform.s3_endpoint, lifetime=900) as running:
        yield running


@pytest.fixture
def checking_operator(
    platform: stack.Platform,
    crds: None,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[OperatorProcess, int]]:
    port = processes.free_port()
    # OperatorProcess passes its environment on: a check every second, each bounded by 5 s.
    monkeypatch.setenv("IDM_BACKUP_METRICS_PORT", str(port))
    monkeypatch.setenv("IDM_BACKUP_METRICS_ADDRESS", "127.0.0.1")
    monkeypatch.setenv(storagecheck.INTERVAL_ENV, "1")
    monkeypatch.setenv(storagecheck.TIMEOUT_ENV, "5")
    (tmp_path / "pvc").mkdir()
    proc = OperatorProcess(namespace, platform.kubeconfig, tmp_path / "pvc", tmp_path / "operator.log")
    proc.start()
    yield proc, port
    proc.stop()
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        print(f"--- operator log (last 6000 characters) ---\n{proc.output()[-6000:]}")


def test_the_operator_checks_a_schedules_storage_and_says_when_it_turns_unavailable(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    secrets: None,
    proxy: FaultProxy,
    checking_operator: tuple[OperatorProcess, int],
) -> None:
    _, port = checking_operator
    storage = s3_storage(platform, f"test/{namespace}")
    storage["s3"]["endpoint"] = proxy.url  # the platform's S3, through a proxy that can refuse it
    where = f"s3://{platform.s3_bucket}/test/{namespace}"
    spec = {"schedule": "0 2 * * *", "template": {"spec": backup_spec(platform, storage, type="Data")}}
    create_schedule(api, namespace, "nightly", spec)

    def available() -> dict[str, float] | None:
        return storage_series(port, "idm_backup_storage_available", namespace)

    def last_check() -> float:
        return (storage_series(port, "idm_backup_storage_last_check_timestamp_seconds", namespace) or {}).get(
            where, 0.0
        )

    wait_for("the storage to be found available", lambda: available() == {where: 1}, timeout=60)
    first_check = last_check()
    assert abs(first_check - time.time()) < 60
    # Checked again and again, every second here.
    wait_for("a later check", lambda: last_check() > first_check, timeout=30)
    assert schedule_events(api, namespace) == []
    accepted = proxy.accepted
    assert accepted >= 2  # each check reaches the S3 server

    # The S3 server becomes unreachable: every connection is reset.
    proxy.set_fault(Fault("refuse"))
    wait_for("the storage to be found unavailable", lambda: available() == {where: 0}, timeout=60)
    (warning,) = wait_for("the Warning Event", lambda: schedule_events(api, namespace), timeout=30)
    assert warning.type == "Warning" and warning.reason == "StorageUnavailable"
    assert warning.message.startswith(f"{where} ")
    assert warning.source.component == "idm-backup-operator"
    assert warning.involved_object.kind == "IdmBackupSchedule"

    proxy.set_fault(Fault("pass"))
    wait_for("the storage to be available again", lambda: available() == {where: 1}, timeout=60)
    events = wait_for(
        "the Normal Event", lambda: (e := schedule_events(api, namespace)) and len(e) == 2 and e
    )
    assert [(e.type, e.reason) for e in events] == [
        ("Warning", "StorageUnavailable"),
        ("Normal", "StorageAvailable"),
    ]
    assert events[1].message == f"{where} is available again"

    # The template now names a bucket that does not exist: the new location is checked, the old goes.
    custom = client.CustomObjectsApi(api)
    missing = f"no-such-bucket-{namespace}"
    patch = {"spec": {"template": {"spec": {"storage": {"s3": {"bucket": missing}}}}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, SCHEDULES, "nightly", patch)
    gone = f"s3://{missing}/test/{namespace}"
    wait_for("the missing bucket to be found unavailable", lambda: available() == {gone: 0}, timeout=60)
    events = wait_for(
        "a second Warning", lambda: (e := schedule_events(api, namespace)) and len(e) == 3 and e
    )
    assert events[2].type == "Warning" and events[2].reason == "StorageUnavailable"
    assert f"bucket '{missing}' does not exist" in events[2].message

    # Deleted: its series go with it.
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, SCHEDULES, "nightly")
    wait_for("the deleted schedule's storage series to go", lambda: available() == {}, timeout=60)
