"""ipa-backup's command line and everything it prints or writes: exit codes, progress lines, the backup
directory and its header.

Nothing here talks to Kubernetes: the operator runs the commands built here through exec in the FreeIPA pod
and hands what comes back to the parsers here. The facts come from FreeIPA's own sources
(ipaserver/install/ipa_backup.py, ipapython/admintool.py).
"""

from __future__ import annotations

import codecs
import configparser
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath

# ipa-backup always writes here (paths.IPA_BACKUP_DIR). In freeipa-container /var/lib/ipa is a symlink into
# /data, but ipa-backup prints the path through the symlink, so this is what the output names.
IPA_BACKUP_DIR = PurePosixPath("/var/lib/ipa/backup")
HEADER_FILE = "header"
IPA_BACKUP_LOG = "/var/log/ipabackup.log"

# A header is about 200 bytes; anything far bigger is not a header and must not be read into memory.
MAX_HEADER_BYTES = 64 * 1024

# ipa-backup's exit codes (ipapython/admintool.py): 0 SUCCESS, 1 any error, 2 SERVER_NOT_CONFIGURED. optparse
# usage errors exit with 2 as well; both happen in validate_options(), before anything on the server changes.
EXIT_SUCCESS = 0
EXIT_ERROR = 1
EXIT_NOT_CONFIGURED_OR_USAGE = 2


class BackupType(enum.Enum):
    FULL = "FULL"
    DATA = "DATA"

    @property
    def archive_name(self) -> str:
        return f"ipa-{self.value.lower()}.tar"

    @property
    def directory_prefix(self) -> str:
        return f"ipa-{self.value.lower()}-"


class InvalidBackupOptions(ValueError):
    """Options that ipa-backup itself would refuse; the operator refuses them when the resource is applied."""


@dataclass(frozen=True)
class BackupOptions:
    type: BackupType = BackupType.FULL
    online: bool = False
    logs: bool = False
    disable_role_check: bool = False
    tmpdir: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        # Same checks, same order and same words as Backup.validate_options() in ipa_backup.py.
        if self.online and self.type is not BackupType.DATA:
            raise InvalidBackupOptions("You cannot specify --online without --data")
        if self.type is BackupType.DATA and self.logs:
            raise InvalidBackupOptions("You cannot specify --data with --logs")
        if self.tmpdir is not None and (
            not self.tmpdir.startswith("/") or any(c in self.tmpdir for c in "\0\n")
        ):
            raise InvalidBackupOptions(f"tmpdir must be an absolute path, not {self.tmpdir!r}")

    @property
    def stops_services(self) -> bool:
        """Whether ipa-backup stops something: all of IPA (full backup) or the directory (offline data)."""
        return not self.online


def ipa_backup_argv(options: BackupOptions) -> list[str]:
    """The command to exec in the FreeIPA container.

    Kubernetes exec takes no environment, so TMPDIR goes through env(1): `env TMPDIR=/x ipa-backup ...`.
    ipa-backup's temporary copy comes from tempfile.mkdtemp(), which silently falls back to /tmp when TMPDIR
    is missing or not writable, so the caller should make sure the directory exists.

    Never --gpg: it needs a secret key on the server, while the operator encrypts with public keys only.
    Never -v or -q: the output parser reads the plain console format, and -q would hide the progress lines.
    """
    argv = ["env", f"TMPDIR={options.tmpdir}"] if options.tmpdir else []
    argv.append("ipa-backup")
    if options.type is BackupType.DATA:
        argv.append("--data")
    if options.online:
        argv.append("--online")
    if options.logs:
        argv.append("--logs")
    if options.disable_role_check:
        argv.append("--disable-role-check")
    return argv


def describe_exit_code(exit_code: int | None) -> str:
    if exit_code is None:
        return "no exit status (the connection to the pod was lost)"
    if exit_code == EXIT_SUCCESS:
        return "exit code 0 (success)"
    if exit_code == EXIT_ERROR:
        return "exit code 1 (error)"
    if exit_code == EXIT_NOT_CONFIGURED_OR_USAGE:
        return "exit code 2 (IPA not configured, or a usage error)"
    if exit_code > 128:
        return f"exit code {exit_code} (killed by signal {exit_code - 128})"
    return f"exit code {exit_code}"


