"""What the operator needs from a place that keeps archives, whichever it is.

Keys are relative paths such as ``<namespace>/<server>/<backup>/ipa-full.tar.gpg``; each store applies its
own prefix (an S3 key prefix, a sub-directory of a PVC). An object written through an `Upload` appears under
its key only when the upload is committed, whole: a reader never sees a partial archive under a final name.
"""

import abc
import dataclasses
import datetime
import re
from collections.abc import Iterator
from types import TracebackType
from typing import BinaryIO

from idm_backup_operator.streams import Tally


class StorageError(Exception):
    """The store failed; the message says what to fix, without a stack trace."""


class ObjectNotFound(StorageError):
    pass


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
    @abc.abstractmethod
    def uri(self, key: str) -> str:
        """Where the key lives, for status fields and messages: ``s3://bucket/prefix/key`` or a path."""

    @abc.abstractmethod
    def open_upload(self, key: str) -> Upload: ...

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        """Store a small object (header, checksum, manifest) as a whole."""
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
