"""Taking one backup of a FreeIPA server, from pre-flight checks to a verified, stored archive.

The order matters and is the point of this module:
1. pre-flight, before anything is stopped: keys, storage, the pod, FreeIPA's own configuration, the
   topology (hidden replica) and server roles, read from LDAP;
2. one backup per server at a time (a Lease), so ipa-backup never runs twice on a server;
3. ipa-backup in the pod, its progress followed line by line; after a failure of an offline run, the
   services are started again, because ipa-backup leaves them stopped;
4. the archive streamed out of the pod through gpg into storage, checksummed on both ends;
5. the manifest written last, so a directory without one is recognisably incomplete.
Everything reaches the user through a Reporter: the resource's status and Kubernetes Events.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import urllib3

from idm_backup_operator import freeipa
from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.phase import Phase
from idm_backup_operator.api.spec import BackupSpec, PvcStorage, S3Storage
from idm_backup_operator.api.times import format_time, parse_time
from idm_backup_operator.archive import encryption, layout, stored
from idm_backup_operator.freeipa import BackupDirectory, BackupHeader, IpaServerConfig
from idm_backup_operator.freeipa.topology import TopologyError, check_roles, read_topology
from idm_backup_operator.idmbackup import status as idmbackup_status
from idm_backup_operator.kube import references
from idm_backup_operator.kube.errors import ApiError
from idm_backup_operator.kube.locking import TargetLock
from idm_backup_operator.kube.podexec import (
    ExecCancelled,
    ExecError,
    ExecLost,
    ExecResult,
    ExecTimeout,
    PodExec,
    PodRef,
)
from idm_backup_operator.kube.services import Reporter, Services
from idm_backup_operator.storage import DeadlineExceeded, StorageError, StorageFull, Store, StoredObject
from idm_backup_operator.streams import Tally, chunks_of, human_size, tallied

log = logging.getLogger(__name__)

SERVICE_START_TIMEOUT = 900
# After an operator restart, how long an ipa-backup that is still running may take to end on its own.
ORPHAN_WAIT_SECONDS = 120
# How long the commands that put a server back (stop ipa-backup, ipactl start, ipactl status) keep
# trying through a lost exec connection: an API server restart takes seconds, a node's a few minutes.
OUTAGE_PATIENCE_SECONDS = 300
# How often status.progress is written while the archive streams: one status patch per backup per interval.
PROGRESS_SECONDS = 10.0


CANCELLED = "Cancelled"
CANCELLED_MESSAGE = "the IdmBackup was deleted while the backup ran: stopped, and nothing was stored"
LOCK_LOST = "LockLost"
SHUTDOWN = "OperatorShutdown"


class BackupFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class MustWait(Exception):
    """The backup cannot start yet, and nothing was changed: the server's lock is held, its pod is not
    ready, or an ipa-backup this backup did not start still runs there. Tried again later."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _busy(holder: str) -> MustWait:
    return MustWait("TargetBusy", f"waiting for {holder} to finish: one backup per server at a time")


def lock_holder(resource: ResourceIdentity) -> str:
    return f"IdmBackup {resource.namespace}/{resource.name} ({resource.uid})"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def take_backup(resource: ResourceIdentity, spec: BackupSpec, services: Services, report: Reporter) -> None:
    """Raises BackupFailed with the cause, or MustWait when it cannot start yet."""
    try:
        pod = references.find_target_pod(services.core, resource.namespace, spec.target)
    except references.PodNotReady as err:
        raise MustWait("TargetNotReady", str(err)) from None
    except references.ResolveError as err:
        raise BackupFailed("TargetUnavailable", str(err)) from None
    with _holding_lock(services, pod, resource) as lock:
        # An ipa-backup still running there is an interrupted backup's (operator killed, connection
        # lost): its recovery stops it and starts the services; a second one now would stop them under it.
        if _ipa_backup_running(services.execs, pod):
            raise MustWait(
                "TargetBusy",
                f"an ipa-backup this backup did not start is still running in pod {pod.name}: waiting for "
                "it to end, or for the backup it belongs to to be recovered",
            )
        with tempfile.TemporaryDirectory(prefix="idm-backup-") as scratch:
            _Backup(resource, spec, services, report, pod, Path(scratch), lock).run()


@contextlib.contextmanager
def _holding_lock(services: Services, pod: PodRef, resource: ResourceIdentity) -> Iterator[TargetLock]:
    lock = TargetLock(services.coordination, pod, lock_holder(resource))
    busy = lock.try_acquire()
    if busy is not None:
        raise _busy(busy.holder)
    lock.keep_renewed()
    try:
        yield lock
    finally:
        lock.release()


