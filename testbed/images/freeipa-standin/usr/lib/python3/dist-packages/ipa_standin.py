"""TEST STAND-IN for FreeIPA -- NOT FreeIPA. Shared code of the stand-in's ipactl, ipa-backup, ipa-restore,
ipa-server-upgrade and init.

Part of the idm-backup-operator test platform (testbed/images/freeipa-standin). It reproduces the
observable behaviour of FreeIPA 4.12 tools (messages, exit codes, files) on top of a real 389-ds
reached over LDAP; no IPA service actually runs. Service states are simulated in /run.
"""

from __future__ import annotations

import configparser
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ldap
from ipapython import version as _ipa_version

# The release the server "runs": ipapython.version's VERSION (4.12.2, or X with the fault version=X), as
# the real tools read it; ipa-backup writes it into the header and ipa-restore compares against it.
VERSION = _ipa_version.VERSION
DEFAULT_CONF = "/etc/ipa/default.conf"
SVC_LIST_FILE = "/run/ipa/services.list"  # paths.SVC_LIST_FILE: written by ipactl start/stop
STATE_DIR = "/run/ipa-standin"  # simulated service states; /run is fresh in every pod, as in the container
STATE_FILE = STATE_DIR + "/services.json"
CREDENTIALS_FILE = STATE_DIR + "/ldap.json"
FAULT_FILE = "/data/ipa-standin-fault"
IPA_BACKUP_DIR = "/var/lib/ipa/backup"
SYSRESTORE_STATE = "/var/lib/ipa/sysrestore/sysrestore.state"
# ipa-restore: the host path of the pod's /data (ns-slapd runs on the host and opens LDIF files itself).
DS_DATA_DIR_ENV = "IPA_STANDIN_DS_DATA_DIR"
POD_DATA_DIR = "/data"

ENABLED_SERVICE = "enabledService"
HIDDEN_SERVICE = "hiddenService"
DIRSRV = "dirsrv"

# ipaserver/servroles.py + ipaserver/install/service.py: LDAP service cn -> (systemd name, start order).
SERVICE_LIST = {
    "KDC": ("krb5kdc", 10),
    "KPASSWD": ("kadmin", 20),
    "DNS": ("named", 30),
    "HTTP": ("httpd", 40),
    "KEYS": ("ipa-custodia", 41),
    "NTP": ("ntpd", 45),
    "CA": ("pki-tomcatd", 50),
    "KRA": ("pki-tomcatd", 51),
    "ADTRUST": ("smb", 60),
    "EXTID": ("winbind", 70),
    "OTPD": ("ipa-otpd", 80),
    "DNSKeyExporter": ("ipa-ods-exporter", 90),
    "DNSSEC": ("ods-enforcerd", 100),
    "DNSKeySync": ("ipa-dnskeysyncd", 110),
}


class ScriptError(Exception):
    """ipapython.admintool.ScriptError: a message and the process exit code."""

    def __init__(self, msg: str | None = "", rval: int = 1) -> None:
        super().__init__(msg or "")
        self.rval = rval

    @property
    def msg(self) -> str:
        return str(self)


def realm_to_serverid(realm: str) -> str:
    return "-".join(realm.split("."))


def domain_to_basedn(domain: str) -> str:
    return ",".join("dc=" + part for part in domain.split("."))


def read_default_conf() -> dict[str, str] | None:
    """The [global] section of /etc/ipa/default.conf, or None when IPA is not configured."""
    if not os.path.exists(DEFAULT_CONF):
        return None
    parser = configparser.RawConfigParser()
    parser.read(DEFAULT_CONF)
    return dict(parser.items("global"))


def env_host() -> str:
    return os.environ.get("IPA_SERVER_HOSTNAME") or socket.getfqdn()


def env_realm(host: str) -> str:
    realm = os.environ.get("IPA_REALM")
    if realm:
        return realm
    return host.split(".", 1)[1].upper() if "." in host else "EXAMPLE.TEST"


