"""The FreeIPA server around ipa-backup: its /etc/ipa/default.conf, and ipactl's view of its services.

As in ipa_backup.py, nothing here talks to Kubernetes; the facts come from FreeIPA's own sources
(ipalib/config.py, ipaserver/install/ipactl.py).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from idm_backup_operator.freeipa.ipa_backup import describe_exit_code, read_ini_section

READ_DEFAULT_CONF = ("cat", "/etc/ipa/default.conf")
IPACTL_START = ("ipactl", "start")
IPACTL_STATUS = ("ipactl", "status")


class DefaultConfError(ValueError):
    """/etc/ipa/default.conf lacks what the operator needs to know about the server."""


def serverid(realm: str) -> str:
    """The 389-ds instance name of an IPA server: EXAMPLE.TEST -> EXAMPLE-TEST (ipaldap.realm_to_serverid)."""
    return realm.replace(".", "-")


@dataclass(frozen=True)
class IpaServerConfig:
    host: str
    realm: str
    domain: str
    basedn: str
    server: str | None = None
    ldap_uri: str | None = None

    @property
    def serverid(self) -> str:
        return serverid(self.realm)


_FQDN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def parse_default_conf(text: str) -> IpaServerConfig:
    try:
        section = read_ini_section(text, "global", "/etc/ipa/default.conf")
    except ValueError as error:
        raise DefaultConfError(str(error)) from None

    def value(key: str) -> str | None:
        return section.get(key, "").strip() or None

    host, realm, domain = value("host"), value("realm"), value("domain")
    missing = [k for k, v in (("host", host), ("realm", realm), ("domain", domain)) if v is None]
    if host is None or realm is None or domain is None:
        raise DefaultConfError(f"/etc/ipa/default.conf has no {', '.join(missing)} in its [global] section")
    # ipactl refuses a short name the same way: the topology is keyed by FQDN.
    if "." not in host:
        raise DefaultConfError(f"host {host!r} in /etc/ipa/default.conf is not fully qualified")
    # The pod is not trusted input: its host name becomes a path in storage and an LDAP filter value.
    if len(host) > 253 or not _FQDN.fullmatch(host):
        raise DefaultConfError(
            f"host {host!r} in /etc/ipa/default.conf is not a DNS name (letters, digits and hyphens in "
            "dot-separated labels)"
        )
    # ipalib derives basedn from the domain when the file has none (ipalib/config.py).
    basedn = value("basedn") or ",".join(f"dc={label}" for label in domain.split("."))
    return IpaServerConfig(
        host=host,
        realm=realm,
        domain=domain,
        basedn=basedn,
        server=value("server"),
        ldap_uri=value("ldap_uri"),
    )


def server_config(exit_code: int, content: bytes, pod: str) -> IpaServerConfig:
    """The server's identity from READ_DEFAULT_CONF run in its pod; DefaultConfError says why not."""
    if exit_code != 0:
        raise DefaultConfError(
            f"pod {pod} has no readable /etc/ipa/default.conf: IPA is not configured there"
        )
    try:
        return parse_default_conf(content.decode("utf-8", "replace"))
    except DefaultConfError as err:
        raise DefaultConfError(f"/etc/ipa/default.conf in pod {pod}: {err}") from None


class ServiceRunState(enum.Enum):
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


class IpaServicesVerdict(enum.Enum):
    RUNNING = "Running"
    # The directory runs but some service does not.
    DEGRADED = "Degraded"
    # The directory is down, so IPA as a whole is.
    STOPPED = "Stopped"
    # ipactl could not tell: not configured, not root, LDAP unreadable, or no output.
    UNKNOWN = "Unknown"


# `ipactl status` (ipaserver/install/ipactl.py, ipa_status()) prints to stdout "Directory Service: RUNNING"
# first, then "<systemd unit> Service: RUNNING|STOPPED" for each enabled or hidden service, in start order
# (krb5kdc, kadmin, named, httpd, ipa-custodia, pki-tomcatd, ...). Errors go to stderr. Exit codes are LSB
# status codes: 0 all running; 3 some service not running ("N service(s) are not running") or the directory
# is stopped and no service list is cached; 4 status unknown (not root, IPA not configured, no service
# list); 1 other errors. The socket-activated ipa-otpd and ipa-ods-exporter are normally STOPPED and do not
# count towards the exit code.
_IPACTL_LINE = re.compile(r"(.+?) Service: (RUNNING|STOPPED)")
_DIRECTORY = "Directory"
SOCKET_ACTIVATED_SERVICES = frozenset({"ipa-otpd", "ipa-ods-exporter"})


@dataclass(frozen=True)
class IpactlStatus:
    exit_code: int | None
    services: Mapping[str, ServiceRunState] = field(default_factory=dict)
    messages: tuple[str, ...] = ()

    @property
    def stopped(self) -> tuple[str, ...]:
        """Services that should run but do not; socket-activated ones start on demand, as ipactl counts."""
        return tuple(
            name
            for name, state in self.services.items()
            if state is ServiceRunState.STOPPED and name not in SOCKET_ACTIVATED_SERVICES
        )

    @property
    def verdict(self) -> IpaServicesVerdict:
        directory = self.services.get(_DIRECTORY)
        if directory is ServiceRunState.STOPPED:
            return IpaServicesVerdict.STOPPED
        if directory is None:
            return IpaServicesVerdict.UNKNOWN
        if self.stopped or self.exit_code == 3:
            return IpaServicesVerdict.DEGRADED
        return IpaServicesVerdict.RUNNING if self.exit_code == 0 else IpaServicesVerdict.UNKNOWN

    @property
    def summary(self) -> str:
        verdict = self.verdict
        if verdict is IpaServicesVerdict.RUNNING:
            return "all IPA services are running"
        if verdict is IpaServicesVerdict.DEGRADED:
            names = ", ".join(self.stopped) or "unknown"
            return f"IPA services not running: {names}"
        if verdict is IpaServicesVerdict.STOPPED:
            return "IPA is stopped: the directory server is not running"
        detail = " ".join(self.messages) or describe_exit_code(self.exit_code)
        return f"IPA service status unknown: {detail}"


def parse_ipactl_status(output: str, exit_code: int | None) -> IpactlStatus:
    """Parse `ipactl status`; `output` may be stdout alone or stdout and stderr together."""
    services: dict[str, ServiceRunState] = {}
    messages: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        if match := _IPACTL_LINE.fullmatch(line):
            services[match[1]] = ServiceRunState(match[2])
        elif line:
            messages.append(line)
    return IpactlStatus(exit_code=exit_code, services=services, messages=tuple(messages))


def upgrade_failure(ipactl_stderr: str) -> str | None:
    """What `ipactl start` said when the upgrade it ran first failed, with the log to read; None otherwise.

    After an image update `ipactl start` runs ipa-server-upgrade before anything (ipactl.py,
    version_check); when that fails nothing is started, and why is only on ipactl's stderr and in the
    upgrade log, which `ipactl status` never names. The log's path is taken from ipactl's own line
    (freeipa-container keeps it under /data).
    """
    lines = [line.strip() for line in ipactl_stderr.splitlines()]
    if not any(line.startswith("Automatic upgrade failed:") for line in lines):
        return None
    said = [line for line in lines if line.startswith(("IPA version error:", "Automatic upgrade failed:"))]
    upgrade_log = next(
        (line.rsplit(" ", 1)[1] for line in lines if line.startswith("Automatically running upgrade,")), ""
    )
    return "ipactl start: " + "; ".join(said) + (f" (see {upgrade_log} in the pod)" if upgrade_log else "")