def _ipa_backup_running(execs: PodExec, pod: PodRef) -> bool:
    try:
        return execs.run(pod, ["pgrep", "-x", "ipa-backup"], timeout=30).exit_code == 0
    except (ExecError, ApiError) as err:
        raise BackupFailed("ExecFailed", f"cannot exec in pod {pod.name}: {err}") from None


class _Backup:
    def __init__(
        self,
        resource: ResourceIdentity,
        spec: BackupSpec,
        services: Services,
        report: Reporter,
        pod: PodRef,
        scratch: Path,
        lock: TargetLock,
    ) -> None:
        self.resource, self.spec, self.services, self.report = resource, spec, services, report
        self.pod, self.scratch, self.lock = pod, scratch, lock
        self.started = _now()
        self.deadline = time.monotonic() + spec.deadline_seconds

    def stop_reason(self) -> BackupFailed | None:
        """Why the backup must stop now, if it must: deleted, its server's lock lost, or the operator
        shutting down. Asked between steps and, through should_stop, every second while a command runs."""
        if self.report.cancelled():
            return BackupFailed(CANCELLED, CANCELLED_MESSAGE)
        if self.lock.lost.is_set():
            return BackupFailed(
                LOCK_LOST,
                f"this backup lost pod {self.pod.name}'s lock (its renewals failed for too long, or "
                "another process took it over): it stopped acting on the server",
            )
        if self.services.stopping.is_set():
            return BackupFailed(
                SHUTDOWN, "the operator was shut down while this backup ran: stopped, and nothing was stored"
            )
        return None

    def should_stop(self) -> bool:
        return self.stop_reason() is not None

    def stop_if_told(self) -> None:
        if (reason := self.stop_reason()) is not None:
            raise reason

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.deadline_exceeded("")
        return left

    def deadline_exceeded(self, during: str) -> BackupFailed:
        return BackupFailed(
            "DeadlineExceeded",
            f"the backup did not finish within activeDeadlineSeconds={self.spec.deadline_seconds}"
            + (f" ({during})" if during else ""),
        )

    def run(self) -> None:
        self.report.update(
            phase=Phase.RUNNING.value,
            startTime=format_time(self.started),
            step="pre-flight checks",
            message="",  # the reason it waited for the server's lock, if it did, is over
            target={"pod": self.pod.name, "container": self.pod.container},
        )
        self.report.condition(
            "Waiting", False, "LockAcquired", f"this backup holds pod {self.pod.name}'s lock"
        )
        self.report.event("BackupStarted", f"backing up pod {self.pod.name}")
        recipients = self.load_keys()
        store = self.open_store()
        server = self.preflight_server()
        self.stop_if_told()
        directory = self.run_ipa_backup()
        try:
            self.stop_if_told()
            archive_uri = self.store_backup(store, server, directory, recipients)
        except BaseException:
            # Nothing was stored: the plaintext copy goes as it would on success, unless the lock was
            # lost, since the server is then another process's to act on.
            if not self.lock.lost.is_set():
                self.cleanup_pod(directory)
            raise
        cleanup_note = self.cleanup_pod(directory)
        idmbackup_status.set_succeeded(self.report, self.started, archive_uri, note=cleanup_note)

    # -- pre-flight: nothing on the server is touched until all of this passed --------------------------

    def load_keys(self) -> encryption.Recipients | None:
        if not self.spec.encryption.enabled:
            return None
        try:
            recipients = references.load_public_keys(
                self.services.core, self.resource.namespace, self.spec.encryption
            )
        except (references.ResolveError, encryption.KeyMaterialError) as err:
            raise BackupFailed("InvalidEncryptionKeys", f"encryption keys unusable: {err}") from None
        return recipients

    def open_store(self) -> Store:
        try:
            store = self.services.open_store(self.resource.namespace, self.spec.storage, self.scratch)
            # Every storage call from here on, the probe included, ends by the backup's deadline however
            # the server behaves (stalls, trickles, never answers).
            store.set_deadline(self.deadline)
            store.check_writable()
        except DeadlineExceeded as err:
            raise self.deadline_exceeded(f"the storage probe: {err}") from None
        except StorageFull as err:
            raise _storage_full("storage not usable", err, self.spec.storage) from None
        except (references.ResolveError, StorageError) as err:
            raise BackupFailed("StorageUnavailable", f"storage not usable: {err}") from None
        return store

    def preflight_server(self) -> IpaServerConfig:
        conf = self.exec(list(freeipa.READ_DEFAULT_CONF), timeout=60)
        try:
            server = freeipa.server_config(conf.exit_code, conf.stdout, self.pod.name)
        except freeipa.DefaultConfError as err:
            raise BackupFailed("NotConfigured", str(err)) from None
        self.report.update(target={"host": server.host, "realm": server.realm})
        target = self.spec.target
        if target.require_hidden_replica or not self.spec.options.disable_role_check:
            self.check_topology(server)
        if self.spec.options.type is freeipa.BackupType.FULL:
            self.warn_about_symlinked_config()
        return server

    def warn_about_symlinked_config(self) -> None:
        """freeipa-container keeps /etc/ipa and friends as symlinks into /data: files.tar gets links only."""
        if self.exec(["test", "-L", "/etc/ipa"], timeout=30).exit_code == 0:
            self.report.event(
                "ConfigFilesAreSymlinks",
                f"/etc/ipa in pod {self.pod.name} is a symlink (freeipa-container): this full backup's "
                "files.tar will hold symlinks, not configuration files; back up the /data volume as well",
                warning=True,
            )

    def check_topology(self, server: IpaServerConfig) -> None:
        target = self.spec.target
        self.report.update(step="pre-flight: reading the topology from LDAP")
        try:
            settings = references.ldap_settings(
                self.services.core, self.pod, server.host, target.ldap, self.scratch
            )
            topology = read_topology(settings, target.ldap.base_dn or server.basedn)
            replica = topology.server(server.host)
        except (references.ResolveError, TopologyError) as err:
            raise BackupFailed("TopologyUnavailable", f"cannot check the FreeIPA topology: {err}") from None
        if target.require_hidden_replica and not replica.is_hidden:
            raise BackupFailed(
                "NotHiddenReplica",
                f"{server.host} is not a hidden replica (its services are {replica.state.name.lower()}): an "
                "offline backup would stop a server clients use. Back up a hidden replica, or set "
                "spec.target.requireHiddenReplica to false to back up this server anyway.",
            )
        if not self.spec.options.disable_role_check:
            roles = check_roles(topology, server.host)
            if not roles.ok:
                raise BackupFailed("RoleCheckFailed", f"{roles.message} {roles.explanation}")

    # -- ipa-backup in the pod ----------------------------------------------------------------------------

    def exec(self, argv: list[str], timeout: float) -> Any:
        try:
            return self.services.execs.run(self.pod, argv, timeout=min(timeout, self.remaining()))
        except ExecError as err:
            raise BackupFailed("ExecFailed", f"{' '.join(argv)} in pod {self.pod.name}: {err}") from None
        except ApiError as err:
            raise BackupFailed("ExecFailed", f"cannot exec in pod {self.pod.name}: {err.reason}") from None

    def run_ipa_backup(self) -> BackupDirectory:
        """ipa-backup in the pod. Offline, it stops IPA: from the moment it may have, the services are
        started again unless they were seen running, whatever ends this method (ipa-backup failing, a lost
        connection, a status write, cancellation, shutdown)."""
        if not self.spec.options.stops_services:
            return self._ipa_backup()
        self.services_settled = False
        try:
            return self._ipa_backup()
        finally:
            if not self.services_settled:
                self.put_services_back()

    def _ipa_backup(self) -> BackupDirectory:
        options = self.spec.options
        argv = freeipa.ipa_backup_argv(options)
        self.report.update(step="ipa-backup: starting", ipaBackup={"command": argv})
        parser = freeipa.BackupOutputParser()
        exit_code, interruption = self._exec_ipa_backup(argv, parser)
        result = parser.finish(exit_code)
        self.report.update(
            ipaBackup={
                "exitCode": exit_code,
                "directory": result.backup_dir,
                "warnings": list(result.warnings),
            }
        )
        if interruption is not None:
            raise interruption
        if not result.succeeded:
            self.services_settled = not result.services_may_be_stopped
            raise BackupFailed("IpaBackupFailed", f"ipa-backup failed: {result.message}")
        if options.stops_services:
            self.services_settled = check_services(
                self.services.execs, self.pod, self.report, started_by="ipa-backup"
            )
        try:
            return result.directory(options.type)
        except freeipa.UnsafeBackupPath as err:
            raise BackupFailed(
                "UnexpectedOutput", f"ipa-backup reported an unexpected directory: {err}"
            ) from None

    def _exec_ipa_backup(
        self, argv: list[str], parser: freeipa.BackupOutputParser
    ) -> tuple[int | None, BackupFailed | None]:
        """Its exit code, or why it was interrupted (it is then stopped, if it still runs)."""

        def on_line(line: str) -> None:
            for step in parser.feed(line + "\n"):
                self.report.update(step=f"ipa-backup: {step}")

        try:
            session = self.services.execs.open(
                self.pod, argv, timeout=self.remaining(), on_stderr_line=on_line, should_stop=self.should_stop
            )
        except ExecLost as err:
            # Whether the command started is unknown: treat it as running.
            interruption = BackupFailed("ExecStreamLost", f"ipa-backup could not be run reliably: {err}")
        except (ExecError, ApiError) as err:
            self.services_settled = True  # refused: nothing ran
            raise BackupFailed("ExecFailed", f"cannot run ipa-backup in pod {self.pod.name}: {err}") from None
        else:
            try:
                return session.finish().exit_code, None
            except ExecError as err:
                interruption = self._interruption(err)
            finally:
                session.close()
        stop_orphaned_ipa_backup(self.services.execs, self.pod, wait=0)
        if not self.spec.keep_in_pod:
            remove_orphaned_workdirs(
                self.services.execs, self.pod, self.started, self.spec.options.tmpdir, self.report
            )
        return None, interruption

    def _interruption(self, err: ExecError) -> BackupFailed:
        stopped = "; ipa-backup was stopped"
        if isinstance(err, ExecCancelled):
            reason = self.stop_reason() or BackupFailed(CANCELLED, CANCELLED_MESSAGE)
            return BackupFailed(reason.reason, reason.message + stopped)
        if isinstance(err, ExecTimeout):
            return BackupFailed(
                "DeadlineExceeded",
                f"ipa-backup did not finish within activeDeadlineSeconds={self.spec.deadline_seconds}"
                + stopped,
            )
        if isinstance(err, ExecLost):
            return BackupFailed(
                "ExecStreamLost",
                f"the connection to ipa-backup in pod {self.pod.name} was lost ({err}), e.g. by an API "
                f"server or node restart{stopped}",
            )
        return BackupFailed("IpaBackupFailed", f"ipa-backup could not be followed: {err}{stopped}")

    def put_services_back(self) -> None:
        """ipactl start, as the holder of the server's lock: if another process holds it now, starting
        the services under its work could spoil it, and that process puts them back itself."""
        if self.lock.lost.is_set() and (holder := self._holder_instead()) is not None:
            self.report.event(
                "ServicesNotRestarted",
                f"IPA services in pod {self.pod.name} may be stopped, and {holder} holds the server's "
                "lock: it starts them when it is done",
                warning=True,
            )
            return
        restart_services(self.services.execs, self.pod, self.report)

    def _holder_instead(self) -> str | None:
        """Take the lost lock back; who holds it instead, if that fails."""
        try:
            busy = self.lock.try_acquire()
        except (ApiError, urllib3.exceptions.HTTPError, OSError) as err:
            return f"whoever may hold it (it cannot be read: {err})"
        return None if busy is None else busy.holder

    # -- transfer and verification ------------------------------------------------------------------------

    def read_header(self, directory: BackupDirectory) -> tuple[bytes, BackupHeader]:
        raw = self.exec(["cat", "--", str(directory.header_path)], timeout=60)
        if raw.exit_code != 0:
            raise BackupFailed("InvalidHeader", f"cannot read {directory.header_path}: {raw.stderr.strip()}")
        try:
            header = freeipa.parse_header(raw.stdout)
        except freeipa.HeaderError as err:
            raise BackupFailed("InvalidHeader", f"{directory.header_path}: {err}") from None
        self.report.update(
            header={
                "type": header.type.name,
                "time": format_time(header.time),
                "host": header.host,
                "ipaVersion": header.ipa_version,
                "version": header.version,
                "services": list(header.services),
            }
        )
        return raw.stdout, header

    def checksum_in_pod(self, directory: BackupDirectory) -> layout.FileRecord:
        path = str(directory.archive_path)
        self.report.update(step="computing the archive's checksum in the pod")
        size = self.exec(["stat", "-c", "%s", "--", path], timeout=60)
        digest = self.exec(["sha256sum", "--", path], timeout=self.remaining())
        if size.exit_code != 0 or digest.exit_code != 0:
            raise BackupFailed(
                "ArchiveMissing", f"cannot read {path} in the pod: {(size.stderr or digest.stderr).strip()}"
            )
        return layout.FileRecord(
            name=directory.type.archive_name,
            size=int(size.stdout.split()[0]),
            sha256=digest.stdout.split()[0].decode(),
        )

    def archive_chunks(self, directory: BackupDirectory, tally: Tally) -> Iterator[bytes]:
        argv = ["cat", "--", str(directory.archive_path)]
        chunks = self.services.execs.stream_stdout(
            self.pod, argv, timeout=self.remaining(), should_stop=self.should_stop
        )
        return tallied(chunks, tally)

    def store_backup(
        self,
        store: Store,
        server: IpaServerConfig,
        directory: BackupDirectory,
        recipients: encryption.Recipients | None,
    ) -> str:
        header_bytes, header = self.read_header(directory)
        in_pod = self.checksum_in_pod(directory)
        keys = layout.backup_keys(
            self.resource.namespace, server.host, directory, encrypted=recipients is not None
        )
        self.report.update(step=f"uploading {human_size(in_pod.size)} to {store.uri(keys.archive)}")
        written: list[str] = []
        try:
            header_obj = _put(store, keys.header, header_bytes, self.spec.storage)
            written.append(keys.header)
            plain = Tally()
            with reporting_progress(self.report, plain, in_pod.size):
                stored = self.upload_archive(
                    store, keys.archive, self.archive_chunks(directory, plain), recipients, plain, in_pod
                )
            written.append(keys.archive)
            self.verify(store, keys, stored)
            manifest = layout.build_manifest(
                resource=self.resource,
                host=server.host,
                pod=self.pod.name,
                header=header,
                header_file=layout.FileRecord("header", header_obj.size, Tally.of(header_bytes).sha256),
                archive=layout.FileRecord(keys.archive.rsplit("/", 1)[1], stored.size, stored.sha256 or ""),
                plaintext=in_pod,
                recipients=recipients.fingerprints if recipients else (),
                options=self.spec.raw,
                created=_now(),
            )
            _put(store, keys.manifest, manifest, self.spec.storage)
        except BaseException:
            for key in written:
                try:
                    store.delete(key)
                except StorageError as err:
                    log.warning("could not remove partial %s: %s", key, err)
            raise
        self.report.update(
            archive={
                "name": f"{server.host}/{directory.path.name}",
                "uri": store.uri(keys.archive),
                "headerURI": store.uri(keys.header),
                "manifestURI": store.uri(keys.manifest),
                "size": human_size(stored.size),
                "sizeBytes": stored.size,
                "sha256": stored.sha256,
                "plaintextSizeBytes": in_pod.size,
                "plaintextSHA256": in_pod.sha256,
                "encrypted": recipients is not None,
                "recipients": list(recipients.fingerprints) if recipients else [],
            }
        )
        return store.uri(keys.archive)

    def upload_archive(
        self,
        store: Store,
        key: str,
        chunks: Iterator[bytes],
        recipients: encryption.Recipients | None,
        plain: Tally,
        in_pod: layout.FileRecord,
    ) -> StoredObject:
        try:
            with store.open_upload(key) as upload:
                if recipients is None:
                    for chunk in chunks:
                        upload.write(chunk)
                else:
                    with encryption.encrypt(chunks, recipients) as ciphertext:
                        for chunk in ciphertext:
                            upload.write(chunk)
                # Before the commit: a stream cut short can still end with a success status (the API
                # server reports the killed `cat` of a deleted pod as Success), and what is committed
                # has its final name.
                _check_plaintext(plain, in_pod)
                return upload.commit()
        except ExecCancelled:
            raise self.stop_reason() or BackupFailed(CANCELLED, CANCELLED_MESSAGE) from None
        except ExecTimeout:
            raise self.deadline_exceeded("reading the archive from the pod") from None
        except ExecError as err:
            raise BackupFailed("TransferFailed", f"reading the archive from the pod failed: {err}") from None
        except encryption.GpgError as err:
            raise BackupFailed("EncryptionFailed", str(err)) from None
        except DeadlineExceeded as err:
            raise self.deadline_exceeded(f"the upload: {err}") from None
        except StorageError as err:
            raise _upload_failed(err, self.spec.storage) from None

    def verify(self, store: Store, keys: layout.BackupKeys, stored: StoredObject) -> None:
        """Succeeded is only ever reported for an archive whose bytes were checked on both ends: the
        plaintext before the upload was committed (_check_plaintext), the stored size here."""
        self.report.update(step="verifying the stored archive")
        try:
            found = store.stat(keys.archive)
        except DeadlineExceeded as err:
            raise self.deadline_exceeded(f"checking the stored archive: {err}") from None
        except StorageError as err:
            raise BackupFailed(
                "VerificationFailed", f"cannot check {store.uri(keys.archive)}: {err}"
            ) from None
        if found is None or found.size != stored.size:
            raise BackupFailed(
                "VerificationFailed",
                f"{store.uri(keys.archive)} has {found.size if found else 'no'} bytes in storage, "
                f"expected {stored.size}",
            )

    def cleanup_pod(self, directory: BackupDirectory) -> str:
        if self.spec.keep_in_pod:
            return f"; kept {directory.path} in the pod"
        return remove_from_pod(self.services.execs, self.pod, directory.path, self.report)


