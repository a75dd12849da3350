from datetime import UTC, datetime
from pathlib import PurePosixPath

import pytest

from idm_backup_operator import freeipa
from idm_backup_operator.freeipa import (
    BackupOptions,
    BackupOutcome,
    BackupOutputParser,
    BackupType,
    DefaultConfError,
    HeaderError,
    InvalidBackupOptions,
    IpaServicesVerdict,
    ServiceRunState,
    UnsafeBackupPath,
    backup_directory,
    ipa_backup_argv,
    parse_backup_output,
    parse_default_conf,
    parse_header,
    parse_ipactl_status,
    serverid,
)

FULL, DATA = BackupType.FULL, BackupType.DATA


@pytest.mark.parametrize(
    ("options", "argv"),
    [
        ({}, ["ipa-backup"]),
        ({"logs": True}, ["ipa-backup", "--logs"]),
        ({"type": DATA}, ["ipa-backup", "--data"]),
        ({"type": DATA, "online": True}, ["ipa-backup", "--data", "--online"]),
        ({"disable_role_check": True}, ["ipa-backup", "--disable-role-check"]),
        (
            {"type": DATA, "online": True, "tmpdir": "/data/tmp", "disable_role_check": True},
            ["env", "TMPDIR=/data/tmp", "ipa-backup", "--data", "--online", "--disable-role-check"],
        ),
    ],
)
def test_valid_options_make_argv(options: dict[str, object], argv: list[str]) -> None:
    built = ipa_backup_argv(BackupOptions(**options))  # type: ignore[arg-type]
    assert built == argv
    assert "--gpg" not in built


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"online": True}, "You cannot specify --online without --data"),
        ({"online": True, "logs": True}, "You cannot specify --online without --data"),
        ({"type": DATA, "logs": True}, "You cannot specify --data with --logs"),
        ({"type": DATA, "online": True, "logs": True}, "You cannot specify --data with --logs"),
        ({"tmpdir": "relative/dir"}, "tmpdir must be an absolute path"),
        ({"tmpdir": "/tmp/a\nb"}, "tmpdir must be an absolute path"),
    ],
)
def test_invalid_options_are_refused_at_construction(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidBackupOptions, match=message):
        BackupOptions(**options)  # type: ignore[arg-type]


def test_invalid_options_error_is_a_value_error() -> None:
    assert issubclass(InvalidBackupOptions, ValueError)


def test_stops_services_unless_online() -> None:
    assert BackupOptions().stops_services
    assert BackupOptions(type=DATA).stops_services
    assert not BackupOptions(type=DATA, online=True).stops_services


FULL_SUCCESS = """\
Preparing backup on ipa-hidden.example.test
Local roles match globally used roles, proceeding.
Stopping IPA services
Backing up ipaca in EXAMPLE-TEST to LDIF
Backing up userRoot in EXAMPLE-TEST to LDIF
Backing up EXAMPLE-TEST
Backing up files
Starting IPA service
Backed up to /var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20
The ipa-backup command was successful
"""

DATA_ONLINE_SUCCESS = """\
Preparing backup on ipa-hidden.example.test
Local roles match globally used roles, proceeding.
Backing up ipaca in EXAMPLE-TEST to LDIF
Waiting for LDIF to finish
Backing up userRoot in EXAMPLE-TEST to LDIF
Waiting for LDIF to finish
Backing up EXAMPLE-TEST
Waiting for BAK to finish
Backed up to /var/lib/ipa/backup/ipa-data-2026-11-14-22-15-01
The ipa-backup command was successful
"""

ROLE_ERROR = (
    "Error: Local roles CA, DNS do not match globally used roles CA, DNS, KRA. A backup done on this host "
    "would not be complete enough to restore a fully functional, identical cluster."
)


