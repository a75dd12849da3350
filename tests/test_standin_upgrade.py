"""Tests of the FreeIPA stand-in's upgrade on start: ipactl's version check and ipa-server-upgrade.

Nothing is mocked: the stand-in pod runs as tests/test_standin.py runs it (root in a private mount
namespace, an overlay of the image over the host's /, /data bound from a host directory), its ipactl reading
the service list from the real 389-ds of that module. The faults `upgrade`, `upgrade-fail` and
`data-newer` change the build the image runs (ipapython.version.VENDOR_VERSION); the data version is the
one recorded in /var/lib/ipa/sysupgrade/sysupgrade.state, read here from the pod's volume.

One pod serves the module; every test leaves it with no fault, the data at the image's own build and the
services running (the autouse fixture puts that back), so the tests can run in any order.
"""

from __future__ import annotations

import configparser
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import test_standin
from tests.test_standin import HIDDEN_SERVICES, STANDIN_MARKS, Pod, pod_env, services_running

# That module's directory (session-scoped, shared) and pod factory serve here too.
directory = test_standin.directory
pod_factory = test_standin.pod_factory

pytestmark = STANDIN_MARKS

HOST = "ipa-hidden.example.test"
STATE = "var/lib/ipa/sysupgrade/sysupgrade.state"
INSTALLED = "4.12.2-1.fc41"  # the image's own build, which the installation records
NEWER = "4.12.2-2.fc41"  # faults upgrade, upgrade-fail: the image updated to a newer build
OLDER = "4.12.2-0.fc41"  # fault data-newer: the image rolled back to an older build
OLDER_DATA = (
    "IPA version error: data needs to be upgraded "
    f"(expected version '{NEWER}', current version '{INSTALLED}')"
)
NEWER_DATA = f"data are in newer version than IPA (data version '{INSTALLED}', IPA version '{OLDER}')"
RUNNING_UPGRADE = [
    "Automatically running upgrade, for details see /var/log/ipaupgrade.log",
    "Be patient, this may take a few minutes.",
]
UPGRADE_FAILED = [
    "IPA server upgrade failed: Inspect /var/log/ipaupgrade.log and run command ipa-server-upgrade manually.",
]
ABORTED = [
    # The upgrade's stderr ends with a newline, and ipactl adds its own: an empty line.
    "",
    "See the upgrade log for more details and/or run /usr/sbin/ipa-server-upgrade again",
    "Aborting ipactl",
]
COMMAND_FAILED = "The ipa-server-upgrade command failed. See /var/log/ipaupgrade.log for more information"
SUCCESS = "ipa: INFO: The ipactl command was successful"
STARTED = ["Starting Directory Service", *(f"Starting {s} Service" for s in HIDDEN_SERVICES)]
STOPPED = [*(f"Stopping {s} Service" for s in reversed(HIDDEN_SERVICES)), "Stopping Directory Service"]
# upgradeinstance.IPAUpgrade's steps with the directory server stopped when the upgrade starts.
DATA_STEPS = [
    "saving configuration",
    "disabling listeners",
    "enabling DS global lock",
    "disabling Schema Compat",
    "starting directory server",
    "updating schema",
    "upgrading server",
    "stopping directory server",
    "restoring configuration",
]


