"""A real 389 Directory Server on loopback, holding a FreeIPA-shaped directory for the test platform.

FreeIPA cannot be installed here, so the FreeIPA stand-in (testbed/images/freeipa-standin) and the
operator's own role pre-flight talk to this server instead of a real IPA directory. It is a genuine
ns-slapd from Debian's 389-ds-base, created from the package's own dse.ldif template: nothing about
LDAP is mocked.

Instance layout: everything lives under ``state_dir`` (config, schema, databases, logs, pid file);
nothing is written to /etc/dirsrv or /var/lib/dirsrv. dscreate is not used because lib389 insists on
finding the instance under /etc/dirsrv/slapd-NAME. ns-slapd listens on 127.0.0.1 only
(nsslapd-listenhost), LDAPI and TLS are off, and it runs as root.

Directory contents after :meth:`DirectoryServer.load_topology` (suffix ``dc=example,dc=test``, domain
``example.test``, realm ``EXAMPLE.TEST``; see also testbed/ldap/README.md):

* backends ``userRoot`` (the suffix) and ``ipaca`` (``o=ipaca``), like a real IPA server with a CA;
* replication configured on both suffixes as on an IPA master (a supplier replica with its changelog, no
  agreements): each backend holds its RUV tombstone
  (``nsuniqueid=ffffffff-ffffffff-ffffffff-ffffffff,<suffix>``) and deleted entries leave tombstones,
  which a replica export (``db2ldif -r``, ``nsExportReplica``) writes out; normal searches do not see them;
* the FreeIPA schema subset in testbed/ldap/60ipa-standin.ldif (real OIDs and definitions);
* users admin, alice, bob, carol under ``cn=users,cn=accounts``; groups admins, ipausers, engineering;
  a couple of Dogtag entries under ``o=ipaca`` (testbed/ldap/base.ldif);
* the server topology under ``cn=masters,cn=ipa,cn=etc,<suffix>`` generated from :data:`TOPOLOGY`:

  =========================  =======  ==========================================================
  host                       state    services (cn=<SVC>,cn=<host>,cn=masters,...)
  =========================  =======  ==========================================================
  ipa-hidden.example.test    hidden   every role: KDC KPASSWD DNS HTTP KEYS CA KRA ADTRUST EXTID
                                      OTPD DNSKeySync
  ipa-ca.example.test        enabled  KDC KPASSWD HTTP KEYS CA OTPD (CA carries caRenewalMaster)
  ipa-kra.example.test       enabled  KDC KPASSWD HTTP KEYS CA KRA OTPD
  ipa-partial.example.test   hidden   KDC KPASSWD HTTP KEYS CA OTPD (no KRA, no DNS/DNSKeySync,
                                      no ADTRUST: fails the ipa-backup role check)
  ipa-visible.example.test   enabled  every role, like ipa-hidden, but not hidden
  =========================  =======  ==========================================================

  Each service entry has objectClass nsContainer + ipaConfigObject and ipaConfigString values
  ``enabledService`` or ``hiddenService`` plus ``startOrder <n>`` (FreeIPA's start orders).
  Globally used roles, as ipa-backup computes them: ADTRUST, CA, DNS, DNSKeySync, KRA.

CLI: ``python -m testbed.ldap_server up|down STATE_DIR [--port N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ldap
import ldap.modlist
import ldif  # type: ignore[import-untyped,unused-ignore]
from ldap.ldapobject import LDAPObject

DATA_DIR = Path(__file__).resolve().parent / "ldap"
DSE_TEMPLATE = Path("/usr/share/dirsrv/data/template-dse.ldif")
DS_CONFIG_FILES = Path("/etc/dirsrv/config")
DS_USER_SCHEMA = Path("/etc/dirsrv/schema/99user.ldif")
NS_SLAPD = "/usr/sbin/ns-slapd"
PWDHASH = "/usr/bin/pwdhash"

ENABLED = "enabledService"
HIDDEN = "hiddenService"

# FreeIPA's service start orders (ipaserver/servroles + ipaserver/install/service.py SERVICES).
START_ORDER = {
    "KDC": 10,
    "KPASSWD": 20,
    "DNS": 30,
    "HTTP": 40,
    "KEYS": 41,
    "CA": 50,
    "KRA": 51,
    "ADTRUST": 60,
    "EXTID": 70,
    "OTPD": 80,
    "DNSKeyExporter": 90,
    "DNSSEC": 100,
    "DNSKeySync": 110,
}

# Replica IDs must differ among the servers replicating a suffix; this directory replicates with none.
REPLICA_IDS = {"userRoot": 1, "ipaca": 2}

ALL_ROLES = ("KDC", "KPASSWD", "DNS", "HTTP", "KEYS", "CA", "KRA", "ADTRUST", "EXTID", "OTPD", "DNSKeySync")
MASTER_ONLY = ("KDC", "KPASSWD", "HTTP", "KEYS", "OTPD")


@dataclass(frozen=True)
class Server:
    """One IPA server of the topology: short host name (the domain is appended), state, services."""

    name: str
    state: str
    services: tuple[str, ...]
    extras: tuple[tuple[str, str], ...] = ()  # (service, extra ipaConfigString), e.g. caRenewalMaster


TOPOLOGY: tuple[Server, ...] = (
    Server("ipa-hidden", HIDDEN, ALL_ROLES),
    Server("ipa-ca", ENABLED, (*MASTER_ONLY, "CA"), (("CA", "caRenewalMaster"),)),
    Server("ipa-kra", ENABLED, (*MASTER_ONLY, "CA", "KRA")),
    Server("ipa-partial", HIDDEN, (*MASTER_ONLY, "CA")),
    Server("ipa-visible", ENABLED, ALL_ROLES),
)


def suffix_to_domain(suffix: str) -> str:
    """dc=example,dc=test -> example.test (IPA derives its base DN from the domain the same way)."""
    parts = [rdn.split("=", 1) for rdn in suffix.split(",")]
    return ".".join(value for attr, value in parts if attr.strip().lower() == "dc")


class DirectoryServerError(RuntimeError):
    pass


class DirectoryServer:
    """A 389-ds instance under ``state_dir``, listening on ``ldap://127.0.0.1:<port>`` only."""

    def __init__(self, state_dir: Path, port: int = 3389, suffix: str = "dc=example,dc=test") -> None:
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.suffix = suffix
        self.uri = f"ldap://127.0.0.1:{port}"
        self.bind_dn = "cn=Directory Manager"
        self.domain = suffix_to_domain(suffix)
        self.realm = self.domain.upper()
        self.config_dir = self.state_dir / "etc"
        self.pid_file = self.state_dir / "run" / "slapd.pid"
        self.error_log = self.state_dir / "log" / "errors"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.password = self._password()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the instance on first use, start ns-slapd if it is not running, wait for a bind."""
        if not (self.config_dir / "dse.ldif").exists():
            self._create_instance()
        if self._running_pid() is None:
            self._set_port()
            # A pid file left by a crashed or killed instance would make the wait below mistake
            # the old, dead pid for the new server having died.
            self.pid_file.unlink(missing_ok=True)
            # ns-slapd daemonizes itself and writes its pid file; it exits non-zero when the
            # configuration is unusable, which is reported from its error log.
            result = subprocess.run(
                [NS_SLAPD, "-D", str(self.config_dir), "-i", str(self.pid_file)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise DirectoryServerError(
                    f"ns-slapd failed to start (exit {result.returncode}): {result.stderr}{self._log_tail()}"
                )
        self._wait_for_bind(timeout=60)
        self._ensure_backends()
        self._ensure_replication()

    def stop(self) -> None:
        """Stop this instance's ns-slapd: the pid from its pid file, checked against its command line."""
        pid = self._running_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    def connect(self) -> Any:
        """A bound python-ldap connection as Directory Manager."""
        conn: LDAPObject = ldap.initialize(self.uri)
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 5)
        conn.simple_bind_s(self.bind_dn, self.password)
        return conn

    # -- data ------------------------------------------------------------------------------------

    def load_topology(self) -> None:
        """Load the IPA schema subset, the base tree and the server topology; safe to run again.

        Re-running also resets every topology host's services to :data:`TOPOLOGY`, so a test that
        changed them can restore the documented state.
        """
        conn = self.connect()
        try:
            self._load_schema(conn)
            for dn, entry in self._base_entries():
                _add_if_missing(conn, dn, entry)
            for dn, entry, children in self._topology_entries():
                _add_if_missing(conn, dn, entry)
                self._sync_services(conn, dn, children)
        finally:
            conn.unbind_s()

    @contextlib.contextmanager
    def more_servers(self, servers: Sequence[Server]) -> Iterator[list[str]]:
        """Servers added to the topology for the duration of the `with` (tests and benchmarks that need
        many FreeIPA servers at once); yields their FQDNs. TOPOLOGY itself stays as documented."""
        entries = self._topology_entries(servers)
        conn = self.connect()
        try:
            for dn, entry, children in entries:
                _add_if_missing(conn, dn, entry)
                self._sync_services(conn, dn, children)
            yield [f"{server.name}.{self.domain}" for server in servers]
        finally:
            for dn, _, children in entries:
                for cn in children:
                    conn.delete_s(f"cn={cn},{dn}")
                conn.delete_s(dn)
            conn.unbind_s()

    # -- internals -------------------------------------------------------------------------------

    def _password(self) -> str:
        path = self.state_dir / "dm-password"
        if not path.exists():
            # The password must survive restarts: it is hashed into dse.ldif at creation time.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("DM-" + secrets.token_urlsafe(18) + "\n")
        return path.read_text().strip()

    def _create_instance(self) -> None:
        s = self.state_dir
        dirs = {
            "schema_dir": s / "etc" / "schema",
            "lock_dir": s / "lock",
            "tmp_dir": s / "tmp",
            "cert_dir": s / "etc",
            "ldif_dir": s / "ldif",
            "bak_dir": s / "bak",
            "run_dir": s / "run",
            "inst_dir": s / "inst",
            "log_dir": s / "log",
            "config_dir": s / "etc",
            "db_dir": s / "db",
            "db_home_dir": s / "dbhome",
        }
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        # ns-slapd refuses to start with an empty instance schema directory.
        shutil.copy(DS_USER_SCHEMA, dirs["schema_dir"] / "99user.ldif")
        for name in ("certmap.conf", "slapd-collations.conf"):
            shutil.copy(DS_CONFIG_FILES / name, self.config_dir / name)
        hashed = subprocess.run(
            [PWDHASH, "-s", "PBKDF2-SHA256", self.password], capture_output=True, text=True, check=True
        ).stdout.strip()
        values = {k: str(v) for k, v in dirs.items()} | {
            "fqdn": "localhost",
            "ds_port": str(self.port),
            "ds_user": "root",
            "rootdn": self.bind_dn,
            "ds_passwd": hashed,
            "ldapi_enabled": "off",
            "ldapi": str(s / "run" / "slapd.socket"),
            "ldapi_autobind": "off",
            "ds_suffix": self.suffix,
            "db_lib": "bdb",
        }
        text = DSE_TEMPLATE.read_text()
        for key, value in values.items():
            text = text.replace(f"%{key}%", value)
        # Loopback only, and a small fixed database cache instead of autosizing to a share of the
        # host's RAM: the test directory holds a few dozen entries.
        text = text.replace(
            f"nsslapd-port: {self.port}\n", f"nsslapd-port: {self.port}\nnsslapd-listenhost: 127.0.0.1\n", 1
        )
        text = text.replace(
            "nsslapd-backend-implement: bdb\n",
            "nsslapd-backend-implement: bdb\nnsslapd-cache-autosize: 0\nnsslapd-dbcachesize: 16777216\n",
            1,
        )
        if "%" in "".join(line for line in text.splitlines() if line.startswith("nsslapd-")):
            raise DirectoryServerError("unfilled placeholder in dse.ldif template")
        tmp = self.config_dir / "dse.ldif.new"
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        tmp.rename(self.config_dir / "dse.ldif")

    def _set_port(self) -> None:
        # The same state directory may be started on another free port by a later test session.
        dse = self.config_dir / "dse.ldif"
        lines = dse.read_text().splitlines(keepends=True)
        changed = False
        for i, line in enumerate(lines):
            if line.startswith("nsslapd-port: ") and line != f"nsslapd-port: {self.port}\n":
                lines[i] = f"nsslapd-port: {self.port}\n"
                changed = True
                break
        if changed:
            dse.write_text("".join(lines))

    def _running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        # A stale pid file may name a recycled pid: only our ns-slapd with our config dir counts.
        if cmdline and cmdline[0].endswith(b"ns-slapd") and str(self.config_dir).encode() in cmdline:
            return pid
        return None

    def _wait_for_bind(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.connect().unbind_s()
                return
            except ldap.LDAPError as e:
                last = e
            if self.pid_file.exists() and self._running_pid() is None:
                break  # ns-slapd wrote its pid file, then exited
            time.sleep(0.05)
        raise DirectoryServerError(f"389-ds at {self.uri} did not accept a bind: {last}{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return "\nerrors log:\n" + "".join(self.error_log.read_text().splitlines(keepends=True)[-15:])
        except OSError:
            return ""

    def _ensure_backends(self) -> None:
        conn = self.connect()
        try:
            for backend, suffix, entry in (
                (
                    "userRoot",
                    self.suffix,
                    {
                        "objectClass": [b"top", b"domain", b"domainRelatedObject"],
                        "dc": [self.suffix.split(",")[0].split("=", 1)[1].encode()],
                        "associatedDomain": [self.domain.encode()],
                    },
                ),
                ("ipaca", "o=ipaca", {"objectClass": [b"top", b"organization"], "o": [b"ipaca"]}),
            ):
                _add_if_missing(
                    conn,
                    f"cn={backend},cn=ldbm database,cn=plugins,cn=config",
                    {
                        "objectClass": [b"top", b"extensibleObject", b"nsBackendInstance"],
                        "cn": [backend.encode()],
                        "nsslapd-suffix": [suffix.encode()],
                    },
                )
                _add_if_missing(
                    conn,
                    f'cn="{suffix}",cn=mapping tree,cn=config',
                    {
                        "objectClass": [b"top", b"extensibleObject", b"nsMappingTree"],
                        "cn": [suffix.encode()],
                        "nsslapd-state": [b"backend"],
                        "nsslapd-backend": [backend.encode()],
                    },
                )
                _add_if_missing(conn, suffix, entry)
        finally:
            conn.unbind_s()

    def _ensure_replication(self) -> None:
        # ipa-backup exports with replication data and ipa-restore strips the RUV before importing: only a
        # replicated backend has the RUV tombstone that makes the difference. 389-ds 2.x keeps the changelog
        # in the backend and adds its entry (cn=changelog,cn=<backend>,cn=ldbm database,...) itself when a
        # supplier replica is added; 1.4.3 and older needed cn=changelog5,cn=config first.
        conn = self.connect()
        try:
            for replica_id, suffix in (
                (REPLICA_IDS["userRoot"], self.suffix),
                (REPLICA_IDS["ipaca"], "o=ipaca"),
            ):
                _add_if_missing(
                    conn,
                    f'cn=replica,cn="{suffix}",cn=mapping tree,cn=config',
                    {
                        "objectClass": [b"top", b"nsds5Replica", b"extensibleObject"],
                        "cn": [b"replica"],
                        "nsDS5ReplicaRoot": [suffix.encode()],
                        "nsDS5ReplicaId": [str(replica_id).encode()],
                        "nsDS5ReplicaType": [b"3"],  # read-write supplier
                        "nsDS5Flags": [b"1"],  # keeps a changelog
                    },
                )
        finally:
            conn.unbind_s()

    def _load_schema(self, conn: Any) -> None:
        with open(DATA_DIR / "60ipa-standin.ldif", "rb") as f:
            parser = ldif.LDIFRecordList(f)
            parser.parse()
        wanted: dict[str, list[bytes]] = {}
        for _dn, attrs in parser.all_records:
            for attr, values in attrs.items():
                wanted.setdefault(attr.lower(), []).extend(values)
        subschema = conn.search_s(
            "cn=schema", ldap.SCOPE_BASE, "(objectClass=*)", ["attributeTypes", "objectClasses"]
        )
        present: set[bytes] = set()
        for _dn, attrs in subschema:
            for values in attrs.values():
                present.update(_schema_oid(v) for v in values)
        # Attribute types first: the object classes refer to them.
        for attr in ("attributetypes", "objectclasses"):
            missing = [v for v in wanted.get(attr, []) if _schema_oid(v) not in present]
            if missing:
                conn.modify_s("cn=schema", [(ldap.MOD_ADD, attr, missing)])

    def _substitute(self, text: str) -> str:
        for key, value in (("$SUFFIX", self.suffix), ("$DOMAIN", self.domain), ("$REALM", self.realm)):
            text = text.replace(key, value)
        return text

    def _base_entries(self) -> list[tuple[str, dict[str, list[bytes]]]]:
        text = self._substitute((DATA_DIR / "base.ldif").read_text())
        parser = ldif.LDIFRecordList(io.BytesIO(text.encode()))
        parser.parse()
        return [(dn, dict(attrs)) for dn, attrs in parser.all_records]

    def _topology_entries(
        self, servers: Sequence[Server] = TOPOLOGY
    ) -> list[tuple[str, dict[str, list[bytes]], dict[str, dict[str, list[bytes]]]]]:
        result = []
        masters = f"cn=masters,cn=ipa,cn=etc,{self.suffix}"
        for server in servers:
            fqdn = f"{server.name}.{self.domain}"
            managed = [self.suffix.encode()]
            if "CA" in server.services:
                managed.append(b"o=ipaca")
            host_entry: dict[str, list[bytes]] = {
                "objectClass": [
                    b"top",
                    b"nsContainer",
                    b"ipaReplTopoManagedServer",
                    b"ipaConfigObject",
                    b"ipaSupportedDomainLevelConfig",
                ],
                "cn": [fqdn.encode()],
                "ipaReplTopoManagedSuffix": managed,
                "ipaMinDomainLevel": [b"1"],
                "ipaMaxDomainLevel": [b"1"],
            }
            children: dict[str, dict[str, list[bytes]]] = {}
            # Sorted, so that a one-level search returns them (and the backup header lists them)
            # in the order shown in the reference header example.
            for svc in sorted(server.services):
                config = [server.state, f"startOrder {START_ORDER[svc]}"]
                config += [extra for name, extra in server.extras if name == svc]
                children[svc] = {
                    "objectClass": [b"top", b"nsContainer", b"ipaConfigObject"],
                    "cn": [svc.encode()],
                    "ipaConfigString": [c.encode() for c in config],
                }
            result.append((f"cn={fqdn},{masters}", host_entry, children))
        return result

    def _sync_services(self, conn: Any, host_dn: str, children: dict[str, dict[str, list[bytes]]]) -> None:
        existing = {
            attrs["cn"][0].decode(): dn
            for dn, attrs in conn.search_s(host_dn, ldap.SCOPE_ONELEVEL, "(objectClass=*)", ["cn"])
        }
        for cn, dn in existing.items():
            if cn not in children:
                conn.delete_s(dn)
        for cn, entry in children.items():
            dn = f"cn={cn},{host_dn}"
            if cn in existing:
                conn.modify_s(dn, [(ldap.MOD_REPLACE, "ipaConfigString", entry["ipaConfigString"])])
            else:
                conn.add_s(dn, ldap.modlist.addModlist(entry))


def _schema_oid(definition: bytes) -> bytes:
    return definition.strip().lstrip(b"(").split()[0]


def _add_if_missing(conn: Any, dn: str, entry: dict[str, list[bytes]]) -> None:
    with contextlib.suppress(ldap.ALREADY_EXISTS):
        conn.add_s(dn, ldap.modlist.addModlist(entry))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # ns-slapd is reparented to init when it daemonizes, so it never lingers as our zombie; a
    # zombie here means it has exited.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.ldap_server", description="389-ds for the testbed"
    )
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--port", type=int, default=3389)
    args = parser.parse_args(argv)
    server = DirectoryServer(args.state_dir, port=args.port)
    if args.action == "up":
        server.start()
        server.load_topology()
        print(
            f"uri={server.uri}\nbind_dn={server.bind_dn}\npassword={server.password}\nsuffix={server.suffix}"
        )
    else:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