def test_full_success() -> None:
    result = parse_backup_output(FULL_SUCCESS, 0)
    assert result.outcome is BackupOutcome.SUCCEEDED and result.succeeded
    assert result.backup_dir == "/var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20"
    assert result.steps[2] == "Stopping IPA services"
    assert result.warnings == () and result.errors == ()
    assert result.stopped_services and result.restarted_services
    assert not result.services_may_be_stopped
    assert result.message == "Backed up to /var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20"
    directory = result.directory(FULL)
    assert directory.archive_path == PurePosixPath(
        "/var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20/ipa-full.tar"
    )
    assert directory.header_path.name == "header"


def test_data_online_success_stops_nothing() -> None:
    result = parse_backup_output(DATA_ONLINE_SUCCESS, 0)
    assert result.succeeded
    assert not result.stopped_services and not result.services_may_be_stopped
    assert result.directory(DATA).archive_path.name == "ipa-data.tar"


def test_data_offline_success_restarts_directory() -> None:
    text = (
        "Preparing backup on ipa.example.test\nStopping Directory Server\n"
        "Backing up userRoot in EXAMPLE-TEST to LDIF\nBacking up EXAMPLE-TEST\nStarting Directory Server\n"
        "Backed up to /var/lib/ipa/backup/ipa-data-2026-01-02-03-04-05\n"
        "The ipa-backup command was successful\n"
    )
    result = parse_backup_output(text, 0)
    assert result.succeeded and result.stopped_services and result.restarted_services


def test_role_mismatch_is_the_error() -> None:
    text = (
        f"Preparing backup on ipa-ca.example.test\n{ROLE_ERROR}\n"
        "The ipa-backup command failed. See /var/log/ipabackup.log for more information\n"
    )
    result = parse_backup_output(text, 1)
    assert result.outcome is BackupOutcome.FAILED
    assert result.errors == (ROLE_ERROR,)
    assert result.message == ROLE_ERROR
    assert not result.stopped_services


def test_disabled_role_check_turns_the_mismatch_into_a_warning() -> None:
    text = FULL_SUCCESS.replace("Local roles match globally used roles, proceeding.", ROLE_ERROR)
    result = parse_backup_output(text, 0)
    assert result.succeeded
    assert result.warnings == (ROLE_ERROR,)
    assert result.errors == ()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "Usage: ipa-backup [options]\n\nipa-backup: error: You cannot specify --online without --data\n"
            "The ipa-backup command failed.\n",
            "You cannot specify --online without --data",
        ),
        (
            "Usage: ipa-backup [options]\n\nipa-backup: error: You cannot specify --data with --logs\n"
            "The ipa-backup command failed.\n",
            "You cannot specify --data with --logs",
        ),
        ("IPA is not configured on this system.\nThe ipa-backup command failed.\n", "IPA is not configured"),
    ],
)
def test_exit_code_2_is_refused(text: str, error: str) -> None:
    result = parse_backup_output(text, 2)
    assert result.outcome is BackupOutcome.REFUSED
    assert len(result.errors) == 1 and result.errors[0].startswith(error)
    assert not result.services_may_be_stopped


def test_not_root() -> None:
    text = (
        "Must be root to run ipa-backup\n"
        "The ipa-backup command failed. See /var/log/ipabackup.log for more information\n"
    )
    result = parse_backup_output(text, 1)
    assert result.outcome is BackupOutcome.FAILED
    assert result.message == "Must be root to run ipa-backup"


def test_failure_after_stopping_services_leaves_them_stopped() -> None:
    text = (
        "Preparing backup on ipa-hidden.example.test\n"
        "Local roles match globally used roles, proceeding.\n"
        "Stopping IPA services\n"
        "Backing up ipaca in EXAMPLE-TEST to LDIF\n"
        "db2ldif failed: Command '/usr/sbin/dsctl EXAMPLE-TEST db2ldif --replication ipaca "
        "/var/lib/dirsrv/slapd-EXAMPLE-TEST/ldif/EXAMPLE-TEST-ipaca.ldif' returned non-zero exit status 1 "
        "Check if destination directory /var/lib/dirsrv/slapd-EXAMPLE-TEST/ldif has enough space.\n"
        "The ipa-backup command failed. See /var/log/ipabackup.log for more information\n"
    )
    result = parse_backup_output(text, 1)
    assert result.outcome is BackupOutcome.FAILED
    assert result.errors[0].startswith("db2ldif failed:")
    assert result.stopped_services and result.services_may_be_stopped
    assert result.backup_dir is None


