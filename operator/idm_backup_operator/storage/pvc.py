"""Archives in a directory: the mount path of a PersistentVolumeClaim, under an optional sub-path.

An upload writes to a hidden temporary file next to its final name, makes it durable (fsync), links it
under its final name and makes that durable (fsync of the directory). After a crash or power loss, a key
therefore holds either nothing or a complete object, never a prefix of one; what a crash leaves is a
``.<name>.partial-<random>`` file, which `clean_incomplete` removes.

The final name is given with link(), not rename(): rename replaces an existing file, link fails with
EEXIST, so an existing object is never replaced (see `base`). On a file system without hard links,
renameat2(RENAME_NOREPLACE) does the same; only where neither exists is it a check, then a rename.

Nothing is read or written outside the volume: keys and the sub-path are relative paths without '..'
(`check_key`), a claim's directory is found by `claim_mount`, and a path is used only once it is known
to resolve, symbolic links included, to a place inside the mount: a link planted on a shared volume
cannot lead a write into the operator's own file system.

A volume with no room left (ENOSPC, EDQUOT), on any write, the commit's fsync and link or the probe,
raises `StorageFull` naming the volume, and an upload it ends leaves no temporary file behind.

A deadline (`Store.set_deadline`) is checked before each write, commit and probe; a local write that
blocks (a hung NFS server) cannot be interrupted from Python and is bounded only by the volume's mount
options.
"""

import contextlib
import ctypes
import datetime
import errno
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from idm_backup_operator.storage.base import (
    ObjectExists,
    ObjectNotFound,
    StorageError,
    StorageFull,
    Store,
    StoredObject,
    Upload,
    check_key,
)

logger = logging.getLogger(__name__)

_PARTIAL = re.compile(r"\..+\.partial-[a-z0-9_]+")
_PROBE = ".idm-backup-probe-"

# What an errno means for a backup volume, beyond strerror.
_HINTS = {
    errno.EACCES: "check the volume's ownership and the pod's fsGroup",
    errno.EPERM: "check the volume's ownership and the pod's fsGroup",
    errno.EROFS: "the volume is mounted read-only",
}
# Errnos that mean "no room": they raise StorageFull, whose hint names the volume, since the path alone
# (a file deep under the operator's mount root) does not say which volume to grow or clean.
_FULL = {
    errno.ENOSPC: "is full",
    errno.EDQUOT: "has exhausted its quota",
}


# What a PersistentVolumeClaim's name may be: a DNS-1123 subdomain. Each label starts and ends with a
# letter or digit, so neither '/', '.', '..' nor an empty name can pass.
_CLAIM_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# link() errors that mean "this file system has no hard links", not "this link is refused".
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def claim_mount(pvc_root: str | os.PathLike[str], claim_name: str) -> Path:
    """The directory where the operator sees a claim: `pvc_root/<claim_name>`, never anywhere else.

    The CRD validates claimName, but this is where it becomes a path: a name that is not a DNS-1123
    subdomain is refused, so it is always one directory of `pvc_root`. What that directory is (a volume
    the kubelet mounted from the chart's storage.pvcMounts, or a link an administrator made) is the
    operator's own configuration, not a tenant's: it is not resolved here. Links inside the volume,
    which tenants may write, are refused by the store. Whether the claim is mounted is the caller's
    question.
    """
    if len(claim_name) > 253 or not _CLAIM_NAME.fullmatch(claim_name):
        raise StorageError(
            f"invalid claim name {claim_name!r}: a PersistentVolumeClaim's name is a DNS-1123 subdomain "
            "(lower-case letters, digits, '-' and '.', starting and ending with a letter or digit)"
        )
    return Path(pvc_root) / claim_name


