"""The FreeIPA topology as cn=masters describes it, and ipa-backup's role check computed from it.

Each server is `cn=<fqdn>,cn=masters,cn=ipa,cn=etc,<suffix>`; each of its services is a child entry
`cn=<SERVICE>,cn=<fqdn>,...` whose ipaConfigString carries enabledService, hiddenService or
configuredService. The pure part builds a Topology from such entries; read_topology() fetches them with
python-ldap, which blocks: callers in async code run it in a thread.
"""

from __future__ import annotations

import contextlib
import enum
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ldap
import ldap.dn

# The services ipa-backup's role check looks for. A backup taken on a server that lacks one
# of them while another server has it cannot restore an identical cluster.
ROLE_SERVICES = ("CA", "DNS", "DNSKeySync", "KRA", "ADTRUST")

# The server roles those services make up (ipaserver/servroles.py), for messages people can act on.
ROLE_NAMES = {
    "CA": "CA server",
    "DNS": "DNS server",
    "DNSKeySync": "DNS server",
    "KRA": "KRA server",
    "ADTRUST": "AD trust controller",
}

_CANONICAL_ROLE_SERVICES = {name.lower(): name for name in ROLE_SERVICES}


# ipaConfigString values that make a service advertised to clients, or configured but hidden from them.
ENABLED_SERVICE = "enabledService"
HIDDEN_SERVICE = "hiddenService"


class ServiceState(enum.Enum):
    ENABLED = "enabled"
    HIDDEN = "hidden"
    CONFIGURED = "configured"


class ServerState(enum.Enum):
    ENABLED = "enabled"
    HIDDEN = "hidden"
    # Some services advertised, some hidden: `ipa server-state` interrupted, or a role added later in the
    # other state. The server still answers clients for the enabled ones.
    MIXED = "mixed"
    # Nothing enabled or hidden yet: an installation in progress.
    CONFIGURED = "configured"


@dataclass(frozen=True)
class ServiceEntry:
    """One `cn=<service>,cn=<host>,cn=masters,...` entry as read from LDAP."""

    host: str
    service: str
    config_strings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Service:
    name: str
    state: ServiceState
    config_strings: tuple[str, ...]

    @classmethod
    def from_entry(cls, entry: ServiceEntry) -> Service:
        # ipaConfigString matches case-insensitively in LDAP, which is how ipactl and
        # find_providing_servers() query it. Enabled wins over hidden as in servroles.ServiceBasedRole;
        # no flag at all means configured.
        flags = {value.lower() for value in entry.config_strings}
        if "enabledservice" in flags:
            state = ServiceState.ENABLED
        elif "hiddenservice" in flags:
            state = ServiceState.HIDDEN
        else:
            state = ServiceState.CONFIGURED
        name = _CANONICAL_ROLE_SERVICES.get(entry.service.lower(), entry.service)
        return cls(name=name, state=state, config_strings=entry.config_strings)


@dataclass(frozen=True)
class Server:
    fqdn: str
    services: Mapping[str, Service] = field(default_factory=dict)

    @property
    def state(self) -> ServerState:
        # What matters for a backup is whether clients use the server, and only enabledService is advertised
        # (DNS SRV records, ipa-ca, find_providing_servers), so configured services do not change the verdict.
        states = {service.state for service in self.services.values()}
        enabled, hidden = ServiceState.ENABLED in states, ServiceState.HIDDEN in states
        if enabled and hidden:
            return ServerState.MIXED
        if hidden:
            return ServerState.HIDDEN
        return ServerState.ENABLED if enabled else ServerState.CONFIGURED

    @property
    def is_hidden(self) -> bool:
        return self.state is ServerState.HIDDEN

    @property
    def roles(self) -> frozenset[str]:
        # ipa-backup counts a role wherever its entry exists, whatever its state.
        return frozenset(name for name in self.services if name in ROLE_SERVICES)


class TopologyError(Exception):
    """The topology cannot be read or does not contain the server; the message is meant for users."""


@dataclass(frozen=True)
class Topology:
    servers: Mapping[str, Server]

    @classmethod
    def from_entries(cls, entries: Iterable[ServiceEntry], hosts: Iterable[str] = ()) -> Topology:
        """Build from service entries; `hosts` adds servers that have no service entry yet."""
        services: dict[str, dict[str, Service]] = {_fqdn(host): {} for host in hosts}
        for entry in entries:
            service = Service.from_entry(entry)
            services.setdefault(_fqdn(entry.host), {})[service.name] = service
        return cls(servers={fqdn: Server(fqdn, services[fqdn]) for fqdn in sorted(services)})

    @property
    def global_roles(self) -> frozenset[str]:
        return frozenset(role for server in self.servers.values() for role in server.roles)

    def providers(self, role: str) -> tuple[str, ...]:
        return tuple(fqdn for fqdn, server in self.servers.items() if role in server.roles)

    def server(self, fqdn: str) -> Server:
        try:
            return self.servers[_fqdn(fqdn)]
        except KeyError:
            known = ", ".join(self.servers) or "none"
            raise TopologyError(
                f"{fqdn} is not a server of this FreeIPA topology (servers in cn=masters: {known})"
            ) from None


