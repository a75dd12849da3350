"""Tests of the test platform's FreeIPA stand-in and its 389 Directory Server.

Nothing here is mocked: a real ns-slapd (testbed/ldap_server.py) holds the IPA topology, and the
stand-in's ipa-standin-init, ipactl and ipa-backup run as they do on the platform, as root in a private
mount namespace whose root is an overlay of the image directory over the host's /, with /data bound
from a per-pod directory and fresh /tmp and /run.
"""

from __future__ import annotations

import configparser
import gzip
import hashlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ldap
import ldap.filter
import ldap.modlist
import ldif
import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "testbed" / "images" / "freeipa-standin"
REALM = "EXAMPLE.TEST"
SERVERID = "EXAMPLE-TEST"
ROLE_ERROR = (
    "Error: Local roles CA do not match globally used roles ADTRUST, CA, DNS, DNSKeySync, KRA. "
    "A backup done on this host would not be complete enough to restore a fully functional, "
    "identical cluster."
)
HIDDEN_SERVICES = [
    "krb5kdc",
    "kadmin",
    "named",
    "httpd",
    "ipa-custodia",
    "pki-tomcatd",
    "smb",
    "winbind",
    "ipa-otpd",
    "ipa-dnskeysyncd",
]

# Every stand-in test: root (mount namespaces) and a real 389-ds. Other stand-in modules use these too.
STANDIN_MARKS = [
    pytest.mark.platform,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ns-slapd", path="/usr/sbin:/usr/bin") is None,
        reason="needs root and 389-ds-base (ns-slapd)",
    ),
]
pytestmark = STANDIN_MARKS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # testbed/ is not a package installed in the venv: import it from the repository.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from testbed.ldap_server import DirectoryServer

    server = DirectoryServer(tmp_path_factory.mktemp("389ds"), port=free_port())
    server.start()
    server.load_topology()
    yield server
    server.stop()