def _check_plaintext(plain: Tally, in_pod: layout.FileRecord) -> None:
    if (plain.size, plain.sha256) != (in_pod.size, in_pod.sha256):
        raise BackupFailed(
            "ChecksumMismatch",
            f"the archive read from the pod ({plain.size} bytes, sha256 {plain.sha256}) differs from "
            f"the file in the pod ({in_pod.size} bytes, sha256 {in_pod.sha256})",
        )


@contextlib.contextmanager
def reporting_progress(
    report: Reporter, tally: Tally, total: int, interval: float = PROGRESS_SECONDS
) -> Iterator[None]:
    """status.progress while the archive streams: how much of it was read from the pod, every `interval`
    seconds. Written from a thread of its own, so that a slow status write never holds the stream."""
    done = threading.Event()

    def write() -> None:
        report.update(progress={"bytesRead": tally.size, "totalBytes": total})

    def loop() -> None:
        while not done.wait(interval):
            write()

    write()
    writer = threading.Thread(target=loop, name="backup-progress", daemon=True)
    writer.start()
    try:
        yield
    finally:
        done.set()
        writer.join()
        write()


def _put(store: Store, key: str, data: bytes, storage: S3Storage | PvcStorage) -> StoredObject:
    try:
        return store.put_bytes(key, data)
    except DeadlineExceeded as err:
        raise BackupFailed("DeadlineExceeded", f"the backup did not finish in time: {err}") from None
    except StorageError as err:
        raise _upload_failed(err, storage) from None


