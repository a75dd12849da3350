"""An S3 server whose disk fills up mid-write: a second versitygw of the test's own, on a small tmpfs.

versitygw's posix backend is the platform's S3 server, and it reports a full file system the way it
reports it to any client: InsufficientStorage (HTTP 507). It stages multipart parts on the same file
system as its objects (``<bucket>/.sgwtmp/multipart/<hash of the key>/<upload id>/<part>``), and
CompleteMultipartUpload copies them into a new file before the parts go: an upload needs room for its
parts, then room for them once more at the end. So each of its writes can be the one refused, and each
is produced here: a single PUT, a part, the complete.

The platform's own versitygw is shared and never filled: the server here is started, and its tmpfs
mounted, by each test, and both are gone after it, whatever the test did. Mounting needs root, as the
platform does (its node runs pods as root).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from kubernetes import client

from idm_backup_operator.storage import S3Config, S3Store, StorageError, StorageFull
from idm_backup_operator.storage import s3 as s3_module
from testbed import stack
from testbed.deploy import OperatorProcess
from tests.helpers import (
    Backup,
    backup_dirs,
    backup_spec,
    events,
    leases,
    mount_tmpfs,
    s3_storage,
    services_running,
    unmount,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

MiB = 1024 * 1024
BUCKET = "full-bucket"
HOST = "ipa-hidden.example.test"
KEY = "ns/ipa.example.test/ipa-full-2026-11-26-03-00-00/ipa-full.tar.gpg"
FULL = "(InsufficientStorage: No space left on device.)"
# Where versitygw keeps what is not an object yet; empty directories are all it leaves there.
STAGING = {BUCKET, f"{BUCKET}/.sgwtmp", f"{BUCKET}/.sgwtmp/multipart"}
# versitygw's locks for conditional writes (If-None-Match): empty files, created on first use and never
# removed by design (objlock.go), outside the bucket. They hold no data and take no space.
LOCKS = ".vgwlocks"


@dataclass
class SmallS3:
    """A versitygw of the test's own, whose data directory is a tmpfs of a few MiB."""

    endpoint: str
    data: Path
    log: Path

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=stack.S3_ACCESS_KEY,
            aws_secret_access_key=stack.S3_SECRET_KEY,
        )

    def store(self, prefix: str = "") -> S3Store:
        return S3Store(
            S3Config(
                bucket=BUCKET,
                prefix=prefix,
                endpoint_url=self.endpoint,
                access_key_id=stack.S3_ACCESS_KEY,
                secret_access_key=stack.S3_SECRET_KEY,
                force_path_style=True,
                part_size=5 * MiB,
            )
        )

    def files(self) -> list[str]:
        """Every file on the server's disk but its (empty) lock files, which are checked here."""
        found = [p for p in self.data.rglob("*") if not p.is_dir()]
        locks = [p for p in found if p.relative_to(self.data).parts[0] == LOCKS]
        assert all(p.stat().st_size == 0 for p in locks), locks
        return sorted(str(p.relative_to(self.data)) for p in found if p not in locks)

    def directories(self) -> set[str]:
        """The server's directories, its locks' aside."""
        found = (p.relative_to(self.data) for p in self.data.rglob("*") if p.is_dir())
        return {str(p) for p in found if p.parts[0] != LOCKS}

    def used_bytes(self) -> int:
        fs = os.statvfs(self.data)
        return (fs.f_blocks - fs.f_bfree) * fs.f_frsize

    def refusals(self) -> list[str]:
        """The requests the server answered 507, from its own access log."""
        return [line for line in self.log.read_text().splitlines() if " | 507 | " in line]

    def uploads(self) -> list[Any]:
        return list(self.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))

    def keys(self) -> list[str]:
        return sorted(o["Key"] for o in self.client().list_objects_v2(Bucket=BUCKET).get("Contents", []))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def small_s3(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SmallS3]:
    """A server with a bucket and `request.param` of room (a tmpfs size, 8m unless parametrized)."""
    size = getattr(request, "param", "8m")
    data = tmp_path / "s3-data"
    data.mkdir()
    mount_tmpfs(data, size)
    try:
        endpoint = f"http://127.0.0.1:{_free_port()}"
        log = tmp_path / "versitygw.log"
        argv = [
            str(stack.binaries()["versitygw"]),
            *("--access", stack.S3_ACCESS_KEY, "--secret", stack.S3_SECRET_KEY),
            *("--port", endpoint.removeprefix("http://"), "posix", str(data)),
        ]
        with log.open("wb") as out:
            server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:

            def answers() -> bool:
                assert server.poll() is None, log.read_text()
                try:
                    urllib.request.urlopen(f"{endpoint}/", timeout=1)
                except urllib.error.HTTPError:
                    return True  # an S3 error document: up, and refusing anonymous access
                except OSError:
                    return False
                return True

            wait_for("the test's versitygw to answer", answers, timeout=30, interval=0.05)
            s3 = SmallS3(endpoint, data, log)
            # Through the S3 API: versitygw keeps a bucket's owner and ACL in extended attributes.
            s3.client().create_bucket(Bucket=BUCKET)
            yield s3
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    finally:
        unmount(data)