class UnsafeBackupPath(ValueError):
    """A backup directory that must not be read from or deleted: not one that ipa-backup creates."""


_BACKUP_DIR_NAME = re.compile(r"ipa-(full|data)-(\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2})")


@dataclass(frozen=True)
class BackupDirectory:
    path: PurePosixPath
    type: BackupType
    # ipa-backup names the directory with time.strftime(), i.e. the server's local time (UTC in containers),
    # taken at the end of the run: naive on purpose. The header has the exact UTC start time.
    time: datetime

    @property
    def archive_path(self) -> PurePosixPath:
        return self.path / self.type.archive_name

    @property
    def header_path(self) -> PurePosixPath:
        return self.path / HEADER_FILE


def backup_directory(path: str, expected_type: BackupType) -> BackupDirectory:
    """Check a directory that ipa-backup reported before the operator cats files from it and later removes it.

    Only the exact canonical form `/var/lib/ipa/backup/ipa-<type>-<timestamp>` is accepted: no `..`, no
    doubled or trailing slashes, no other parent, and the type must be the one that was requested.
    """
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise UnsafeBackupPath(f"backup directory {path!r} contains control characters")
    pure = PurePosixPath(path)
    # PurePosixPath quietly folds "//" and "/./"; comparing with the input rejects any non-canonical spelling.
    if str(pure) != path or pure.parent != IPA_BACKUP_DIR:
        raise UnsafeBackupPath(f"backup directory {path!r} is not directly inside {IPA_BACKUP_DIR}")
    match = _BACKUP_DIR_NAME.fullmatch(pure.name)
    if not match:
        raise UnsafeBackupPath(f"backup directory {path!r} is not named ipa-(full|data)-YYYY-MM-DD-HH-MM-SS")
    found_type = BackupType(match[1].upper())
    if found_type is not expected_type:
        raise UnsafeBackupPath(
            f"backup directory {path!r} holds a {found_type.value} backup, not {expected_type.value}"
        )
    try:
        time = datetime.strptime(match[2], "%Y-%m-%d-%H-%M-%S")
    except ValueError:
        raise UnsafeBackupPath(f"backup directory {path!r} has an impossible timestamp") from None
    return BackupDirectory(path=pure, type=found_type, time=time)