def _upload_failed(err: StorageError, storage: S3Storage | PvcStorage) -> BackupFailed:
    if isinstance(err, StorageFull):
        return _storage_full("upload failed", err, storage)
    return BackupFailed("UploadFailed", f"upload failed: {err}")


def _storage_full(doing: str, err: StorageFull, storage: S3Storage | PvcStorage) -> BackupFailed:
    """StorageFull, whether the probe or the upload found no room: someone must grow or clean the volume,
    nothing about the backup is wrong, and an alert or a person can tell that from other failures."""
    # The store's message names a path under the operator's own mount root; the claim is the name the
    # backup's owner knows.
    where = f"PVC {storage.claim_name}: " if isinstance(storage, PvcStorage) else ""
    return BackupFailed("StorageFull", f"{doing}: {where}{err}")


def remove_from_pod(execs: PodExec, pod: PodRef, path: PurePosixPath, report: Reporter) -> str:
    """Remove a stored backup's plaintext copy from the pod; a note for the status message if that failed."""
    try:
        result = execs.run(pod, ["rm", "-rf", "--", str(path)], timeout=300)
        problem = result.stderr.strip() if result.exit_code != 0 else ""
    except (ExecError, ApiError) as err:
        problem = str(err)
    if not problem:
        return ""
    report.event("PodCleanupFailed", f"could not remove {path}: {problem}", warning=True)
    return f"; could not remove {path} from the pod"


