"""IdmRestore failures that need the real directory server to happen: a backend 389-ds leaves disabled after
a failed import, and a drill's LDAP URL that leads away from its scratch server.

Both restore into a 389-ds of this module's own (tests/test_restore.py's fixtures): the first leaves a
backend broken until its teardown imports it again, which the platform's shared directory must never see.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ldap
import ldap.modlist
import pytest
from kubernetes import client

from idm_backup_operator.freeipa.directory import await_online
from idm_backup_operator.freeipa.topology import LdapConnectionSettings
from testbed import stack
from testbed.deploy import OperatorProcess
from testbed.ldap_server import DirectoryServer
from tests.helpers import condition, events, leases, pod_exec, services_running, set_fault, wait_for
from tests.test_restore import (  # noqa: F401 (fixtures)
    BOB,
    MALLORY,
    POD,
    apply_drill_dm_secret,
    change_after_backup,
    create_restore,
    data_backup,
    directory,
    drill_spec,
    exists,
    get_restore,
    restore_spec,
    run_restore,
    scratch_objects,
    server,
    staged_files,
)

IPACA = "o=ipaca"


def settings(ds: DirectoryServer) -> LdapConnectionSettings:
    return LdapConnectionSettings(ds.uri, ds.bind_dn, ds.password, timeout=5)


def run_task(ds: DirectoryServer, kind: str, backend: str, path: Path) -> None:
    """An export or import task of 389-ds's own (cn=<kind>,cn=tasks,cn=config), as dsctl runs them."""
    conn = ds.connect()
    dn = f"cn={kind}-{backend}-{time.time_ns()},cn={kind},cn=tasks,cn=config"
    try:
        conn.add_s(
            dn,
            ldap.modlist.addModlist(
                {
                    "objectClass": [b"top", b"extensibleObject"],
                    "nsFilename": [str(path).encode()],
                    "nsInstance": [backend.encode()],
                }
            ),
        )
        task = ["nsTaskExitCode", "nsTaskLog"]
        done = wait_for(
            f"389-ds's {kind} task of {backend}",
            lambda: (
                (attrs := conn.search_s(dn, ldap.SCOPE_BASE, attrlist=task)[0][1]).get("nsTaskExitCode")
                and attrs
            ),
            timeout=60,
            interval=0.05,
        )
    finally:
        conn.unbind_s()
    assert done["nsTaskExitCode"] == [b"0"], done.get("nsTaskLog")


@pytest.fixture
def backends_kept(
    directory: DirectoryServer,  # noqa: F811
    server: Callable[..., str],  # noqa: F811
    tmp_path: Path,
) -> Iterator[None]:
    """userRoot and o=ipaca as the test starts with them, each imported back afterwards if it is left
    disabled: only an import that succeeds enables a backend again after a failed one, and the next test's
    directory must work."""
    suffixes = {"userRoot": directory.suffix, "ipaca": IPACA}
    for backend in suffixes:
        run_task(directory, "export", backend, tmp_path / f"{backend}.ldif")
    yield
    for backend, suffix in suffixes.items():
        if not await_online(settings(directory), suffix, 0):
            run_task(directory, "import", backend, tmp_path / f"{backend}.ldif")
            # 389-ds ends the task a moment before it enables the backend.
            assert await_online(settings(directory), suffix, 30)


