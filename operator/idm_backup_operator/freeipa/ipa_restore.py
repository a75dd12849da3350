"""ipa-restore as the operator drives it: the command line, the answers it reads, and what its output proves.

ipa-restore's exit code is not its verdict. It exits 0 after "ldif2db failed", "Restoring files failed" and
"Restarting IPA failed", which it only logs, and it never checks an online import's result (FreeIPA's
ipaserver/install/ipa_restore.py). So the operator reads every line it prints, and afterwards counts the
entries itself (`count_ldif_entries` for what the archive holds; freeipa.directory for what the server has).

Replication is the other consequence: ipa-restore disables the agreements on every other master, and
each of them must then be re-initialized from the restored server, working outward through the topology.
`replication_plan` says which commands, in which order.
"""

from __future__ import annotations

import collections
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from idm_backup_operator.freeipa.ipa_backup import BackupDirectory

# The backends ipa-restore knows (init_api: userRoot and ipaca), and the LDIF each is restored from.
BACKENDS = ("userRoot", "ipaca")
SUCCESS_LINE = "The ipa-restore command was successful"
FAILURE_LINE = "The ipa-restore command failed"
# Logged (CRITICAL or ERROR) while the run goes on to exit 0: each means data or services did not come back.
SILENT_FAILURES = (
    "ldif2db failed",
    "bak2db failed",
    "Restoring files failed",
    "Restoring /etc/ipa/default.conf failed",
    "Restarting IPA failed",
    "Unable to bind to LDAP server",
)
# Logged, and the run goes on: true, but not a failure of the restore itself.
WARNINGS = (
    "Restoring data from a different release of IPA",
    "Unable to get connection, skipping disabling agreements",
    "Unable to disable agreement on",
    "Stopping IPA failed",
)
_UNREACHABLE = re.compile(r"Unable to disable agreement on (\S+?):")
DISABLING = "Disabling all replication."
# 389-ds's replica update vector lives in this tombstone; ipa-restore strips it before importing.
RUV_RDN = b"nsuniqueid=ffffffff-ffffffff-ffffffff-ffffffff"
# 389-ds's replication plugin adds `cn=repl keep alive <replica id>,<suffix>` to a replicated backend
# whenever it likes, before or after a backup: neither side of a count can rely on it.
KEEP_ALIVE_RDN = b"cn=repl keep alive"


class RestoreType(enum.Enum):
    DATA = "Data"
    FULL = "Full"


@dataclass(frozen=True)
class RestoreOptions:
    type: RestoreType = RestoreType.DATA
    online: bool = False
    backends: tuple[str, ...] = ()  # empty: every backend the archive holds
    tmpdir: str | None = None  # where ipa-restore extracts the archive (TMPDIR); None: the pod's, /tmp

    def __post_init__(self) -> None:
        if self.tmpdir is not None and (
            not self.tmpdir.startswith("/") or any(c in self.tmpdir for c in "\0\n")
        ):
            raise ValueError(f"tmpDir must be an absolute path, not {self.tmpdir!r}")

    @property
    def extraction_dir(self) -> str:
        return self.tmpdir or "/tmp"

    def argv(self, directory: BackupDirectory) -> list[str]:
        """No -p and no -U: the password and the confirmations go to stdin (`answers`), never into argv,
        where any process of the pod could read them."""
        argv = ["env", f"TMPDIR={self.tmpdir}", "ipa-restore"] if self.tmpdir else ["ipa-restore"]
        if self.type is RestoreType.DATA:
            argv.append("--data")
        if self.online:
            argv.append("--online")
        # ipa-restore takes one --backend (optparse keeps the last); both is what no option restores.
        if len(self.backends) == 1:
            argv += ["--backend", self.backends[0]]
        argv.append(str(directory.path))
        return argv


def password_line(password: str) -> bytes:
    """The Directory Manager password as the line a FreeIPA tool's prompt reads."""
    if "\n" in password or "\r" in password:
        raise ValueError("the Directory Manager password contains a line break")
    return f"{password}\n".encode()


def answers(password: str) -> bytes:
    """What ipa-restore reads on stdin, in its order: the Directory Manager password, then "yes" to the
    version prompt (asked only when versions differ, which the operator allowed if it got this far) and to
    "Restoring data will overwrite existing live data. Continue to restore?". Unread lines are harmless."""
    return password_line(password) + b"yes\nyes\n"


@dataclass
class RestoreOutcome:
    """What ipa-restore's output says happened."""

    exit_code: int | None
    succeeded_line: bool = False
    critical: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    replication_disabled: bool = False
    unreachable: list[str] = field(default_factory=list)

    @property
    def problem(self) -> str | None:
        """Why the restore did not work, from the output alone; None when the output shows no failure
        (the data must still be checked: an online import's result is never reported)."""
        if self.exit_code != 0:
            said = self.errors[-1] if self.errors else "no error line"
            return f"ipa-restore exited with {self.exit_code}: {said}"
        if self.critical:
            return f"ipa-restore exited 0 but logged: {self.critical[0]}"
        if not self.succeeded_line:
            return f"ipa-restore exited 0 without its final line ({SUCCESS_LINE!r})"
        return None