# -- services and orphans, shared with recovery after an operator restart ------------------------------


def _through_outages(call: Callable[[], ExecResult], patience: float = OUTAGE_PATIENCE_SECONDS) -> ExecResult:
    """A command that puts the server back is run again when its connection is lost, for `patience`
    seconds: an API server restart must not leave IPA stopped because `ipactl start` could not be sent."""
    deadline = time.monotonic() + patience
    delay = 1.0
    while True:
        try:
            return call()
        except ExecLost as err:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s; trying again in %.0f s", err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def check_services(
    execs: PodExec, pod: PodRef, report: Reporter, *, started_by: str, cause: str = ""
) -> bool:
    """`ipactl status` into the ServicesRunning condition; `cause`, what the start before it said went
    wrong, is added to the message when the services are down."""
    try:
        result = _through_outages(lambda: execs.run(pod, list(freeipa.IPACTL_STATUS), timeout=120))
    except (ExecError, ApiError) as err:
        report.condition("ServicesRunning", False, "StatusUnknown", f"ipactl status could not run: {err}")
        return False
    status = freeipa.parse_ipactl_status(
        result.stderr + "\n" + result.stdout.decode("utf-8", "replace"), result.exit_code
    )
    running = status.verdict is freeipa.IpaServicesVerdict.RUNNING
    report.condition(
        "ServicesRunning",
        running,
        f"StartedBy{started_by.title().replace('-', '').replace(' ', '')}" if running else "ServicesDown",
        f"{status.summary}; {cause}" if cause and not running else status.summary,
    )
    return running


