import re
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import ldap
import pytest

from idm_backup_operator.freeipa.topology import (
    LdapConnectionSettings,
    ServerState,
    ServiceEntry,
    ServiceState,
    Topology,
    TopologyError,
    check_roles,
    foreign_ldap_host,
    masters_dn,
    read_topology,
)
from testbed import processes
from testbed.ldap_server import DirectoryServer

MASTER = ("KDC", "KPASSWD", "HTTP", "KEYS", "OTPD")
EVERY_ROLE = (*MASTER, "CA", "DNS", "DNSKeySync", "KRA", "ADTRUST")


def entries(host: str, services: tuple[str, ...], state: str = "enabledService") -> list[ServiceEntry]:
    return [ServiceEntry(host, service, (state, "startOrder 50")) for service in services]


def topology(*servers: list[ServiceEntry]) -> Topology:
    return Topology.from_entries(entry for server in servers for entry in server)


def test_all_roles_present() -> None:
    topo = topology(entries("a.example.test", EVERY_ROLE), entries("b.example.test", (*MASTER, "CA")))
    check = check_roles(topo, "a.example.test")
    assert check.ok
    assert check.missing_roles == ()
    assert check.local_roles == {"CA", "DNS", "DNSKeySync", "KRA", "ADTRUST"}
    assert check.message == "Local roles match globally used roles, proceeding."
    assert check.explanation == "a.example.test has every server role used in the topology"


def test_missing_kra_reproduces_ipa_backup_error() -> None:
    topo = topology(
        entries("ca-dns.example.test", (*MASTER, "CA", "DNS")),
        entries("kra.example.test", (*MASTER, "CA", "KRA")),
    )
    check = check_roles(topo, "ca-dns.example.test")
    assert not check.ok
    assert check.missing_roles == ("KRA",)
    assert check.message == (
        "Error: Local roles CA, DNS do not match globally used roles CA, DNS, KRA. "
        "A backup done on this host would not be complete enough to restore a fully functional, "
        "identical cluster."
    )
    assert check.explanation.startswith(
        "ca-dns.example.test lacks server roles used elsewhere in the topology: "
        "KRA server (KRA on kra.example.test)."
    )


def test_missing_dns_groups_dns_and_dnskeysync() -> None:
    topo = topology(
        entries("ca.example.test", (*MASTER, "CA")),
        entries("dns1.example.test", (*MASTER, "CA", "DNS", "DNSKeySync")),
        entries("dns2.example.test", (*MASTER, "DNS", "DNSKeySync")),
    )
    check = check_roles(topo, "ca.example.test")
    assert check.missing_roles == ("DNS", "DNSKeySync")
    assert "Local roles CA do not match globally used roles CA, DNS, DNSKeySync." in check.message
    assert "DNS server (DNS, DNSKeySync on dns1.example.test, dns2.example.test)" in check.explanation


def test_adtrust_sorts_first_like_ipa_backup() -> None:
    topo = topology(
        entries("ipa1.example.test", (*MASTER, "CA")),
        entries("trust.example.test", (*MASTER, "CA", "ADTRUST", "KRA")),
    )
    check = check_roles(topo, "ipa1.example.test")
    assert check.missing_roles == ("ADTRUST", "KRA")
    assert check.message.startswith(
        "Error: Local roles CA do not match globally used roles ADTRUST, CA, KRA. "
    )
    assert (
        "AD trust controller (ADTRUST on trust.example.test); KRA server (KRA on trust.example.test)"
        in check.explanation
    )


def test_roles_count_whatever_the_service_state() -> None:
    # ipa-backup searches (cn=<role>) only: a configured or hidden CA is a CA.
    topo = topology(
        entries("hidden.example.test", (*MASTER, "CA"), "hiddenService"),
        entries("new.example.test", ("CA",), "configuredService"),
    )
    assert check_roles(topo, "new.example.test").ok
    assert topo.global_roles == {"CA"}


def test_services_that_are_not_roles_do_not_count() -> None:
    others = (*MASTER, "EXTID", "DNSSEC")
    topo = topology(entries("a.example.test", MASTER), entries("b.example.test", others))
    assert topo.global_roles == frozenset()
    assert check_roles(topo, "a.example.test").ok


def test_server_without_services_has_no_roles() -> None:
    topo = Topology.from_entries(entries("a.example.test", ("CA",)), hosts=["empty.example.test"])
    check = check_roles(topo, "empty.example.test")
    assert check.local_roles == frozenset()
    assert topo.servers["empty.example.test"].state is ServerState.CONFIGURED
    # ipa-backup joins an empty set into nothing, leaving two spaces: reproduced as is.
    assert check.message.startswith("Error: Local roles  do not match globally used roles CA.")


