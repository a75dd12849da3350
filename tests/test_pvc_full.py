"""A PVC that fills up in the middle of a write: a real, small file system (tmpfs), not a simulated errno.

The store-level tests write to PVCStore directly; the platform test is what a user sees through the real
operator: reason StorageFull naming the claim, the volume and the path, nothing under the final name and
no temporary file left to keep the volume full, IPA running, the server's Lease released, and, once the
volume has room again, the next backup of the same server Succeeded.

Mounting needs root, as the platform does (its node runs pods as root).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from idm_backup_operator.storage import PVCStore, StorageError, StorageFull
from idm_backup_operator.storage import pvc as pvc_module
from testbed import stack
from testbed.deploy import OperatorProcess
from tests.helpers import (
    Backup,
    backup_dirs,
    backup_spec,
    events,
    leases,
    mount_tmpfs,
    services_running,
    unmount,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

MiB = 1024 * 1024
HOST = "ipa-hidden.example.test"
NO_SPACE = os.strerror(errno.ENOSPC)


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB file system, a volume that really fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    mount_tmpfs(mount, "2m")
    try:
        yield mount
    finally:
        unmount(mount)


def files_in(volume: Path) -> list[str]:
    """Every file on the volume, hidden ones (`.<name>.partial-*`, `.idm-backup-probe-*`) included."""
    return sorted(str(p.relative_to(volume)) for p in volume.rglob("*") if not p.is_dir())


def fill(volume: Path) -> Path:
    """Fill the volume to the last byte with a file of its own; returns that file."""
    filler = volume / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        while True:
            os.write(descriptor, b"\0" * 65536)
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    finally:
        os.close(descriptor)
    return filler


def full_message(doing: str, volume: Path) -> str:
    return f"{doing}: {NO_SPACE} (the volume mounted at {volume} is full)"


# -- the store --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunk_size",
    [
        # Below the file object's 8 KiB buffer: the refused bytes stay buffered, and closing the file to
        # discard it fails once more. This is the case that used to leave the `.partial-` file (which kept
        # the volume full) and end the backup InternalError with a bare OSError.
        4096,
        MiB,
    ],
    ids=["buffered", "unbuffered"],
)
def test_a_write_that_fills_the_volume_raises_storage_full_and_leaves_nothing(
    small_volume: Path, chunk_size: int
) -> None:
    store = PVCStore(small_volume, "idm")
    key = "ns/host/ipa-full-2024/ipa-full.tar.gpg"
    with pytest.raises(StorageFull) as full, store.open_upload(key) as upload:
        for _ in range(4 * MiB // chunk_size):
            upload.write(os.urandom(chunk_size))
        upload.commit()
    path = small_volume / "idm" / key
    assert str(full.value) == full_message(f"cannot write {path}", small_volume)
    assert files_in(small_volume) == []
    assert store.stat(key) is None
    # The space is back: the partial file's blocks were freed, not only its name.
    with store.open_upload(key) as upload:
        upload.write(os.urandom(MiB))
        assert upload.commit().size == MiB
    assert files_in(small_volume) == [f"idm/{key}"]


def test_a_commit_that_finds_the_volume_full_raises_storage_full_and_leaves_nothing(
    small_volume: Path,
) -> None:
    store = PVCStore(small_volume)
    key = "ns/host/ipa-full-2024/manifest.json"
    (small_volume / "ns" / "host" / "ipa-full-2024").mkdir(parents=True)
    filler = fill(small_volume)
    with pytest.raises(StorageFull) as full, store.open_upload(key) as upload:
        upload.write(b"{}\n")  # buffered: the volume refuses it only when the commit flushes it
        upload.commit()
    assert str(full.value) == full_message(f"cannot write {small_volume / key}", small_volume)
    assert files_in(small_volume) == ["filler"]
    filler.unlink()
    assert store.put_bytes(key, b"{}\n").size == 3


def test_the_probe_of_a_full_volume_raises_storage_full_and_leaves_nothing(small_volume: Path) -> None:
    store = PVCStore(small_volume)
    fill(small_volume)
    with pytest.raises(StorageFull) as full:
        store.check_writable()
    assert str(full.value) == full_message(f"cannot write to {small_volume}", small_volume)
    assert files_in(small_volume) == ["filler"]


def test_an_exhausted_quota_is_storage_full_and_other_errors_are_not() -> None:
    # EDQUOT cannot be produced for real on this machine: its kernel has neither CONFIG_TMPFS_QUOTA nor
    # CONFIG_QFMT_V2 (ext4 quotas), and root ignores hard limits anyway. The translation is checked here,
    # on the errno the kernel would report.
    volume = Path("/volumes/backups")
    quota = pvc_module._storage_error(
        "cannot write x", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), volume
    )
    assert isinstance(quota, StorageFull)
    hint = f"(the volume mounted at {volume} has exhausted its quota)"
    assert str(quota) == f"cannot write x: {os.strerror(errno.EDQUOT)} {hint}"
    read_only = pvc_module._storage_error("cannot write x", OSError(errno.EROFS, "Read-only"), volume)
    assert type(read_only) is StorageError
    assert str(read_only) == "cannot write x: Read-only (the volume is mounted read-only)"


# -- through the operator ---------------------------------------------------------------------------------


@pytest.fixture
def claim_volume(operator: OperatorProcess) -> Iterator[Path]:
    """Claim `backups` as the operator sees it (what the chart's storage.pvcMounts mounts at the PVC root):
    a 2 MiB file system, unmounted whatever the test did."""
    volume = operator.pvc_root / "backups"
    volume.mkdir()
    mount_tmpfs(volume, "2m")
    try:
        yield volume
    finally:
        unmount(volume)


def test_a_pvc_that_fills_up_mid_write_fails_storage_full_leaves_nothing_and_the_next_backup_succeeds(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Backup,
    claim_volume: Path,
) -> None:
    # 8 MiB of incompressible payload: the header fits, the archive fills the 2 MiB volume a quarter in.
    pod = freeipa(payload_bytes=8 * MiB)
    spec = backup_spec(platform, {"pvc": {"claimName": "backups", "subPath": "idm"}}, type="Full")
    status = run_backup("full", spec)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "StorageFull"), status
    dirname = status["ipaBackup"]["directory"].rsplit("/", 1)[1]
    archive = claim_volume / "idm" / namespace / HOST / dirname / "ipa-full.tar.gpg"
    doing = f"cannot write {archive}"
    assert status["message"] == f"upload failed: PVC backups: {full_message(doing, claim_volume)}"
    assert "archive" not in status
    # Not the archive, not the header written before it, no `.partial-` file, no probe.
    assert files_in(claim_volume) == []
    # An offline backup: ipa-backup stopped IPA, and it runs again.
    running = next(c for c in status["conditions"] if c["type"] == "ServicesRunning")
    assert running["status"] == "True", running
    assert services_running(api, namespace, pod)
    assert backup_dirs(api, namespace, pod) == []
    wait_for("the Lease to be released", lambda: leases(api, namespace) == [], timeout=30)
    assert events(api, namespace, "full")[-1] == "BackupFailed"
    log = operator.output()
    assert "Traceback" not in log, log[-3000:]

    # The administrator grows the volume: the next backup of the same server fits, and is all there is.
    subprocess.run(["mount", "-o", "remount,size=64m", str(claim_volume)], check=True)
    status = run_backup("after", spec)["status"]
    assert status["phase"] == "Succeeded", status
    dirname = status["ipaBackup"]["directory"].rsplit("/", 1)[1]
    stored = f"idm/{namespace}/{HOST}/{dirname}"
    assert files_in(claim_volume) == [
        f"{stored}/header",
        f"{stored}/ipa-full.tar.gpg",
        f"{stored}/manifest.json",
    ]
    assert services_running(api, namespace, pod)
    wait_for("the Lease to be released", lambda: leases(api, namespace) == [], timeout=30)


def test_a_pvc_full_before_the_backup_fails_storage_full_before_ipa_backup_runs(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    run_backup: Backup,
    claim_volume: Path,
) -> None:
    """The pre-flight test write finds no room: the same reason as mid-write, and nothing was stopped."""
    pod = freeipa()
    filler = fill(claim_volume)
    spec = backup_spec(platform, {"pvc": {"claimName": "backups"}}, type="Full")
    status = run_backup("early", spec)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "StorageFull"), status
    doing = f"cannot write to {claim_volume}"
    assert status["message"] == f"storage not usable: PVC backups: {full_message(doing, claim_volume)}"
    assert "ipaBackup" not in status
    assert files_in(claim_volume) == [filler.name]
    assert services_running(api, namespace, pod)
    wait_for("the Lease to be released", lambda: leases(api, namespace) == [], timeout=30)