def restart_services(execs: PodExec, pod: PodRef, report: Reporter) -> bool:
    """ipa-backup leaves IPA stopped when it fails: start it again and say whether it came back."""
    report.update(step="starting IPA services again (ipactl start)")
    cause = ""
    try:
        started = _through_outages(
            lambda: execs.run(pod, list(freeipa.IPACTL_START), timeout=SERVICE_START_TIMEOUT)
        )
    except (ExecError, ApiError) as err:
        log.warning("ipactl start in %s: %s", pod, err)
    else:
        cause = freeipa.upgrade_failure(started.stderr) or ""
    running = check_services(execs, pod, report, started_by="operator", cause=cause)
    if running:
        report.event("ServicesRestarted", f"IPA services in pod {pod.name} are running again")
    else:
        report.event(
            "ServicesDown",
            f"IPA services in pod {pod.name} did not come back: check the server",
            warning=True,
        )
    return running


def stop_orphaned_ipa_backup(execs: PodExec, pod: PodRef, wait: float) -> None:
    """Let an ipa-backup whose session was lost end on its own for `wait` seconds, then stop it."""

    def run(argv: list[str]) -> ExecResult:
        return _through_outages(lambda: execs.run(pod, argv, timeout=30))

    def gone_within(seconds: float, interval: float) -> bool:
        until = time.monotonic() + seconds
        while run(["pgrep", "-x", "ipa-backup"]).exit_code == 0:
            if time.monotonic() >= until:
                return False
            time.sleep(interval)
        return True

    try:
        if gone_within(wait, interval=2):
            return
        run(["pkill", "-TERM", "-x", "ipa-backup"])
        # Most often TERM is enough at once: KILL only what is still there after 2 s.
        if not gone_within(2, interval=0.25):
            run(["pkill", "-KILL", "-x", "ipa-backup"])
    except (ExecError, ApiError) as err:
        log.warning("stopping ipa-backup in %s: %s", pod, err)