def test_host_not_in_topology() -> None:
    topo = topology(entries("a.example.test", EVERY_ROLE), entries("b.example.test", MASTER))
    with pytest.raises(TopologyError) as raised:
        check_roles(topo, "c.example.test")
    assert str(raised.value) == (
        "c.example.test is not a server of this FreeIPA topology "
        "(servers in cn=masters: a.example.test, b.example.test)"
    )


def test_empty_topology() -> None:
    with pytest.raises(TopologyError, match="servers in cn=masters: none"):
        check_roles(Topology.from_entries([]), "a.example.test")


def test_host_names_and_service_names_are_case_insensitive() -> None:
    topo = Topology.from_entries(
        [ServiceEntry("IPA.Example.Test", "ca", ("enabledService",)), ServiceEntry("ipa.example.test", "Kra")]
    )
    server = topo.server("Ipa.EXAMPLE.test")
    assert server.fqdn == "ipa.example.test"
    assert server.roles == {"CA", "KRA"}


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (("hiddenService", "hiddenService"), ServerState.HIDDEN),
        (("enabledService", "enabledService"), ServerState.ENABLED),
        (("enabledService", "hiddenService"), ServerState.MIXED),
        (("hiddenService", "configuredService"), ServerState.HIDDEN),
        (("enabledService", "configuredService"), ServerState.ENABLED),
        (("configuredService", "configuredService"), ServerState.CONFIGURED),
    ],
)
def test_server_state(states: tuple[str, str], expected: ServerState) -> None:
    topo = Topology.from_entries(
        [
            ServiceEntry("s.example.test", "CA", (states[0],)),
            ServiceEntry("s.example.test", "KDC", (states[1],)),
        ]
    )
    server = topo.servers["s.example.test"]
    assert server.state is expected
    assert server.is_hidden == (expected is ServerState.HIDDEN)


def test_service_state_from_config_strings() -> None:
    topo = Topology.from_entries(
        [
            ServiceEntry("s.example.test", "CA", ("HIDDENSERVICE", "startOrder 50", "caRenewalMaster")),
            ServiceEntry("s.example.test", "KDC", ("enabledService", "hiddenService")),
            ServiceEntry("s.example.test", "HTTP", ("startOrder 40",)),
        ]
    )
    services = topo.servers["s.example.test"].services
    assert services["CA"].state is ServiceState.HIDDEN
    assert services["CA"].config_strings == ("HIDDENSERVICE", "startOrder 50", "caRenewalMaster")
    assert services["KDC"].state is ServiceState.ENABLED
    assert services["HTTP"].state is ServiceState.CONFIGURED


def test_masters_dn() -> None:
    assert masters_dn("dc=example,dc=test") == "cn=masters,cn=ipa,cn=etc,dc=example,dc=test"


def test_settings_repr_hides_the_password() -> None:
    settings = LdapConnectionSettings("ldap://127.0.0.1:1", "cn=Directory Manager", "s3cret")
    assert "s3cret" not in repr(settings)


def test_empty_password_is_refused_before_connecting() -> None:
    settings = LdapConnectionSettings("ldap://127.0.0.1:1", "cn=Directory Manager", "")
    with pytest.raises(TopologyError, match=re.escape("no password to bind to ldap://127.0.0.1:1 as cn=")):
        read_topology(settings, "dc=example,dc=test")


def test_invalid_uri() -> None:
    settings = LdapConnectionSettings("127.0.0.1:389", "cn=Directory Manager", "pw")
    with pytest.raises(TopologyError, match=re.escape("'127.0.0.1:389' is not an LDAP URI")):
        read_topology(settings, "dc=example,dc=test")


def test_unreachable_server() -> None:
    uri = f"ldap://127.0.0.1:{processes.free_port()}"
    settings = LdapConnectionSettings(uri, "cn=Directory Manager", "pw", timeout=5)
    with pytest.raises(TopologyError, match=re.escape(f"cannot reach the LDAP server {uri} (Can't contact")):
        read_topology(settings, "dc=example,dc=test")


def test_server_that_never_answers_times_out() -> None:
    # A listening socket nobody accepts from: the kernel completes the handshake, no LDAP reply ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"ldap://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(
            TopologyError, match=re.escape(f"the LDAP server {uri} did not answer within 0.5 seconds")
        ):
            read_topology(LdapConnectionSettings(uri, "cn=x", "pw", timeout=0.5), "dc=example,dc=test")
        assert time.monotonic() - started < 5