def test_failure_after_the_start_step_still_needs_a_restart_check() -> None:
    text = (
        "Stopping IPA services\nBacking up files\nStarting IPA service\n"
        "CalledProcessError(Command ['/usr/sbin/ipactl', 'start'] returned non-zero exit status 1)\n"
        "The ipa-backup command failed. See /var/log/ipabackup.log for more information\n"
    )
    result = parse_backup_output(text, 1)
    assert result.services_may_be_stopped
    assert "ipactl" in result.message


def test_killed_without_final_line() -> None:
    text = "Preparing backup on ipa-hidden.example.test\nStopping IPA services\nBacking up files\n"
    result = parse_backup_output(text, 137)
    assert result.outcome is BackupOutcome.INTERRUPTED
    assert result.services_may_be_stopped
    assert result.message == (
        "ipa-backup stopped without a final status during 'Backing up files': "
        "exit code 137 (killed by signal 9)"
    )


def test_lost_connection_keeps_last_output_as_error() -> None:
    text = "Stopping IPA services\nsomething went wrong"
    result = parse_backup_output(text, None)
    assert result.outcome is BackupOutcome.INTERRUPTED
    assert result.errors == ("something went wrong",)


def test_success_line_with_wrong_exit_code_is_a_failure() -> None:
    result = parse_backup_output(FULL_SUCCESS, 1)
    assert result.outcome is BackupOutcome.FAILED
    assert "reported success" in result.message


def test_success_without_directory_is_a_failure() -> None:
    result = parse_backup_output("The ipa-backup command was successful\n", 0)
    assert result.outcome is BackupOutcome.FAILED
    with pytest.raises(UnsafeBackupPath):
        result.directory(FULL)


def test_failure_without_message_points_to_the_log() -> None:
    result = parse_backup_output("Stopping IPA services\nThe ipa-backup command failed.\n", 1)
    assert "/var/log/ipabackup.log" in result.message


def test_the_log_path_is_the_one_the_failure_line_names() -> None:
    # freeipa-container keeps its logs on the volume: the failure line says where, not the upstream default.
    failed = "The ipa-backup command failed. See /data/var/log/ipabackup.log for more information"
    text = f"Stopping IPA services\n{failed}\n"
    result = parse_backup_output(text, 1)
    assert result.log_path == "/data/var/log/ipabackup.log"
    assert "see /data/var/log/ipabackup.log on the server" in result.message


def test_warnings_the_run_survived() -> None:
    warning = "Unable to obtain list of master services, continuing anyway"
    text = FULL_SUCCESS.replace("Stopping IPA services", f"{warning}\nStopping IPA services")
    result = parse_backup_output(text, 0)
    assert result.warnings == (warning,)


def test_incremental_feed_reports_steps_and_handles_split_chunks() -> None:
    parser = BackupOutputParser()
    raw = FULL_SUCCESS.encode()
    seen: list[str] = []
    for i in range(0, len(raw), 7):
        seen += parser.feed(raw[i : i + 7])
        if "Backing up files" in seen and "Starting IPA service" not in seen:
            assert parser.current_step == "Backing up files"
    assert seen[0] == "Preparing backup on ipa-hidden.example.test"
    assert "Backing up userRoot in EXAMPLE-TEST to LDIF" in seen
    assert seen[-1] == "Backed up to /var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20"
    assert parser.finish(0) == parse_backup_output(FULL_SUCCESS, 0)


def test_incremental_feed_keeps_multibyte_characters_split_across_chunks() -> None:
    parser = BackupOutputParser()
    data = "Stopping IPA services\nErreur: rôle manquant\nThe ipa-backup command failed.\n".encode()
    cut = data.index("ô".encode()) + 1
    parser.feed(data[:cut])
    parser.feed(data[cut:])
    assert parser.finish(1).errors == ("Erreur: rôle manquant",)