def fault() -> str:
    """The injected fault: /data/ipa-standin-fault (so tests can change it after the pod started)
    wins over the IPA_STANDIN_FAULT variable of the pod spec. An empty file means no fault."""
    try:
        with open(FAULT_FILE) as f:
            return f.read().strip()
    except OSError:
        return os.environ.get("IPA_STANDIN_FAULT", "").strip()


def save_credentials(uri: str, password: str) -> None:
    """Lets processes started without the pod's environment (rare) still reach the directory."""
    os.makedirs(STATE_DIR, exist_ok=True)
    fd = os.open(CREDENTIALS_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"uri": uri, "password": password}, f)


def ldap_connect(conf: Mapping[str, str] | None = None) -> ldap.ldapobject.LDAPObject:
    """Bind to the stand-in's directory as Directory Manager.

    The real tools bind with EXTERNAL over ldapi as root; the stand-in's directory is a shared 389-ds
    on loopback, so it binds with the Directory Manager password from the pod's environment.
    """
    saved: dict[str, Any] = {}
    try:
        with open(CREDENTIALS_FILE) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        pass
    uri = os.environ.get("IPA_STANDIN_LDAP_URI") or (conf or {}).get("ldap_uri") or saved.get("uri")
    password = os.environ.get("IPA_STANDIN_DM_PASSWORD") or saved.get("password", "")
    conn = ldap.initialize(uri)
    conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 10)
    conn.simple_bind_s("cn=Directory Manager", password)
    return conn


def masters_dn(basedn: str) -> str:
    return "cn=masters,cn=ipa,cn=etc," + basedn


def host_services(
    conn: ldap.ldapobject.LDAPObject,
    host: str,
    basedn: str,
    states: Iterable[str] = (ENABLED_SERVICE, HIDDEN_SERVICE),
) -> list[tuple[str, list[str]]]:
    """(cn, ipaConfigString list) of the service entries under this host's master entry."""
    base = f"cn={host},{masters_dn(basedn)}"
    wanted = "".join(f"(ipaConfigString={s})" for s in states)
    flt = f"(&(objectClass=ipaConfigObject)(|{wanted}))"
    try:
        res = conn.search_s(base, ldap.SCOPE_SUBTREE, flt, ["cn", "ipaConfigString"])
    except ldap.NO_SUCH_OBJECT:
        return []
    out: list[tuple[str, list[str]]] = []
    for _dn, attrs in res:
        out.append((attrs["cn"][0].decode(), [v.decode() for v in attrs.get("ipaConfigString", [])]))
    return out


def service_cns(conn: ldap.ldapobject.LDAPObject, host: str, basedn: str) -> list[str]:
    """cns of the children of this host's master entry, in the server's order (the backup header)."""
    base = f"cn={host},{masters_dn(basedn)}"
    res = conn.search_s(base, ldap.SCOPE_ONELEVEL, "(objectClass=*)", ["cn"])
    return [attrs["cn"][0].decode() for _dn, attrs in res]


def ordered_systemd_services(entries: Iterable[tuple[str, Iterable[str]]]) -> list[str]:
    """ipactl.get_config: sort by startOrder, map to systemd names, drop duplicates (CA/KRA)."""
    svc_list: list[tuple[int, str]] = []
    for name, config in entries:
        order = 0
        for p in config:
            if p.startswith("startOrder "):
                order = int(p.split()[1])
        svc_list.append((order, name))
    ordered: list[str] = []
    for _order, svc in sorted(svc_list):
        if svc in SERVICE_LIST and SERVICE_LIST[svc][0] not in ordered:
            ordered.append(SERVICE_LIST[svc][0])
    return ordered


