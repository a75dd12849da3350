"""Archives in a directory: the mount path of a PersistentVolumeClaim, under an optional sub-path.

An upload writes to a hidden temporary file next to its final name, makes it durable (fsync), renames it
into place atomically and makes the rename durable (fsync of the directory). After a crash or power loss,
a key therefore holds either nothing or a complete object, never a prefix of one; what a crash leaves is
a ``.<name>.partial-<random>`` file, which `clean_incomplete` removes.
"""

import contextlib
import datetime
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from idm_backup_operator.storage.base import (
    ObjectNotFound,
    StorageError,
    Store,
    StoredObject,
    Upload,
    check_key,
)

_PARTIAL = re.compile(r"\..+\.partial-[a-z0-9_]+")
_PROBE = ".idm-backup-probe-"

# What an errno means for a backup volume, beyond strerror.
_HINTS = {
    errno.EACCES: "check the volume's ownership and the pod's fsGroup",
    errno.EPERM: "check the volume's ownership and the pod's fsGroup",
    errno.EROFS: "the volume is mounted read-only",
    errno.ENOSPC: "the volume is full",
    errno.EDQUOT: "the volume's quota is exhausted",
}


class PVCStore(Store):
    def __init__(self, mount_path: str | os.PathLike[str], sub_path: str = "") -> None:
        self._mount = Path(mount_path)
        self._base = self._mount.joinpath(*check_key(sub_path, prefix=True).split("/"))

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def open_upload(self, key: str) -> Upload:
        path = self._path(key)
        if _PARTIAL.fullmatch(path.name) or path.name.startswith(_PROBE):
            raise StorageError(f"invalid object key {key!r}: its name is reserved for temporary files")
        with _errors(f"cannot create {path}"):
            self._make_dirs(path.parent)
            return _FileUpload(key, path)

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{path} does not exist") from None
        except OSError as error:
            raise _storage_error(f"cannot read {path}", error) from None

    def stat(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            return self._stored(key, path, path.stat())
        except FileNotFoundError:
            return None
        except OSError as error:
            raise _storage_error(f"cannot read {path}", error) from None

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        with _errors(f"cannot list {self._base}"):
            for key, path in self._walk(prefix):
                if not _PARTIAL.fullmatch(path.name) and (stored := self._stored(key, path, path.stat())):
                    yield stored

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _errors(f"cannot delete {path}"):
            path.unlink(missing_ok=True)
            # A backup is a directory of files: once its last file is gone, the directory goes too.
            for directory in path.parents:
                if directory == self._base or not directory.is_relative_to(self._base):
                    break
                try:
                    directory.rmdir()
                except OSError:
                    break

    def check_writable(self) -> None:
        if not self._mount.is_dir():
            raise StorageError(f"{self._mount} does not exist or is not a directory: is the volume mounted?")
        with _errors(f"cannot write to {self._base}"):
            self._make_dirs(self._base)
            descriptor, probe = tempfile.mkstemp(prefix=_PROBE, dir=self._base)
            try:
                os.write(descriptor, b"probe\n")
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
                os.unlink(probe)

    def clean_incomplete(self, prefix: str = "", *, started_before: datetime.datetime) -> list[str]:
        removed = []
        with _errors(f"cannot clean up {self._base}"):
            for key, path in self._walk(prefix):
                if not (_PARTIAL.fullmatch(path.name) or path.name.startswith(_PROBE)):
                    continue
                if datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC) < started_before:
                    path.unlink(missing_ok=True)
                    removed.append(key)
        return removed

    def _walk(self, prefix: str) -> Iterator[tuple[str, Path]]:
        """Keys and paths of all files whose key starts with `prefix`, walking only where they can be."""
        directory, _, _ = check_key(prefix, prefix=True).rpartition("/")
        for parent, _dirs, files in os.walk(self._base / directory):
            for name in files:
                path = Path(parent, name)
                key = path.relative_to(self._base).as_posix()
                if key.startswith(prefix):
                    yield key, path

    def _path(self, key: str) -> Path:
        return self._base.joinpath(*check_key(key).split("/"))

    def _stored(self, key: str, path: Path, stat: os.stat_result) -> StoredObject | None:
        if not path.is_file():
            return None
        modified = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.UTC)
        return StoredObject(key, str(path), stat.st_size, modified)

    def _make_dirs(self, directory: Path) -> None:
        """Create the missing directories durably: each new entry is fsync'd into its parent."""
        if not self._mount.is_dir():
            # Creating it would write backups into the container's own file system, lost at the next restart.
            raise StorageError(f"{self._mount} does not exist or is not a directory: is the volume mounted?")
        missing = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
            _fsync_directory(new.parent)


class _FileUpload(Upload):
    def __init__(self, key: str, path: Path) -> None:
        super().__init__(key, str(path))
        self._path = path
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
        self._temporary = Path(temporary)
        self._file = os.fdopen(descriptor, "wb")

    def _write(self, data: bytes) -> None:
        with _errors(f"cannot write {self._path}"):
            self._file.write(data)

    def _commit(self) -> None:
        with _errors(f"cannot write {self._path}"):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._temporary, self._path)
            _fsync_directory(self._path.parent)

    def _abort(self) -> None:
        self._file.close()
        self._temporary.unlink(missing_ok=True)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _errors(doing: str) -> Iterator[None]:
    """Turn an OSError into a StorageError that says what was being done, and what to check."""
    try:
        yield
    except OSError as error:
        raise _storage_error(doing, error) from None


def _storage_error(doing: str, error: OSError) -> StorageError:
    hint = _HINTS.get(error.errno or 0)
    return StorageError(f"{doing}: {error.strerror or error}" + (f" ({hint})" if hint else ""))
