"""The Argo CD health checks of docs/install.md, run as Argo CD runs them, on objects of the real operator.

testbed/argocd-lua runs a script in Argo CD's Lua environment: its gopher-lua, its libraries, the global
`obj`, and its reading of the returned table (see that program's comment). The scripts are taken from the
argocd-cm example in the documentation as it stands, and the objects are the platform API server's, as the
operator left them at each stage; only "no status yet" is an object as it was created.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from testbed import stack
from testbed.deploy import REPO, OperatorProcess
from tests.helpers import (
    GROUP,
    PLURAL,
    SCHEDULES,
    VERSION,
    backup_spec,
    create_schedule,
    get_backup,
    pod_exec,
    s3_storage,
    wait_finished,
    wait_for,
)

KEY = "resource.customizations.health.idm-backup.io_{kind}"
KINDS = ("IdmBackup", "IdmBackupSchedule")
Health = Callable[[dict[str, Any]], dict[str, str] | None]


def documented_health_checks() -> dict[str, str]:
    """The scripts of the YAML block in docs/install.md that is the argocd-cm ConfigMap, by kind."""
    text = (REPO / "docs" / "install.md").read_text()
    blocks = re.findall(r"^```ya?ml\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    configmaps = [
        doc
        for block in blocks
        if "argocd-cm" in block
        for doc in yaml.safe_load_all(block)
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "argocd-cm"
    ]
    assert len(configmaps) == 1, "docs/install.md must show argocd-cm exactly once"
    data = configmaps[0]["data"]
    return {kind: data[KEY.format(kind=kind)] for kind in KINDS}


@pytest.fixture(scope="session")
def argocd_lua() -> Path:
    """testbed/argocd-lua, built by testbed/build.sh (a no-op once cached)."""
    path = stack.own_binary("argocd-lua")
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("argocd-cm")
    paths = {}
    for kind, script in documented_health_checks().items():
        paths[kind] = directory / f"{kind}.lua"
        paths[kind].write_text(script)
    return paths


def evaluate(runner: Path, script: Path, obj: dict[str, Any]) -> dict[str, str] | None:
    """The health Argo CD gives `obj` with `script`; a Lua error (Unknown in Argo CD) fails the test."""
    proc = subprocess.run(
        [str(runner), str(script), "-"], input=json.dumps(obj), capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"the health check failed on {json.dumps(obj)[:2000]}:\n{proc.stderr}"
    result: dict[str, str] | None = json.loads(proc.stdout)
    return result


@pytest.fixture
def backup_health(argocd_lua: Path, scripts: dict[str, Path]) -> Health:
    return lambda obj: evaluate(argocd_lua, scripts["IdmBackup"], obj)


@pytest.fixture
def schedule_health(argocd_lua: Path, scripts: dict[str, Path]) -> Health:
    return lambda obj: evaluate(argocd_lua, scripts["IdmBackupSchedule"], obj)


def test_the_runner_gives_a_script_argo_cds_environment(argocd_lua: Path, tmp_path: Path) -> None:
    """What a script in argocd-cm can use, and how Argo CD reads what it returns."""

    def run(script: str, obj: dict[str, Any], *flags: str) -> tuple[int, str]:
        path = tmp_path / "check.lua"
        path.write_text(script)
        proc = subprocess.run(
            [str(argocd_lua), *flags, str(path), "-"],
            input=json.dumps(obj),
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.returncode, (proc.stdout if proc.returncode == 0 else proc.stderr).strip()

    obj = {"spec": {"n": 3, "f": 1.5, "on": True, "list": ["a", "b"]}, "status": {"message": ""}}
    libs = 'return {status = "Healthy", message = type(string) .. " " .. type(os) .. " " .. type(math)}'
    assert run(libs, obj) == (0, '{"status":"Healthy","message":"nil nil nil"}')
    assert run(libs, obj, "-use-open-libs") == (0, '{"status":"Healthy","message":"table table table"}')
    # Argo CD's safe os library is reached through require only.
    os_time = 'return {status = "Healthy", message = type(require("os").time())}'
    assert run(os_time, obj) == (0, '{"status":"Healthy","message":"number"}')
    values = (
        'return {status = "Healthy", message = obj.spec.n + obj.spec.f .. " " .. tostring(obj.spec.on)'
        ' .. " " .. #obj.spec.list .. obj.spec.list[2]}'
    )
    assert run(values, obj) == (0, '{"status":"Healthy","message":"4.5 true 2b"}')
    # An empty string is true in Lua: `or` does not fall back, and Argo CD then shows no message.
    assert run('return {status = "Progressing", message = obj.status.message or "x"}', obj) == (
        0,
        '{"status":"Progressing"}',
    )
    assert run('return {status = "Fine"}', obj) == (
        0,
        '{"status":"Unknown","message":"Lua returned an invalid health status"}',
    )
    assert run("return nil", obj) == (0, "null")
    assert run("return {}", obj) == (0, "{}")
    code, err = run("return obj.status.nothing.here", obj)
    assert code == 1 and "attempt to index a non-table object(nil) with key 'here'" in err
    code, err = run('return ("x"):upper()', obj)  # no string library, so no string methods
    assert code == 1 and "with key 'upper'" in err
    code, err = run("while true do end", obj)
    assert code == 1 and "context deadline exceeded" in err


def test_both_documented_scripts_compile_and_handle_an_empty_object(
    backup_health: Health, schedule_health: Health
) -> None:
    waiting = {"status": "Progressing", "message": "waiting for the operator"}
    assert backup_health({}) == waiting
    assert schedule_health({"spec": {}}) == waiting


def get_schedule(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, SCHEDULES, name
    )
    return obj


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def test_idmbackup_health_through_pending_running_waiting_failed_and_succeeded(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    backup_health: Health,
) -> None:
    # ipa-backup hangs until killed: each backup can be looked at while it runs, or waits for the lock.
    pod = freeipa(fault="hang")
    custom = client.CustomObjectsApi(api)
    storage = s3_storage(platform, f"test/{namespace}")
    spec = backup_spec(platform, storage, type="Data", online=True)

    def create(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "IdmBackup", "metadata": {"name": name}}
        created: dict[str, Any] = custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, {**body, "spec": spec}
        )
        return created

    def running_ipa_backup(name: str) -> dict[str, Any] | None:
        obj = get_backup(api, namespace, name)
        status = obj.get("status") or {}
        return (
            obj
            if status.get("phase") == "Running" and status.get("step", "").startswith("ipa-backup:")
            else None
        )

    def kill_ipa_backup() -> None:
        # The step names ipa-backup just before it is started.
        wait_for(
            "ipa-backup to be killed",
            lambda: pod_exec(api, namespace, pod, ["pkill", "-x", "ipa-backup"])[0] == 0,
        )

    # Nothing to back up: fails in pre-flight.
    create("nopod", backup_spec(platform, storage, target={"podName": "no-such-pod"}))
    # As the API server returns it on create: the status subresource is empty until the operator writes it.
    first = create("first", spec)
    assert "status" not in first
    assert backup_health(first) == {"status": "Progressing", "message": "waiting for the operator"}

    first = wait_for("first to run ipa-backup", lambda: running_ipa_backup("first"), timeout=60)
    assert backup_health(first) == {"status": "Progressing", "message": first["status"]["step"]}

    create("second", spec)

    def waiting() -> dict[str, Any] | None:
        obj = get_backup(api, namespace, "second")
        waits = condition(obj, "Waiting")
        return obj if waits is not None and waits["status"] == "True" else None

    second = wait_for("second to wait for the server's lock", waiting, timeout=60)
    waits = condition(second, "Waiting")
    assert waits is not None and "first" in waits["message"]
    assert backup_health(second) == {"status": "Progressing", "message": f"waiting: {waits['message']}"}

    nopod = wait_finished(api, namespace, "nopod", operator)
    assert nopod["status"]["phase"] == "Failed" and nopod["status"]["reason"] == "TargetUnavailable"
    assert "no-such-pod" in nopod["status"]["message"]
    assert backup_health(nopod) == {
        "status": "Degraded",
        "message": f"TargetUnavailable: {nopod['status']['message']}",
    }

    kill_ipa_backup()
    first = wait_finished(api, namespace, "first", operator)
    status = first["status"]
    assert status["phase"] == "Failed" and status["reason"] == "IpaBackupFailed", status
    assert backup_health(first) == {"status": "Degraded", "message": f"IpaBackupFailed: {status['message']}"}

    # The second now holds the lock and runs: its health is what it does now, not the wait it is past.
    second = wait_for("second to run ipa-backup", lambda: running_ipa_backup("second"), timeout=60)
    waits = condition(second, "Waiting")
    assert waits is not None and waits["status"] == "False"
    assert backup_health(second) == {"status": "Progressing", "message": second["status"]["step"]}

    code, out = pod_exec(api, namespace, pod, ["sh", "-c", ": > /data/ipa-standin-fault"])  # no more hangs
    assert code == 0, out
    kill_ipa_backup()
    assert wait_finished(api, namespace, "second", operator)["status"]["phase"] == "Failed"
    create("third", spec)
    third = wait_finished(api, namespace, "third", operator)
    assert third["status"]["phase"] == "Succeeded", third["status"]
    uri = third["status"]["archive"]["uri"]
    assert uri.startswith(f"s3://{platform.s3_bucket}/test/{namespace}/")
    assert backup_health(third) == {"status": "Healthy", "message": uri}


def test_schedule_health_ready_suspended_invalid_and_failing(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    schedule_health: Health,
) -> None:
    freeipa()
    storage = s3_storage(platform, f"test/{namespace}")
    good = backup_spec(platform, storage, type="Data", online=True)
    failing = backup_spec(platform, storage, target={"podName": "no-such-pod"})
    nightly = create_schedule(
        api, namespace, "nightly", {"schedule": "0 3 * * *", "immediate": True, "template": {"spec": good}}
    )
    assert "status" not in nightly
    assert schedule_health(nightly) == {"status": "Progressing", "message": "waiting for the operator"}
    create_schedule(
        api, namespace, "paused", {"schedule": "0 3 * * *", "suspend": True, "template": {"spec": good}}
    )
    # Six fields: the webhook refuses it; without one, the operator reports it.
    create_schedule(api, namespace, "sixfields", {"schedule": "0 0 2 * * *", "template": {"spec": good}})
    create_schedule(
        api, namespace, "failing", {"schedule": "0 3 * * *", "immediate": True, "template": {"spec": failing}}
    )

    def with_condition(name: str, type_: str, status: str) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            obj = get_schedule(api, namespace, name)
            found = condition(obj, type_)
            return obj if found is not None and found["status"] == status else None

        return check

    # Its immediate backup succeeded, and the next is scheduled.
    nightly = wait_for(
        "nightly's first backup to succeed",
        with_condition("nightly", "LastBackupSucceeded", "True"),
        timeout=120,
    )
    ready = condition(nightly, "Ready")
    assert ready is not None and ready["status"] == "True" and ready["message"].startswith("next backup at ")
    assert nightly["status"]["consecutiveFailures"] == 0
    assert schedule_health(nightly) == {"status": "Healthy", "message": ready["message"]}

    paused = wait_for("paused to be evaluated", with_condition("paused", "Ready", "True"), timeout=60)
    assert schedule_health(paused) == {"status": "Suspended", "message": "suspended"}

    invalid = wait_for("sixfields to be refused", with_condition("sixfields", "Ready", "False"), timeout=60)
    ready = condition(invalid, "Ready")
    assert ready is not None and ready["reason"] == "InvalidSchedule" and "6 fields" in ready["message"]
    assert schedule_health(invalid) == {
        "status": "Degraded",
        "message": f"InvalidSchedule: {ready['message']}",
    }

    broken = wait_for(
        "failing's backup to fail", with_condition("failing", "LastBackupSucceeded", "False"), timeout=120
    )
    assert broken["status"]["consecutiveFailures"] == 1
    ready = condition(broken, "Ready")
    assert ready is not None and ready["status"] == "True"  # Degraded by the backup, not the schedule
    assert schedule_health(broken) == {
        "status": "Degraded",
        "message": "last backup failed: 1 failed in a row",
    }