@pytest.fixture(scope="module")
def pod(directory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    p = Pod(tmp_path_factory.mktemp("upgrade-pod"), pod_env(directory, HOST))
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def as_installed(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "pod" not in request.fixturenames:
        return
    p: Pod = request.getfixturevalue("pod")
    fault(p, "")
    record(p, INSTALLED)
    assert p.exec("ipactl", "start").returncode == 0
    assert services_running(p)


def fault(pod: Pod, name: str) -> None:
    (pod.data / "ipa-standin-fault").write_text(name)


def data_version(pod: Pod) -> dict[str, str]:
    state = configparser.RawConfigParser()
    state.read(pod.data / STATE)
    return dict(state.items("ipa"))


def record(pod: Pod, version: str) -> None:
    """The data version as an installation or upgrade by that build leaves it."""
    (pod.data / STATE).write_text(f"[ipa]\ndata_version = {version}\nplatform = fedora\n\n")


def upgrade_log(pod: Pod) -> str:
    return pod.exec("cat", "/var/log/ipaupgrade.log").stdout


def test_the_installation_records_its_build_and_starts_without_upgrade(pod: Pod) -> None:
    assert data_version(pod) == {"data_version": INSTALLED, "platform": "fedora"}
    r = pod.exec("python3", "-c", "from ipapython import version; print(version.VENDOR_VERSION)")
    assert r.stdout == f"{INSTALLED}\n"
    for action in ("start", "restart"):
        r = pod.exec("ipactl", action)
        assert r.returncode == 0, r.stderr
        assert r.stderr.splitlines()[-1] == SUCCESS and "upgrade" not in r.stderr


def test_data_older_than_the_software_is_upgraded_once_at_start(pod: Pod) -> None:
    assert pod.exec("ipactl", "stop").returncode == 0
    fault(pod, "upgrade=1")
    started = time.monotonic()
    r = pod.exec("ipactl", "start")
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    # ipactl shows none of the upgrade's own output when it succeeds (ipautil.run captured it).
    assert r.stderr.splitlines() == [OLDER_DATA, *RUNNING_UPGRADE, SUCCESS]
    assert r.stdout.splitlines() == STARTED
    assert took >= 1
    assert services_running(pod)
    # ipa-server-upgrade recorded the software's build: the next start checks and goes straight on.
    assert data_version(pod) == {"data_version": NEWER, "platform": "fedora"}
    log = upgrade_log(pod)
    assert (
        "INFO The IPA services were upgraded" in log
        and "INFO The ipa-server-upgrade command was successful" in log
    )
    r = pod.exec("ipactl", "restart")
    assert r.returncode == 0 and r.stderr.splitlines() == [SUCCESS], r.stderr
    assert pod.exec("ipactl", "start").stderr.splitlines()[-1] == SUCCESS
    assert upgrade_log(pod) == log


def test_ipa_server_upgrade_by_hand_prints_its_steps_and_records_the_version(pod: Pod) -> None:
    fault(pod, "upgrade=0.2")
    r = pod.exec("ipa-server-upgrade")
    assert r.returncode == 0, r.stderr
    # The directory server was running: stopped first, started again last.
    steps = ["stopping directory server", *DATA_STEPS, "starting directory server"]
    assert r.stdout.splitlines() == [
        "Upgrading IPA:. Estimated time: 1 minute 30 seconds",
        *(f"  [{n}/{len(steps)}]: {step}" for n, step in enumerate(steps, start=1)),
        "Done.",
        "Upgrading IPA services",
    ]
    assert r.stderr.splitlines() == [
        "Update complete",
        "Upgrading the configuration of the IPA services",
        "The IPA services were upgraded",
        "The ipa-server-upgrade command was successful",
    ]
    assert data_version(pod)["data_version"] == NEWER


def test_a_failed_upgrade_aborts_start_and_leaves_everything_stopped(pod: Pod) -> None:
    fault(pod, "upgrade-fail=0.5")
    # restart: the version check fails first, and then everything is stopped.
    r = pod.exec("ipactl", "restart")
    assert r.returncode == 1
    assert r.stdout.splitlines() == STOPPED
    failure = [
        OLDER_DATA,
        *RUNNING_UPGRADE,
        "Automatic upgrade failed: Upgrade failed with Server is unwilling to perform: database is read-only",
        *UPGRADE_FAILED,
        "('IPA upgrade failed.', 1)",
        COMMAND_FAILED,
        *ABORTED,
    ]
    assert r.stderr.splitlines() == failure
    status = pod.exec("ipactl", "status")
    assert status.returncode == 3 and status.stdout == "Directory Service: STOPPED\n"

    # start: nothing is started; the upgrade's cleanup left the directory server stopped.
    r = pod.exec("ipactl", "start")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == failure
    assert not services_running(pod)
    assert data_version(pod)["data_version"] == INSTALLED
    # The steps, the error and the cleanup are in the log (and were on the upgrade's stdout).
    log = upgrade_log(pod)
    assert "  [7/9]: upgrading server" in log
    assert "  [error] RuntimeError: Server is unwilling to perform: database is read-only" in log
    assert "  [cleanup]: stopping directory server" in log and "  [cleanup]: restoring configuration" in log

    fault(pod, "upgrade=0.5")  # the cause fixed: the next start upgrades and starts
    r = pod.exec("ipactl", "start")
    assert r.returncode == 0, r.stderr
    assert services_running(pod)


def test_data_newer_than_the_software_is_refused_and_running_services_stay(pod: Pod) -> None:
    fault(pod, "data-newer")
    r = pod.exec("ipactl", "start")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"IPA version error: {NEWER_DATA}",
        *RUNNING_UPGRADE,
        # ipa-server-upgrade refuses; its RuntimeError(message, 1) shows as the tuple.
        f"Automatic upgrade failed: {UPGRADE_FAILED[0]}",
        f'("Unable to execute IPA upgrade: {NEWER_DATA}", 1)',
        COMMAND_FAILED,
        *ABORTED,
    ]
    # The check comes before anything is started or stopped: what ran still runs.
    assert services_running(pod)
    assert data_version(pod)["data_version"] == INSTALLED


def test_skip_version_check_and_force_start_without_the_check(pod: Pod) -> None:
    fault(pod, "data-newer")
    assert pod.exec("ipactl", "stop").returncode == 0
    r = pod.exec("ipactl", "start", "--skip-version-check")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Skipping version check", *STARTED]
    assert r.stderr.splitlines() == [SUCCESS]
    r = pod.exec("ipactl", "restart", "--force")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "Skipping version check", r.stdout
    assert data_version(pod)["data_version"] == INSTALLED

    # ipa-server-upgrade --skip-version-check upgrades anyway, and records the older build.
    r = pod.exec("ipa-server-upgrade", "--skip-version-check")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[:2] == [
        "Skipping version check",
        "Upgrade without version check may break your system",
    ]
    assert data_version(pod)["data_version"] == OLDER


def test_a_new_image_on_old_data_upgrades_at_its_first_start(pod_factory: Callable[..., Pod]) -> None:
    # The pod's own start runs the upgrade: IPA_STANDIN_FAULT applies from the beginning.
    new = pod_factory(IPA_STANDIN_FAULT="upgrade=0.5")
    assert data_version(new) == {"data_version": NEWER, "platform": "fedora"}
    init_log = new.log.read_text()
    assert OLDER_DATA in init_log and RUNNING_UPGRADE[1] in init_log
    assert services_running(new)