def test_last_line_without_newline_is_read() -> None:
    result = parse_backup_output(FULL_SUCCESS.rstrip("\n"), 0)
    assert result.succeeded


@pytest.mark.parametrize(
    ("path", "expected", "reason"),
    [
        ("/var/lib/ipa/backup/../../../etc", FULL, "not directly inside"),
        ("/var/lib/ipa/backup/../backup/ipa-full-2026-11-14-22-13-20", FULL, "not directly inside"),
        ("/var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20/..", FULL, "not directly inside"),
        ("/var/lib/ipa/backup//ipa-full-2026-11-14-22-13-20", FULL, "not directly inside"),
        ("/var/lib/ipa/backup/./ipa-full-2026-11-14-22-13-20", FULL, "not directly inside"),
        ("/var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20/", FULL, "not directly inside"),
        ("var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20", FULL, "not directly inside"),
        ("/tmp/ipa-full-2026-11-14-22-13-20", FULL, "not directly inside"),
        ("/data/var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20", FULL, "not directly inside"),
        ("/var/lib/ipa/backup", FULL, "not directly inside"),
        ("/var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20/x", FULL, "not directly inside"),
        ("/var/lib/ipa/backup/ipa-full-latest", FULL, "is not named"),
        ("/var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20-x", FULL, "is not named"),
        ("/var/lib/ipa/backup/ipa-data-2026-11-14-22-13-20", FULL, "holds a DATA backup, not FULL"),
        ("/var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20", DATA, "holds a FULL backup, not DATA"),
        ("/var/lib/ipa/backup/ipa-full-2026-13-14-22-13-20", FULL, "impossible timestamp"),
        ("/var/lib/ipa/backup/ipa-full-2026-11-14-22-13-20\n/etc", FULL, "control characters"),
    ],
)
def test_unsafe_backup_paths_are_rejected(path: str, expected: BackupType, reason: str) -> None:
    with pytest.raises(UnsafeBackupPath, match=reason):
        backup_directory(path, expected)


def test_backup_directory_fields() -> None:
    directory = backup_directory("/var/lib/ipa/backup/ipa-data-2026-11-14-22-13-20", DATA)
    assert directory.type is DATA
    assert directory.time == datetime(2026, 11, 14, 22, 13, 20)
    assert str(directory.archive_path) == "/var/lib/ipa/backup/ipa-data-2026-11-14-22-13-20/ipa-data.tar"
    assert FULL.archive_name == "ipa-full.tar"


SAMPLE_HEADER = b"""\
[ipa]
type = FULL
time = 2026-11-14T22:13:20
host = ipa-hidden.example.test
ipa_version = 4.12.2
version = 1
services = CA,DNS,DNSKeySync,HTTP,KDC,KEYS,KPASSWD,KRA,OTPD

"""


def test_header_sample() -> None:
    header = parse_header(SAMPLE_HEADER)
    assert header.type is FULL
    assert header.time == datetime(2026, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert header.host == "ipa-hidden.example.test"
    assert header.ipa_version == "4.12.2"
    assert header.version == 1
    assert header.services == ("CA", "DNS", "DNSKeySync", "HTTP", "KDC", "KEYS", "KPASSWD", "KRA", "OTPD")


def test_header_with_empty_services() -> None:
    services = b"services = CA,DNS,DNSKeySync,HTTP,KDC,KEYS,KPASSWD,KRA,OTPD"
    header = parse_header(SAMPLE_HEADER.replace(services, b"services = "))
    assert header.services == ()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no \\[ipa\\] section"),
        (b"not a header at all", "not in INI format"),
        (b"\xff\xfe[ipa]", "not UTF-8"),
        (b"[other]\ntype = FULL\n", "no \\[ipa\\] section"),
        (SAMPLE_HEADER.replace(b"type = FULL", b"type = PARTIAL"), "neither FULL nor DATA"),
        (SAMPLE_HEADER.replace(b"time = 2026-11-14T22:13:20", b"time = yesterday"), "not YYYY-MM-DD"),
        (SAMPLE_HEADER.replace(b"host = ipa-hidden.example.test\n", b""), "no 'host'"),
        (SAMPLE_HEADER.replace(b"ipa_version = 4.12.2", b"ipa_version ="), "no 'ipa_version'"),
        (SAMPLE_HEADER.replace(b"version = 1", b"version = one"), "not a number"),
        (b"[ipa]\n" + b"x" * 70_000, "more than a header can be"),
    ],
)
def test_malformed_headers(data: bytes, message: str) -> None:
    with pytest.raises(HeaderError, match=message):
        parse_header(data)


