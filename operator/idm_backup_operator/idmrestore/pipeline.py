"""Restoring one backup into a FreeIPA server, safely: every gate first, then the change, then the proof.

A restore overwrites the live directory, so the order is the point:
1. gates, while nothing on the server has changed: the typed confirmation, the archive verified end to end
   with the private key (archive.verify: manifest, sizes, both sha256), its header against the server
   (host, IPA version, type), the server's backends and directory server, free space, and the server's
   Lease, so that no backup and no other restore acts on it meanwhile;
2. staging: the archive streamed from storage through gpg into the pod, under its original directory name
   in /var/lib/ipa/backup (never /tmp, which dirsrv cannot read), checked by sha256 in the pod; the
   private key stays in the operator;
3. ipa-restore, with the password and confirmations on stdin; from here the services are put back,
   whatever ends the restore;
4. the check: ipa-restore's output read for the failures it logs and exits 0 after, `ipactl status`, and
   the entries per backend counted over LDAP against the archive's LDIF;
5. a hidden replica hidden again (ipa-restore enables it), and the other masters listed with the commands
   that re-initialize them;
6. the staged files removed, on every path.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from idm_backup_operator import freeipa
from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import IDMRESTORE
from idm_backup_operator.api.phase import Phase
from idm_backup_operator.api.spec import DrillSpec, LdapTarget, RestoreSpec
from idm_backup_operator.api.times import format_time
from idm_backup_operator.archive import encryption, stored
from idm_backup_operator.archive.verify import Verdict, verify_backup
from idm_backup_operator.freeipa import BackupDirectory, BackupHeader, IpaServerConfig, directory, ipa_restore
from idm_backup_operator.freeipa.ipa_restore import RestoreOutcome, RestoreType
from idm_backup_operator.freeipa.topology import (
    LdapConnectionSettings,
    TopologyError,
    masters_dn,
    read_topology,
)
from idm_backup_operator.idmbackup.pipeline import check_services, remove_from_pod, restart_services
from idm_backup_operator.idmrestore import status as restore_status
from idm_backup_operator.kube import references
from idm_backup_operator.kube.backups import IdmBackups, NotFound
from idm_backup_operator.kube.errors import ApiError
from idm_backup_operator.kube.locking import TargetLock
from idm_backup_operator.kube.podexec import ExecError, ExecResult, PodRef
from idm_backup_operator.kube.scratch import ScratchError, ScratchServer
from idm_backup_operator.kube.services import Reporter, Services
from idm_backup_operator.storage import DeadlineExceeded, StorageError, Store
from idm_backup_operator.streams import Tally, chunks_of, human_size, tallied

log = logging.getLogger(__name__)

DIRECTORY_MANAGER = "cn=directory manager"
# The server's IPA version, read the way FreeIPA's own tools know it (ipapython/version.py).
VERSION_COMMAND = ["python3", "-c", "from ipapython import version; print(version.VERSION)"]
# Room left on the volume after staging and extraction, for the logs and the LDIF copies 389-ds imports.
SPACE_MARGIN = 64 << 20
INTERRUPTED = "OperatorRestarted"
# Writes exactly $1 bytes of stdin to $2 and prints their sha256; fails unless the closed file has them
# all (tee reports a full disk on stderr, and the size test catches what it wrote short).
STAGE_SCRIPT = 'head -c "$1" | tee "$2" | sha256sum && test "$(stat -c %s "$2")" = "$1"'
# One re-initialization copies a whole directory to another master: minutes for a large one.
REINITIALIZE_TIMEOUT = 3600
# How long a master's pod may take to be found ready before its re-initialization counts as failed.
MASTER_POD_PATIENCE = 120
# 389-ds enables a backend again within moments of finishing its import; one still disabled after this
# long was left so by a failed import.
BACKEND_ONLINE_PATIENCE = 30
# The steps during which the staging directory exists and is this restore's own.
STAGED_STEPS = ("stage", "ipa-restore", "check", "re-hide", "replication", "clean-up")


class RestoreFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class MustWait(Exception):
    """Nothing was changed, and the restore is tried again later: the server's lock is held (a backup or
    another restore), or its pod is not ready (e.g. IPA restarting after the previous one)."""

    def __init__(self, message: str, reason: str = "TargetBusy") -> None:
        super().__init__(message)
        self.reason = reason


def lock_holder(resource: ResourceIdentity) -> str:
    # idmbackupschedule.pause tells a restore's lock from a backup's by this first word.
    return f"{IDMRESTORE} {resource.namespace}/{resource.name} ({resource.uid})"


@contextlib.contextmanager
def _holding_lock(services: Services, pod: PodRef, resource: ResourceIdentity) -> Iterator[TargetLock]:
    lock = TargetLock(services.coordination, pod, lock_holder(resource))
    busy = lock.try_acquire()
    if busy is not None:
        raise MustWait(f"waiting for {busy.holder} to finish: one backup or restore per server at a time")
    lock.keep_renewed()
    services.locks_changed(pod.namespace)
    try:
        yield lock
    finally:
        lock.release()
        services.locks_changed(pod.namespace)


def restore(resource: ResourceIdentity, spec: RestoreSpec, services: Services, report: Reporter) -> None:
    """Raises RestoreFailed with the cause, or MustWait when the server is busy."""
    if spec.drill is not None:
        return _drill(resource, spec, spec.drill, services, report)
    assert spec.target is not None
    try:
        pod = references.find_target_pod(services.core, resource.namespace, spec.target)
    except references.PodNotReady as err:
        raise MustWait(str(err), "TargetNotReady") from None
    except references.ResolveError as err:
        raise RestoreFailed("TargetUnavailable", str(err)) from None
    with (
        _holding_lock(services, pod, resource) as lock,
        tempfile.TemporaryDirectory(prefix="idm-restore-") as tmp,
    ):
        _Restore(resource, spec, services, report, pod, Path(tmp), lock, spec.target.ldap).run()


def _drill(
    resource: ResourceIdentity, spec: RestoreSpec, drill: DrillSpec, services: Services, report: Reporter
) -> None:
    """The same restore, into a scratch server made for it and deleted afterwards, whatever happened."""
    if not services.drills_enabled:
        raise RestoreFailed(
            "DrillsDisabled",
            "this operator does not run restore drills: a drill creates a pod from the IdmRestore's "
            "template, which its administrator must allow (Helm value drills.enabled; outside the chart, "
            "IDM_BACKUP_ENABLE_DRILLS=true)",
        )
    scratch = ScratchServer(
        services.core, services.networking, resource, drill.pod_template, drill.volume_claim_template
    )
    try:
        targeting = scratch.would_be_targeted_by(IdmBackups(services.custom).targets_in(resource.namespace))
    except ApiError as err:
        raise RestoreFailed(
            "ScratchServerFailed", f"cannot list the namespace's backups: {err.reason}"
        ) from None
    if shared := scratch.shared_claims():
        raise RestoreFailed(
            "DrillWouldTouchProduction",
            f"the scratch pod would mount claim {', '.join(shared)} read-write, and a restore into it would "
            "overwrite what is there: give the drill a volume of its own (volumeClaimTemplate, for the "
            "volume named data)",
        )
    if targeting:
        raise RestoreFailed(
            "DrillWouldTouchProduction",
            f"the scratch pod {scratch.name} would be the target of {', '.join(targeting)}: a backup could "
            "then act on it, or fail to tell it from production. Run drills in a namespace of their own, or "
            "give the scratch pod other labels and host",
        )
    started = datetime.datetime.now(datetime.UTC)
    report.update(
        phase=Phase.RUNNING.value,
        startTime=format_time(started),
        step="scratch server",
        drill={"pod": scratch.name},
    )
    report.event(
        "RestoreStep", f"scratch server: creating pod {scratch.name} behind a deny-all-egress policy"
    )
    try:
        scratch.create()
        pod = scratch.wait_ready(
            drill.ready_timeout_seconds, lambda: report.cancelled() or services.stopping.is_set()
        )
        with (
            _holding_lock(services, pod, resource) as lock,
            tempfile.TemporaryDirectory(prefix="idm-restore-") as tmp,
        ):
            _Restore(
                resource, spec, services, report, pod, Path(tmp), lock, drill.ldap, started=started
            ).run()
    except ScratchError as err:
        raise RestoreFailed("ScratchServerFailed", str(err)) from None
    finally:
        left = scratch.delete()
        if left:
            report.event("ScratchServerNotDeleted", "; ".join(left), warning=True)


class _Source:
    """The stored backup to restore: its store, directory key, manifest and (if known) IdmBackup."""

    def __init__(self, store: Store, directory: str, backup: str | None, expected_uid: str | None) -> None:
        self.store, self.directory, self.backup, self.expected_uid = store, directory, backup, expected_uid

    @property
    def name(self) -> str:
        return self.directory.rstrip("/").rsplit("/", 1)[-1]


class _Restore:
    def __init__(
        self,
        resource: ResourceIdentity,
        spec: RestoreSpec,
        services: Services,
        report: Reporter,
        pod: PodRef,
        scratch: Path,
        lock: TargetLock,
        ldap: LdapTarget,
        *,
        started: datetime.datetime | None = None,
    ) -> None:
        self.resource, self.spec, self.services, self.report = resource, spec, services, report
        self.pod, self.scratch, self.lock, self.ldap = pod, scratch, lock, ldap
        self.drill = spec.drill is not None
        self.started = started or datetime.datetime.now(datetime.UTC)
        self.stage_started = time.monotonic()
        self.deadline = time.monotonic() + spec.deadline_seconds

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def step(self, step: str, event: str = "") -> None:
        """A new step: in status.step, and an Event, so `kubectl describe` tells the story."""
        self.report.update(step=step)
        self.report.event("RestoreStep", f"{step}: {event}" if event else step)

    def stop_if_told(self, *, last_chance: bool = False) -> None:
        """Raise if the restore must stop. `last_chance`: before ipa-restore, which nothing may interrupt,
        the API server is asked now whether the IdmRestore still exists."""
        if self.report.cancelled(fresh=last_chance):
            raise RestoreFailed(
                "Cancelled", "the IdmRestore was deleted: stopped, and the staged files removed"
            )
        if self.lock.lost.is_set():
            raise RestoreFailed("LockLost", f"this restore lost pod {self.pod.name}'s lock: it stopped")
        if self.services.stopping.is_set():
            raise RestoreFailed("OperatorShutdown", "the operator was shut down during the restore")
        if time.monotonic() > self.deadline:
            raise RestoreFailed(
                "DeadlineExceeded",
                f"the restore did not finish within activeDeadlineSeconds={self.spec.deadline_seconds}",
            )

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def exec(self, argv: list[str], timeout: float = 60) -> ExecResult:
        try:
            return self.services.execs.run(self.pod, argv, timeout=min(timeout, self.remaining()))
        except (ExecError, ApiError) as err:
            raise RestoreFailed("ExecFailed", f"{' '.join(argv)} in pod {self.pod.name}: {err}") from None

    # -- the whole restore ---------------------------------------------------------------------------------

    def run(self) -> None:
        self.report.update(
            phase=Phase.RUNNING.value,
            startTime=format_time(self.started),
            message="",
            target={"pod": self.pod.name, "container": self.pod.container},
        )
        self.report.condition(
            "Waiting", False, "LockAcquired", f"this restore holds pod {self.pod.name}'s lock"
        )
        self.step("verify", f"restoring {self.spec.source.describe()} into pod {self.pod.name}: verifying")
        server = self.server_config()
        self.check_confirmation(server)
        source = self.locate()
        secret_key, passphrase = self.decryption_key()
        verdict, header = self.verify(source, server, secret_key, passphrase)
        backup_dir = self.check_header(header, server, source)
        backends = self.check_server(server, verdict)
        self.check_space(verdict)
        settings, was_hidden, masters, segments = self.read_directory(server)
        self.stop_if_told()
        self.make_staging_directory(backup_dir)
        try:
            self.stage(source, backup_dir, verdict, secret_key, passphrase)
            self.stop_if_told(last_chance=True)
            outcome = self.run_ipa_restore(backup_dir, settings, self.basedn(server), backends)
            self.check(settings, server, verdict, backends, outcome)
            if self.drill:
                self.report.update(
                    drill={
                        "pod": self.pod.name,
                        "restoreSeconds": round(time.monotonic() - self.stage_started, 1),
                        "entries": sum(verdict.ldif_entries.values()),
                    }
                )
            else:
                # A scratch server has no clients to hide from and no masters that matter.
                self.rehide(settings, server, was_hidden)
                self.plan_replication(server, masters, segments, outcome, settings.password)
        finally:
            # Unless the lock was lost: the server is then another process's to act on.
            if not self.lock.lost.is_set():
                self.step("clean-up", f"removing {backup_dir.path} from pod {self.pod.name}")
                remove_from_pod(self.services.execs, self.pod, backup_dir.path, self.report)
        restore_status.set_succeeded(self.report, self.started, server.host, verdict)

    # -- gates: nothing on the server changes until all of these passed ------------------------------------

    def server_config(self) -> IpaServerConfig:
        conf = self.exec(list(freeipa.READ_DEFAULT_CONF))
        try:
            server = freeipa.server_config(conf.exit_code, conf.stdout, self.pod.name)
        except freeipa.DefaultConfError as err:
            raise RestoreFailed("NotConfigured", str(err)) from None
        self.report.update(target={"host": server.host})
        return server

    def check_confirmation(self, server: IpaServerConfig) -> None:
        if not self.drill and self.spec.confirm != server.host:
            raise RestoreFailed(
                "ConfirmationMismatch",
                f"spec.confirm is {self.spec.confirm!r}, but pod {self.pod.name} is {server.host}: a restore "
                f"overwrites that server's live directory; set spec.confirm to {server.host!r} in a new "
                "IdmRestore if that is what you want",
            )
        full = self.spec.options.type is RestoreType.FULL
        if (
            full
            and not self.spec.allow_symlinked_config
            and self.exec(["test", "-L", "/etc/ipa"]).exit_code == 0
        ):
            raise RestoreFailed(
                "ConfigFilesAreSymlinks",
                f"/etc/ipa in pod {self.pod.name} is a symlink (freeipa-container): a Full restore fails "
                "there ('Restoring files failed', freeipa-container issue 543) after stopping IPA. Restore "
                "type Data, or set allowSymlinkedConfig if this image handles it",
            )

    def locate(self) -> _Source:
        source, namespace = self.spec.source, self.resource.namespace
        backups = IdmBackups(self.services.custom)
        try:
            if source.storage is not None and source.directory is not None:
                store = self.services.open_store(namespace, source.storage, self.scratch)
                return self._with_deadline(_Source(store, source.directory, None, None))
            obj = (
                backups.get(namespace, source.backup)
                if source.backup
                else backups.latest_succeeded(namespace, source.schedule or "")
            )
        except NotFound as err:
            raise RestoreFailed("SourceNotFound", str(err)) from None
        except (references.ResolveError, StorageError) as err:
            raise RestoreFailed("StorageUnavailable", f"storage not usable: {err}") from None
        if obj is None:
            raise RestoreFailed("SourceNotFound", f"{source.describe()}: it has no Succeeded backup yet")
        name = obj["metadata"]["name"]
        if (obj.get("status") or {}).get("phase") != Phase.SUCCEEDED:
            raise RestoreFailed(
                "SourceNotSucceeded", f"IdmBackup {name} has not Succeeded: nothing to restore"
            )
        located = stored.locate(obj)
        if located is None:
            raise RestoreFailed("SourceNotFound", f"IdmBackup {name} has no stored archive in its status")
        try:
            store = self.services.open_store(namespace, located.spec.storage, self.scratch)
        except (references.ResolveError, StorageError) as err:
            raise RestoreFailed("StorageUnavailable", f"storage not usable: {err}") from None
        return self._with_deadline(_Source(store, located.keys.directory, name, located.resource.uid))

    def _with_deadline(self, source: _Source) -> _Source:
        source.store.set_deadline(self.deadline)
        return source

    def decryption_key(self) -> tuple[bytes | None, str | None]:
        ns = self.resource.namespace
        try:
            key = (
                None
                if self.spec.secret_key is None
                else references.read_secret_key(self.services.core, ns, self.spec.secret_key)
            )
            phrase = (
                None
                if self.spec.passphrase is None
                else references.read_secret_text(self.services.core, ns, self.spec.passphrase)
            )
        except references.ResolveError as err:
            raise RestoreFailed("InvalidDecryptionKey", f"decryption key unusable: {err}") from None
        return key, phrase

    def verify(
        self, source: _Source, server: IpaServerConfig, key: bytes | None, passphrase: str | None
    ) -> tuple[Verdict, BackupHeader]:
        """The archive end to end (archive.verify), then the header ipa-restore will read, as stored."""
        try:
            verdict = verify_backup(
                source.store,
                source.directory,
                secret_key=key,
                passphrase=passphrase,
                expected_uid=source.expected_uid,
                server_id=server.serverid,
            )
        except DeadlineExceeded as err:
            raise RestoreFailed("DeadlineExceeded", f"verifying the archive: {err}") from None
        archive = ((verdict.manifest or {}).get("files") or {}).get("archive") or {}
        self.report.update(
            source={
                "uri": verdict.location,
                **({"backup": source.backup} if source.backup else {}),
                **({"sha256": archive["sha256"]} if archive.get("sha256") else {}),
            }
        )
        if not verdict.restorable:
            raise RestoreFailed(
                "ArchiveInvalid",
                f"the archive does not verify, nothing was changed: {'; '.join(verdict.reasons)}",
            )
        try:
            with source.store.open_read(source.directory + freeipa.HEADER_FILE) as f:
                header = freeipa.parse_header(f.read(freeipa.MAX_HEADER_BYTES + 1))
        except (StorageError, freeipa.HeaderError) as err:
            raise RestoreFailed("ArchiveInvalid", f"the backup's header: {err}") from None
        self.report.update(
            source={
                "header": {
                    "type": header.type.value,
                    "time": format_time(header.time),
                    "host": header.host,
                    "ipaVersion": header.ipa_version,
                    "version": str(header.version),
                    "services": ",".join(header.services),
                }
            }
        )
        self.report.event("ArchiveVerified", f"{verdict.location}: {'; '.join(verdict.facts[-3:])}")
        return verdict, header

    def check_header(self, header: BackupHeader, server: IpaServerConfig, source: _Source) -> BackupDirectory:
        if self.spec.options.type is RestoreType.FULL and header.type is not freeipa.BackupType.FULL:
            raise RestoreFailed("TypeMismatch", "a Full restore needs a FULL backup; this one is DATA")
        try:
            backup_dir = freeipa.backup_directory(str(freeipa.IPA_BACKUP_DIR / source.name), header.type)
        except freeipa.UnsafeBackupPath as err:
            raise RestoreFailed("ArchiveInvalid", f"the stored directory cannot be staged: {err}") from None
        # ipa-restore compares exactly (case included): refusing here is refusing before anything changed.
        if header.host != server.host:
            raise RestoreFailed(
                "HostMismatch",
                f"the backup is of {header.host}, the target is {server.host}: ipa-restore only "
                "restores a server's own backup",
            )
        version = self.exec(VERSION_COMMAND)
        server_version = version.stdout.decode("utf-8", "replace").strip()
        if version.exit_code != 0 or not server_version:
            raise RestoreFailed("VersionUnknown", f"cannot read the IPA version in pod {self.pod.name}")
        if header.ipa_version != server_version:
            message = f"the backup was made by IPA {header.ipa_version}, the server runs {server_version}"
            if not self.spec.allow_version_mismatch:
                raise RestoreFailed(
                    "VersionMismatch",
                    f"{message}: ipa-restore only warns about this; set allowVersionMismatch to restore "
                    "anyway",
                )
            self.report.event(
                "VersionMismatch", f"{message}: restoring anyway (allowVersionMismatch)", warning=True
            )
        return backup_dir

    def check_server(self, server: IpaServerConfig, verdict: Verdict) -> list[str]:
        """The backends to restore, each present on the server; and a running directory server."""
        in_archive = [b for b in ipa_restore.BACKENDS if b in verdict.ldif_entries]
        wanted = list(self.spec.options.backends) or in_archive
        if absent := [b for b in wanted if b not in in_archive]:
            raise RestoreFailed("BackendNotInBackup", f"the archive has no LDIF for {', '.join(absent)}")
        db = PurePosixPath("/var/lib/dirsrv") / f"slapd-{server.serverid}" / "db"
        missing = [b for b in wanted if self.exec(["test", "-d", str(db / b)]).exit_code != 0]
        if missing:
            raise RestoreFailed(
                "MissingBackend",
                f"{server.host} has no {', '.join(missing)} backend ({db}): a data restore needs a "
                "configured server with every backend it restores",
            )
        status = self.exec(list(freeipa.IPACTL_STATUS), timeout=120)
        parsed = freeipa.parse_ipactl_status(
            status.stderr + "\n" + status.stdout.decode("utf-8", "replace"), status.exit_code
        )
        if parsed.verdict in (freeipa.IpaServicesVerdict.STOPPED, freeipa.IpaServicesVerdict.UNKNOWN):
            raise RestoreFailed(
                "DirectoryServerStopped", f"ipa-restore needs the directory server running: {parsed.summary}"
            )
        return wanted

    def check_space(self, verdict: Verdict) -> None:
        """Room for the staged archive in /var/lib/ipa/backup and for its extraction in ipa-restore's
        TMPDIR (tmpDir, else /tmp): one need on each file system, or both on one when they share it."""
        archive = ((verdict.manifest or {}).get("files") or {}).get("archive") or {}
        staged = int((archive.get("plaintext") or {}).get("size") or archive.get("size") or 0)
        extraction = self.spec.options.extraction_dir
        df = self.exec(["df", "-P", "-B1", str(freeipa.IPA_BACKUP_DIR), extraction])
        try:
            rows = [line.split() for line in df.stdout.decode().splitlines()[1:]]
            (backup_fs, backup_free), (tmp_fs, tmp_free) = [(row[-1], int(row[3])) for row in rows[-2:]]
        except (ValueError, IndexError):
            raise RestoreFailed(
                "ExecFailed",
                f"cannot read the free space of {freeipa.IPA_BACKUP_DIR} and {extraction} in pod "
                f"{self.pod.name}: {df.stderr.strip() or 'no df output'}",
            ) from None
        needs = {backup_fs: staged + SPACE_MARGIN}
        needs[tmp_fs] = needs.get(tmp_fs, SPACE_MARGIN) + verdict.unpacked_bytes
        free = {backup_fs: backup_free, tmp_fs: tmp_free}
        short = [fs for fs, need in needs.items() if free[fs] < need]
        if short:
            raise RestoreFailed(
                "InsufficientSpace",
                f"in pod {self.pod.name}, the staged archive ({human_size(staged)}, in "
                f"{freeipa.IPA_BACKUP_DIR}) and its extraction ({human_size(verdict.unpacked_bytes)}, in "
                f"{extraction}) need "
                + "; ".join(
                    f"{human_size(needs[fs])} on {fs}, which has {human_size(free[fs])} free" for fs in short
                )
                + (
                    ""
                    if self.spec.options.tmpdir
                    else "; set tmpDir to extract elsewhere (/data/tmp in freeipa-container)"
                ),
            )

    def basedn(self, server: IpaServerConfig) -> str:
        """The spec's baseDN, or the one the server's default.conf gives."""
        return self.ldap.base_dn or server.basedn

    def read_directory(
        self, server: IpaServerConfig
    ) -> tuple[LdapConnectionSettings, bool, dict[str, bool], list[tuple[str, str]]]:
        ldap = self.ldap
        if ldap.bind_dn.strip().lower() != DIRECTORY_MANAGER:
            raise RestoreFailed(
                "DirectoryManagerRequired",
                f"spec.target.ldap.bindDN is {ldap.bind_dn}: ipa-restore needs the Directory Manager "
                "password, so the restore binds as cn=Directory Manager",
            )
        try:
            settings = references.ldap_settings(
                self.services.core, self.pod, server.host, ldap, self.scratch, scratch_server=self.drill
            )
            basedn = self.basedn(server)
            topology = read_topology(settings, basedn)
            was_hidden = topology.server(server.host).is_hidden
            segments = directory.replication_segments(settings, basedn)
        except (references.ResolveError, TopologyError) as err:
            raise RestoreFailed("TopologyUnavailable", f"cannot read the FreeIPA topology: {err}") from None
        masters = {
            fqdn: "CA" in s.roles for fqdn, s in topology.servers.items() if fqdn != server.host.lower()
        }
        return settings, was_hidden, masters, segments

    # -- the change ----------------------------------------------------------------------------------------

    def make_staging_directory(self, backup_dir: BackupDirectory) -> None:
        """Only a directory made here is removed at the end (and by recovery, which knows it from the step):
        a backup kept in the pod under the same name is the user's, and the restore refuses to touch it."""
        made = self.exec(["mkdir", "-m", "0700", str(backup_dir.path)])
        if made.exit_code != 0:
            raise RestoreFailed(
                "StagingFailed",
                f"cannot create {backup_dir.path} in pod {self.pod.name} (if it exists, it is not this "
                f"restore's: remove it first): {made.stderr.strip()}",
            )
        self.stage_started = time.monotonic()
        self.step("stage", f"staging the archive in pod {self.pod.name} at {backup_dir.path}")

    def stage(
        self,
        source: _Source,
        backup_dir: BackupDirectory,
        verdict: Verdict,
        key: bytes | None,
        passphrase: str | None,
    ) -> None:
        files = (verdict.manifest or {})["files"]
        self._put(
            source.store.open_read(source.directory + freeipa.HEADER_FILE),
            None,
            None,
            backup_dir.header_path,
            files["header"],
        )
        archive = files["archive"]
        plain = archive.get("plaintext") or archive
        self._put(
            source.store.open_read(source.directory + archive["name"]),
            key if archive.get("encryption") else None,
            passphrase,
            backup_dir.archive_path,
            plain,
        )

    def _put(
        self,
        reader: Any,
        key: bytes | None,
        passphrase: str | None,
        path: PurePosixPath,
        expected: dict[str, Any],
    ) -> None:
        """Stream one file into the pod (decrypting it on the way when a key is given) and prove in the pod
        that it is what ipa-backup made: the bytes written are hashed there as they are written (tee into
        sha256sum, on another core, instead of a second read of the file afterwards), and the file's size
        is checked once it is closed."""
        size = int(expected["size"])
        tally = Tally()
        try:
            with reader, contextlib.ExitStack() as closing:
                if key is not None:
                    chunks: Iterator[bytes] = closing.enter_context(
                        encryption.decrypt(reader, key, passphrase=passphrase)
                    )
                else:
                    chunks = chunks_of(reader)
                result = self.services.execs.feed(
                    self.pod,
                    ["sh", "-c", STAGE_SCRIPT, "sh", str(size), str(path)],
                    tallied(chunks, tally),
                    timeout=self.remaining(),
                    should_stop=self._should_stop,
                    keep_stdout=1024,
                )
        except (encryption.GpgError, encryption.KeyMaterialError, StorageError) as err:
            raise RestoreFailed("StagingFailed", f"streaming {path.name} into the pod: {err}") from None
        except (ExecError, ApiError) as err:
            raise RestoreFailed("StagingFailed", f"writing {path} in pod {self.pod.name}: {err}") from None
        if result.exit_code != 0:
            said = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.exit_code}"]
            reason = "InsufficientSpace" if "No space left" in said[0] else "StagingFailed"
            raise RestoreFailed(reason, f"writing {path} in pod {self.pod.name} failed: {said[0]}")
        digest = result.stdout.decode("utf-8", "replace").split(" ", 1)[0]
        if tally.size != size or digest != expected.get("sha256"):
            raise RestoreFailed(
                "StagingFailed",
                f"{path} in pod {self.pod.name} is not what ipa-backup made (sha256 {digest or '?'}, "
                f"{tally.size} bytes sent; the manifest says {expected.get('sha256')}, {size} bytes)",
            )

    def _should_stop(self) -> bool:
        try:
            self.stop_if_told()
        except RestoreFailed:
            return True
        return False

    @staticmethod
    def _stdin(make: Callable[[str], bytes], password: str) -> Iterator[bytes]:
        """A tool's stdin, made from the password (which must fit on one line)."""
        try:
            return iter([make(password)])
        except ValueError as err:
            raise RestoreFailed("InvalidPassword", str(err)) from None

    def run_ipa_restore(
        self, backup_dir: BackupDirectory, settings: LdapConnectionSettings, basedn: str, backends: list[str]
    ) -> RestoreOutcome:
        argv = self.spec.options.argv(backup_dir)
        self.step("ipa-restore", f"running {' '.join(argv)} in pod {self.pod.name}")
        self.report.update(ipaRestore={"command": argv})
        lines: list[str] = []
        # From here the server may be changed: its services are checked, and started again if need be,
        # whatever ends the restore (a failure, a lost connection, a status write, the deadline).
        settled = False
        try:
            try:
                result = self.services.execs.feed(
                    self.pod,
                    argv,
                    self._stdin(ipa_restore.answers, settings.password),
                    timeout=self.remaining(),
                    on_stderr_line=lines.append,
                )
            except (ExecError, ApiError) as err:
                raise RestoreFailed(
                    "RestoreInterrupted", f"ipa-restore in pod {self.pod.name}: {err}; its outcome is unknown"
                ) from None
            outcome = ipa_restore.parse_restore_output(lines, result.exit_code)
            self.report.update(
                ipaRestore={
                    "command": argv,
                    "exitCode": result.exit_code,
                    "warnings": outcome.warnings,
                    "critical": outcome.critical,
                }
            )
            if (problem := outcome.problem) is not None:
                reason = "RestoreFailed" if result.exit_code != 0 else "RestoreIncomplete"
                raise RestoreFailed(reason, problem)
            self.step("check", "ipa-restore ended; checking services and data")
            # Before `ipactl status`: it reads its services from userRoot, which 389-ds enables only a moment
            # after an online import ends, and never after a failed one; an `ipactl start` then (the restart
            # below) finds no services and stops the directory server.
            offline = directory.offline_backends(settings, basedn, backends, BACKEND_ONLINE_PATIENCE)
            settled = check_services(self.services.execs, self.pod, self.report, started_by="ipa-restore")
            if offline:
                raise RestoreFailed("BackendOffline", backend_offline_message(offline))
            if not settled:
                raise RestoreFailed("ServicesDown", "IPA services are not running after ipa-restore")
            return outcome
        finally:
            if not settled:
                restart_services(self.services.execs, self.pod, self.report)

    # -- the proof -----------------------------------------------------------------------------------------

    def check(
        self,
        settings: LdapConnectionSettings,
        server: IpaServerConfig,
        verdict: Verdict,
        backends: list[str],
        outcome: RestoreOutcome,
    ) -> None:
        basedn = self.basedn(server)
        counts = []
        try:
            for backend in backends:
                found = directory.count_entries(settings, directory.backend_suffix(backend, basedn))
                counts.append({"backend": backend, "expected": verdict.ldif_entries[backend], "found": found})
            well_known = [basedn, masters_dn(basedn), f"cn={server.host},{masters_dn(basedn)}"]
            if "ipaca" in backends:
                well_known.append("o=ipaca")
            missing = directory.missing_entries(settings, well_known)
        except TopologyError as err:
            raise RestoreFailed("CheckFailed", f"cannot read the restored directory: {err}") from None
        self.report.update(
            check={"entries": counts, "wellKnown": [dn for dn in well_known if dn not in missing]}
        )
        wrong = [c for c in counts if c["expected"] != c["found"]]
        if wrong:
            raise RestoreFailed(
                "EntryCountMismatch",
                "the directory does not hold what the archive does: "
                + "; ".join(
                    f"{c['backend']}: {c['expected']} entries in the archive's LDIF, {c['found']} found"
                    for c in wrong
                ),
            )
        if missing:
            raise RestoreFailed(
                "EntriesMissing", f"well-known entries missing after the restore: {', '.join(missing)}"
            )

    def rehide(self, settings: LdapConnectionSettings, server: IpaServerConfig, was_hidden: bool) -> None:
        self.step("re-hide", f"{server.host} was hidden before the restore" if was_hidden else "")
        if not was_hidden:
            self.report.condition(
                "ReplicaHidden",
                False,
                "NotHiddenBefore",
                f"{server.host} was not a hidden replica: left as it is",
            )
            return
        basedn = self.basedn(server)
        try:
            changed = directory.hide_server(settings, basedn, server.host)
        except TopologyError as err:
            raise RestoreFailed(
                "RehideFailed",
                f"{server.host} was restored but could not be hidden again ({err}): clients may now use "
                f"it; run `ipa server-state {server.host} --state=hidden`",
            ) from None
        message = (
            f"ipa-restore enabled {server.host}; hidden again ({', '.join(changed)})"
            if changed
            else f"{server.host} is still hidden"
        )
        self.report.condition("ReplicaHidden", True, "Rehidden", message)
        self.report.event("ReplicaHidden", message)

    def plan_replication(
        self,
        server: IpaServerConfig,
        masters: dict[str, bool],
        segments: list[tuple[str, str]],
        outcome: RestoreOutcome,
        password: str,
    ) -> None:
        self.step("replication")
        plan = ipa_restore.replication_plan(server.host.lower(), masters, segments, outcome)
        entries = [m.as_status() for m in plan]
        if self.spec.reinitialize_pods is None or not plan:
            self.report.update(replication=entries)
            if plan:
                self.report.event(
                    "ReinitializeReplicas",
                    f"every other master must be re-initialized from {server.host}, in this order: "
                    + ", ".join(m.host for m in plan)
                    + " (status.replication has the commands)",
                    warning=True,
                )
            return
        failed = self.reinitialize(plan, entries, password)
        self.report.update(replication=entries)
        if failed:
            raise RestoreFailed(
                "ReinitializeFailed",
                f"{server.host} was restored, but re-initializing {', '.join(failed)} failed: until each is "
                "re-initialized its agreements stay disabled (status.replication has each command's result)",
            )
        self.report.event("ReplicasReinitialized", f"re-initialized {', '.join(m.host for m in plan)}")

    def _master_pod(self, host: str) -> tuple[PodRef | None, str]:
        """The ready pod of replication.podSelector that serves `host`, waited for a while: a master's pod
        may be between two readiness probes, or restarting. The pod, or why there is none."""
        assert self.spec.reinitialize_pods is not None
        until = min(time.monotonic() + MASTER_POD_PATIENCE, self.deadline)
        while True:
            try:
                pods = references.pods_by_host(
                    self.services.core, self.resource.namespace, self.spec.reinitialize_pods
                )
                why = f"no ready pod of replication.podSelector serves {host}"
            except ApiError as err:
                pods, why = {}, f"cannot list replication.podSelector's pods: {err.reason}"
            if host in pods or time.monotonic() >= until:
                return pods.get(host), why
            time.sleep(2)

    def reinitialize(
        self, plan: list[ipa_restore.MasterToReinitialize], entries: list[dict[str, object]], password: str
    ) -> list[str]:
        """Run each master's commands in its pod, nearest master first; the masters that failed. A master
        whose command failed is left there: the next ones may depend on it, but are still tried."""
        assert self.spec.reinitialize_pods is not None
        failed = []
        for master, entry in zip(plan, entries, strict=True):
            results: list[dict[str, object]] = []
            entry["results"] = results
            pod, why = self._master_pod(master.host)
            for argv in master.argvs:
                command = " ".join(argv)
                if pod is None:
                    results.append({"command": command, "message": why})
                    break
                self.report.event("RestoreStep", f"replication: {command} in pod {pod.name}")
                try:
                    result = self.services.execs.feed(
                        pod,
                        list(argv),
                        self._stdin(ipa_restore.password_line, password),
                        timeout=min(REINITIALIZE_TIMEOUT, self.remaining()),
                    )
                except (ExecError, ApiError) as err:
                    results.append({"command": command, "pod": pod.name, "message": str(err)})
                    break
                said = result.stderr.strip().splitlines()[-1:] or ["done"]
                results.append(
                    {"command": command, "pod": pod.name, "exitCode": result.exit_code, "message": said[0]}
                )
                if result.exit_code != 0:
                    break
            if not results or results[-1].get("exitCode") != 0:
                failed.append(master.host)
        return failed