# Against a real 389 Directory Server holding the test platform's topology (testbed/ldap_server.py).


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if shutil.which("ns-slapd", path="/usr/sbin:/usr/bin") is None:
        pytest.skip("389-ds-base (ns-slapd) is not installed")

    server = DirectoryServer(tmp_path_factory.mktemp("389ds"), port=processes.free_port())
    server.start()
    try:
        server.load_topology()
        yield server
    finally:
        server.stop()


def settings_for(directory: Any, password: str | None = None) -> LdapConnectionSettings:
    return LdapConnectionSettings(directory.uri, directory.bind_dn, password or directory.password)


@pytest.mark.platform
def test_read_topology_from_389ds(directory: Any) -> None:
    topo = read_topology(settings_for(directory), directory.suffix)
    assert list(topo.servers) == [
        "ipa-ca.example.test",
        "ipa-hidden.example.test",
        "ipa-kra.example.test",
        "ipa-partial.example.test",
        "ipa-visible.example.test",
    ]
    states = {fqdn: server.state for fqdn, server in topo.servers.items()}
    assert states == {
        "ipa-ca.example.test": ServerState.ENABLED,
        "ipa-hidden.example.test": ServerState.HIDDEN,
        "ipa-kra.example.test": ServerState.ENABLED,
        "ipa-partial.example.test": ServerState.HIDDEN,
        "ipa-visible.example.test": ServerState.ENABLED,
    }
    assert topo.global_roles == {"ADTRUST", "CA", "DNS", "DNSKeySync", "KRA"}
    ca = topo.servers["ipa-ca.example.test"].services["CA"]
    assert "caRenewalMaster" in ca.config_strings and "startOrder 50" in ca.config_strings


@pytest.mark.platform
@pytest.mark.parametrize(
    ("host", "local", "missing"),
    [
        ("ipa-hidden.example.test", "ADTRUST, CA, DNS, DNSKeySync, KRA", ()),
        ("ipa-visible.example.test", "ADTRUST, CA, DNS, DNSKeySync, KRA", ()),
        ("ipa-kra.example.test", "CA, KRA", ("ADTRUST", "DNS", "DNSKeySync")),
        ("ipa-ca.example.test", "CA", ("ADTRUST", "DNS", "DNSKeySync", "KRA")),
        ("ipa-partial.example.test", "CA", ("ADTRUST", "DNS", "DNSKeySync", "KRA")),
    ],
)
def test_role_check_on_389ds(directory: Any, host: str, local: str, missing: tuple[str, ...]) -> None:
    check = check_roles(read_topology(settings_for(directory), directory.suffix), host)
    assert check.missing_roles == missing
    if missing:
        assert check.message == (
            f"Error: Local roles {local} do not match globally used roles ADTRUST, CA, DNS, DNSKeySync, KRA. "
            "A backup done on this host would not be complete enough to restore a fully functional, "
            "identical cluster."
        )
    else:
        assert check.message == "Local roles match globally used roles, proceeding."


@pytest.mark.platform
def test_partial_hidden_replica_explanation(directory: Any) -> None:
    check = check_roles(read_topology(settings_for(directory), directory.suffix), "ipa-partial.example.test")
    assert check.explanation.startswith(
        "ipa-partial.example.test lacks server roles used elsewhere in the topology: "
        "AD trust controller (ADTRUST on ipa-hidden.example.test, ipa-visible.example.test); "
        "DNS server (DNS, DNSKeySync on ipa-hidden.example.test, ipa-visible.example.test); "
        "KRA server (KRA on ipa-hidden.example.test, ipa-kra.example.test, ipa-visible.example.test)."
    )


@pytest.mark.platform
def test_mixed_server_on_389ds(directory: Any) -> None:
    service_dn = f"cn=CA,cn=ipa-hidden.example.test,{masters_dn(directory.suffix)}"
    conn = directory.connect()
    try:
        enabled = [b"enabledService", b"startOrder 50"]
        conn.modify_s(service_dn, [(ldap.MOD_REPLACE, "ipaConfigString", enabled)])
        server = read_topology(settings_for(directory), directory.suffix).server("ipa-hidden.example.test")
        assert server.state is ServerState.MIXED
        assert not server.is_hidden
    finally:
        conn.unbind_s()
        directory.load_topology()


@pytest.mark.platform
def test_host_missing_from_389ds_topology(directory: Any) -> None:
    topo = read_topology(settings_for(directory), directory.suffix)
    with pytest.raises(TopologyError, match=re.escape("ipa-gone.example.test is not a server of this")):
        check_roles(topo, "ipa-gone.example.test")


@pytest.mark.platform
def test_bad_password_on_389ds(directory: Any) -> None:
    with pytest.raises(TopologyError) as raised:
        read_topology(settings_for(directory, password="wrong"), directory.suffix)
    assert str(raised.value) == (
        f"the LDAP server {directory.uri} rejected the password of cn=Directory Manager (invalid credentials)"
    )


