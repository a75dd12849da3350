"""Tests of the FreeIPA stand-in's ipa-restore, restoring through a real 389 Directory Server.

Nothing is mocked: the stand-in pod runs as tests/test_standin.py runs it (root in a private mount
namespace, an overlay of the image over the host's /, /data bound from a host directory), against its
OWN ns-slapd (testbed/ldap_server.py): an import replaces a whole backend, so these tests must not touch
the directory other tests use. The restored data is read back over LDAP.

One pod and one set of backups (DATA offline, DATA online, FULL) serve the whole module; every test
leaves the directory holding the backed-up data and the pod's services running (the autouse fixture
checks that), so the tests can run in any order.
"""

from __future__ import annotations

import configparser
import io
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ldap
import ldap.modlist
import pytest

from idm_backup_operator.freeipa.directory import await_online
from idm_backup_operator.freeipa.topology import LdapConnectionSettings
from tests.test_standin import (
    BACKENDS,
    RUV_UNIQUEID,
    SERVERID,
    STANDIN_MARKS,
    Pod,
    backed_up_to,
    directory_ruv,
    free_port,
    generation,
    is_tombstone,
    ldif_records,
    pod_env,
    read_member,
    services_running,
)

pytestmark = STANDIN_MARKS

HOST = "ipa-hidden.example.test"
SUFFIX = "dc=example,dc=test"
BOB = f"uid=bob,cn=users,cn=accounts,{SUFFIX}"
MALLORY = f"uid=mallory,cn=users,cn=accounts,{SUFFIX}"
MASTERS = f"cn=masters,cn=ipa,cn=etc,{SUFFIX}"
OTHER_MASTERS = ["ipa-ca", "ipa-kra", "ipa-partial", "ipa-visible"]  # every one has a CA
FAILED = "The ipa-restore command failed. See /var/log/iparestore.log for more information"
INFO = [
    "Each master will individually need to be re-initialized or",
    "re-created from this one. The replication agreements on",
    "masters running IPA 3.1 or earlier will need to be manually",
    "re-enabled. See the man page for details.",
    "Disabling all replication.",
]
AGREEMENTS = [
    line
    for m in OTHER_MASTERS
    for line in (
        f"Disabling replication agreement on {m}.example.test to {HOST}",
        f"Disabling CA replication agreement on {m}.example.test to {HOST}",
    )
]
LDIF_DIR = f"/var/lib/dirsrv/slapd-{SERVERID}/ldif"
PROMPTS = (
    "Directory Manager (existing master) password: \n"
    "Restoring data will overwrite existing live data. Continue to restore? [no]: "
)


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if str(Path(__file__).resolve().parent.parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from testbed.ldap_server import DirectoryServer

    server = DirectoryServer(tmp_path_factory.mktemp("389ds-restore"), port=free_port())
    server.start()
    server.load_topology()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pod(directory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    root = tmp_path_factory.mktemp("restore-pod")
    # Files a real server has under /var/lib/ipa and ipa-backup's file list names (the stand-in's
    # install does not create them): a FULL backup then archives them after the /var/lib/ipa symlink.
    keytab = root / "data/var/lib/ipa/gssproxy/http.keytab"
    keytab.parent.mkdir(parents=True)
    keytab.write_bytes(b"TEST STAND-IN keytab\n")
    # The host path of the pod's /data: ns-slapd (on the host) opens the LDIF files through it.
    p = Pod(root, pod_env(directory, HOST, IPA_STANDIN_DS_DATA_DIR=str(root / "data")))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def backups(pod: Pod) -> dict[str, str]:
    """One backup of each kind, taken before any test changed anything."""
    made = {}
    for kind, args in (("data", ["--data"]), ("online", ["--data", "--online"]), ("full", [])):
        r = pod.exec("ipa-backup", *args)
        assert r.returncode == 0, r.stderr
        made[kind] = backed_up_to(r.stderr)
        # Backup directories are named to the second: the next one must start in a later second.
        second = int(time.time())
        while int(time.time()) == second:
            time.sleep(0.02)
    assert made["data"] != made["online"] != made["full"]  # one second apart at least
    return made


@pytest.fixture(autouse=True)
def consistent(pod: Pod, directory: Any, backups: dict[str, str]) -> Iterator[None]:
    fault(pod, "")
    yield
    fault(pod, "")
    if not services_running(pod):
        assert pod.exec("ipactl", "start").returncode == 0
    # Every test leaves the backed-up data in place (a FULL restore enables the host: reset that).
    directory.load_topology()
    conn = directory.connect()
    assert entry(conn, BOB) and not entry(conn, MALLORY)


# -- helpers -------------------------------------------------------------------------------------------


def settings(directory: Any) -> LdapConnectionSettings:
    return LdapConnectionSettings(directory.uri, directory.bind_dn, directory.password, timeout=5)


def fault(pod: Pod, name: str) -> None:
    (pod.data / "ipa-standin-fault").write_text(name)


def restore(
    pod: Pod, *args: str, answers: tuple[str, ...] | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """ipa-restore as the operator runs it: no -p, the password and the answers on stdin."""
    lines = answers if answers is not None else (pod.env["IPA_STANDIN_DM_PASSWORD"], "yes", "yes")
    return subprocess.run(
        pod.command("ipa-restore", *args, env=env),
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def entry(conn: Any, dn: str) -> dict[str, list[bytes]] | None:
    try:
        return dict(conn.search_s(dn, ldap.SCOPE_BASE)[0][1])
    except ldap.NO_SUCH_OBJECT:
        return None


def count(conn: Any, base: str) -> int:
    return len(conn.search_s(base, ldap.SCOPE_SUBTREE, "(objectClass=*)", ["1.1"]))


def tamper(directory: Any) -> None:
    """The change a restore must undo: bob deleted, mallory added."""
    conn = directory.connect()
    conn.delete_s(BOB)
    conn.add_s(
        MALLORY,
        ldap.modlist.addModlist(
            {
                "objectClass": [b"top", b"person", b"organizationalPerson", b"inetOrgPerson"],
                "uid": [b"mallory"],
                "cn": [b"Mallory"],
                "sn": [b"Mallory"],
            }
        ),
    )
    assert entry(conn, BOB) is None and entry(conn, MALLORY)


def archive_of(pod: Pod, path: str) -> Path:
    (found,) = (pod.data / path.lstrip("/")).glob("ipa-*.tar")
    return found


def ldif_count(pod: Pod, path: str, backend: str) -> int:
    """Entries of the archived LDIF that a search finds after a restore: a replica export also holds the
    RUV tombstone (stripped by ipa-restore) and the tombstones of deleted entries (hidden from searches)."""
    return sum(1 for _dn, attrs in ldif_records(archive_of(pod, path), backend) if not is_tombstone(attrs))


def assert_restored(pod: Pod, directory: Any, path: str) -> None:
    conn = directory.connect()
    assert entry(conn, BOB) is not None
    assert entry(conn, MALLORY) is None
    assert count(conn, SUFFIX) == ldif_count(pod, path, "userRoot")
    assert count(conn, "o=ipaca") == ldif_count(pod, path, "ipaca")


def host_states(directory: Any) -> set[bytes]:
    conn = directory.connect()
    states = set()
    for _dn, attrs in conn.search_s(
        f"cn={HOST},{MASTERS}", ldap.SCOPE_ONELEVEL, "(cn=*)", ["ipaConfigString"]
    ):
        states |= {v for v in attrs["ipaConfigString"] if v.endswith(b"Service")}
    return states


def copy_backup(pod: Pod, path: str, name: str) -> tuple[str, Path]:
    """A copy of a backup directory under /var/lib/ipa/backup (to damage it)."""
    src = pod.data / path.lstrip("/")
    dst = src.parent / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return f"/var/lib/ipa/backup/{name}", dst


def set_header(bdir: Path, **values: str) -> None:
    header = configparser.ConfigParser()
    header.read(bdir / "header")
    for k, v in values.items():
        header.set("ipa", k, v)
    with open(bdir / "header", "w") as f:
        header.write(f)


def leftovers(pod: Pod) -> list[str]:
    r = pod.exec("sh", "-c", "ls -d /tmp/*ipa 2>/dev/null || true")
    return r.stdout.split()


# -- success paths -------------------------------------------------------------------------------------


def test_data_restore_offline(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    tamper(directory)
    r = restore(pod, backups["data"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPTS
    assert r.stderr.splitlines() == [
        f"Preparing restore from {backups['data']} on {HOST}",
        "Performing DATA restore from DATA backup",
        "Temporary setting umask to 022",
        *INFO,
        *AGREEMENTS,
        "Stopping Directory Server",
        f"Restoring from userRoot in {SERVERID}",
        f"Restoring from ipaca in {SERVERID}",
        "Starting Directory Server",
        "Restoring umask to 18",
        "The ipa-restore command was successful",
    ]
    assert_restored(pod, directory, backups["data"])
    assert services_running(pod)
    # Upstream enables the server only at the end of a FULL restore: a DATA restore leaves what the
    # backup held, here the hidden replica's hiddenService.
    assert host_states(directory) == {b"hiddenService"}
    # The LDIF 389-ds imported, where the real tool writes it; the temporary directory is gone.
    written = pod.data / f"var/lib/dirsrv/slapd-{SERVERID}/ldif/{SERVERID}-userRoot.ldif"
    assert f"dn: {BOB}\n" in written.read_text()
    assert leftovers(pod) == []
    log = pod.exec("cat", "/var/log/iparestore.log").stdout
    assert "ldif2db" not in log and "Import task cn=import_" in log and "exit code 0" in log


def test_data_restore_online_strips_the_ruv(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    # The backup as 389-ds's replication-aware export writes it: with the RUV tombstone entry.
    path, bdir = copy_backup(pod, backups["online"], "ipa-data-with-ruv")
    archive = bdir / "ipa-data.tar"
    with tarfile.open(archive, "r:gz") as tar:
        files = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]  # type: ignore[union-attr]
    ruv = (
        f"dn: nsuniqueid=ffffffff-ffffffff-ffffffff-ffffffff,{SUFFIX}\n"
        "objectClass: top\nobjectClass: nsTombstone\nobjectClass: extensibleObject\n"
        "nsUniqueId: ffffffff-ffffffff-ffffffff-ffffffff\nnsds50ruv: {replicageneration} 5f0000000000\n\n"
    ).encode()
    with tarfile.open(archive, "w:gz") as tar:
        for m, data in files:
            if m.name == f"./{SERVERID}-userRoot.ldif":
                assert data is not None
                data = data.replace(b"version: 1\n", b"version: 1\n" + ruv, 1)
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    tamper(directory)
    r = restore(pod, "--online", path)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[-7:] == [
        "Starting Directory Server",  # the real tool says so online, before the import tasks
        f"Restoring from userRoot in {SERVERID}",
        "Waiting for LDIF to finish",
        f"Restoring from ipaca in {SERVERID}",
        "Waiting for LDIF to finish",
        "Restoring umask to 18",
        "The ipa-restore command was successful",
    ]
    assert "Stopping Directory Server" not in lines
    written = (pod.data / f"var/lib/dirsrv/slapd-{SERVERID}/ldif/{SERVERID}-userRoot.ldif").read_text()
    assert "ffffffff-ffffffff-ffffffff-ffffffff" not in written and f"dn: {BOB}\n" in written
    # The LDIF of the previous restore was kept aside, as ipautil.backup_file does.
    assert (pod.data / f"var/lib/dirsrv/slapd-{SERVERID}/ldif/{SERVERID}-userRoot.ldif.orig").exists()
    assert_restored(pod, directory, backups["online"])
    shutil.rmtree(bdir)


def test_full_restore_in_the_container_layout(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    tamper(directory)
    r = restore(pod, backups["full"])
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    start = lines.index("Stopping IPA services")
    assert lines[: start + 1] == [
        f"Preparing restore from {backups['full']} on {HOST}",
        "Performing FULL restore from FULL backup",
        "Temporary setting umask to 022",
        *INFO,
        *AGREEMENTS,
        "Stopping IPA services",
    ]
    # freeipa-container issue 543: /var/lib/ipa is a symlink into /data, so files.tar holds the link and,
    # after it, files under it; tar fails on those (real tar, at /) and the real tool only logs it.
    assert lines[start + 1 : start + 4] == [
        "Systemwide CA database updated.",
        "Restoring files",
        "Restoring files failed: tar: var/lib/ipa/gssproxy/http.keytab: Cannot open: Not a directory",
    ]
    assert "tar: Exiting with failure status due to previous errors" in lines
    assert lines[-10:] == [
        "Systemwide CA database updated.",
        f"Restoring from userRoot in {SERVERID}",
        f"Restoring from ipaca in {SERVERID}",
        "Restarting GSS-proxy",
        "Starting IPA services",
        "Restarting SSSD",
        "Restarting oddjobd",
        "Restarting IPA services",
        "Restoring umask to 18",
        "The ipa-restore command was successful",
    ]
    assert_restored(pod, directory, backups["full"])
    assert services_running(pod)
    # FreeIPA PR #6192: a restored hidden replica is enabled; hiding it again is the operator's job.
    assert host_states(directory) == {b"enabledService"}
    # The link itself is back in place.
    assert pod.exec("readlink", "/var/lib/ipa").stdout.strip() == "/data/var/lib/ipa"


def test_version_mismatch(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    fault(pod, "version=4.13.0")
    version = pod.exec("python3", "-c", "from ipapython import version; print(version.VERSION)")
    assert version.stdout == "4.13.0\n"
    assert pod.exec("python3", "-c", "import ipa_standin; print(ipa_standin.VERSION)").stdout == "4.13.0\n"
    warning = [
        "Restoring data from a different release of IPA.",
        "Data is version 4.12.2.",
        "Server is running 4.13.0.",
    ]
    r = restore(pod, backups["data"], answers=(pod.env["IPA_STANDIN_DM_PASSWORD"], "no"))
    assert r.returncode == 1
    assert r.stdout == "Directory Manager (existing master) password: \nContinue to restore? [no]: "
    assert r.stderr.splitlines() == [
        f"Preparing restore from {backups['data']} on {HOST}",
        "Performing DATA restore from DATA backup",
        *warning,
        "Aborted",
        FAILED,
    ]
    # -U answers nothing and goes on.
    tamper(directory)
    r = restore(pod, "-U", "-p", pod.env["IPA_STANDIN_DM_PASSWORD"], backups["data"], answers=())
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert r.stderr.splitlines()[2:5] == warning
    assert_restored(pod, directory, backups["data"])
    # The other tools see the same release: ipa-backup writes it into its header.
    fault(pod, "")
    assert pod.exec("python3", "-c", "import ipa_standin; print(ipa_standin.VERSION)").stdout == "4.12.2\n"


# -- refusals ------------------------------------------------------------------------------------------


def test_usage_errors(pod: Pod, backups: dict[str, str]) -> None:
    usage = "Usage: ipa-restore [options] backup\n\n"
    for args, message in (
        ([], "must provide the backup to restore"),
        ([backups["data"], backups["full"]], "must provide exactly one name for the backup"),
        (["ipa-data-1999-01-01-00-00-00"], "must provide path to backup directory"),
    ):
        r = restore(pod, *args)
        assert (r.returncode, r.stdout) == (2, ""), r
        assert r.stderr == f"{usage}ipa-restore: error: {message}\nThe ipa-restore command failed.\n"
    r = restore(pod, "--bogus", backups["data"])
    assert r.returncode == 2 and "ipa-restore: error: no such option: --bogus" in r.stderr

    # A name under /var/lib/ipa/backup works like the absolute path (here up to the refusal below).
    name = backups["full"].rsplit("/", 1)[1]
    for args, message in (
        (["--online"], "File restoration cannot be done online"),
        (
            ["--backend", "userRoot"],
            "Restore must be in data-only mode when restoring a specific instance or backend",
        ),
    ):
        r = restore(pod, *args, name)
        assert r.returncode == 1
        assert r.stderr.splitlines() == [
            f"Preparing restore from {backups['full']} on {HOST}",
            message,
            FAILED,
        ]

    # -U without -p: nothing to bind with. Failures before logging is set up name no log file.
    r = restore(pod, "-U", backups["data"], answers=())
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "Directory Manager password required\nThe ipa-restore command failed.\n"
    # An empty line is asked again; end of input means no password.
    r = restore(pod, backups["data"], answers=("",))
    assert r.returncode == 1 and r.stdout == "Directory Manager (existing master) password: " * 2 + "\n"
    assert r.stderr == "Directory Manager password required\nThe ipa-restore command failed.\n"

    r = pod.exec("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/sbin/ipa-restore", "x")
    assert r.returncode == 1
    assert r.stderr == "Must be root to run ipa-restore\nThe ipa-restore command failed.\n"
    # --gpg-keyring only says it is unsupported.
    r = restore(pod, "--gpg-keyring", "/root/k", "--backend", "nosuch", backups["data"])
    assert r.stderr.startswith("--gpg-keyring is no longer supported, use GNUPGHOME environment variable")


def test_not_configured(pod: Pod, tmp_path: Path) -> None:
    bare = Pod(tmp_path / "bare", pod.env, init=False)
    try:
        bdir = bare.data / "ipa-data-2026-01-01-00-00-00"
        bdir.mkdir()
        (bdir / "header").write_text(
            f"[ipa]\ntype = DATA\ntime = 2026-01-01T00:00:00\nhost = {HOST}\nipa_version = 4.12.2\n"
            "version = 1\nservices = CA\n"
        )
        r = bare.exec("ipa-restore", "-U", "/data/ipa-data-2026-01-01-00-00-00")
        assert r.returncode == 2
        assert r.stderr.splitlines() == [
            "Preparing restore from /data/ipa-data-2026-01-01-00-00-00 on ipa-hidden.example.test",
            "IPA is not configured on this system.",
            "The ipa-restore command failed.",
        ]
    finally:
        bare.stop()


def test_header_checks(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    path, bdir = copy_backup(pod, backups["data"], "ipa-data-other-host")
    set_header(bdir, host="IPA-HIDDEN.example.test")  # compared case-sensitively
    tamper(directory)
    try:
        r = restore(pod, path)
        assert r.returncode == 1
        assert r.stderr.splitlines()[-2:] == [
            f"Host name {HOST} does not match backup name IPA-HIDDEN.example.test",
            FAILED,
        ]
        assert entry(directory.connect(), MALLORY)  # nothing restored

        set_header(bdir, host=HOST)
        (bdir / "ipa-data.tar").rename(bdir / "elsewhere.tar")
        r = restore(pod, path)
        assert r.returncode == 1
        assert r.stderr.splitlines()[-4:] == [
            "Temporary setting umask to 022",
            "Restoring umask to 18",
            f"Unable to find backup file in {path}",
            FAILED,
        ]
        assert leftovers(pod) == []
        (bdir / "header").unlink()
        r = restore(pod, path)
        assert r.returncode == 1 and "No section: 'ipa'" in r.stderr.splitlines()
    finally:
        shutil.rmtree(bdir)
        restore(pod, backups["data"])  # undo tamper()


def test_backend_checks(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    db = pod.data / f"var/lib/dirsrv/slapd-{SERVERID}/db"
    r = restore(pod, "--instance", "NOPE", backups["data"])
    assert r.returncode == 1 and r.stderr.splitlines()[-2:] == ["Instance NOPE does not exist", FAILED]
    r = restore(pod, "--backend", "nosuch", backups["data"])
    assert r.returncode == 1 and r.stderr.splitlines()[-2:] == ["Backend nosuch does not exist", FAILED]

    (db / "retroRoot").mkdir()
    try:
        r = restore(pod, "--backend", "retroRoot", backups["data"])
        assert r.returncode == 1
        lines = r.stderr.splitlines()
        assert f"LDIF file '{SERVERID}-retroRoot.ldif' not found in backup" in lines
        assert lines[-2:] == ["Backend retroRoot not found in backup", FAILED]
    finally:
        (db / "retroRoot").rmdir()

    (db / "ipaca").rename(db / "ipaca.away")
    try:
        r = restore(pod, backups["data"])
        assert r.returncode == 1
        assert r.stderr.splitlines()[-2:] == [
            "Cannot restore a data backup into an empty system. Missing backend(s) ipaca",
            FAILED,
        ]
        # One backend: only it is restored.
        tamper(directory)
        r = restore(pod, "--backend", "userRoot", backups["data"])
        assert r.returncode == 0, r.stderr
        assert f"Restoring from userRoot in {SERVERID}" in r.stderr.splitlines()
        assert "ipaca" not in r.stderr
        assert_restored(pod, directory, backups["data"])
    finally:
        (db / "ipaca.away").rename(db / "ipaca")


def test_password_and_directory_server_checks(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    tamper(directory)
    r = restore(pod, backups["data"], answers=("not-the-password", "yes"))
    assert r.returncode == 1
    assert r.stdout == "Directory Manager (existing master) password: \n"
    assert r.stderr.splitlines() == [
        f"Preparing restore from {backups['data']} on {HOST}",
        "Incorrect Directory Manager password provided",
        "Insufficient access:  Invalid credentials",
        FAILED,
    ]
    assert entry(directory.connect(), MALLORY)

    assert pod.exec("ipactl", "stop").returncode == 0
    r = restore(pod, backups["data"])
    assert r.returncode == 1
    assert r.stderr.splitlines()[-2:] == ["directory server instance is not running", FAILED]
    assert pod.exec("ipactl", "start").returncode == 0

    # The stand-in's own precondition: without the host path of /data, ns-slapd could not open the LDIF.
    r = restore(pod, backups["data"], env={"IPA_STANDIN_DS_DATA_DIR": ""})
    assert r.returncode == 1
    assert re.search(r"^TEST STAND-IN: IPA_STANDIN_DS_DATA_DIR is not set: ", r.stderr, re.M), r.stderr
    assert "Disabling all replication." not in r.stderr and services_running(pod)
    r = restore(pod, backups["data"])
    assert r.returncode == 0, r.stderr


# -- faults --------------------------------------------------------------------------------------------


def test_fault_unreachable_master(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    fault(pod, "restore-unreachable")
    tamper(directory)
    # --data restores the LDIF of a FULL backup.
    r = restore(pod, "-U", "-p", pod.env["IPA_STANDIN_DM_PASSWORD"], "--data", backups["full"], answers=())
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[1] == "Performing DATA restore from FULL backup"
    assert "Restoring files" not in lines and "Stopping Directory Server" in lines
    assert lines[lines.index("Disabling all replication.") + 1 :][:7] == [
        "Unable to disable agreement on ipa-ca.example.test: cannot connect to "
        "'ldaps://ipa-ca.example.test:389': Transport endpoint is not connected",
        *AGREEMENTS[2:],
    ]
    assert lines[-1] == "The ipa-restore command was successful"
    assert_restored(pod, directory, backups["online"])


def import_ldif(directory: Any, path: Path, backend: str) -> None:
    """What an administrator does after a failed import: an import task of their own (dsctl ldif2db)."""
    conn = directory.connect()
    dn = f"cn=repair-{backend}-{time.time_ns()},cn=import,cn=tasks,cn=config"
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
    deadline = time.monotonic() + 60
    task = ["nsTaskExitCode", "nsTaskLog"]
    while not (done := conn.search_s(dn, ldap.SCOPE_BASE, attrlist=task)[0][1]).get("nsTaskExitCode"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert done["nsTaskExitCode"] == [b"0"], done.get("nsTaskLog")
    # 389-ds finishes the task before it enables the backend again: wait as the operator does.
    assert await_online(settings(directory), SUFFIX if backend == "userRoot" else "o=ipaca", 30)


def test_fault_ldif2db(pod: Pod, directory: Any, backups: dict[str, str], tmp_path: Path) -> None:
    fault(pod, "restore-ldif2db")
    tamper(directory)
    r = restore(pod, backups["data"])
    # As the real tool: CRITICAL (dsctl's own refusal, before it touches the database), then success.
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    i = lines.index(f"Restoring from userRoot in {SERVERID}")
    assert lines[i + 1 : i + 5] == [
        f"ldif2db failed: ldif2db: Can't find file: {LDIF_DIR}/{SERVERID}-userRoot.ldif",
        "ldif2db failed",
        "",
        f"Restoring from ipaca in {SERVERID}",
    ]
    assert lines[-1] == "The ipa-restore command was successful"
    # userRoot was not restored: the live data is as the test left it; ipaca was.
    conn = directory.connect()
    assert entry(conn, BOB) is None and entry(conn, MALLORY)
    assert count(conn, "o=ipaca") == ldif_count(pod, backups["data"], "ipaca")

    # Online the import task really fails in 389-ds, and the real tool does not look at its result:
    # no message at all, exit 0, and the backend is left empty and unusable.
    r = restore(pod, "--online", backups["online"])
    assert r.returncode == 0, r.stderr
    assert "ldif2db failed" not in r.stderr and r.stderr.count("Waiting for LDIF to finish") == 2
    assert r.stderr.splitlines()[-1] == "The ipa-restore command was successful"
    with pytest.raises(ldap.LDAPError):
        directory.connect().search_s(BOB, ldap.SCOPE_BASE)
    log = pod.exec("cat", "/var/log/iparestore.log").stdout
    assert "Could not open LDIF file" in log and "exit code -23" in log
    # Nor can ipa-restore itself repair that: it cannot read cn=masters any more.
    fault(pod, "")
    r = restore(pod, backups["data"])
    assert r.returncode == 1 and r.stderr.splitlines()[-4] == "Disabling all replication.", r.stderr

    saved = tmp_path / "userRoot.ldif"
    saved.write_bytes(read_member(archive_of(pod, backups["data"]), f"./{SERVERID}-userRoot.ldif"))
    import_ldif(directory, saved, "userRoot")
    assert_restored(pod, directory, backups["data"])


def test_fault_restore_startfail(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    fault(pod, "restore-startfail")
    tamper(directory)
    r = restore(pod, backups["data"])
    assert r.returncode == 1
    assert r.stderr.splitlines()[-6:] == [
        f"Restoring from userRoot in {SERVERID}",
        f"Restoring from ipaca in {SERVERID}",
        "Starting Directory Server",
        "Restoring umask to 18",
        "CalledProcessError(Command ['/bin/systemctl', 'start', 'dirsrv@EXAMPLE-TEST.service'] returned "
        "non-zero exit status 1)",
        FAILED,
    ]
    assert_restored(pod, directory, backups["data"])  # imported before the start failed
    status = pod.exec("ipactl", "status")
    assert status.returncode == 3 and status.stdout.startswith("Directory Service: STOPPED\n")
    start = pod.exec("ipactl", "start")
    assert (start.returncode, start.stdout) == (1, "Starting Directory Service\n")
    assert start.stderr.splitlines()[-1] == (
        "Failed to start Directory Service: CalledProcessError(Command ['/bin/systemctl', 'start', "
        "'dirsrv@EXAMPLE-TEST.service'] returned non-zero exit status 1)"
    )
    fault(pod, "")
    assert pod.exec("ipactl", "start").returncode == 0


def test_fault_startfail_in_a_full_restore(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    fault(pod, "startfail")
    tamper(directory)
    r = restore(pod, backups["full"])
    assert r.returncode == 1
    assert r.stderr.splitlines()[-4:] == [
        "Starting IPA services",
        "Restoring umask to 18",
        "CalledProcessError(Command ['/usr/sbin/ipactl', 'start'] returned non-zero exit status 1: "
        "'Failed to start named Service\\nShutting down\\nHint: You can use --ignore-service-failure option "
        "for forced start in case that a non-critical service failed\\nAborting ipactl\\n')",
        FAILED,
    ]
    assert not services_running(pod)
    assert_restored(pod, directory, backups["full"])
    assert host_states(directory) == {b"hiddenService"}  # enable_server() never ran


def test_encrypted_backup(pod: Pod, directory: Any, backups: dict[str, str]) -> None:
    gnupg = pod.data / "gnupg"
    gnupg.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(
        ["gpg", "--homedir", str(gnupg), "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
         "--quick-gen-key", "IPA Backup <root@example.test>", "default", "default", "never"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        path, bdir = copy_backup(pod, backups["online"], "ipa-data-encrypted")
        subprocess.run(
            ["gpg", "--homedir", str(gnupg), "--batch", "--default-recipient-self", "--encrypt", "--output",
             str(bdir / "ipa-data.tar.gpg"), str(bdir / "ipa-data.tar")],
            check=True, capture_output=True,
        )  # fmt: skip
        (bdir / "ipa-data.tar").unlink()
        # No secret key: gpg fails before anything changed.
        tamper(directory)
        r = restore(pod, path, env={"GNUPGHOME": "/tmp"})
        assert r.returncode == 1
        assert f"Decrypting {path}/ipa-data.tar.gpg" in r.stderr.splitlines()
        assert re.search(r"^gpg failed: ", r.stderr, re.M) and "Disabling all replication." not in r.stderr
        r = restore(pod, "--online", path, env={"GNUPGHOME": "/data/gnupg"})
        assert r.returncode == 0, r.stderr
        assert_restored(pod, directory, backups["online"])
        assert leftovers(pod) == []
    finally:
        subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "all"], check=False)
        shutil.rmtree(gnupg, ignore_errors=True)


def set_state(directory: Any, suffix: str, state: bytes) -> None:
    """What 389-ds does to a backend while it imports it: its mapping-tree node disabled, then enabled."""
    directory.connect().modify_s(
        f'cn="{suffix}",cn=mapping tree,cn=config', [(ldap.MOD_REPLACE, "nsslapd-state", [state])]
    )


def test_a_disabled_backend_is_waited_for_and_reported_when_it_stays_so(directory: Any) -> None:
    set_state(directory, "o=ipaca", b"disabled")
    try:
        # Refused as the first searches after an online import are: OPERATIONS_ERROR.
        with pytest.raises(ldap.OPERATIONS_ERROR):
            directory.connect().search_s("o=ipaca", ldap.SCOPE_BASE)
        started = time.monotonic()
        assert not await_online(settings(directory), "o=ipaca", 1)
        assert 1 <= time.monotonic() - started < 5
        enable = threading.Timer(1, set_state, (directory, "o=ipaca", b"backend"))
        enable.start()
        started = time.monotonic()
        assert await_online(settings(directory), "o=ipaca", 30)
        enable.join()
        assert 1 <= time.monotonic() - started < 10
        # A backend that is enabled answers at once, the suffix entry there or not.
        assert await_online(settings(directory), SUFFIX, 0)
        assert await_online(settings(directory), "o=nothing-here", 0)
    finally:
        set_state(directory, "o=ipaca", b"backend")


@pytest.mark.parametrize("kind", ["data", "online"])
def test_a_replica_export_restores_exactly_with_the_directorys_own_ruv(
    pod: Pod, directory: Any, backups: dict[str, str], kind: str
) -> None:
    # The backups are 389-ds's replica exports (offline "data", online "online"): each LDIF holds its
    # backend's RUV tombstone, with the replica generation the directory had then.
    archive = archive_of(pod, backups[kind])
    conn = directory.connect()
    exported = {}
    for backend, suffix in BACKENDS:
        records = ldif_records(archive, backend)
        (ruv,) = [attrs for dn, attrs in records if dn.lower() == f"nsuniqueid={RUV_UNIQUEID},{suffix}"]
        exported[suffix] = (
            generation(ruv["nsds50ruv"]),
            {dn.lower() for dn, a in records if not is_tombstone(a)},
        )
    tamper(directory)
    r = restore(pod, *(["--online"] if kind == "online" else []), backups[kind])
    assert r.returncode == 0, r.stderr
    assert "ldif2db failed" not in r.stderr
    assert_restored(pod, directory, backups[kind])
    for backend, suffix in BACKENDS:
        generation_then, entries = exported[suffix]
        # Exactly the backed-up entries, found by a search.
        found = conn.search_s(suffix, ldap.SCOPE_SUBTREE, "(objectClass=*)", ["1.1"])
        assert {dn.lower() for dn, _ in found} == entries
        # The RUV was stripped before the import: 389-ds gave the imported backend a RUV of its own, a new
        # replica generation (an imported RUV would have brought back the exported one).
        written = pod.data / f"var/lib/dirsrv/slapd-{SERVERID}/ldif/{SERVERID}-{backend}.ldif"
        assert RUV_UNIQUEID not in written.read_text()
        assert generation(directory_ruv(conn, suffix)) != generation_then