def _upload(store: S3Store, key: str, total: int, before_commit: Callable[[], None] = lambda: None) -> None:
    with store.open_upload(key) as upload:
        for offset in range(0, total, MiB):
            upload.write(os.urandom(min(MiB, total - offset)))
        before_commit()
        upload.commit()


def _assert_nothing_left(s3: SmallS3, store: S3Store, key: str) -> None:
    assert store.stat(key) is None
    assert s3.keys() == []
    assert s3.uploads() == []
    # On the server's disk: no object, no part, no temporary file; the space is free again.
    assert s3.files() == []
    assert s3.directories() <= STAGING
    assert s3.used_bytes() == 0


def _message(s3: SmallS3, doing: str, key: str) -> str:
    where = f"bucket {BUCKET!r} at {s3.endpoint}"
    return f"cannot {doing} s3://{BUCKET}/{key}: {where} is full or over its quota {FULL}"


# -- the store --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("small_s3", ["4m"], indirect=True)
def test_a_single_put_that_does_not_fit_raises_storage_full_and_leaves_nothing(small_s3: SmallS3) -> None:
    # Smaller than a part, so sent with one PUT at commit; larger than the 4 MiB disk.
    store = small_s3.store()
    with pytest.raises(StorageFull) as full:
        _upload(store, KEY, 4 * MiB + MiB // 2)
    assert str(full.value) == _message(small_s3, "upload", KEY)
    assert len(small_s3.refusals()) == 1  # refused once, not retried
    _assert_nothing_left(small_s3, store, KEY)


def test_a_part_that_does_not_fit_raises_storage_full_and_leaves_no_upload(small_s3: SmallS3) -> None:
    # The first 5 MiB part is staged on the 8 MiB disk; the second finds 3 MiB left.
    store = small_s3.store("backups")
    with pytest.raises(StorageFull) as full:
        _upload(store, KEY, 16 * MiB)
    assert str(full.value) == _message(small_s3, "upload", f"backups/{KEY}")
    # The one refused part, and nothing sent after it: the parts that followed were dropped unsent.
    (refused,) = small_s3.refusals()
    assert "partNumber=2" in refused, refused
    _assert_nothing_left(small_s3, store, KEY)


def test_a_complete_that_does_not_fit_raises_storage_full_and_leaves_no_upload(small_s3: SmallS3) -> None:
    # 6 MiB of parts fit on the 8 MiB disk; completing copies them into one new file, which does not.
    store = small_s3.store()

    def part_staged() -> None:
        staged = wait_for(
            "the first part to be staged",
            lambda: [f for f in small_s3.files() if f.startswith(f"{BUCKET}/.sgwtmp/multipart/")],
        )
        assert [Path(f).name for f in staged] == ["1"], staged
        assert small_s3.used_bytes() == 5 * MiB
        assert small_s3.keys() == []

    with pytest.raises(StorageFull) as full:
        _upload(store, KEY, 6 * MiB, before_commit=part_staged)
    assert str(full.value) == _message(small_s3, "complete the upload of", KEY)
    (refused,) = small_s3.refusals()
    assert "| POST |" in refused, refused
    _assert_nothing_left(small_s3, store, KEY)


def test_the_probe_of_a_full_bucket_raises_storage_full_and_leaves_nothing(small_s3: SmallS3) -> None:
    filler = small_s3.data / "filler"  # outside the bucket: the disk is full, whoever filled it
    with filler.open("wb") as out, pytest.raises(OSError) as no_space:
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    assert no_space.value.errno == errno.ENOSPC
    store = small_s3.store()
    with pytest.raises(StorageFull) as full:
        store.check_writable()
    probe = re.fullmatch(
        rf"cannot upload s3://{BUCKET}/(\.idm-backup-probe-[0-9a-f]{{32}}): .*", str(full.value)
    )
    assert probe is not None, full.value
    assert str(full.value) == _message(small_s3, "upload", probe[1])
    assert small_s3.files() == ["filler"]


def test_other_servers_codes_for_no_room_are_storage_full_and_other_refusals_are_not() -> None:
    # MinIO, Ceph RGW and an exhausted versitygw quota (EDQUOT: no quota-capable file system here, see
    # test_pvc_full) cannot be produced on this machine: their answers, as their sources define them.
    config = S3Config(bucket="b", endpoint_url="https://s3.example.test")

    def translated(code: str, status: int, message: str = "m") -> StorageError:
        body: Any = {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        return s3_module._translate(ClientError(body, "PutObject"), config, "upload", "s3://b/k")

    for code, status in [
        ("QuotaExceeded", 403),
        ("XMinioStorageFull", 507),
        ("XMinioAdminBucketQuotaExceeded", 400),
        ("507", 507),  # a bare 507, no error document
    ]:
        error = translated(code, status)
        assert isinstance(error, StorageFull), code
        where = "bucket 'b' at https://s3.example.test"
        assert str(error) == f"cannot upload s3://b/k: {where} is full or over its quota ({code}: m)"
    for code, status in [("AccessDenied", 403), ("EntityTooLarge", 400), ("InternalError", 500)]:
        assert type(translated(code, status)) is StorageError, code


# -- through the operator ---------------------------------------------------------------------------------


def test_an_s3_backup_that_does_not_fit_fails_storage_full_leaves_nothing_and_the_next_backup_succeeds(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Backup,
    small_s3: SmallS3,
) -> None:
    # The namespace's S3 Secret holds the platform's keys, which the test's server was given too.
    assert (platform.s3_access_key, platform.s3_secret_key) == (stack.S3_ACCESS_KEY, stack.S3_SECRET_KEY)
    # 8 MiB of incompressible payload: the probe and the header fit, the archive's second part does not.
    pod = freeipa(payload_bytes=8 * MiB)
    storage = s3_storage(platform, "full")
    storage["s3"].update(bucket=BUCKET, endpoint=small_s3.endpoint)
    spec = backup_spec(platform, storage, type="Full")
    status = run_backup("full", spec)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "StorageFull"), status
    dirname = status["ipaBackup"]["directory"].rsplit("/", 1)[1]
    key = f"full/{namespace}/{HOST}/{dirname}/ipa-full.tar.gpg"
    assert status["message"] == f"upload failed: {_message(small_s3, 'upload', key)}"
    assert "archive" not in status
    (refused,) = small_s3.refusals()
    assert "partNumber=2" in refused, refused
    # Not the archive, not the header written before it, no part, no probe: an empty, free disk.
    assert small_s3.keys() == []
    assert small_s3.uploads() == []
    assert small_s3.files() == []
    assert small_s3.directories() <= STAGING
    assert small_s3.used_bytes() == 0
    # An offline backup: ipa-backup stopped IPA, and it runs again.
    running = next(c for c in status["conditions"] if c["type"] == "ServicesRunning")
    assert running["status"] == "True", running
    assert services_running(api, namespace, pod)
    assert backup_dirs(api, namespace, pod) == []
    wait_for("the Lease to be released", lambda: leases(api, namespace) == [], timeout=30)
    assert events(api, namespace, "full")[-1] == "BackupFailed"
    log = operator.output()
    assert "Traceback" not in log, log[-3000:]

    # The administrator grows the disk: the next backup of the same server fits, and is all there is.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_s3.data)], check=True)
    status = run_backup("after", spec)["status"]
    assert status["phase"] == "Succeeded", status
    dirname = status["ipaBackup"]["directory"].rsplit("/", 1)[1]
    stored = f"full/{namespace}/{HOST}/{dirname}"
    assert small_s3.keys() == [f"{stored}/header", f"{stored}/ipa-full.tar.gpg", f"{stored}/manifest.json"]
    assert small_s3.uploads() == []
    assert services_running(api, namespace, pod)
    wait_for("the Lease to be released", lambda: leases(api, namespace) == [], timeout=30)