class ServiceState:
    """Simulated systemd unit states, shared by every process in the pod through /run."""

    def __init__(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        self._lock = open(STATE_DIR + "/lock", "w")  # noqa: SIM115 - held for the object's life

    def _update(self, fn: Callable[[dict[str, str]], None]) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            states = self.read()
            fn(states)
            tmp = STATE_FILE + ".tmp"
            with open(tmp, "w") as f:
                json.dump(states, f)
            os.rename(tmp, STATE_FILE)
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    @staticmethod
    def read() -> dict[str, str]:
        try:
            with open(STATE_FILE) as f:
                states: dict[str, str] = json.load(f)
                return states
        except (OSError, ValueError):
            return {}

    def is_running(self, name: str) -> bool:
        return self.read().get(name) == "running"

    def set(self, name: str, running: bool) -> None:
        def fn(states: dict[str, str]) -> None:
            states[name] = "running" if running else "stopped"

        self._update(fn)


# -- additions for ipa-restore ---------------------------------------------------------------------------


def is_ipa_configured() -> bool:
    """ipalib.facts.is_ipa_configured: sysrestore.state records a complete installation."""
    parser = configparser.RawConfigParser()
    try:
        parser.read(SYSRESTORE_STATE)
        return parser.get("installation", "complete").strip().lower() == "true"
    except (configparser.Error, OSError):
        return False


def ldap_uri(conf: Mapping[str, str] | None = None) -> str:
    """The directory's URI, found the way ldap_connect() finds it."""
    saved: dict[str, Any] = {}
    try:
        with open(CREDENTIALS_FILE) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        pass
    uri: str = os.environ.get("IPA_STANDIN_LDAP_URI") or (conf or {}).get("ldap_uri") or saved.get("uri", "")
    return uri


def ldap_bind_dm(password: str, conf: Mapping[str, str] | None = None) -> ldap.ldapobject.LDAPObject:
    """Bind as Directory Manager with the password a tool was given (ipa-restore checks it by a bind)."""
    conn = ldap.initialize(ldap_uri(conf))
    conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 10)
    conn.simple_bind_s("cn=Directory Manager", password)
    return conn


def ds_host_path(path: str) -> str:
    """The host's path of a file under the pod's /data, for ns-slapd, which runs on the host.

    Symlinks are resolved first (/var/lib/dirsrv -> /data/var/lib/dirsrv). Raises ScriptError naming
    IPA_STANDIN_DS_DATA_DIR when the variable is unset or the file is not on the /data volume.
    """
    host_data = os.environ.get(DS_DATA_DIR_ENV, "").strip()
    real = os.path.realpath(path)
    if not host_data:
        raise ScriptError(
            f"TEST STAND-IN: {DS_DATA_DIR_ENV} is not set: the directory server runs on the host, outside "
            f"this pod, and opens {real} by its host path; set {DS_DATA_DIR_ENV} to the host path of the "
            f"pod's {POD_DATA_DIR} volume"
        )
    if os.path.commonpath([real, POD_DATA_DIR]) != POD_DATA_DIR:
        raise ScriptError(
            f"TEST STAND-IN: {real} is not on the {POD_DATA_DIR} volume, so the directory server (on the "
            f"host) cannot open it through {DS_DATA_DIR_ENV}"
        )
    return os.path.join(host_data, os.path.relpath(real, POD_DATA_DIR))


def set_service_failed(state: ServiceState, name: str) -> None:
    """A unit that failed to start (systemd "failed"): not running; ipactl start fails on it while the
    restore-startfail fault is set."""
    state._update(lambda states: states.__setitem__(name, "failed"))


def service_failed(name: str) -> bool:
    return ServiceState.read().get(name) == "failed"


# -- additions for the version check of ipactl and ipa-server-upgrade -----------------------------------

SYSUPGRADE_STATE = "/var/lib/ipa/sysupgrade/sysupgrade.state"  # paths.STATEFILE_DIR + sysupgrade.state
IPAUPGRADE_LOG = "/var/log/ipaupgrade.log"  # paths.IPAUPGRADE_LOG
IPA_SERVER_UPGRADE = "/usr/sbin/ipa-server-upgrade"  # paths.IPA_SERVER_UPGRADE
# installutils.get_current_platform(): freeipa-container's images run ipaplatform "fedora_container",
# stored without the suffix.
PLATFORM = "fedora"
# The build the image's installer recorded: its own, whatever fault is set now.
INSTALLED_VENDOR_VERSION = f"{_ipa_version.DEFAULT_VERSION}-{_ipa_version.DEFAULT_BUILD}"
DEFAULT_UPGRADE_SECONDS = 3.0