def _fqdn(host: str) -> str:
    # FreeIPA stores host names in lower case and DNS names are case-insensitive.
    return host.strip().lower()


@dataclass(frozen=True)
class RoleCheck:
    host: str
    local_roles: frozenset[str]
    global_roles: frozenset[str]
    providers: Mapping[str, tuple[str, ...]]

    @property
    def missing_roles(self) -> tuple[str, ...]:
        return tuple(sorted(self.global_roles - self.local_roles))

    @property
    def ok(self) -> bool:
        return not self.missing_roles

    @property
    def message(self) -> str:
        """ipa-backup's own words: its INFO line when the roles match, its error (or warning) otherwise."""
        if self.ok:
            return "Local roles match globally used roles, proceeding."
        return (
            f"Error: Local roles {', '.join(sorted(self.local_roles))} do not match globally used roles "
            f"{', '.join(sorted(self.global_roles))}. A backup done on this host would not be complete "
            "enough to restore a fully functional, identical cluster."
        )

    @property
    def explanation(self) -> str:
        """The same verdict for a status message: which roles are missing and which servers have them."""
        if self.ok:
            return f"{self.host} has every server role used in the topology"
        by_role: dict[str, list[str]] = {}
        for service in self.missing_roles:
            by_role.setdefault(ROLE_NAMES[service], []).append(service)
        missing = "; ".join(
            f"{role} ({', '.join(services)} on {', '.join(self._providers_of(services))})"
            for role, services in sorted(by_role.items())
        )
        return (
            f"{self.host} lacks server roles used elsewhere in the topology: {missing}. A backup taken there "
            "could not restore the whole cluster: back up a server that has every role, or disable the role "
            "check to accept an incomplete backup."
        )

    def _providers_of(self, services: Iterable[str]) -> list[str]:
        return sorted({host for service in services for host in self.providers[service]})


def check_roles(topology: Topology, host: str) -> RoleCheck:
    """ipa-backup's role check, run by the operator before it stops anything on the server."""
    server = topology.server(host)
    global_roles = topology.global_roles
    return RoleCheck(
        host=server.fqdn,
        local_roles=server.roles,
        global_roles=global_roles,
        providers={role: topology.providers(role) for role in sorted(global_roles)},
    )


def masters_dn(suffix: str) -> str:
    return f"cn=masters,cn=ipa,cn=etc,{suffix}"


@dataclass(frozen=True)
class LdapConnectionSettings:
    uri: str
    bind_dn: str
    password: str = field(repr=False)
    ca_file: str | None = None
    starttls: bool = False
    # Seconds for the TCP connect and for each LDAP operation.
    timeout: float = 10.0