DEFAULT_CONF = """\
#File modified by ipa-server-install

[global]
basedn = dc=example,dc=test
realm = EXAMPLE.TEST
domain = example.test
server = ipa-hidden.example.test
host = ipa-hidden.example.test
xmlrpc_uri = https://ipa-hidden.example.test/ipa/xml
ldap_uri = ldapi://%2Frun%2Fslapd-EXAMPLE-TEST.socket
mode = production
enable_ra = True
ra_plugin = dogtag
dogtag_version = 10
"""


def test_default_conf() -> None:
    config = parse_default_conf(DEFAULT_CONF)
    assert config.host == "ipa-hidden.example.test"
    assert config.realm == "EXAMPLE.TEST"
    assert config.domain == "example.test"
    assert config.basedn == "dc=example,dc=test"
    assert config.server == "ipa-hidden.example.test"
    assert config.ldap_uri == "ldapi://%2Frun%2Fslapd-EXAMPLE-TEST.socket"
    assert config.serverid == "EXAMPLE-TEST"


def test_default_conf_derives_basedn_from_domain() -> None:
    text = "[global]\nrealm = IPA.CORP.EXAMPLE\ndomain = corp.example\nhost = idm1.corp.example\n"
    config = parse_default_conf(text)
    assert config.basedn == "dc=corp,dc=example"
    assert config.server is None and config.ldap_uri is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no \\[global\\] section"),
        ("[global]\ndomain = example.test\nhost = a.example.test\n", "no realm"),
        ("[global]\nrealm = EXAMPLE.TEST\n", "no host, domain"),
        ("[global]\nrealm = EXAMPLE.TEST\ndomain = example.test\nhost = ipa\n", "not fully qualified"),
        # A hostile pod's host name would become a storage path: '..' and '/' are refused by name.
        ("[global]\nrealm = EXAMPLE.TEST\ndomain = example.test\nhost = ..\n", "'..' .* is not a DNS name"),
        (
            "[global]\nrealm = EXAMPLE.TEST\ndomain = example.test\nhost = a/../b.example.test\n",
            "is not a DNS name",
        ),
        ("[global]\nrealm = EXAMPLE.TEST\ndomain = example.test\nhost = -a.example.test\n", "not a DNS name"),
        ("realm = EXAMPLE.TEST\n", "not in INI format"),
    ],
)
def test_broken_default_conf(text: str, message: str) -> None:
    with pytest.raises(DefaultConfError, match=message):
        parse_default_conf(text)


def test_serverid() -> None:
    assert serverid("EXAMPLE.TEST") == "EXAMPLE-TEST"
    assert serverid("IPA.CORP.EXAMPLE") == "IPA-CORP-EXAMPLE"


IPACTL_RUNNING = """\
Directory Service: RUNNING
krb5kdc Service: RUNNING
kadmin Service: RUNNING
named Service: RUNNING
httpd Service: RUNNING
ipa-custodia Service: RUNNING
pki-tomcatd Service: RUNNING
ipa-otpd Service: STOPPED
ipa-dnskeysyncd Service: RUNNING
ipa: INFO: The ipactl command was successful
"""


def test_ipactl_all_running_ignores_socket_activated() -> None:
    status = parse_ipactl_status(IPACTL_RUNNING, 0)
    assert status.verdict is IpaServicesVerdict.RUNNING
    assert status.services["pki-tomcatd"] is ServiceRunState.RUNNING
    assert status.services["ipa-otpd"] is ServiceRunState.STOPPED
    assert status.stopped == ()
    assert status.summary == "all IPA services are running"