class PVCStore(Store):
    def __init__(self, mount_path: str | os.PathLike[str], sub_path: str = "") -> None:
        self._mount = Path(mount_path)
        self._base = self._mount.joinpath(*check_key(sub_path, prefix=True).split("/"))

    @classmethod
    def for_claim(cls, pvc_root: str | os.PathLike[str], claim_name: str, sub_path: str = "") -> "PVCStore":
        """The store of a claim mounted at `pvc_root/<claim_name>` (see `claim_mount`)."""
        return cls(claim_mount(pvc_root, claim_name), sub_path)

    @property
    def mount(self) -> Path:
        """Where the volume is mounted: what a message names when the volume is full."""
        return self._mount

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def open_upload(self, key: str) -> Upload:
        path = self._path(key)
        if _PARTIAL.fullmatch(path.name) or path.name.startswith(_PROBE):
            raise StorageError(f"invalid object key {key!r}: its name is reserved for temporary files")
        self.check_deadline(f"cannot create {path}")
        with _errors(f"cannot create {path}", self._mount):
            self._make_dirs(path.parent)
            self._inside(path.parent)
            # Checked again, atomically, at commit; failing here spares streaming a whole archive first.
            if os.path.lexists(path):
                raise _exists(path)
            return _FileUpload(key, path, self)

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            self._inside(path)
            return path.open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{path} does not exist") from None
        except OSError as error:
            raise _storage_error(f"cannot read {path}", error, self._mount) from None

    def stat(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            self._inside(path)
            return self._stored(key, path, path.stat())
        except FileNotFoundError:
            return None
        except OSError as error:
            raise _storage_error(f"cannot read {path}", error, self._mount) from None

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        with _errors(f"cannot list {self._base}", self._mount):
            for key, path in self._walk(prefix):
                if not _PARTIAL.fullmatch(path.name) and (stored := self._stored(key, path, path.stat())):
                    yield stored

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _errors(f"cannot delete {path}", self._mount):
            # unlink() never follows the last component: only the parents can lead elsewhere.
            self._inside(path.parent)
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
        self.check_deadline(f"cannot write to {self._base}")
        if not self._mount.is_dir():
            raise StorageError(f"{self._mount} does not exist or is not a directory: is the volume mounted?")
        with _errors(f"cannot write to {self._base}", self._mount):
            self._make_dirs(self._base)
            self._inside(self._base)
            descriptor, probe = tempfile.mkstemp(prefix=_PROBE, dir=self._base)
            try:
                os.write(descriptor, b"probe\n")
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
                os.unlink(probe)

    def clean_incomplete(self, prefix: str = "", *, started_before: datetime.datetime) -> list[str]:
        removed = []
        with _errors(f"cannot clean up {self._base}", self._mount):
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
        # os.walk follows its top, not the links below it: the top is the only one to check.
        top = self._inside(self._base / directory)
        for parent, _dirs, files in os.walk(top):
            for name in files:
                path = Path(parent, name)
                if path.is_symlink():
                    continue  # never written by a store, and possibly pointing out of the volume
                key = path.relative_to(self._base).as_posix()
                if key.startswith(prefix):
                    yield key, path

    def _path(self, key: str) -> Path:
        return self._base.joinpath(*check_key(key).split("/"))

    def _inside(self, path: Path) -> Path:
        """`path`, once it is known to resolve to a place inside the mount; StorageError otherwise."""
        resolved, root = _resolve(path), _resolve(self._mount)
        if not resolved.is_relative_to(root):
            raise StorageError(
                f"{path} resolves to {resolved}, outside the volume mounted at {self._mount}: "
                "a symbolic link on the volume points out of it"
            )
        return path

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
        self._inside(directory)  # before anything is created under it
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
            _fsync_directory(new.parent)


class _FileUpload(Upload):
    def __init__(self, key: str, path: Path, store: PVCStore) -> None:
        super().__init__(key, str(path))
        self._path = path
        self._store = store
        self._mount = store.mount
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
        self._temporary = Path(temporary)
        self._file = os.fdopen(descriptor, "wb")

    def _write(self, data: bytes) -> None:
        self._store.check_deadline(f"cannot write {self._path}")
        with _errors(f"cannot write {self._path}", self._mount):
            self._file.write(data)

    def _commit(self) -> None:
        self._store.check_deadline(f"cannot write {self._path}")
        with _errors(f"cannot write {self._path}", self._mount):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            _link_no_replace(self._temporary, self._path)
            # A crash here leaves the temporary name too, a second link to the same, complete file;
            # clean_incomplete removes it like any other leftover.
            self._temporary.unlink(missing_ok=True)
            _fsync_directory(self._path.parent)

    def _abort(self) -> None:
        # Closing flushes what is still buffered, which on a full volume fails again with the error that
        # ended the upload: the file is being discarded, so that error is no news, and it must neither keep
        # the temporary file (filling the volume for the next backup) nor replace the StorageFull already
        # on its way up with a bare OSError. The descriptor is closed regardless.
        with contextlib.suppress(OSError):
            self._file.close()
        with _errors(f"cannot remove {self._temporary}", self._mount):
            self._temporary.unlink(missing_ok=True)


def _link_no_replace(source: Path, target: Path) -> None:
    """Give `source`'s file the name `target`; ObjectExists if `target` exists. `source` may remain."""
    try:
        os.link(source, target)
        return
    except FileExistsError:
        raise _exists(target) from None
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
    try:
        _rename_noreplace(source, target)
        return
    except FileExistsError:
        raise _exists(target) from None
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    # Neither primitive exists here (some FUSE and SMB volumes): another writer could still take the name
    # between the check and the rename. Keys are unique per backup, so only a concurrent backup of the same
    # pod directory could.
    logger.warning("%s supports neither link() nor RENAME_NOREPLACE: no-replace is a check", target.parent)
    if os.path.lexists(target):
        raise _exists(target)
    os.rename(source, target)


def _rename_noreplace(source: Path, target: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing: renameat2(RENAME_NOREPLACE), Linux 3.15+."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available in this C library")
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def _exists(path: Path) -> ObjectExists:
    return ObjectExists(f"{path} already exists: a stored object is never replaced")


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symbolic link loop, before Python 3.13
        raise StorageError(f"cannot resolve {path}: {error}") from None


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _errors(doing: str, mount: Path) -> Iterator[None]:
    """Turn an OSError into a StorageError that says what was being done, and what to check."""
    try:
        yield
    except OSError as error:
        raise _storage_error(doing, error, mount) from None


def _storage_error(doing: str, error: OSError, mount: Path) -> StorageError:
    """A StorageError for `error`; StorageFull, naming the volume mounted at `mount`, for "no room"."""
    code = error.errno or 0
    what = f"{doing}: {error.strerror or error}"
    if full := _FULL.get(code):
        return StorageFull(f"{what} (the volume mounted at {mount} {full})")
    hint = _HINTS.get(code)
    return StorageError(what + (f" ({hint})" if hint else ""))
