"""freeipa/ipa_restore.py: ipa-restore's command line, what its output proves, the LDIF's entries, and the
order in which the other masters are re-initialized. Pure functions: no platform needed."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import PurePosixPath

import pytest

from idm_backup_operator.freeipa import BackupDirectory, BackupType
from idm_backup_operator.freeipa.ipa_restore import (
    RestoreOptions,
    RestoreType,
    answers,
    count_ldif_entries,
    parse_restore_output,
    replication_plan,
    topology_order,
)

DIRECTORY = BackupDirectory(
    PurePosixPath("/var/lib/ipa/backup/ipa-data-2026-11-28-02-00-00"),
    BackupType.DATA,
    datetime(2026, 11, 28, 2),
)


def test_argv_never_carries_the_password_and_names_one_backend_only_when_one_is_asked() -> None:
    assert RestoreOptions().argv(DIRECTORY) == ["ipa-restore", "--data", str(DIRECTORY.path)]
    assert RestoreOptions(online=True, backends=("ipaca",)).argv(DIRECTORY) == [
        "ipa-restore", "--data", "--online", "--backend", "ipaca", str(DIRECTORY.path),
    ]  # fmt: skip
    # ipa-restore keeps only the last --backend: both backends is what no option restores.
    both = RestoreOptions(backends=("userRoot", "ipaca")).argv(DIRECTORY)
    assert "--backend" not in both
    full = RestoreOptions(type=RestoreType.FULL).argv(DIRECTORY)
    assert "--data" not in full and "-p" not in full and "-U" not in full


def test_tmpdir_becomes_ipa_restores_tmpdir_and_must_be_absolute() -> None:
    options = RestoreOptions(tmpdir="/data/tmp")
    assert options.argv(DIRECTORY)[:3] == ["env", "TMPDIR=/data/tmp", "ipa-restore"]
    assert options.extraction_dir == "/data/tmp" and RestoreOptions().extraction_dir == "/tmp"
    with pytest.raises(ValueError, match="absolute"):
        RestoreOptions(tmpdir="data/tmp")


def test_answers_are_the_password_then_confirmations() -> None:
    assert answers("Secret123") == b"Secret123\nyes\nyes\n"
    with pytest.raises(ValueError, match="line break"):
        answers("one\nyes")


SUCCESS = [
    "Preparing restore from /var/lib/ipa/backup/ipa-data-2026-11-28-02-00-00 on ipa-hidden.example.test",
    "Performing DATA restore from DATA backup",
    "Each master will individually need to be re-initialized or",
    "Disabling all replication.",
    "Disabling replication agreement on ipa-ca.example.test to ipa-hidden.example.test",
    "Stopping Directory Server",
    "Restoring from userRoot in EXAMPLE-TEST",
    "Starting Directory Server",
    "The ipa-restore command was successful",
]


def test_a_clean_run_has_no_problem() -> None:
    outcome = parse_restore_output(SUCCESS, 0)
    assert outcome.problem is None
    assert outcome.replication_disabled and outcome.critical == [] and outcome.unreachable == []


def test_exit_zero_after_a_failed_import_is_a_failure() -> None:
    lines = [*SUCCESS[:6], "ldif2db failed: import of userRoot failed (exit 1)", *SUCCESS[6:]]
    outcome = parse_restore_output(lines, 0)
    assert outcome.critical == ["ldif2db failed: import of userRoot failed (exit 1)"]
    assert (
        outcome.problem
        == "ipa-restore exited 0 but logged: ldif2db failed: import of userRoot failed (exit 1)"
    )


def test_a_failure_names_the_error_line_and_an_unreachable_master_is_noted() -> None:
    lines = [
        "Unable to disable agreement on ipa-kra.example.test: cannot connect",
        "Host name ipa-visible.example.test does not match backup name ipa-hidden.example.test",
        "The ipa-restore command failed. See /var/log/iparestore.log for more information",
    ]
    outcome = parse_restore_output(lines, 1)
    assert outcome.unreachable == ["ipa-kra.example.test"]
    assert outcome.problem == (
        "ipa-restore exited with 1: Host name ipa-visible.example.test does not match backup name "
        "ipa-hidden.example.test"
    )


def test_exit_zero_without_the_final_line_is_not_trusted() -> None:
    assert "without its final line" in (parse_restore_output(SUCCESS[:-1], 0).problem or "")


LDIF = (
    b"""version: 1

dn: dc=example,dc=test
objectClass: top
objectClass: domain
dc: example

dn: nsuniqueid=ffffffff-ffffffff-ffffffff-ffffffff,dc=example,dc=test
objectClass: top
objectClass: nsTombstone
nsds50ruv: {replicageneration} 0

dn: uid=ghost,cn=users,cn=accounts,dc=example,dc=test
objectClass: nsTombstone
objectclass: inetOrgPerson

dn:: dWlkPWFsaWNlLGNuPXVzZXJzLGNuPWFjY291bnRzLGRjPWV4YW1wbGUsZGM9dGVzdA==
objectClass: inetOrgPerson
jpegPhoto:: """
    + b"QUFB" * 40000
    + b"""
 QUFB
cn: Alice

dn: cn=users,cn=accounts,dc=example,dc=test
objectClass: nsContainer

dn: nsuniqueid=0c1a6a02-8d5b11f1-a4f0e7b3-5c1d2e3f,uid=gone,cn=users,cn=accounts,dc=example,dc=test
objectClass;vucsn-6b0b0bd0000100010000: top
objectClass;vucsn-6b0b0bd0000100010000: nsTombstone
nsParentUniqueId: 0c1a6a01-8d5b11f1-a4f0e7b3-5c1d2e3f

dn: cn=repl keep alive 4,dc=example,dc=test
objectClass: top
objectClass: ldapsubentry
objectClass: extensibleObject
cn: repl keep alive 4
keepalivetimestamp: 20261128172500Z
"""
)


def test_ldif_entries_leave_out_the_ruv_tombstones_and_keep_alive_and_survive_long_lines() -> None:
    assert count_ldif_entries(io.BytesIO(LDIF)) == 3
    assert count_ldif_entries(io.BytesIO(b"version: 1\n")) == 0


def test_masters_are_reinitialized_nearest_first_and_unreached_ones_last() -> None:
    segments = [("a.test", "b.test"), ("b.test", "c.test"), ("a.test", "d.test")]
    masters = ["a.test", "b.test", "c.test", "d.test", "z.test", "e.test"]
    assert topology_order("a.test", masters, segments) == ["b.test", "d.test", "c.test", "e.test", "z.test"]


def test_plan_gives_ca_masters_both_commands_and_says_which_were_disabled() -> None:
    outcome = parse_restore_output(
        ["Disabling all replication.", "Unable to disable agreement on kra.test: down", SUCCESS[-1]], 0
    )
    plan = replication_plan("hidden.test", {"ca.test": True, "kra.test": False}, [], outcome)
    assert [m.as_status() for m in plan] == [
        {
            "host": "ca.test",
            "ca": True,
            "agreementsDisabled": True,
            "commands": [
                "ipa-replica-manage re-initialize --from hidden.test",
                "ipa-csreplica-manage re-initialize --from hidden.test",
            ],
        },
        {
            "host": "kra.test",
            "ca": False,
            "agreementsDisabled": False,
            "commands": ["ipa-replica-manage re-initialize --from hidden.test"],
        },
    ]
