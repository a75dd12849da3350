"""What a restore reads and writes in the server's directory: entry counts, well-known entries, the hidden
state of a replica, and the replication segments that order re-initialization.

Counting is how a restore is checked rather than trusted (freeipa.ipa_restore says why). Hiding is how a
hidden replica is put back: ipa-restore enables the server it restored (FreeIPA PR #6192), which is what
`ipa server-state FQDN --state=hidden` undoes, by the same change of `ipaConfigString` values under
cn=masters.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ldap

from idm_backup_operator.freeipa.topology import (
    ENABLED_SERVICE,
    HIDDEN_SERVICE,
    LdapConnectionSettings,
    TopologyError,
    bound,
    masters_dn,
)

# Subentries (password policies, CoS templates) are in the LDIF but only found when asked for by name.
_EVERY_ENTRY = "(|(objectClass=*)(objectClass=ldapSubEntry))"
# ... except replication keep-alive entries, which 389-ds adds on its own (ipa_restore.KEEP_ALIVE_RDN).
_COUNTED = f"(&{_EVERY_ENTRY}(!(cn=repl keep alive*)))"
_SEGMENT_ATTRS = ["ipaReplTopoSegmentLeftNode", "ipaReplTopoSegmentRightNode"]


def backend_suffix(backend: str, basedn: str) -> str:
    """userRoot holds the IPA tree; ipaca holds Dogtag's o=ipaca."""
    return "o=ipaca" if backend == "ipaca" else basedn


def await_online(settings: LdapConnectionSettings, suffix: str, patience: float) -> bool:
    """Wait until the backend holding `suffix` answers; False if it still did not after `patience` seconds.

    389-ds marks an import task finished (nsTaskExitCode) before it reopens the backend's database and
    enables its mapping-tree node (bdb_import_all_done), and until then answers every operation under the
    suffix with OPERATIONS_ERROR ("Operation attempted on a disabled node"). So the first searches after
    an online import can fail although the import worked; after a failed import the node stays disabled.
    """
    deadline = time.monotonic() + patience
    with bound(settings) as conn:
        while True:
            try:
                conn.search_ext_s(suffix, ldap.SCOPE_BASE, _EVERY_ENTRY, ["1.1"], timeout=settings.timeout)
                return True
            except ldap.NO_SUCH_OBJECT:
                # Enabled but empty: counting reports that in its own terms.
                return True
            except ldap.OPERATIONS_ERROR:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.2)


def offline_backends(
    settings: LdapConnectionSettings, basedn: str, backends: Sequence[str], patience: float
) -> list[str]:
    """The backends still disabled `patience` seconds from now (see await_online); none when the directory
    server does not answer at all, which is for `ipactl status` to report."""
    deadline = time.monotonic() + patience
    try:
        return [
            backend
            for backend in backends
            if not await_online(
                settings, backend_suffix(backend, basedn), max(0.0, deadline - time.monotonic())
            )
        ]
    except TopologyError:
        return []


def count_entries(settings: LdapConnectionSettings, suffix: str) -> int:
    """Entries under `suffix`, the suffix itself included, but not replication keep-alive entries; 0 when
    the suffix does not exist."""
    try:
        with bound(settings) as conn:
            # "1.1": no attributes, so the count costs the server as little as it can.
            msgid = conn.search_ext(suffix, ldap.SCOPE_SUBTREE, _COUNTED, ["1.1"])
            count = 0
            while True:
                kind, data, _, _ = conn.result3(msgid, all=0, timeout=settings.timeout)
                count += sum(1 for dn, _ in data if dn is not None)
                if kind == ldap.RES_SEARCH_RESULT:
                    return count
    except ldap.NO_SUCH_OBJECT:
        return 0


def missing_entries(settings: LdapConnectionSettings, dns: Sequence[str]) -> list[str]:
    """Which of `dns` do not exist."""
    missing = []
    with bound(settings) as conn:
        for dn in dns:
            try:
                conn.search_ext_s(dn, ldap.SCOPE_BASE, _EVERY_ENTRY, ["1.1"], timeout=settings.timeout)
            except ldap.NO_SUCH_OBJECT:
                missing.append(dn)
    return missing


def hide_server(settings: LdapConnectionSettings, suffix: str, host: str) -> list[str]:
    """Make `host` a hidden replica again; the services whose state changed (none: it was hidden)."""
    base = f"cn={host},{masters_dn(suffix)}"
    changed = []
    try:
        with bound(settings) as conn:
            entries = conn.search_ext_s(
                base,
                ldap.SCOPE_ONELEVEL,
                f"(ipaConfigString={ENABLED_SERVICE})",
                ["cn"],
                timeout=settings.timeout,
            )
            for dn, attrs in entries:
                if dn is None:
                    continue
                conn.modify_ext_s(
                    dn,
                    [
                        (ldap.MOD_DELETE, "ipaConfigString", [ENABLED_SERVICE.encode()]),
                        (ldap.MOD_ADD, "ipaConfigString", [HIDDEN_SERVICE.encode()]),
                    ],
                )
                changed.append(attrs["cn"][0].decode())
    except ldap.NO_SUCH_OBJECT:
        raise TopologyError(f"{base} does not exist: {host} is not a master of this directory") from None
    return sorted(changed)


def replication_segments(settings: LdapConnectionSettings, suffix: str) -> list[tuple[str, str]]:
    """(left, right) nodes of every topology segment (domain and CA suffixes); none on an old domain level."""
    base = f"cn=topology,cn=ipa,cn=etc,{suffix}"
    try:
        with bound(settings) as conn:
            results = conn.search_ext_s(
                base,
                ldap.SCOPE_SUBTREE,
                "(objectClass=ipaReplTopoSegment)",
                _SEGMENT_ATTRS,
                timeout=settings.timeout,
            )
    except ldap.NO_SUCH_OBJECT:
        return []
    segments = []
    for dn, attrs in results:
        left, right = (attrs.get(a, [b""])[0].decode() for a in _SEGMENT_ATTRS)
        if dn is not None and left and right:
            segments.append((left, right))
    return segments