def parse_restore_output(lines: Iterable[str], exit_code: int | None) -> RestoreOutcome:
    outcome = RestoreOutcome(exit_code=exit_code)
    previous = ""
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith(SUCCESS_LINE):
            outcome.succeeded_line = True
        elif line.startswith(FAILURE_LINE):
            # The line before it is the error (admintool logs the message, then this).
            if previous:
                outcome.errors.append(previous)
        elif any(marker in line for marker in SILENT_FAILURES):
            outcome.critical.append(line)
        elif any(marker in line for marker in WARNINGS):
            outcome.warnings.append(line)
        if line == DISABLING:
            outcome.replication_disabled = True
        if match := _UNREACHABLE.search(line):
            outcome.unreachable.append(match[1])
        previous = line
    return outcome


# -- what the archive holds ----------------------------------------------------------------------------------

_MAX_LINE = 1 << 16


def _is_tombstone_class(line: bytes) -> bool:
    """`objectClass: nsTombstone`, also with the state a replica export adds as attribute options
    (`objectClass;vucsn-<csn>: nsTombstone`)."""
    name, colon, value = line.partition(b":")
    return (
        bool(colon)
        and name.split(b";")[0].strip().lower() == b"objectclass"
        and (value.strip().lower() == b"nstombstone")
    )


def count_ldif_entries(stream: IO[bytes]) -> int:
    """Entries a restore of this LDIF brings back and a search finds: neither the RUV tombstone (stripped
    by ipa-restore) nor replication tombstones (hidden from searches), nor replication keep-alive entries
    (directory.count_entries leaves them out too). Reads in bounded lines, so that a
    long base64 value costs no more memory than any other."""
    count = 0
    in_entry = skip = False
    at_line_start = True
    while chunk := stream.readline(_MAX_LINE):
        starts_line, at_line_start = at_line_start, chunk.endswith(b"\n")
        if not starts_line:
            continue  # the rest of a long line
        line = chunk.rstrip(b"\r\n")
        if not line:
            if in_entry and not skip:
                count += 1
            in_entry = skip = False
        elif line[:3].lower() == b"dn:":
            in_entry = True
            skip = line[3:].lstrip(b": ").lower().startswith((RUV_RDN, KEEP_ALIVE_RDN))
        elif in_entry and _is_tombstone_class(line):
            skip = True
    if in_entry and not skip:
        count += 1
    return count


def backend_of(member: str, server_id: str) -> str | None:
    """`<SERVERID>-userRoot.ldif` -> userRoot; None for any other member of the archive."""
    for backend in BACKENDS:
        if member == f"{server_id}-{backend}.ldif":
            return backend
    return None


# -- replication after the restore -------------------------------------------------------------------------


@dataclass(frozen=True)
class MasterToReinitialize:
    host: str
    ca: bool
    agreements_disabled: bool
    argvs: tuple[tuple[str, ...], ...]  # run on `host`, in this order; each prompts for the DM password

    @property
    def commands(self) -> tuple[str, ...]:
        return tuple(" ".join(argv) for argv in self.argvs)

    def as_status(self) -> dict[str, object]:
        return {
            "host": self.host,
            "ca": self.ca,
            "agreementsDisabled": self.agreements_disabled,
            "commands": list(self.commands),
        }


def topology_order(restored: str, masters: Sequence[str], segments: Iterable[tuple[str, str]]) -> list[str]:
    """The other masters, nearest to the restored server first (breadth-first over the replication
    segments), so that each is re-initialized from a server that already has the restored data; masters no
    segment reaches come last, by name."""
    neighbours: dict[str, set[str]] = collections.defaultdict(set)
    for left, right in segments:
        neighbours[left].add(right)
        neighbours[right].add(left)
    order: list[str] = []
    seen = {restored}
    queue = collections.deque([restored])
    while queue:
        for nxt in sorted(neighbours[queue.popleft()] - seen):
            seen.add(nxt)
            order.append(nxt)
            queue.append(nxt)
    others = [m for m in masters if m != restored]
    return [m for m in order if m in others] + sorted(m for m in others if m not in seen)


def replication_plan(
    restored: str,
    masters_with_ca: Mapping[str, bool],
    segments: Iterable[tuple[str, str]],
    outcome: RestoreOutcome,
) -> list[MasterToReinitialize]:
    """Each other master, in topology order, with the exact commands an administrator runs on it."""
    plan = []
    for host in topology_order(restored, list(masters_with_ca), segments):
        ca = masters_with_ca[host]
        argvs = [("ipa-replica-manage", "re-initialize", "--from", restored)]
        if ca:
            argvs.append(("ipa-csreplica-manage", "re-initialize", "--from", restored))
        disabled = outcome.replication_disabled and host not in outcome.unreachable
        plan.append(MasterToReinitialize(host, ca, disabled, tuple(argvs)))
    return plan