class Pod:
    """One stand-in pod: its init process in a private mount namespace; exec() enters it like kubectl."""

    def __init__(self, root: Path, env: dict[str, str], init: bool = True) -> None:
        self.root = root
        self.data = root / "data"
        self.env = env
        for d in ("data", "layer", "merged"):
            (root / d).mkdir(parents=True, exist_ok=True)
        layer, merged = root / "layer", root / "merged"
        # The image and the upper layer live on a tmpfs: overlayfs refuses layers nested in one another
        # (ELOOP), and the image directory is inside the host's /, the lowest layer.
        mounts = " && ".join(
            [
                f"mount -t tmpfs tmpfs {layer}",
                f"cp -a {IMAGE} {layer}/image",
                f"mkdir {layer}/upper {layer}/work",
                f"mount -t overlay overlay -o lowerdir={layer}/image:/,upperdir={layer}/upper,"
                f"workdir={layer}/work {merged}",
                f"mount --bind {self.data} {merged}/data",
                f"mount -t tmpfs tmpfs {merged}/tmp",
                f"mount -t tmpfs tmpfs {merged}/run",
                f"mount --rbind /dev {merged}/dev",
                f"mount -t proc proc {merged}/proc",
            ]
        )
        entry = "/usr/sbin/ipa-standin-init" if init else "/bin/sleep infinity"
        self.log = root / "init.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--fork",
                    "sh",
                    "-c",
                    f"{mounts} && exec chroot {merged} /usr/bin/env -i {self._env_words(env)} {entry}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.pid = self._init_pid()
        if init:
            self._wait_for_log("ipa-standin-init: ready")

    @staticmethod
    def _env_words(env: dict[str, str]) -> str:
        return " ".join(f"'{k}={v}'" for k, v in env.items())

    def _init_pid(self) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                pids = children.read_text().split()
            except OSError:
                pids = []
            if pids and os.readlink(f"/proc/{pids[0]}/root") != "/":
                return int(pids[0])
            if self.proc.poll() is not None:
                raise AssertionError("pod failed to start:\n" + self.log.read_text())
            time.sleep(0.02)
        raise AssertionError("pod did not start:\n" + self.log.read_text())

    def _wait_for_log(self, text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in self.log.read_text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {text!r} in the pod log:\n{self.log.read_text()}")
            time.sleep(0.02)

    def command(self, *cmd: str, env: dict[str, str] | None = None) -> list[str]:
        full_env = {**self.env, **(env or {})}
        return [
            "nsenter", "-t", str(self.pid), "-m", "-r", "-w", "--",
            "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in full_env.items()], *cmd,
        ]  # fmt: skip

    def exec(
        self, *cmd: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*cmd, env=env), capture_output=True, text=True, timeout=timeout, check=False
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pod_env(directory: Any, fqdn: str, **extra: str) -> dict[str, str]:
    """A stand-in pod's environment, as the testbed's pod spec gives it, on `directory`."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "TZ": "UTC",
        "IPA_SERVER_HOSTNAME": fqdn,
        "IPA_REALM": REALM,
        "IPA_STANDIN_LDAP_URI": directory.uri,
        "IPA_STANDIN_DM_PASSWORD": directory.password,
        **extra,
    }


@pytest.fixture
def pod_factory(directory: Any, tmp_path: Path) -> Iterator[Callable[..., Pod]]:
    pods: list[Pod] = []

    def make(host: str = "ipa-hidden", init: bool = True, **extra_env: str) -> Pod:
        env = pod_env(directory, f"{host}.example.test", **extra_env)
        pod = Pod(tmp_path / f"pod{len(pods)}", env, init=init)
        pods.append(pod)
        return pod

    yield make
    for pod in pods:
        pod.stop()


def backed_up_to(stderr: str) -> str:
    m = re.search(r"^Backed up to (/var/lib/ipa/backup/ipa-(?:full|data)-\d{4}(?:-\d\d){5})$", stderr, re.M)
    assert m, stderr
    return m.group(1)


def host_path(pod: Pod, path: str) -> Path:
    """Where a path under /var/lib/ipa in the pod lives on the host (/var/lib/ipa -> /data/var/lib/ipa)."""
    return pod.data / path.lstrip("/")


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def read_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def services_running(pod: Pod) -> bool:
    status = pod.exec("ipactl", "status")
    return status.returncode == 0


# -- 389-ds ------------------------------------------------------------------------------------------


def test_directory_topology(directory: Any) -> None:
    conn = ldap.initialize(directory.uri)
    conn.simple_bind_s(directory.bind_dn, directory.password)
    base = f"cn=masters,cn=ipa,cn=etc,{directory.suffix}"
    hosts = {
        a["cn"][0].decode() for _, a in conn.search_s(base, ldap.SCOPE_ONELEVEL, "(objectClass=*)", ["cn"])
    }
    assert hosts == {
        f"{h}.example.test" for h in ("ipa-hidden", "ipa-ca", "ipa-kra", "ipa-partial", "ipa-visible")
    }
    ca = conn.search_s(f"cn=CA,cn=ipa-ca.example.test,{base}", ldap.SCOPE_BASE)[0][1]
    assert ca["ipaConfigString"] == [b"enabledService", b"startOrder 50", b"caRenewalMaster"]
    assert {b"nsContainer", b"ipaConfigObject"} <= set(ca["objectClass"])
    hidden = conn.search_s(f"cn=ipa-hidden.example.test,{base}", ldap.SCOPE_ONELEVEL, "(cn=*)")
    assert all(b"hiddenService" in a["ipaConfigString"] for _, a in hidden)
    assert conn.search_s("o=ipaca", ldap.SCOPE_BASE)[0][0] == "o=ipaca"
    # Loopback only.
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{directory.port}"], capture_output=True, text=True)
    assert listening.stdout.split()[3] == f"127.0.0.1:{directory.port}"
    # Idempotent: loading again changes nothing and raises nothing.
    directory.load_topology()
    directory.start()


# -- init and ipactl ---------------------------------------------------------------------------------


def test_init_installs_and_ipactl(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory()
    conf = (pod.data / "etc/ipa/default.conf").read_text()
    assert conf.startswith("#File modified by ipa-client-install\n\n[global]\n")
    for line in (
        "basedn = dc=example,dc=test",
        "realm = EXAMPLE.TEST",
        "domain = example.test",
        "host = ipa-hidden.example.test",
        "xmlrpc_uri = https://ipa-hidden.example.test/ipa/xml",
        f"ldap_uri = {pod.env['IPA_STANDIN_LDAP_URI']}",
        "enable_ra = True",
    ):
        assert line + "\n" in conf
    status = pod.exec("ipactl", "status")
    assert status.returncode == 0, status
    assert status.stdout.splitlines() == ["Directory Service: RUNNING"] + [
        f"{s} Service: RUNNING" for s in HIDDEN_SERVICES
    ]
    assert status.stderr == "ipa: INFO: The ipactl command was successful\n"

    stop = pod.exec("ipactl", "stop")
    assert stop.returncode == 0
    assert stop.stdout.splitlines() == [f"Stopping {s} Service" for s in reversed(HIDDEN_SERVICES)] + [
        "Stopping Directory Service"
    ]
    status = pod.exec("ipactl", "status")
    assert (status.returncode, status.stdout) == (3, "Directory Service: STOPPED\n")
    assert "Directory Service must be running in order to obtain status of other services" in status.stderr

    start = pod.exec("ipactl", "start")
    assert start.returncode == 0 and start.stdout.startswith("Starting Directory Service\nStarting krb5kdc")
    assert services_running(pod)
    assert pod.exec("ipactl", "bogus").returncode == 2

    # A restarted pod finds the installation on its volume and only starts services.
    pod.stop()
    assert pod.proc.returncode == 0
    again = Pod(pod.root, pod.env)
    try:
        assert "already configured" in again.log.read_text()
        assert services_running(again)
    finally:
        again.stop()


# -- ipa-backup: success paths -----------------------------------------------------------------------


def test_data_backup_online(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory()
    started = time.gmtime(time.time() - 1)
    r = pod.exec("ipa-backup", "--data", "--online")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[:2] == [
        "Preparing backup on ipa-hidden.example.test",
        "Local roles match globally used roles, proceeding.",
    ]
    assert lines[2:7] == [
        f"Backing up ipaca in {SERVERID} to LDIF",
        "Waiting for LDIF to finish",
        f"Backing up userRoot in {SERVERID} to LDIF",
        "Waiting for LDIF to finish",
        f"Backing up {SERVERID}",
    ]
    assert lines[-1] == "The ipa-backup command was successful"
    assert not any("Stopping" in line for line in lines)
    path = backed_up_to(r.stderr)
    assert path.startswith("/var/lib/ipa/backup/ipa-data-")
    bdir = host_path(pod, path)
    assert bdir.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in bdir.iterdir()) == ["header", "ipa-data.tar"]

    header = configparser.ConfigParser()
    header.read(bdir / "header")
    h = dict(header["ipa"])
    assert list(h) == ["type", "time", "host", "ipa_version", "version", "services"]
    assert h["type"] == "DATA" and h["host"] == "ipa-hidden.example.test"
    assert h["ipa_version"] == "4.12.2" and h["version"] == "1"
    assert h["services"] == "ADTRUST,CA,DNS,DNSKeySync,EXTID,HTTP,KDC,KEYS,KPASSWD,KRA,OTPD"
    assert time.strptime(h["time"], "%Y-%m-%dT%H:%M:%S") >= started

    archive = bdir / "ipa-data.tar"
    assert archive.read_bytes()[:2] == b"\x1f\x8b"  # a .tar that is really gzip, as the real one
    names = set(members(archive))
    assert {f"./{SERVERID}-userRoot.ldif", f"./{SERVERID}-ipaca.ldif", f"./{SERVERID}"} <= names
    assert f"./{SERVERID}/userRoot/id2entry.db" in names
    assert "./files.tar" not in names
    userroot = read_member(archive, f"./{SERVERID}-userRoot.ldif").decode()
    assert userroot.startswith("version: 1\n")
    for user in ("admin", "alice", "bob", "carol"):
        assert f"dn: uid={user},cn=users,cn=accounts,dc=example,dc=test\n" in userroot
    assert "nsUniqueId: " in userroot
    assert "dn: uid=ipara,ou=people,o=ipaca" in read_member(archive, f"./{SERVERID}-ipaca.ldif").decode()
    assert services_running(pod)


def test_data_backup_offline_stops_only_dirsrv(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory("ipa-visible")
    r = pod.exec("ipa-backup", "--data")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines.index("Stopping Directory Server") < lines.index(
        f"Backing up userRoot in {SERVERID} to LDIF"
    )
    assert lines.index(f"Backing up {SERVERID}") < lines.index("Starting Directory Server")
    assert "Waiting for LDIF to finish" not in lines
    assert services_running(pod)


def test_full_backup_stops_and_restarts(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory()
    r = pod.exec("ipa-backup", "-v", "--logs")
    assert r.returncode == 0, r.stderr
    # -v shows ipactl's captured output (ipautil.run logs it at debug level).
    out = r.stderr
    assert "ipaserver.install.ipa_backup: INFO: Stopping IPA services" in out
    assert out.index("stdout=Stopping ipa-dnskeysyncd Service") < out.index("INFO: Backing up ipaca")
    assert out.index("INFO: Backing up files") < out.index("INFO: Starting IPA service")
    assert out.index("INFO: Starting IPA service") < out.index("stdout=Starting Directory Service")
    assert "ipapython.admintool: INFO: The ipa-backup command was successful" in out
    path = re.search(r"INFO: Backed up to (\S+)", out)
    assert path and "/ipa-full-" in path.group(1)
    bdir = host_path(pod, path.group(1))
    archive = bdir / "ipa-full.tar"
    header = configparser.ConfigParser()
    header.read(bdir / "header")
    assert header["ipa"]["type"] == "FULL"
    assert "./files.tar" in members(archive)
    files_tar = read_member(archive, "./files.tar")
    assert files_tar[:2] == b"\x1f\x8b"
    with tarfile.open(fileobj=io.BytesIO(files_tar), mode="r:gz") as ft:
        inner = {m.name: m for m in ft.getmembers()}
    # As in freeipa-container: /var/lib/ipa is a symlink into /data, so only the link is archived.
    assert inner["var/lib/ipa"].issym() and inner["var/lib/ipa"].linkname == "/data/var/lib/ipa"
    assert inner["etc/ipa/default.conf"].isfile()
    assert "var/log/ipaserver-install.log" in inner  # --logs
    assert services_running(pod)


def test_gpg_encrypted_backup(pod_factory: Callable[..., Pod], tmp_path: Path) -> None:
    pod = pod_factory()
    gnupg = pod.data / "gnupg"
    gnupg.mkdir(mode=0o700)
    subprocess.run(
        ["gpg", "--homedir", str(gnupg), "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
         "--quick-gen-key", "IPA Backup <root@example.test>", "default", "default", "never"],
        check=True, capture_output=True,
    )  # fmt: skip
    r = pod.exec("ipa-backup", "--data", "--online", "--gpg", env={"GNUPGHOME": "/data/gnupg"})
    assert r.returncode == 0, r.stderr
    path = backed_up_to(r.stderr)
    assert f"Encrypting {path}/ipa-data.tar" in r.stderr.splitlines()
    bdir = host_path(pod, path)
    assert sorted(p.name for p in bdir.iterdir()) == ["header", "ipa-data.tar.gpg"]
    plain = subprocess.run(
        ["gpg", "--homedir", str(gnupg), "--batch", "--decrypt", str(bdir / "ipa-data.tar.gpg")],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    assert plain[:2] == b"\x1f\x8b"
    subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "all"], check=False)

    # Without a secret key the test encryption in validate_options fails before anything else.
    r = pod.exec("ipa-backup", "--data", "--online", "--gpg", env={"GNUPGHOME": "/tmp"})
    assert r.returncode == 1
    assert "gpg failed: " in r.stderr and "Preparing backup" not in r.stderr


def test_payload_bytes(pod_factory: Callable[..., Pod]) -> None:
    size = 8 * 1024 * 1024 + 123
    pod = pod_factory(IPA_STANDIN_PAYLOAD_BYTES=str(size))
    r = pod.exec("ipa-backup", "--data", "--online")
    assert r.returncode == 0, r.stderr
    archive = host_path(pod, backed_up_to(r.stderr)) / "ipa-data.tar"
    assert archive.stat().st_size > size  # incompressible
    info = members(archive)[f"./{SERVERID}/userRoot/id2entry.db"]
    assert info.size == size
    assert subprocess.run(["gzip", "-t", str(archive)], check=False).returncode == 0
    with gzip.open(archive) as f:
        assert len(f.read(1024)) == 1024


# -- ipa-backup: refusals ----------------------------------------------------------------------------


def test_usage_errors(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory()
    for args, message in (
        (["--online"], "You cannot specify --online without --data"),
        (["--data", "--logs"], "You cannot specify --data with --logs"),
    ):
        r = pod.exec("ipa-backup", *args)
        assert r.returncode == 2, r
        assert r.stderr == (
            f"Usage: ipa-backup [options]\n\nipa-backup: error: {message}\nThe ipa-backup command failed.\n"
        )
    r = pod.exec("ipa-backup", "--bogus")
    assert r.returncode == 2 and "ipa-backup: error: no such option: --bogus" in r.stderr
    assert services_running(pod)
    assert not (pod.data / "var/lib/ipa/backup").exists() or not any(
        (pod.data / "var/lib/ipa/backup").iterdir()
    )


def test_not_root_and_not_configured(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory()
    r = pod.exec(
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/sbin/ipa-backup", "--data"
    )
    assert r.returncode == 1
    assert r.stderr == (
        "Must be root to run ipa-backup\n"
        "The ipa-backup command failed. See /var/log/ipabackup.log for more information\n"
    )
    bare = pod_factory(init=False)
    r = bare.exec("ipa-backup", "--data")
    assert r.returncode == 2
    assert r.stderr == "IPA is not configured on this system.\nThe ipa-backup command failed.\n"
    r = bare.exec("ipactl", "status")
    assert r.returncode == 4 and "IPA is not configured" in r.stderr


def test_role_mismatch(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory("ipa-partial")
    r = pod.exec("ipa-backup")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "Preparing backup on ipa-partial.example.test",
        ROLE_ERROR,
        "The ipa-backup command failed. See /var/log/ipabackup.log for more information",
    ]
    # The role check comes before anything is stopped.
    assert services_running(pod)

    r = pod.exec("ipa-backup", "--data", "--online", "--disable-role-check")
    assert r.returncode == 0, r.stderr
    # Now a warning, in 4.12's own words.
    assert r.stderr.splitlines()[1] == (
        ROLE_ERROR.replace("Error: ", "Warning: ") + " Proceeding as role check was explicitly disabled."
    )
    names = members(host_path(pod, backed_up_to(r.stderr)) / "ipa-data.tar")
    assert f"./{SERVERID}-ipaca.ldif" in names  # ipa-partial has a CA


def test_the_role_check_compares_the_host_name_case_sensitively(pod_factory: Callable[..., Pod]) -> None:
    # cn=masters holds ipa-hidden.example.test; a server that calls itself IPA-HIDDEN.example.test has no
    # role of its own in ipa-backup's eyes (ipa_backup.py compares the cn with api.env.host as is).
    pod = pod_factory("ipa-hidden", IPA_SERVER_HOSTNAME="IPA-HIDDEN.example.test")
    r = pod.exec("ipa-backup", "--data", "--online")
    assert r.returncode == 1
    assert (
        "Error: Local roles  do not match globally used roles ADTRUST, CA, DNS, DNSKeySync, KRA." in r.stderr
    )


def test_no_ca_no_ipaca_ldif(pod_factory: Callable[..., Pod], directory: Any) -> None:
    # ipa-visible has every role; drop its CA for a moment to see a CA-less export.
    conn = directory.connect()
    dn = f"cn=CA,cn=ipa-visible.example.test,cn=masters,cn=ipa,cn=etc,{directory.suffix}"
    conn.delete_s(dn)
    try:
        pod = pod_factory("ipa-visible")
    finally:
        directory.load_topology()
    assert "enable_ra = False" in (pod.data / "etc/ipa/default.conf").read_text()
    r = pod.exec("ipa-backup", "--data", "--online")
    assert r.returncode == 0, r.stderr
    assert f"Backing up ipaca in {SERVERID} to LDIF" not in r.stderr
    names = members(host_path(pod, backed_up_to(r.stderr)) / "ipa-data.tar")
    assert f"./{SERVERID}-ipaca.ldif" not in names and f"./{SERVERID}-userRoot.ldif" in names


# -- ipa-backup: faults ------------------------------------------------------------------------------


def test_fault_ldif(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory(IPA_STANDIN_FAULT="ldif")
    r = pod.exec("ipa-backup")
    assert r.returncode == 1
    assert "Backed up to" not in r.stderr
    assert "Stopping IPA services" in r.stderr
    assert re.search(
        r"^db2ldif failed: .*No space left on device.*\n.*\n Check if destination directory "
        rf"/var/lib/dirsrv/slapd-{SERVERID}/ldif has enough space\.$",
        r.stderr,
        re.M,
    ), r.stderr
    assert r.stderr.endswith(
        "The ipa-backup command failed. See /var/log/ipabackup.log for more information\n"
    )
    assert not services_running(pod)  # nothing restarts IPA after a failed offline backup
    assert not any((pod.data / "var/lib/ipa/backup").iterdir())

    r = pod.exec("ipa-backup", "--data", "--online")
    assert r.returncode == 1
    assert "BAK online task failed. Check file systems' free space." in r.stderr.splitlines()


def test_fault_file_overrides_env_diskfull(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory(IPA_STANDIN_FAULT="ldif")
    (pod.data / "ipa-standin-fault").write_text("diskfull\n")
    r = pod.exec("ipa-backup")
    assert r.returncode == 1
    assert "Backing up files" in r.stderr and "Backed up to" not in r.stderr
    # tar's own error, with its "Removing leading `/'" notes before it, as ipautil.run collected it.
    assert "\ntar returned non-zero code 2: tar: " in r.stderr
    assert re.search(
        r"^tar: /tmp/tmp\w+ipa/ipa/files\.tar: Cannot write: No space left on device$", r.stderr, re.M
    )
    assert not services_running(pod)
    (pod.data / "ipa-standin-fault").write_text("")  # an empty file: no fault
    assert pod.exec("ipactl", "start").returncode == 0
    r = pod.exec("ipa-backup", "--data", "--online")
    assert r.returncode == 0, r.stderr


def test_fault_killed(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory(IPA_STANDIN_FAULT="killed", IPA_STANDIN_PAYLOAD_BYTES=str(4 << 20))
    r = pod.exec("ipa-backup")
    assert r.returncode == -signal.SIGKILL
    assert r.stderr.splitlines()[-1] == f"Backing up {SERVERID}"
    assert "The ipa-backup command" not in r.stderr
    assert not services_running(pod)
    leftovers = pod.exec("sh", "-c", "ls -d /tmp/*ipa")
    assert leftovers.returncode == 0  # the temporary directory stays behind


def test_fault_hang(pod_factory: Callable[..., Pod], tmp_path: Path) -> None:
    pod = pod_factory()
    (pod.data / "ipa-standin-fault").write_text("hang")
    err = tmp_path / "hang.err"
    with open(err, "w") as f:
        proc = subprocess.Popen(pod.command("ipa-backup"), stderr=f, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while f"Backing up ipaca in {SERVERID} to LDIF" not in err.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting
        assert not services_running(pod)
    finally:
        proc.kill()
        proc.wait()
    assert "Backed up to" not in err.read_text()


def test_fault_startfail(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory()
    # Set once the pod is up: init's own `ipactl start` would fail too.
    (pod.data / "ipa-standin-fault").write_text("startfail\n")
    r = pod.exec("ipa-backup")
    assert r.returncode == 1
    assert r.stderr.splitlines()[-3:] == [
        "Starting IPA service",
        "CalledProcessError(Command ['/usr/sbin/ipactl', 'start'] returned non-zero exit status 1)",
        "The ipa-backup command failed. See /var/log/ipabackup.log for more information",
    ]
    assert not any((pod.data / "var/lib/ipa/backup").iterdir())
    assert not services_running(pod)  # everything stopped again, the directory server too

    r = pod.exec("ipactl", "start")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "Starting Directory Service",
        "Starting krb5kdc Service",
        "Starting kadmin Service",
        "Starting named Service",
    ]
    # The failed start before left its (emptied) service list file behind.
    assert r.stderr.splitlines() == [
        "Existing service file detected!",
        "Assuming stale, cleaning and proceeding",
        "Failed to start named Service",
        "Shutting down",
        "Hint: You can use --ignore-service-failure option for forced start in case that a non-critical "
        "service failed",
        "Aborting ipactl",
    ]
    status = pod.exec("ipactl", "status")
    assert status.returncode == 3 and status.stdout == "Directory Service: STOPPED\n"

    # Forced: the failed service is left out, the others run.
    r = pod.exec("ipactl", "start", "--ignore-service-failures")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[-3:] == [
        "Failed to start named Service",
        "Forced start, ignoring named Service, continuing normal operation",
        "ipa: INFO: The ipactl command was successful",
    ]
    assert pod.exec("ipactl", "stop").returncode == 0

    (pod.data / "ipa-standin-fault").write_text("")
    assert pod.exec("ipactl", "start").returncode == 0
    assert services_running(pod)


def test_fault_rewrite_changes_the_archive_right_after_its_checksum(pod_factory: Callable[..., Pod]) -> None:
    pod = pod_factory()
    r = pod.exec("ipa-backup", "--data", "--online")
    assert r.returncode == 0, r.stderr
    path = backed_up_to(r.stderr)
    archive, header = host_path(pod, path) / "ipa-data.tar", host_path(pod, path) / "header"
    before, header_before = archive.read_bytes(), header.read_bytes()

    # Without the fault the hook is coreutils' sha256sum and nothing else.
    out = pod.exec("sha256sum", "--", f"{path}/ipa-data.tar")
    assert out.returncode == 0 and out.stdout.split()[0] == hashlib.sha256(before).hexdigest()
    assert archive.read_bytes() == before

    (pod.data / "ipa-standin-fault").write_text("rewrite")
    out = pod.exec("sha256sum", "--", f"{path}/header", f"{path}/ipa-data.tar")
    assert out.returncode == 0
    # The checksums printed are of the files as they were; the archive has changed once it returned.
    assert [line.split()[0] for line in out.stdout.splitlines()] == [
        hashlib.sha256(header_before).hexdigest(),
        hashlib.sha256(before).hexdigest(),
    ]
    after = archive.read_bytes()
    assert len(after) == len(before)
    assert [i for i in range(len(before)) if before[i] != after[i]] == [len(before) // 2]
    assert header.read_bytes() == header_before  # only archives are touched


@pytest.mark.parametrize("fault", ["noheader", "badheader", "noarchive", "otherdir"])
def test_faults_in_the_backup_directory_left_by_a_successful_run(
    pod_factory: Callable[..., Pod], fault: str
) -> None:
    pod = pod_factory()
    (pod.data / "ipa-standin-fault").write_text(fault)
    r = pod.exec("ipa-backup", "--data", "--online")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[-1] == "The ipa-backup command was successful"
    reported = re.search(r"^Backed up to (\S+)$", r.stderr, re.M)
    assert reported, r.stderr
    (name,) = [p.name for p in (pod.data / "var/lib/ipa/backup").iterdir()]
    canonical = f"/var/lib/ipa/backup/{name}"
    bdir = host_path(pod, canonical)
    present = sorted(p.name for p in bdir.iterdir())
    if fault == "otherdir":
        assert reported[1] == "/data" + canonical
        assert pod.exec("test", "-f", f"{reported[1]}/ipa-data.tar").returncode == 0  # the same directory
    else:
        assert reported[1] == canonical
    expected = {"noheader": ["ipa-data.tar"], "noarchive": ["header"]}.get(fault, ["header", "ipa-data.tar"])
    assert present == expected
    if fault == "badheader":
        text = (bdir / "header").read_text()
        assert len(text) == 40 and text.startswith("[ipa]\ntype = DATA\ntime = ")
        assert "host" not in text and "version" not in text


# -- ipa-backup: 389-ds's own replica export ---------------------------------------------------------

RUV_UNIQUEID = "ffffffff-ffffffff-ffffffff-ffffffff"
BACKENDS = (("userRoot", "dc=example,dc=test"), ("ipaca", "o=ipaca"))


def ldif_records(archive: Path, backend: str) -> list[tuple[str, dict[str, list[bytes]]]]:
    """The archived LDIF of a backend by attribute type: a replica export writes replication state as
    attribute options (objectClass;vucsn-<csn>: ...) and the RUV's names in lowercase."""
    parser = ldif.LDIFRecordList(io.BytesIO(read_member(archive, f"./{SERVERID}-{backend}.ldif")))
    parser.parse()
    records = []
    for dn, attrs in parser.all_records:
        types: dict[str, list[bytes]] = {}
        for name, values in attrs.items():
            types.setdefault(name.split(";", 1)[0].lower(), []).extend(values)
        records.append((dn, types))
    return records


def is_tombstone(attrs: dict[str, list[bytes]]) -> bool:
    return b"nstombstone" in {v.lower() for v in attrs.get("objectclass", [])}


def generation(ruv: list[bytes]) -> bytes:
    (value,) = [v for v in ruv if v.startswith(b"{replicageneration} ")]
    return value


def directory_ruv(conn: Any, suffix: str) -> list[bytes]:
    """The nsds50ruv of the suffix's one RUV tombstone, as 389-ds answers a search for it."""
    ((_dn, attrs),) = conn.search_s(
        suffix, ldap.SCOPE_SUBTREE, f"(&(objectClass=nsTombstone)(nsUniqueId={RUV_UNIQUEID}))", ["nsds50ruv"]
    )
    ruv: list[bytes] = attrs["nsds50ruv"]
    return ruv


def export_tasks(conn: Any, nsfilename: Path, exit_code: str = "*") -> list[dict[str, list[bytes]]]:
    flt = f"(&(nsFilename={ldap.filter.escape_filter_chars(str(nsfilename))})(nsTaskExitCode={exit_code}))"
    found = conn.search_s("cn=export,cn=tasks,cn=config", ldap.SCOPE_ONELEVEL, flt)
    return [{k.lower(): v for k, v in attrs.items()} for _dn, attrs in found]


def test_directory_is_replicated(directory: Any) -> None:
    conn = directory.connect()
    for backend, suffix in BACKENDS:
        replica = dict(
            conn.search_s(f'cn=replica,cn="{suffix}",cn=mapping tree,cn=config', ldap.SCOPE_BASE)[0][1]
        )
        assert replica["nsDS5ReplicaRoot"] == [suffix.encode()]
        assert (replica["nsDS5ReplicaType"], replica["nsDS5Flags"]) == ([b"3"], [b"1"])
        assert conn.search_s(
            f"cn=changelog,cn={backend},cn=ldbm database,cn=plugins,cn=config", ldap.SCOPE_BASE
        )
        assert generation(directory_ruv(conn, suffix))
        # Normal searches do not see tombstones.
        found = conn.search_s(suffix, ldap.SCOPE_SUBTREE, "(objectClass=*)", ["objectClass"])
        assert not any(is_tombstone({"objectclass": attrs["objectClass"]}) for _dn, attrs in found)


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
def test_the_ldif_is_389ds_replica_export(
    pod_factory: Callable[..., Pod], directory: Any, online: bool
) -> None:
    # No IPA_STANDIN_DS_DATA_DIR, as a pod on a claim: ipa-backup finds /data's host path from its mount.
    pod = pod_factory()
    assert "IPA_STANDIN_DS_DATA_DIR" not in pod.env
    conn = directory.connect()
    # A deleted entry: a replica export carries its tombstone too.
    gone = f"uid=gone-{'online' if online else 'offline'},cn=users,cn=accounts,{directory.suffix}"
    conn.add_s(
        gone,
        ldap.modlist.addModlist(
            {
                "objectClass": [b"top", b"person", b"inetOrgPerson"],
                "uid": [b"gone"],
                "cn": [b"G"],
                "sn": [b"G"],
            }
        ),
    )
    conn.delete_s(gone)
    r = pod.exec("ipa-backup", "--data", *(["--online"] if online else []))
    assert r.returncode == 0, r.stderr
    archive = host_path(pod, backed_up_to(r.stderr)) / "ipa-data.tar"
    for backend, suffix in BACKENDS:
        records = ldif_records(archive, backend)
        # The RUV tombstone, as 389-ds's own export writes it, with the directory's replica generation.
        (ruv,) = [attrs for dn, attrs in records if dn.lower() == f"nsuniqueid={RUV_UNIQUEID},{suffix}"]
        assert is_tombstone(ruv) and ruv["nsuniqueid"] == [RUV_UNIQUEID.encode()]
        assert generation(ruv["nsds50ruv"]) == generation(directory_ruv(conn, suffix))
        assert all(attrs.get("nsuniqueid") for _dn, attrs in records)
        # Every entry a search finds, and nothing else but tombstones.
        searched = {
            dn.lower() for dn, _ in conn.search_s(suffix, ldap.SCOPE_SUBTREE, "(objectClass=*)", ["1.1"])
        }
        assert {dn.lower() for dn, attrs in records if not is_tombstone(attrs)} == searched
        # The export task 389-ds ran, writing through the host path of the pod's /data.
        ldif_file = pod.data / f"var/lib/dirsrv/slapd-{SERVERID}/ldif/{SERVERID}-{backend}.ldif"
        (task,) = export_tasks(conn, ldif_file)
        assert task["nsinstance"] == [backend.encode()] and task["nsexportreplica"] == [b"true"]
        assert task["nstaskexitcode"] == [b"0"]
        assert task["cn"][0].startswith(f"export_{backend}_".encode())
        assert not ldif_file.exists()  # moved into the archive
    userroot = ldif_records(archive, "userRoot")
    assert any(is_tombstone(attrs) and dn.lower().endswith(f",{gone}") for dn, attrs in userroot)
    assert services_running(pod)


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
def test_a_failed_export_task(
    pod_factory: Callable[..., Pod], directory: Any, tmp_path: Path, online: bool
) -> None:
    # A /data host path that does not exist on the host: 389-ds cannot open the LDIF, the task fails.
    pod = pod_factory(IPA_STANDIN_DS_DATA_DIR=str(tmp_path / "missing"))
    r = pod.exec("ipa-backup", "--data", *(["--online"] if online else []))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    if online:
        assert lines[-4:] == [
            f"Backing up ipaca in {SERVERID} to LDIF",
            "Waiting for LDIF to finish",
            "BAK online task failed. Check file systems' free space.",
            "The ipa-backup command failed. See /var/log/ipabackup.log for more information",
        ]
        assert services_running(pod)
    else:
        # dsctl's failure line, quoting 389-ds's own task log.
        missing = tmp_path / f"missing/var/lib/dirsrv/slapd-{SERVERID}/ldif/{SERVERID}-ipaca.ldif"
        assert re.search(
            r"^db2ldif failed: Beginning export of 'ipaca'\n"
            rf"Backend ipaca: can't open {re.escape(str(missing))}: .*\n"
            r"(.*\n)*db2ldif failed\n Check if destination directory "
            rf"/var/lib/dirsrv/slapd-{SERVERID}/ldif has enough space\.$",
            r.stderr,
            re.M,
        ), r.stderr
        assert not services_running(pod)  # nothing starts the directory server again, as in the real tool
    assert not any((pod.data / "var/lib/ipa/backup").iterdir())


def test_an_export_written_elsewhere_is_a_stand_in_error(
    pod_factory: Callable[..., Pod], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / f"var/lib/dirsrv/slapd-{SERVERID}/ldif").mkdir(parents=True)
    pod = pod_factory(IPA_STANDIN_DS_DATA_DIR=str(elsewhere))
    r = pod.exec("ipa-backup", "--data", "--online")
    assert r.returncode == 1
    written = elsewhere / f"var/lib/dirsrv/slapd-{SERVERID}/ldif/{SERVERID}-ipaca.ldif"
    assert (
        f"TEST STAND-IN: the export task wrote {written} on the host, which is not this pod's "
        f"/var/lib/dirsrv/slapd-{SERVERID}/ldif/{SERVERID}-ipaca.ldif: set IPA_STANDIN_DS_DATA_DIR to the "
        "host path of the pod's /data volume"
    ) in r.stderr.splitlines()
    assert written.read_text().startswith("version: 1\n")


def test_an_export_waits_for_another_task_on_the_shared_backend(
    pod_factory: Callable[..., Pod], directory: Any, tmp_path: Path
) -> None:
    # Every pod exports from the one shared 389-ds, which runs one task at a time per backend (a server's
    # own 389-ds serves only its own backups). An export into a FIFO holds userRoot until it is read.
    pod = pod_factory()
    fifo = tmp_path / "held.ldif"
    os.mkfifo(fifo)
    conn = directory.connect()
    held = "cn=held_userRoot,cn=export,cn=tasks,cn=config"
    conn.add_s(
        held,
        ldap.modlist.addModlist(
            {
                "objectClass": [b"top", b"extensibleObject"],
                "cn": [b"held_userRoot"],
                "nsInstance": [b"userRoot"],
                "nsFilename": [str(fifo).encode()],
                "nsExportReplica": [b"true"],
            }
        ),
    )
    err = tmp_path / "backup.err"
    try:
        deadline = time.monotonic() + 20
        while not conn.search_s(held, ldap.SCOPE_BASE, "(nsTaskLog=*)", ["1.1"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with open(err, "w") as f:
            proc = subprocess.Popen(
                pod.command("ipa-backup", "--data", "--online"), stderr=f, stdout=subprocess.DEVNULL
            )
        ldif_file = pod.data / f"var/lib/dirsrv/slapd-{SERVERID}/ldif/{SERVERID}-userRoot.ldif"
        while not export_tasks(conn, ldif_file, "-2"):
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            time.sleep(0.05)
        assert proc.poll() is None  # refused once, it tries again
    finally:
        fifo.read_bytes()  # the held export runs to its end: userRoot is free again
    assert proc.wait(timeout=60) == 0, err.read_text()
    assert err.read_text().splitlines()[2:7] == [
        f"Backing up ipaca in {SERVERID} to LDIF",
        "Waiting for LDIF to finish",
        f"Backing up userRoot in {SERVERID} to LDIF",
        "Waiting for LDIF to finish",
        f"Backing up {SERVERID}",
    ]
    assert [t["nstaskexitcode"] for t in export_tasks(conn, ldif_file, "0")] == [[b"0"]]
    archive = host_path(pod, backed_up_to(err.read_text())) / "ipa-data.tar"
    assert any(dn.startswith(f"nsuniqueid={RUV_UNIQUEID},") for dn, _ in ldif_records(archive, "userRoot"))
