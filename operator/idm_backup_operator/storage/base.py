"""What the operator needs from a place that keeps archives, whichever it is.

Keys are relative paths such as ``<namespace>/<server>/<backup>/ipa-full.tar.gpg``; each store applies its
own prefix (an S3 key prefix, a sub-directory of a PVC). An object written through an `Upload` appears under
its key only when the upload is committed, whole: a reader never sees a partial archive under a final name.

A write never replaces an object: committing to a key that exists raises `ObjectExists` and leaves the
existing object as it was. Keys are built from what a FreeIPA pod reports about itself (its host name,
its backup directory), so without this a hostile pod could name a key of an earlier backup, have it
overwritten, and then deleted by the failure path that removes what a backup wrote. With it, whatever a
backup wrote successfully is its own, and removing it on failure touches nothing else.
"""

import abc
import dataclasses
import datetime
import re
import time
from collections.abc import Iterator
from types import TracebackType
from typing import BinaryIO

from idm_backup_operator.streams import Tally


class StorageError(Exception):
    """The store failed; the message says what to fix, without a stack trace."""


class ObjectNotFound(StorageError):
    pass


class ObjectExists(StorageError):
    """A write to a key that already holds an object: stores never replace one."""


class StorageFull(StorageError):
    """The store has no room left for a write: a full volume (ENOSPC) or an exhausted quota (EDQUOT).

    A class of its own because the fix is not in the backup or its credentials: someone must make room
    or grow the volume, and a backup's reason (StorageFull) lets an alert tell this from other failures.
    """


class DeadlineExceeded(StorageError):
    """A call was cut off, or refused, at its time bound: the store's deadline (`Store.set_deadline`), or
    a bound of the call's own (an S3 probe, delete or abort)."""


@dataclasses.dataclass(frozen=True)
class StoredObject:
    """An object in a store. `sha256` is known only for objects that this process has just written."""

    key: str
    uri: str
    size: int
    modified: datetime.datetime | None = None
    sha256: str | None = None


class Upload(abc.ABC):
    """A streaming write of one object.

    Used as a context manager, it must be committed inside the block: leaving the block any other way,
    with an exception or without a commit, aborts it. An archive is never finished implicitly.
    """

    def __init__(self, key: str, uri: str) -> None:
        self.key = key
        self.uri = uri
        self.tally = Tally()
        self._open = True

    def write(self, data: bytes) -> None:
        if not self._open:
            raise StorageError(f"upload to {self.uri} is already finished")
        self._write(data)
        self.tally.update(data)

    def commit(self) -> StoredObject:
        if not self._open:
            raise StorageError(f"upload to {self.uri} is already finished")
        try:
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._open = False
        modified = datetime.datetime.now(datetime.UTC)
        return StoredObject(self.key, self.uri, self.tally.size, modified, self.tally.sha256)

    def abort(self) -> None:
        """Discard what was written. Safe to call more than once, and after a failed commit."""
        if self._open:
            self._open = False
            self._abort()

    def __enter__(self) -> "Upload":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()

    @abc.abstractmethod
    def _write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def _commit(self) -> None: ...

    @abc.abstractmethod
    def _abort(self) -> None: ...


class Store(abc.ABC):
    _deadline: float | None = None

    def set_deadline(self, deadline: float | None) -> None:
        """Bound every later call of this store by a wall-clock deadline, a `time.monotonic()` value.

        Past it, no call starts, and a call running when it passes is cut off: both raise
        `DeadlineExceeded`. A backup sets its own deadline right after opening the store, so that neither
        the pre-flight probe nor the upload can outlast activeDeadlineSeconds however the server behaves
        (stalls, trickles a byte a second, never answers). None removes the bound.

        What undoes a write is exempt, so that a backup that ran out of time can still remove what it
        wrote: `delete` and aborting an upload get a bound of their own instead (S3Config.cleanup_timeout
        for S3), starting when they are called. How closely the deadline is kept differs per store: see
        S3Store and PVCStore.
        """
        self._deadline = deadline

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def check_deadline(self, doing: str) -> None:
        """Raise DeadlineExceeded if the deadline has passed; `doing` says what was refused."""
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise DeadlineExceeded(f"{doing}: it did not finish before the backup's deadline")

    @abc.abstractmethod
    def uri(self, key: str) -> str:
        """Where the key lives, for status fields and messages: ``s3://bucket/prefix/key`` or a path."""

    @abc.abstractmethod
    def open_upload(self, key: str) -> Upload:
        """A new object under `key`; `ObjectExists` if there is one already (now, or at commit)."""

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        """Store a small object (header, checksum, manifest) as a whole; `ObjectExists` as open_upload."""
        with self.open_upload(key) as upload:
            upload.write(data)
            return upload.commit()

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming reader of the object; `ObjectNotFound` if there is none."""

    @abc.abstractmethod
    def stat(self, key: str) -> StoredObject | None: ...

    @abc.abstractmethod
    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        """Committed objects whose keys start with `prefix` (a string prefix, not only a directory)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object; deleting one that does not exist is not an error."""

    @abc.abstractmethod
    def check_writable(self) -> None:
        """Pre-flight check, before an archive is made: write and delete a small probe object."""

    @abc.abstractmethod
    def clean_incomplete(self, prefix: str = "", *, started_before: datetime.datetime) -> list[str]:
        """Remove what uploads interrupted by a crash left behind, and return their keys.

        Only leftovers older than `started_before` go, so that an upload still running is spared.
        """


_SEGMENT = re.compile(r"[^/\x00\\]+")


def check_key(key: str, *, prefix: bool = False) -> str:
    """Refuse keys that could escape the store's base: absolute, with `..`, `.` or empty segments.

    As a prefix, the empty string and a path ending with ``/`` are valid too.
    """
    segments = key.split("/")
    if prefix and segments[-1] == "":
        segments.pop()
    if not all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
        kind = "prefix" if prefix else "object key"
        raise StorageError(f"invalid {kind} {key!r}: it must be a relative path without '.' or '..'")
    return key