def backend_offline_message(offline: list[str]) -> str:
    message = (
        f"389-ds still refuses operations on the {', '.join(offline)} backend {BACKEND_ONLINE_PATIENCE} s "
        "after ipa-restore: it leaves a backend disabled after a failed import (see /var/log/iparestore.log "
        "and the directory server's errors log)"
    )
    if "userRoot" in offline:
        message += (
            "; ipactl reads IPA's services from userRoot, so they cannot be listed or started until an "
            "import of userRoot succeeds"
        )
    return message


# -- after an operator restart -----------------------------------------------------------------------------


def recover_interrupted(
    resource: ResourceIdentity, status: dict[str, Any], services: Services, report: Reporter
) -> None:
    """A restore the previous operator process left Running cannot be resumed: it ends Failed, after the
    same clean-up as any failure (staged files removed, services started if they are down)."""
    step = status.get("step") or "?"
    if (status.get("drill") or {}).get("pod"):
        # A drill's server is a throwaway: nothing to put back, only to delete.
        left = ScratchServer(services.core, services.networking, resource, {}, None).delete()
        raise RestoreFailed(
            INTERRUPTED,
            f"the operator restarted during the drill's step {step!r}; the scratch server was deleted"
            + (f" (not deleted: {'; '.join(left)})" if left else ""),
        )
    target = status.get("target") or {}
    left = []
    if target.get("pod"):
        pod = PodRef(resource.namespace, target["pod"], target.get("container") or "")
        if references.pod_exists(services.core, pod):
            with _holding_lock(services, pod, resource):
                name = ((status.get("source") or {}).get("uri") or "").rstrip("/").rsplit("/", 1)[-1]
                if status.get("step") in STAGED_STEPS and name.startswith(("ipa-full-", "ipa-data-")):
                    remove_from_pod(services.execs, pod, freeipa.IPA_BACKUP_DIR / name, report)
                running = check_services(services.execs, pod, report, started_by="ipa-restore")
                if not running and not restart_services(services.execs, pod, report):
                    left.append("IPA services are down")
        else:
            left.append(f"pod {pod.name} is gone")
    message = f"the operator restarted during step {step!r}; the restore cannot be resumed"
    if status.get("step") in STAGED_STEPS[1:]:
        message += (
            ": ipa-restore may have changed the directory and disabled replication on the other masters"
        )
    raise RestoreFailed(INTERRUPTED, message + (f" ({'; '.join(left)})" if left else ""))
