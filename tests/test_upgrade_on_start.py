"""The operator against a server whose `ipactl start` first runs ipa-server-upgrade.

After an image update FreeIPA's data are older than its software, and the first `ipactl start` upgrades
them (ipaserver/install/ipactl.py, version_check) before it starts anything: the `ipactl start` at the end
of an offline ipa-backup, or the one inside a FULL ipa-restore. The stand-in's faults `upgrade=<seconds>`
and `upgrade-fail=<seconds>` make it so (testbed/images/freeipa-standin); everything else is real: the API
server, S3, gpg, 389-ds and the operator process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubernetes import client

from testbed import stack
from testbed.deploy import OperatorProcess
from testbed.ldap_server import DirectoryServer
from tests import test_restore
from tests.helpers import (
    Backup,
    backup_spec,
    events,
    pod_exec,
    s3_storage,
    services_running,
    set_fault,
)
from tests.test_restore import (
    BOB,
    MALLORY,
    POD,
    change_after_backup,
    data_backup,
    exists,
    restore_spec,
    run_restore,
)

# A 389-ds of this module's own (a restore replaces whole backends) and a pod on it, as that module has.
directory = test_restore.directory
server = test_restore.server

INSTALLED = "4.12.2-1.fc41"  # the build the stand-in's installation records
NEWER = "4.12.2-2.fc41"  # the build the image runs with the upgrade faults


def data_version(api: client.ApiClient, namespace: str, pod: str) -> str:
    code, out = pod_exec(api, namespace, pod, ["cat", "/var/lib/ipa/sysupgrade/sysupgrade.state"])
    assert code == 0, out
    return next(line.split("=", 1)[1].strip() for line in out.splitlines() if line.startswith("data_version"))


def upgrade_log(api: client.ApiClient, namespace: str, pod: str) -> str:
    code, out = pod_exec(api, namespace, pod, ["cat", "/var/log/ipaupgrade.log"])
    assert code == 0, out
    return out


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def test_an_offline_backup_whose_restart_upgrades_the_server_succeeds_with_services_running(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
) -> None:
    pod = freeipa()
    assert data_version(api, namespace, pod) == INSTALLED
    # Set once the pod is up: its own start would otherwise do the upgrade.
    set_fault(api, namespace, pod, "upgrade=3")
    done = run_backup(
        "upgraded", backup_spec(platform, s3_storage(platform, f"upgrade/{namespace}"), type="Full")
    )
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert status["ipaBackup"]["exitCode"] == 0
    # ipa-backup's own `ipactl start` ran the upgrade, which recorded the new build.
    assert data_version(api, namespace, pod) == NEWER
    assert "The ipa-server-upgrade command was successful" in upgrade_log(api, namespace, pod)
    assert services_running(api, namespace, pod)
    assert "ServicesDown" not in events(api, namespace, "upgraded")


def test_a_failed_upgrade_at_restart_fails_the_backup_with_services_down_and_says_why(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
) -> None:
    pod = freeipa()
    set_fault(api, namespace, pod, "upgrade-fail=1")
    done = run_backup(
        "stuck", backup_spec(platform, s3_storage(platform, f"upgrade/{namespace}"), type="Full")
    )
    status = done["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "IpaBackupFailed"), status
    assert status["message"] == (
        "ipa-backup failed: CalledProcessError(Command ['/usr/sbin/ipactl', 'start'] returned non-zero "
        "exit status 1)"
    )
    running = conditions(status)["ServicesRunning"]
    assert (running["status"], running["reason"]) == ("False", "ServicesDown"), running
    # Why is in the condition: ipactl's own lines, and the log to read.
    assert running["message"] == (
        "IPA is stopped: the directory server is not running; ipactl start: IPA version error: data needs "
        f"to be upgraded (expected version '{NEWER}', current version '{INSTALLED}'); Automatic upgrade "
        "failed: Upgrade failed with Server is unwilling to perform: database is read-only (see "
        "/var/log/ipaupgrade.log in the pod)"
    ), running
    assert not services_running(api, namespace, pod)
    assert data_version(api, namespace, pod) == INSTALLED
    # The cause gone, the server starts again.
    set_fault(api, namespace, pod, "")
    code, out = pod_exec(api, namespace, pod, ["ipactl", "start"])
    assert code == 0, out
    assert services_running(api, namespace, pod)


def test_a_full_restore_whose_start_upgrades_the_server_succeeds(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: DirectoryServer,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Backup,
) -> None:
    server()
    # 389-ds adds a "repl keep alive" subentry to each replicated backend on its own, before or after
    # the backup: the restore's count leaves them out on both sides, or the upgrade's seconds would let
    # them in.
    full = run_backup("full", {**data_backup(platform, directory, f"upgrade/{namespace}"), "type": "Full"})
    assert full["status"]["phase"] == "Succeeded", full["status"]
    change_after_backup(directory)
    set_fault(api, namespace, POD, "upgrade=3")
    spec = restore_spec(directory, {"backupRef": {"name": "full"}}, type="Full", allowSymlinkedConfig=True)
    status = run_restore(api, namespace, operator, "full", spec)["status"]
    assert status["phase"] == "Succeeded", status
    assert exists(directory, BOB) and not exists(directory, MALLORY)
    # ipa-restore's `ipactl start` upgraded; its `ipactl restart` after it found nothing left to do.
    assert data_version(api, namespace, POD) == NEWER
    assert upgrade_log(api, namespace, POD).count("The ipa-server-upgrade command was successful") == 1
    assert services_running(api, namespace, POD)