@pytest.mark.platform
@pytest.mark.parametrize("suffix", ["dc=wrong,dc=test", "o=ipaca"])
def test_not_a_freeipa_base_dn_on_389ds(directory: Any, suffix: str) -> None:
    with pytest.raises(TopologyError) as raised:
        read_topology(settings_for(directory), suffix)
    assert str(raised.value) == (
        f"cn=masters,cn=ipa,cn=etc,{suffix} does not exist on {directory.uri}: "
        f"not a FreeIPA directory, or {suffix!r} is not its base DN"
    )


# -- whose directory a URL reaches --------------------------------------------------------------------

RESOLVED = {
    "ipa-hidden-headless.identity.svc": {"10.1.2.3"},
    "ipa-svc.identity.svc": {"10.96.0.7"},
    "dual.example.test": {"10.1.2.3", "192.0.2.9"},
    "192.0.2.1": {"192.0.2.1"},
    "10.1.2.3": {"10.1.2.3"},
}


NAMED = "ipa-hidden.example.test, the server's FQDN in its /etc/ipa/default.conf, or an address of its pod"


def resolve(host: str) -> set[str]:
    return RESOLVED.get(host, set())


@pytest.mark.parametrize(
    "uri",
    [
        "ldaps://ipa-hidden.example.test",
        "ldap://IPA-Hidden.Example.Test:389",  # host names are compared without case
        "ldap://10.1.2.3:389",
        "ldap://ipa-hidden-headless.identity.svc",  # a headless Service names the pod's address
        "ldapi://%2Frun%2Fslapd-EXAMPLE-TEST.socket",
        "ldap://ipa-hidden.example.test ldaps://10.1.2.3",
    ],
)
def test_the_targets_own_directory_is_accepted(uri: str) -> None:
    assert foreign_ldap_host(uri, "ipa-hidden.example.test", {"10.1.2.3"}, resolve) is None


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        (
            "ldap://192.0.2.1:389",
            "192.0.2.1 (192.0.2.1) is neither ipa-hidden.example.test, the server's FQDN in its "
            "/etc/ipa/default.conf, nor an address of its pod (10.1.2.3)",
        ),
        # A Service's cluster IP could send the bind anywhere its endpoints are.
        (
            "ldap://ipa-svc.identity.svc",
            "ipa-svc.identity.svc (10.96.0.7) is neither ipa-hidden.example.test, the server's FQDN in its "
            "/etc/ipa/default.conf, nor an address of its pod (10.1.2.3)",
        ),
        # Every address a name resolves to must be the pod's: libldap may try any of them.
        (
            "ldap://dual.example.test",
            "dual.example.test (10.1.2.3, 192.0.2.9) is neither ipa-hidden.example.test, the server's FQDN "
            "in its /etc/ipa/default.conf, nor an address of its pod (10.1.2.3)",
        ),
        (
            "ldap://nowhere.example.test",
            f"nowhere.example.test does not resolve: name {NAMED}",
        ),
        # The second of a list of URLs is tried when the first fails.
        (
            "ldaps://ipa-hidden.example.test,ldap://nowhere.example.test",
            f"nowhere.example.test does not resolve: name {NAMED}",
        ),
        ("ldap:///", f"ldap:/// names no host: name {NAMED}"),
    ],
)
def test_any_other_directory_is_refused_with_the_reason(uri: str, why: str) -> None:
    assert foreign_ldap_host(uri, "ipa-hidden.example.test", {"10.1.2.3"}, resolve) == why


def test_a_drills_scratch_server_is_reached_by_its_pods_addresses_only() -> None:
    # It has production's FQDN, which resolves to production: the name proves nothing.
    assert (
        foreign_ldap_host("ldap://10.1.2.3", "ipa-hidden.example.test", {"10.1.2.3"}, resolve, by_name=False)
        is None
    )
    assert foreign_ldap_host(
        "ldaps://ipa-hidden.example.test", "ipa-hidden.example.test", {"10.1.2.9"}, resolve, by_name=False
    ) == (
        "ipa-hidden.example.test does not resolve: name an address of the scratch pod (10.1.2.9), not "
        "ipa-hidden.example.test, which is production's"
    )
    assert foreign_ldap_host(
        "ldap://ipa-hidden-headless.identity.svc",
        "ipa-hidden.example.test",
        {"10.1.2.9"},
        resolve,
        by_name=False,
    ) == (
        "ipa-hidden-headless.identity.svc (10.1.2.3) is not an address of the scratch pod (10.1.2.9), not "
        "ipa-hidden.example.test, which is production's"
    )