def test_ipactl_some_stopped() -> None:
    text = IPACTL_RUNNING.replace("pki-tomcatd Service: RUNNING", "pki-tomcatd Service: STOPPED").replace(
        "ipa: INFO: The ipactl command was successful", "1 service(s) are not running"
    )
    status = parse_ipactl_status(text, 3)
    assert status.verdict is IpaServicesVerdict.DEGRADED
    assert status.stopped == ("pki-tomcatd",)
    assert status.summary == "IPA services not running: pki-tomcatd"


def test_ipactl_everything_stopped() -> None:
    text = "Directory Service: STOPPED\nkrb5kdc Service: STOPPED\nhttpd Service: STOPPED\n"
    status = parse_ipactl_status(text + "2 service(s) are not running\n", 3)
    assert status.verdict is IpaServicesVerdict.STOPPED
    assert status.stopped == ("Directory", "krb5kdc", "httpd")


def test_ipactl_directory_stopped_without_service_list() -> None:
    text = (
        "Directory Service: STOPPED\n"
        "Directory Service must be running in order to obtain status of other services\n"
    )
    assert parse_ipactl_status(text, 3).verdict is IpaServicesVerdict.STOPPED


@pytest.mark.parametrize(
    ("text", "exit_code"),
    [
        ("IPA is not configured (see man pages of ipa-server-install for help)\n", 4),
        ("You must be root to run ipactl.\n", 4),
        ("", None),
        ("Directory Service: RUNNING\n", 1),
    ],
)
def test_ipactl_unknown(text: str, exit_code: int | None) -> None:
    status = parse_ipactl_status(text, exit_code)
    assert status.verdict is IpaServicesVerdict.UNKNOWN
    assert status.summary.startswith("IPA service status unknown")


def test_a_failed_upgrade_on_start_is_named_with_its_log() -> None:
    # ipactl start's stderr when the ipa-server-upgrade it runs first fails (ipactl.py, version_check).
    stderr = (
        "IPA version error: data needs to be upgraded (expected version '4.12.2-2.fc41', current version "
        "'4.12.2-1.fc41')\n"
        "Automatically running upgrade, for details see /data/var/log/ipaupgrade.log\n"
        "Be patient, this may take a few minutes.\n"
        "Automatic upgrade failed: IPA server upgrade failed: Inspect /var/log/ipaupgrade.log and run "
        "command ipa-server-upgrade manually.\n"
        "\n"
        "See the upgrade log for more details and/or run /usr/sbin/ipa-server-upgrade again\n"
        "Aborting ipactl\n"
    )
    assert freeipa.upgrade_failure(stderr) == (
        "ipactl start: IPA version error: data needs to be upgraded (expected version '4.12.2-2.fc41', "
        "current version '4.12.2-1.fc41'); Automatic upgrade failed: IPA server upgrade failed: Inspect "
        "/var/log/ipaupgrade.log and run command ipa-server-upgrade manually. (see "
        "/data/var/log/ipaupgrade.log in the pod)"
    )
    # A start that upgraded and went on, or failed for another reason, is not an upgrade failure.
    assert freeipa.upgrade_failure(stderr.replace("Automatic upgrade failed", "Upgraded")) is None
    assert freeipa.upgrade_failure("Failed to start Directory Service\nAborting ipactl\n") is None


def test_the_server_config_says_which_pod_lacks_a_usable_default_conf() -> None:
    conf = b"[global]\nhost = ipa-hidden.example.test\ndomain = example.test\nrealm = EXAMPLE.TEST\n"
    assert freeipa.server_config(0, conf, "ipa-0").host == "ipa-hidden.example.test"
    with pytest.raises(freeipa.DefaultConfError, match=r"^pod ipa-0 has no readable /etc/ipa/default.conf"):
        freeipa.server_config(1, b"", "ipa-0")
    with pytest.raises(freeipa.DefaultConfError, match=r"^/etc/ipa/default.conf in pod ipa-0: "):
        freeipa.server_config(0, b"[global]\n", "ipa-0")