class BackupOutcome(enum.Enum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    # Exit code 2: usage error or IPA not configured, found before ipa-backup touched anything.
    REFUSED = "Refused"
    # No final line: killed, timed out, or the exec stream was cut. Services may be left stopped.
    INTERRUPTED = "Interrupted"


# The lines ipa-backup logs at INFO level on its way (ipa_backup.py, 4.8 to 4.12; "Backing up <x>" covers
# both "Backing up <SERVERID>" and "Backing up files"), less "Encrypting" since --gpg is never used. The
# console format is the bare message because the operator never passes -v; it all goes to stderr.
_STEP_LINES = re.compile(
    r"Preparing backup on\b.*"
    r"|Local roles match globally used roles, proceeding\."
    r"|Stopping IPA services|Stopping Directory Server"
    r"|Backing up \S+ in \S+ to LDIF|Waiting for LDIF to finish"
    r"|Backing up \S+|Waiting for BAK to finish"
    r"|Starting IPA service|Starting Directory Server"
)
_STOP_STEPS = {"Stopping IPA services", "Stopping Directory Server"}
_START_STEPS = {"Starting IPA service", "Starting Directory Server"}
_BACKED_UP = re.compile(r"Backed up to (\S.*)")
_SUCCESS_LINE = "The ipa-backup command was successful"
# AdminTool.log_failure() may append " See /var/log/ipabackup.log for more information"; the path is
# the image's (/data/var/log/ipabackup.log in freeipa-container), so it is read from the line.
_FAILURE_PREFIX = "The ipa-backup command failed."
_LOG_PATH = re.compile(r"See (\S+) for more information")
# optparse's error(): the usage line, a blank line, then "<prog>: error: <message>".
_USAGE_LINE = re.compile(r"Usage: ipa-backup\b.*")
_OPTPARSE_ERROR = re.compile(r"ipa-backup: error: (.*)")


@dataclass(frozen=True)
class BackupRunResult:
    outcome: BackupOutcome
    exit_code: int | None
    backup_dir: str | None
    steps: tuple[str, ...]
    warnings: tuple[str, ...]
    errors: tuple[str, ...]
    stopped_services: bool
    restarted_services: bool
    log_path: str = IPA_BACKUP_LOG

    @property
    def succeeded(self) -> bool:
        return self.outcome is BackupOutcome.SUCCEEDED

    @property
    def services_may_be_stopped(self) -> bool:
        """Services were stopped and nothing shows they came back: the operator must run `ipactl start`."""
        return self.stopped_services and not self.restarted_services

    def directory(self, expected_type: BackupType) -> BackupDirectory:
        if self.backup_dir is None:
            raise UnsafeBackupPath("ipa-backup did not report a backup directory")
        return backup_directory(self.backup_dir, expected_type)

    @property
    def message(self) -> str:
        if self.outcome is BackupOutcome.SUCCEEDED:
            return f"Backed up to {self.backup_dir}"
        if self.errors:
            return " ".join(self.errors)
        exit_text = describe_exit_code(self.exit_code)
        if self.outcome is BackupOutcome.INTERRUPTED:
            last = f" during {self.steps[-1]!r}" if self.steps else " before its first step"
            return f"ipa-backup stopped without a final status{last}: {exit_text}"
        return f"ipa-backup failed without an error message ({exit_text}); see {self.log_path} on the server"


class BackupOutputParser:
    """Reads ipa-backup's stderr as it arrives; `current_step` is what the server is doing right now.

    Lines that are neither steps nor final lines are messages. A message the run went past is a warning
    (the role-check text with --disable-role-check, "Unable to obtain list of master services, continuing
    anyway"); the messages right before "The ipa-backup command failed." are the error.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._steps: list[str] = []
        self._warnings: list[str] = []
        self._pending: list[str] = []
        self._errors: list[str] = []
        self._backup_dir: str | None = None
        self._final: BackupOutcome | None = None
        self._stopped = False
        self._restarted = False
        self._log_path = IPA_BACKUP_LOG

    @property
    def current_step(self) -> str | None:
        return self._steps[-1] if self._steps else None

    def feed(self, data: str | bytes) -> list[str]:
        """Consume a chunk of output, split anywhere; return the steps it completed, for progress reports."""
        text = self._decoder.decode(data) if isinstance(data, bytes) else data
        *lines, self._partial = (self._partial + text).split("\n")
        return [step for line in lines if (step := self._line(line)) is not None]

    def finish(self, exit_code: int | None) -> BackupRunResult:
        self._partial += self._decoder.decode(b"", final=True)
        if self._partial:
            self._line(self._partial)
            self._partial = ""
        outcome, errors = self._verdict(exit_code)
        warnings = [*self._warnings, *self._pending] if outcome is BackupOutcome.SUCCEEDED else self._warnings
        return BackupRunResult(
            outcome=outcome,
            exit_code=exit_code,
            backup_dir=self._backup_dir,
            steps=tuple(self._steps),
            warnings=tuple(warnings),
            errors=tuple(errors),
            stopped_services=self._stopped,
            restarted_services=self._restarted,
            log_path=self._log_path,
        )

    def _verdict(self, exit_code: int | None) -> tuple[BackupOutcome, list[str]]:
        if self._final is None:
            return BackupOutcome.INTERRUPTED, self._pending
        if self._final is BackupOutcome.FAILED:
            refused = exit_code == EXIT_NOT_CONFIGURED_OR_USAGE
            return (BackupOutcome.REFUSED if refused else BackupOutcome.FAILED), self._errors
        if exit_code != EXIT_SUCCESS:
            ended = describe_exit_code(exit_code)
            return BackupOutcome.FAILED, [f"ipa-backup reported success but ended with {ended}"]
        if self._backup_dir is None:
            return BackupOutcome.FAILED, ["ipa-backup reported success without saying where the backup is"]
        return BackupOutcome.SUCCEEDED, []

    def _line(self, raw: str) -> str | None:
        line = raw.strip()
        if not line or _USAGE_LINE.fullmatch(line):
            return None
        if line == _SUCCESS_LINE:
            self._final = BackupOutcome.SUCCEEDED
            return None
        if line.startswith(_FAILURE_PREFIX):
            if (log := _LOG_PATH.search(line)) is not None:
                self._log_path = log[1]
            self._final = BackupOutcome.FAILED
            self._errors, self._pending = self._pending, []
            return None
        if (backed_up := _BACKED_UP.fullmatch(line)) is not None:
            self._backup_dir = backed_up[1]
        elif not _STEP_LINES.fullmatch(line):
            usage_error = _OPTPARSE_ERROR.fullmatch(line)
            self._pending.append(usage_error[1] if usage_error else line)
            return None
        # A service start is a plain `ipactl start` / systemctl call: only a line after it proves it returned.
        self._restarted = self._restarted or (self._stopped and self.current_step in _START_STEPS)
        self._stopped = self._stopped or line in _STOP_STEPS
        self._warnings += self._pending
        self._pending = []
        self._steps.append(line)
        return line


def parse_backup_output(text: str | bytes, exit_code: int | None) -> BackupRunResult:
    parser = BackupOutputParser()
    parser.feed(text)
    return parser.finish(exit_code)


class HeaderError(ValueError):
    """The backup's header file is missing a field or is not a header at all."""


_HEADER_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


@dataclass(frozen=True)
class BackupHeader:
    type: BackupType
    time: datetime
    host: str
    ipa_version: str
    version: int
    services: tuple[str, ...]


def parse_header(data: bytes) -> BackupHeader:
    """Parse the `header` file that ipa-backup's create_header() writes with ConfigParser."""
    if len(data) > MAX_HEADER_BYTES:
        raise HeaderError(f"backup header is {len(data)} bytes, more than a header can be")
    try:
        section = read_ini_section(data.decode("utf-8"), "ipa", "backup header")
    except UnicodeDecodeError:
        raise HeaderError("backup header is not UTF-8 text") from None
    except ValueError as error:
        raise HeaderError(str(error)) from None

    def required(key: str) -> str:
        value = section.get(key, "").strip()
        if not value:
            raise HeaderError(f"backup header has no {key!r} in its [ipa] section")
        return value

    type_text, time_text, version_text = required("type"), required("time"), required("version")
    try:
        backup_type = BackupType(type_text)
    except ValueError:
        raise HeaderError(f"backup header type {type_text!r} is neither FULL nor DATA") from None
    try:
        time = datetime.strptime(time_text, _HEADER_TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise HeaderError(f"backup header time {time_text!r} is not YYYY-MM-DDTHH:MM:SS") from None
    if not version_text.isdigit():
        raise HeaderError(f"backup header version {version_text!r} is not a number")
    # An empty services list is legitimate: ipa-backup writes it when it cannot read cn=masters.
    services = tuple(s.strip() for s in section.get("services", "").split(",") if s.strip())
    return BackupHeader(
        type=backup_type,
        time=time,
        host=required("host"),
        ipa_version=required("ipa_version"),
        version=int(version_text),
        services=services,
    )


def read_ini_section(text: str, name: str, what: str) -> Mapping[str, str]:
    # No interpolation: ldap_uri in default.conf is full of "%2f".
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error as error:
        raise ValueError(f"{what} is not in INI format: {error.message}") from None
    if not parser.has_section(name):
        raise ValueError(f"{what} has no [{name}] section")
    return parser[name]