def restore_losing_ldif(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,  # noqa: F811
    server: Callable[..., str],  # noqa: F811
    run_backup: Callable[..., dict[str, Any]],
    backend: str,
) -> tuple[dict[str, Any], float]:
    """An online restore of a fresh backup whose `backend` LDIF is gone when 389-ds imports it; returns the
    finished IdmRestore and how long it took from the start of its check."""
    server()
    backup = run_backup("before", data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    change_after_backup(directory)
    set_fault(api, namespace, POD, f"restore-ldif2db={backend}")
    try:
        create_restore(
            api,
            namespace,
            "online",
            restore_spec(directory, {"backupRef": {"name": "before"}}, online=True),
        )

        def step() -> str:
            status = get_restore(api, namespace, "online").get("status", {})
            return "finished" if status.get("phase") in ("Succeeded", "Failed") else status.get("step", "")

        # The check starts once ipa-restore ended; the wait for the backend is measured from there.
        wait_for("ipa-restore to end", lambda: step() in ("check", "finished"), timeout=120, interval=0.1)
        checking = time.monotonic()
        wait_for("the restore to finish", lambda: step() == "finished", timeout=120, interval=0.1)
        return get_restore(api, namespace, "online"), time.monotonic() - checking
    finally:
        set_fault(api, namespace, POD, "")


def refused(directory: DirectoryServer, suffix: str) -> bool:  # noqa: F811
    """389-ds refuses every operation under a disabled mapping-tree node (mapping_tree.c: OPERATIONS_ERROR,
    with no diagnostic text)."""
    conn = directory.connect()
    try:
        conn.search_s(suffix, ldap.SCOPE_BASE)
    except ldap.OPERATIONS_ERROR:
        return True
    finally:
        conn.unbind_s()
    return False


def test_a_backend_left_disabled_by_a_silently_failed_import_fails_backend_offline_and_ipa_runs(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,  # noqa: F811
    server: Callable[..., str],  # noqa: F811
    backends_kept: None,
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
) -> None:
    # ipaca's LDIF is gone when 389-ds imports it: the online import task fails in 389-ds, which leaves the
    # backend disabled, and ipa-restore (as upstream) neither looks nor says anything, and exits 0.
    restored, waited = restore_losing_ldif(api, namespace, platform, directory, server, run_backup, "ipaca")

    status = restored["status"]
    assert status["phase"] == "Failed" and status["reason"] == "BackendOffline", status
    assert status["message"] == (
        "389-ds still refuses operations on the ipaca backend 30 s after ipa-restore: it leaves a backend "
        "disabled after a failed import (see /var/log/iparestore.log and the directory server's errors log)"
    )
    # Given its 30 s: the operator did not give up on a backend that 389-ds might still have enabled, nor
    # wait much longer. The margins are the status polls' own latency, seconds on a loaded machine.
    assert 28 <= waited < 90, waited
    assert status["ipaRestore"]["exitCode"] == 0 and status["ipaRestore"]["critical"] == []
    # What 389-ds itself says, read without the operator: userRoot was restored, and o=ipaca is refused.
    assert exists(directory, BOB) and not exists(directory, MALLORY)
    assert refused(directory, IPACA)
    code, log = pod_exec(api, namespace, POD, ["cat", "/var/log/iparestore.log"])
    assert code == 0 and "Could not open LDIF file" in log and "exit code -23" in log, log
    # As README "Restoring" promises for a failure once ipa-restore ran: services checked (up, so not
    # started again), the staged files removed, the server's lock given back.
    running = condition(restored, "ServicesRunning")
    assert running["status"] == "True" and running["reason"] == "StartedByIpaRestore", running
    assert services_running(api, namespace, POD)
    assert staged_files(api, namespace) == ""
    assert leases(api, namespace) == []
    steps = events(api, namespace, "online")
    assert steps[-1] == "RestoreFailed" and "ServicesRestarted" not in steps, steps


def test_a_failed_userroot_import_is_named_backend_offline_not_only_services_down(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,  # noqa: F811
    server: Callable[..., str],  # noqa: F811
    backends_kept: None,
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
) -> None:
    """userRoot is where ipactl reads IPA's services from: with it disabled, `ipactl status` fails and the
    operator's `ipactl start` finds no services and stops the directory server (as the real ipactl does).
    The reason must name the cause, not only the services being down."""
    restored, waited = restore_losing_ldif(
        api, namespace, platform, directory, server, run_backup, "userRoot"
    )
    status = restored["status"]
    assert status["phase"] == "Failed" and status["reason"] == "BackendOffline", status
    assert status["message"] == (
        "389-ds still refuses operations on the userRoot backend 30 s after ipa-restore: it leaves a backend "
        "disabled after a failed import (see /var/log/iparestore.log and the directory server's errors log)"
        "; ipactl reads IPA's services from userRoot, so they cannot be listed or started until an import "
        "of userRoot succeeds"
    )
    assert 28 <= waited < 90, waited
    assert refused(directory, directory.suffix)
    # The start was tried all the same (it is guaranteed once ipa-restore ran), and failed as it must.
    running = condition(restored, "ServicesRunning")
    assert running["status"] == "False" and running["reason"] == "ServicesDown", running
    steps = events(api, namespace, "online")
    assert "ServicesDown" in steps and steps[-1] == "RestoreFailed", steps
    assert staged_files(api, namespace) == ""
    assert leases(api, namespace) == []


def test_a_drill_refuses_an_ldap_url_that_is_not_its_scratch_pods_address_without_connecting(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,  # noqa: F811
    server: Callable[..., str],  # noqa: F811
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IDM_BACKUP_ENABLE_DRILLS", "true")
    operator.stop()
    operator.start()
    server()
    # The scratch pod's own directory is this module's: the drill is refused before anything is restored.
    apply_drill_dm_secret(api, namespace, directory.password)
    backup = run_backup("nightly", data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    (tmp_path / "drill-data").mkdir()
    spec = drill_spec(directory, tmp_path / "drill-data", {"backupRef": {"name": "nightly"}})

    # A listener of someone else's, on a loopback address that is not the scratch pod's (127.0.0.1): plain
    # ldap:// passes the unencrypted-password rule there, so only the address rule stands in the way.
    with socket.socket() as listener:
        listener.bind(("127.0.0.2", 0))
        listener.listen()
        listener.settimeout(0)
        elsewhere = f"ldap://127.0.0.2:{listener.getsockname()[1]}"
        spec["drill"]["ldap"]["url"] = elsewhere
        status = run_restore(api, namespace, operator, "elsewhere", spec)["status"]
        with pytest.raises(BlockingIOError):
            listener.accept()

    assert status["phase"] == "Failed" and status["reason"] == "TopologyUnavailable", status
    assert status["message"] == (
        f"cannot read the FreeIPA topology: ldap.url {elsewhere!r} is not the directory of the server backed "
        "up or restored: 127.0.0.2 (127.0.0.2) is not an address of the scratch pod (127.0.0.1), not "
        "ipa-hidden.example.test, which is production's. The operator binds only to the target's own "
        "directory"
    ), status["message"]
    assert status["drill"]["pod"] == "elsewhere-drill" and "ipaRestore" not in status
    assert "RestoreFailed" in events(api, namespace, "elsewhere")
    wait_for("the scratch server to be gone", lambda: scratch_objects(api, namespace) == [], timeout=60)
    assert leases(api, namespace) == []