def _resolve(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()


def foreign_ldap_host(
    uri: str,
    server_host: str,
    addresses: Iterable[str],
    resolve: Callable[[str], set[str]] = _resolve,
    *,
    by_name: bool = True,
) -> str | None:
    """Why `uri` may not be the target's own directory, or None when it is.

    The operator binds with a password a user names, and trusts what the directory says about hidden
    replicas and roles: so it binds only to the server it acts on. A URL's host must be that server's
    FQDN (from its /etc/ipa/default.conf, which the pod itself says), or a name or address every one of
    whose addresses is the pod's own. libldap takes several URLs separated by spaces or commas and tries
    each: every one must pass. ldapi:// is a socket in the operator's own container.

    Without `by_name` the FQDN does not count: a drill's scratch server has production's FQDN, which
    resolves to production, so only the scratch pod's own addresses prove the URL reaches it.
    """
    addresses = set(addresses)
    for url in filter(None, re.split(r"[\s,]+", uri)):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme.lower() == "ldapi":
            continue
        host = (parsed.hostname or "").lower()
        if by_name and host and host == server_host.lower():
            continue
        pod_addresses = ", ".join(sorted(addresses)) or "none"
        if not by_name:
            wanted = (
                f"an address of the scratch pod ({pod_addresses}), not {server_host}, which is production's"
            )
        else:
            wanted = (
                f"{server_host}, the server's FQDN in its /etc/ipa/default.conf, or an address of its pod"
            )
        if not host:
            return f"{url} names no host: name {wanted}"
        found = resolve(host)
        if not found:
            return f"{host} does not resolve: name {wanted}"
        if not found <= addresses:
            if not by_name:
                return f"{host} ({', '.join(sorted(found))}) is not {wanted}"
            return (
                f"{host} ({', '.join(sorted(found))}) is neither {server_host}, the server's FQDN in its "
                f"/etc/ipa/default.conf, nor an address of its pod ({pod_addresses})"
            )
    return None


def read_topology(settings: LdapConnectionSettings, suffix: str) -> Topology:
    """Read cn=masters of the directory at `settings.uri`; raise TopologyError with a user-facing message."""
    base = masters_dn(suffix)
    try:
        with bound(settings) as conn:
            results = conn.search_ext_s(
                base,
                ldap.SCOPE_SUBTREE,
                "(objectClass=*)",
                ["cn", "ipaConfigString"],
                timeout=settings.timeout,
            )
    except ldap.NO_SUCH_OBJECT:
        raise TopologyError(
            f"{base} does not exist on {settings.uri}: "
            f"not a FreeIPA directory, or {suffix!r} is not its base DN"
        ) from None
    return _topology_from_results(results, base)


@contextlib.contextmanager
def bound(settings: LdapConnectionSettings) -> Iterator[Any]:
    """A connection bound as `settings.bind_dn`, unbound at the end; LDAP errors other than NO_SUCH_OBJECT
    (which callers explain in their own terms) become TopologyError with a user-facing message."""
    # An empty password turns a simple bind into an unauthenticated bind, which some servers accept and
    # then answer as anonymous: a missing Secret key would look like an empty topology.
    if not settings.password:
        raise TopologyError(f"no password to bind to {settings.uri} as {settings.bind_dn}")
    try:
        conn = _initialize(settings)
        try:
            if settings.starttls:
                conn.start_tls_s()
            conn.simple_bind_s(settings.bind_dn, settings.password)
            yield conn
        finally:
            # Releases the socket even when the connection broke half-way; there is nothing to report.
            with contextlib.suppress(ldap.LDAPError):
                conn.unbind_s()
    except ldap.NO_SUCH_OBJECT:
        raise
    except ldap.LDAPError as error:
        raise TopologyError(_describe(error, settings)) from None


def _initialize(settings: LdapConnectionSettings) -> Any:
    try:
        conn = ldap.initialize(settings.uri)
    except ldap.LDAPError:
        # libldap says no more than "Error" about a URI it cannot parse.
        raise TopologyError(f"{settings.uri!r} is not an LDAP URI (ldap://, ldaps:// or ldapi://)") from None
    conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
    conn.set_option(ldap.OPT_REFERRALS, 0)
    conn.set_option(ldap.OPT_NETWORK_TIMEOUT, settings.timeout)
    # libldap's own synchronous calls (StartTLS) obey OPT_TIMEOUT; python-ldap's bind waits for its result
    # with the object's `timeout` attribute, and search_ext_s with its argument.
    conn.set_option(ldap.OPT_TIMEOUT, settings.timeout)
    conn.timeout = settings.timeout
    if settings.starttls or settings.uri.lower().startswith("ldaps:"):
        # Set explicitly so that an image's ldap.conf (TLS_REQCERT allow) cannot weaken verification.
        conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        if settings.ca_file:
            conn.set_option(ldap.OPT_X_TLS_CACERTFILE, settings.ca_file)
        # libldap applies TLS options only to a new context, which must be created after setting them.
        conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
    return conn


def _describe(error: ldap.LDAPError, settings: LdapConnectionSettings) -> str:
    details = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    reason = ": ".join(str(details[k]) for k in ("desc", "info") if details.get(k)) or type(error).__name__
    uri = settings.uri
    if isinstance(error, ldap.SERVER_DOWN):
        return f"cannot reach the LDAP server {uri} ({reason})"
    if isinstance(error, ldap.TIMEOUT):
        return f"the LDAP server {uri} did not answer within {settings.timeout:g} seconds"
    if isinstance(error, ldap.INVALID_CREDENTIALS):
        return f"the LDAP server {uri} rejected the password of {settings.bind_dn} (invalid credentials)"
    if isinstance(error, ldap.CONNECT_ERROR):
        return f"cannot establish a TLS connection to {uri} ({reason})"
    if isinstance(error, ldap.INSUFFICIENT_ACCESS):
        return f"{settings.bind_dn} may not read the FreeIPA topology on {uri} ({reason})"
    return f"LDAP error from {uri}: {reason}"


def _topology_from_results(results: Iterable[tuple[str | None, Any]], base: str) -> Topology:
    # Depth under cn=masters tells masters (one level) from their services (two levels): the service's host
    # is the cn of its parent entry, exactly as ipa-backup's role check reads it.
    base_rdns = ldap.dn.str2dn(base)
    hosts: list[str] = []
    entries: list[ServiceEntry] = []
    for dn, attrs in results:
        if dn is None:  # a search reference
            continue
        rdns = ldap.dn.str2dn(dn)
        relative = rdns[: len(rdns) - len(base_rdns)]
        if len(relative) == 1:
            hosts.append(relative[0][0][1])
        elif len(relative) == 2:
            config_strings = tuple(value.decode("utf-8") for value in attrs.get("ipaConfigString", []))
            entries.append(ServiceEntry(relative[1][0][1], relative[0][0][1], config_strings))
    return Topology.from_entries(entries, hosts)