class UpgradeVersionError(Exception):
    pass


class UpgradePlatformError(UpgradeVersionError):
    pass


class UpgradeDataOlderVersionError(UpgradeVersionError):
    pass


class UpgradeDataNewerVersionError(UpgradeVersionError):
    pass


class UpgradeMissingVersionError(UpgradeVersionError):
    pass


def _read_sysupgrade() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # StateFile keeps keys' case
    parser.read(SYSUPGRADE_STATE)
    return parser


def get_upgrade_state(module: str, state: str) -> str | None:
    """sysupgrade.get_upgrade_state."""
    parser = _read_sysupgrade()
    return parser.get(module, state) if parser.has_option(module, state) else None


def set_upgrade_state(module: str, state: str, value: str) -> None:
    """sysupgrade.set_upgrade_state: the StateFile rewritten whole."""
    parser = _read_sysupgrade()
    if not parser.has_section(module):
        parser.add_section(module)
    parser.set(module, state, value)
    os.makedirs(os.path.dirname(SYSUPGRADE_STATE), exist_ok=True)
    tmp = SYSUPGRADE_STATE + ".tmp"
    with open(tmp, "w") as f:
        parser.write(f)
    os.rename(tmp, SYSUPGRADE_STATE)


def store_version(vendor_version: str | None = None) -> None:
    """installutils.store_version: the data version and platform an upgrade (or install) leaves."""
    set_upgrade_state("ipa", "data_version", vendor_version or _ipa_version.VENDOR_VERSION)
    set_upgrade_state("ipa", "platform", PLATFORM)


Segments = list[tuple[int, int | str]]


def _segments(text: str) -> Segments:
    """rpm's version comparison, reduced to what VENDOR_VERSIONs hold: digit runs compare as numbers and
    win over letter runs, which compare as strings; separators are ignored."""
    out: Segments = []
    run = ""
    for c in text + ".":
        if run and (c.isdigit() != run[-1].isdigit() or not c.isalnum()):
            out.append((1, int(run)) if run.isdigit() else (0, run))
            run = ""
        if c.isalnum():
            run += c
    return out


def parse_ipa_version(vendor_version: str) -> tuple[Segments, Segments]:
    """tasks.parse_ipa_version on Fedora: version and release, compared as rpm's labelCompare does."""
    version, _, release = vendor_version.partition("-")
    return _segments(version), _segments(release)


def check_version() -> None:
    """installutils.check_version: the software (VENDOR_VERSION) against the data's recorded version."""
    if not _read_sysupgrade().has_section("ipa"):
        # ipa-server-install records both at its end; ipa-standin-init, which plays it, does not: the
        # first check records what it would have, so an installation starts at the image's own build.
        store_version(INSTALLED_VENDOR_VERSION)
    state_platform = get_upgrade_state("ipa", "platform")
    if state_platform is None:
        raise UpgradeMissingVersionError("no platform stored")
    if state_platform != PLATFORM:
        raise UpgradePlatformError(f"platform mismatch (expected '{state_platform}', current '{PLATFORM}')")
    data_version = get_upgrade_state("ipa", "data_version")
    if data_version is None:
        raise UpgradeMissingVersionError("no data_version stored")
    current = _ipa_version.VENDOR_VERSION
    parsed_data, parsed_ipa = parse_ipa_version(data_version), parse_ipa_version(current)
    if parsed_data < parsed_ipa:
        raise UpgradeDataOlderVersionError(
            f"data needs to be upgraded (expected version '{current}', current version '{data_version}')"
        )
    if parsed_data > parsed_ipa:
        raise UpgradeDataNewerVersionError(
            f"data are in newer version than IPA (data version '{data_version}', IPA version '{current}')"
        )


def upgrade_seconds() -> float:
    """How long the stand-in's ipa-server-upgrade takes: the fault's `=<seconds>`, else 3 s (minutes
    for the real one)."""
    name, _, value = fault().partition("=")
    if name in ("upgrade", "upgrade-fail") and value.strip():
        return float(value)
    return DEFAULT_UPGRADE_SECONDS