# ipa-backup (and ipa-restore) work in tempfile.mkdtemp("ipa") under TMPDIR and remove it when they end
# (ipa_backup.py); one that was killed leaves it behind, with plaintext LDIF and files in it, under a name
# nobody was told. While neither runs, such a directory is an orphan; only those changed since the
# interrupted run began (less a margin for the pod's clock) are removed. Exit 3: one of them runs.
_ORPHANED_WORKDIRS = (
    "if pgrep -x ipa-backup >/dev/null || pgrep -x ipa-restore >/dev/null; then exit 3; fi; "
    'find "${2:-${TMPDIR:-/tmp}}" -mindepth 1 -maxdepth 1 -type d -name "tmp*ipa" -newermt "@$1" '
    "-prune -print -exec rm -rf -- {} +"
)
CLOCK_MARGIN = datetime.timedelta(minutes=5)


def remove_orphaned_workdirs(
    execs: PodExec, pod: PodRef, since: datetime.datetime | None, tmpdir: str | None, report: Reporter
) -> None:
    """Remove the working directory an interrupted ipa-backup left in the pod, and say so in an Event.

    It is under the TMPDIR ipa-backup ran with: `tmpdir` (spec.tmpDir, given to it as TMPDIR) or else the
    container's own."""
    if since is None:
        return
    epoch = str(int((since - CLOCK_MARGIN).timestamp()))
    argv = ["sh", "-c", _ORPHANED_WORKDIRS, "sh", epoch, tmpdir or ""]
    try:
        result = _through_outages(lambda: execs.run(pod, argv, timeout=300))
    except (ExecError, ApiError) as err:
        report.event(
            "PodCleanupFailed", f"could not look for ipa-backup's working directory: {err}", warning=True
        )
        return
    removed = result.stdout.decode("utf-8", "replace").split()
    if result.exit_code not in (0, 3) or result.stderr.strip():
        problem = result.stderr.strip() or f"exit code {result.exit_code}"
        report.event(
            "PodCleanupFailed", f"could not remove ipa-backup's working directory: {problem}", warning=True
        )
    elif removed:
        report.event(
            "PodCleanedUp",
            f"removed {', '.join(removed)} from pod {pod.name}: the working directory of the interrupted "
            "ipa-backup, with plaintext in it",
        )


# -- after an operator restart -------------------------------------------------------------------------


def recover_interrupted(
    resource: ResourceIdentity,
    spec: BackupSpec,
    status: dict[str, Any],
    services: Services,
    report: Reporter,
) -> None:
    """Finish a backup the previous operator process left Running; raises BackupFailed unless it completed.

    A lost exec session cannot be resumed: the backup is abandoned, unless its manifest shows it was
    stored completely. Either way the server gets its services back and storage keeps nothing partial.
    """
    target = status.get("target") or {}
    pod = None
    if target.get("pod"):
        pod = PodRef(resource.namespace, target["pod"], target.get("container") or "")
        if not references.pod_exists(services.core, pod):
            return _settle(resource, spec, status, services, report, None, [f"pod {pod.name} is gone"])
    if pod is None:
        return _settle(resource, spec, status, services, report, None, [])
    # The dead process's lock has this backup's identity, so it is taken over at once; a lock another
    # backup took after it expired makes recovery wait, so no two processes act on the server together.
    with _holding_lock(services, pod, resource):
        return _settle(resource, spec, status, services, report, pod, [])


def _settle(
    resource: ResourceIdentity,
    spec: BackupSpec,
    status: dict[str, Any],
    services: Services,
    report: Reporter,
    pod: PodRef | None,
    notes: list[str],
) -> None:
    step = status.get("step", "unknown")
    if pod is not None and "ipaBackup" in status:
        stop_orphaned_ipa_backup(services.execs, pod, wait=ORPHAN_WAIT_SECONDS)
        if not spec.keep_in_pod:
            remove_orphaned_workdirs(
                services.execs, pod, parse_time(status.get("startTime")), spec.options.tmpdir, report
            )
        if spec.options.stops_services:
            running = restart_services(services.execs, pod, report)
            notes.append("IPA services are running" if running else "IPA services did NOT come back")
    outcome = _settle_storage(resource, spec, status, services)
    cleanup_note = ""
    if pod is not None and not spec.keep_in_pod:
        cleanup_note = _remove_reported_directory(services, pod, spec, status, report, notes)
    if outcome is not None:
        idmbackup_status.set_succeeded(
            report,
            parse_time(status.get("startTime")),
            outcome,
            note=f" (completed before the operator restarted){cleanup_note}",
            event_note=" (found complete after an operator restart)",
        )
        return
    notes.append("nothing partial is left in storage")
    raise BackupFailed(
        "OperatorRestarted",
        f"the operator stopped while this backup was running (step: {step}) and an exec session cannot be "
        f"resumed, so the backup was abandoned: {'; '.join(notes)}. Create a new IdmBackup to retry.",
    )


def _remove_reported_directory(
    services: Services,
    pod: PodRef,
    spec: BackupSpec,
    status: dict[str, Any],
    report: Reporter,
    notes: list[str],
) -> str:
    """Remove the plaintext copy ipa-backup reported, as after any other end of a backup; notes what could
    not be. A directory ipa-backup wrote only after the operator stopped was never reported: its name is
    unknown, and a guess could delete someone else's backup."""
    reported = (status.get("ipaBackup") or {}).get("directory")
    if "ipaBackup" in status and not reported:
        notes.append(
            "ipa-backup ended after the operator stopped, so its directory in /var/lib/ipa/backup is unknown "
            "and was left there"
        )
        return ""
    if not reported:
        return ""
    try:
        # The operator's own record, checked again as when ipa-backup reported it.
        path = freeipa.backup_directory(reported, spec.options.type).path
    except freeipa.UnsafeBackupPath as err:
        notes.append(f"the recorded directory was not removed: {err}")
        return ""
    note = remove_from_pod(services.execs, pod, path, report)
    if not note:
        notes.append(f"{path} was removed from the pod")
    return note


def _settle_storage(
    resource: ResourceIdentity, spec: BackupSpec, status: dict[str, Any], services: Services
) -> str | None:
    """The archive URI if the interrupted backup is completely stored; otherwise remove what it wrote."""
    keys = stored.keys_from_status(resource, spec, status)
    if keys is None:
        return None  # ipa-backup had not finished: nothing was uploaded yet
    with services.opened_store(resource.namespace, spec.storage) as store:
        # Reading the archive back is bounded as the backup itself was.
        store.set_deadline(time.monotonic() + spec.deadline_seconds)
        manifest = stored.read_manifest(store, keys)
        if manifest is not None and not stored.owns(manifest, resource):
            return None  # another resource's files: not ours to judge or delete
        if manifest is not None and _matches(store, keys.archive, manifest["files"]["archive"]):
            return store.uri(keys.archive)
        stored.delete_files(store, keys)
    return None


def _matches(store: Store, key: str, expected: dict[str, Any]) -> bool:
    """Whether the stored object is, byte for byte, the one the manifest describes: read back and hashed,
    since the manifest is written last but a crash may still leave it beside a damaged archive."""
    if (found := store.stat(key)) is None or found.size != expected["size"]:
        return False
    tally = Tally()
    with store.open_read(key) as stream:
        for chunk in chunks_of(stream):
            tally.update(chunk)
    return (tally.size, tally.sha256) == (expected["size"], expected["sha256"])
