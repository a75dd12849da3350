"""Both stores against real things: a directory, and an S3 server on loopback.

The S3 tests run against the platform's versitygw, a real S3 implementation with real authentication.
Set IDM_TEST_S3_ENDPOINT, IDM_TEST_S3_ACCESS_KEY, IDM_TEST_S3_SECRET_KEY and IDM_TEST_S3_BUCKET to run them
against another server (MinIO, Ceph RGW, ...) instead. moto, in a subprocess, is kept for the one thing
versitygw cannot show: server-side encryption, whose header versitygw accepts but neither applies nor
reports. What the network can do to the S3 store is in test_storage_faults.py.
"""

import dataclasses
import datetime
import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from idm_backup_operator.storage import (
    DeadlineExceeded,
    ObjectExists,
    ObjectNotFound,
    PVCStore,
    S3Config,
    S3Store,
    StorageError,
    Store,
    claim_mount,
)
from idm_backup_operator.storage import pvc as pvc_module
from testbed import stack
from tests.helpers import wait_for

MiB = 1024 * 1024
SOON = datetime.timedelta(minutes=1)


def _random_chunks(total: int, size: int = MiB) -> Iterator[bytes]:
    for offset in range(0, total, size):
        yield os.urandom(min(size, total - offset))


def _write_all(store: Store, key: str, total: int) -> tuple[str, int]:
    with store.open_upload(key) as upload:
        for chunk in _random_chunks(total):
            upload.write(chunk)
        stored = upload.commit()
    assert stored.sha256 is not None
    return stored.sha256, stored.size


def _read_sha256(store: Store, key: str) -> str:
    digest = hashlib.sha256()
    with store.open_read(key) as reader:
        while chunk := reader.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


# --- S3 ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str
    bucket: str
    moto: bool

    def config(self, **overrides: Any) -> S3Config:
        config = S3Config(
            bucket=self.bucket,
            endpoint_url=self.url,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            force_path_style=True,
            part_size=5 * MiB,
            max_attempts=2,
            connect_timeout=2,
        )
        return dataclasses.replace(config, **overrides)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_endpoint(request: pytest.FixtureRequest) -> S3Endpoint:
    names = ["IDM_TEST_S3_ENDPOINT", "IDM_TEST_S3_ACCESS_KEY", "IDM_TEST_S3_SECRET_KEY", "IDM_TEST_S3_BUCKET"]
    if any(name in os.environ for name in names):
        url, access_key, secret_key, bucket = (os.environ[name] for name in names)
        return S3Endpoint(url, access_key, secret_key, bucket, moto=False)
    platform: stack.Platform = request.getfixturevalue("platform")
    return S3Endpoint(
        platform.s3_endpoint, platform.s3_access_key, platform.s3_secret_key, platform.s3_bucket, moto=False
    )


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[S3Endpoint]:
    port = _free_port()
    # After these first unauthenticated requests (create the user, its policy, its key), moto checks
    # every request's signature against its IAM users, as a real S3 server does.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="backup")
        allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [allow]}
        iam.put_user_policy(UserName="backup", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="backup")["AccessKey"]
        endpoint = S3Endpoint(url, key["AccessKeyId"], key["SecretAccessKey"], "idm-backups", moto=True)
        S3Store(endpoint.config()).client.create_bucket(Bucket=endpoint.bucket)
        yield endpoint
    finally:
        server.terminate()
        server.wait()


@pytest.fixture
def s3(s3_endpoint: S3Endpoint) -> Iterator[S3Store]:
    """A store under a prefix of its own, emptied afterwards (a shared real bucket stays clean)."""
    store = S3Store(s3_endpoint.config(prefix=f"test-{uuid.uuid4().hex[:12]}/"))
    yield store
    store.set_deadline(None)
    store.clean_incomplete(started_before=datetime.datetime.now(datetime.UTC) + SOON)
    for stored in store.list_objects():
        store.delete(stored.key)


def _multipart_uploads(store: S3Store) -> list[str]:
    uploads = store.client.list_multipart_uploads(Bucket=store.config.bucket, Prefix=store.config.prefix)
    return [upload["Key"] for upload in uploads.get("Uploads", [])]


def _parts(store: S3Store, key: str) -> int:
    """Parts the server holds of the multipart uploads of `key`."""
    full = f"{store.config.prefix.strip('/')}/{key}"
    uploads = store.client.list_multipart_uploads(Bucket=store.config.bucket, Prefix=full).get("Uploads", [])
    return sum(
        len(
            store.client.list_parts(Bucket=store.config.bucket, Key=full, UploadId=u["UploadId"]).get(
                "Parts", []
            )
        )
        for u in uploads
        if u["Key"] == full
    )


@pytest.mark.platform
def test_s3_multipart_round_trip(s3: S3Store) -> None:
    key = "default/ipa.example.test/ipa-full-2026-11-26-03-00-00/ipa-full.tar.gpg"
    sha256, size = _write_all(s3, key, 40 * MiB + 4321)
    assert size == 40 * MiB + 4321
    assert _read_sha256(s3, key) == sha256
    head = s3.client.head_object(Bucket=s3.config.bucket, Key=f"{s3.config.prefix}{key}")
    assert head["ETag"].strip('"').endswith("-9")  # 8 parts of 5 MiB and the rest
    stat = s3.stat(key)
    assert stat is not None and stat.size == size
    assert s3.uri(key) == f"s3://{s3.config.bucket}/{s3.config.prefix}{key}"
    assert _multipart_uploads(s3) == []


@pytest.mark.platform
def test_s3_small_object_is_a_single_put(s3: S3Store) -> None:
    stored = s3.put_bytes("a/header", b"[ipa]\ntype = FULL\n")
    assert stored.size == 18 and stored.sha256 == hashlib.sha256(b"[ipa]\ntype = FULL\n").hexdigest()
    with s3.open_read("a/header") as reader:
        assert reader.read() == b"[ipa]\ntype = FULL\n"
    etag = s3.client.head_object(Bucket=s3.config.bucket, Key=f"{s3.config.prefix}a/header")["ETag"]
    assert "-" not in etag


@pytest.mark.platform
def test_s3_empty_object(s3: S3Store) -> None:
    assert s3.put_bytes("empty", b"").size == 0
    assert s3.stat("empty") is not None


@pytest.mark.platform
def test_s3_abort_leaves_no_object_and_no_upload(s3: S3Store) -> None:
    upload = s3.open_upload("aborted.tar.gpg")
    for chunk in _random_chunks(12 * MiB):
        upload.write(chunk)
    assert len(_multipart_uploads(s3)) == 1
    upload.abort()
    upload.abort()
    assert s3.stat("aborted.tar.gpg") is None
    assert _multipart_uploads(s3) == []


@pytest.mark.platform
def test_s3_exception_inside_the_block_aborts(s3: S3Store) -> None:
    with pytest.raises(RuntimeError, match="pod stream broke"), s3.open_upload("broken.tar.gpg") as upload:
        for chunk in _random_chunks(11 * MiB):
            upload.write(chunk)
        raise RuntimeError("pod stream broke")
    assert s3.stat("broken.tar.gpg") is None
    assert _multipart_uploads(s3) == []


@pytest.mark.platform
def test_s3_leaving_the_block_without_commit_aborts(s3: S3Store) -> None:
    with s3.open_upload("uncommitted") as upload:
        upload.write(b"x" * 6 * MiB)
    assert s3.stat("uncommitted") is None
    assert _multipart_uploads(s3) == []
    with pytest.raises(StorageError, match="already finished"):
        upload.write(b"more")


@pytest.mark.platform
def test_s3_clean_incomplete_aborts_crashed_uploads(s3: S3Store) -> None:
    crashed = s3.open_upload("crashed/ipa-full.tar.gpg")
    crashed.write(os.urandom(6 * MiB))  # a part is sent: a multipart upload exists; then the operator "dies"
    # Once the part is in: a part still in flight when the upload is aborted lands after the abort, and
    # versitygw then lists the upload again.
    wait_for("the crashed upload's part", lambda: _parts(s3, "crashed/ipa-full.tar.gpg") == 1, timeout=30)
    s3.open_upload("other/small").write(b"nothing sent yet")
    now = datetime.datetime.now(datetime.UTC)
    assert s3.clean_incomplete("other/", started_before=now + SOON) == []
    assert s3.clean_incomplete("crashed/", started_before=now + SOON) == ["crashed/ipa-full.tar.gpg"]
    assert _multipart_uploads(s3) == []


@pytest.mark.platform
def test_s3_clean_incomplete_spares_recent_uploads(s3: S3Store) -> None:
    upload = s3.open_upload("running/ipa-full.tar.gpg")
    try:
        upload.write(os.urandom(6 * MiB))  # a full part: the multipart upload exists now
        an_hour_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        assert s3.clean_incomplete(started_before=an_hour_ago) == []
        assert len(_multipart_uploads(s3)) == 1
    finally:
        upload.abort()
    assert _multipart_uploads(s3) == []


@pytest.mark.platform
def test_s3_list_stat_delete(s3: S3Store) -> None:
    for key in ["ns/a/1", "ns/a/2", "ns/ab/3", "other/4"]:
        s3.put_bytes(key, key.encode())
    assert sorted(o.key for o in s3.list_objects("ns/a/")) == ["ns/a/1", "ns/a/2"]
    assert sorted(o.key for o in s3.list_objects("ns/a")) == ["ns/a/1", "ns/a/2", "ns/ab/3"]
    assert len(list(s3.list_objects())) == 4
    listed = next(iter(s3.list_objects("other/")))
    assert listed.size == 7 and listed.modified is not None and listed.uri == s3.uri("other/4")
    s3.delete("ns/a/1")
    s3.delete("ns/a/1")
    assert s3.stat("ns/a/1") is None
    with pytest.raises(ObjectNotFound, match="ns/a/1 does not exist"):
        s3.open_read("ns/a/1")


@pytest.mark.platform
def test_s3_check_writable_leaves_nothing(s3: S3Store) -> None:
    s3.check_writable()
    assert list(s3.list_objects()) == []


def _read(store: Store, key: str) -> bytes:
    with store.open_read(key) as reader:
        return reader.read()


@pytest.mark.platform
def test_s3_never_replaces_an_object(s3: S3Store) -> None:
    s3.put_bytes("ns/host/b1/header", b"the first backup's header")
    uri = s3.uri("ns/host/b1/header")
    with pytest.raises(ObjectExists, match=f"^{uri} already exists: a stored object is never replaced$"):
        s3.put_bytes("ns/host/b1/header", b"a hostile pod's header")
    # Refused before anything is streamed, not after a whole archive.
    with pytest.raises(ObjectExists, match="already exists"):
        s3.open_upload("ns/host/b1/header")
    assert _read(s3, "ns/host/b1/header") == b"the first backup's header"


@pytest.mark.platform
@pytest.mark.parametrize("size", [1000, 12 * MiB], ids=["single-put", "multipart"])
def test_s3_conditional_write_refuses_a_key_taken_meanwhile(s3: S3Store, size: int) -> None:
    # Both uploads pass the check at open; only S3's If-None-Match on the final request can tell them
    # apart. The second must not replace the first, and must leave no multipart upload behind.
    first, second = os.urandom(size), os.urandom(size)
    with s3.open_upload("ns/host/b1/archive") as late, s3.open_upload("ns/host/b1/archive") as early:
        early.write(first)
        early.commit()
        late.write(second)
        with pytest.raises(ObjectExists, match=r"ns/host/b1/archive already exists"):
            late.commit()
    assert hashlib.sha256(_read(s3, "ns/host/b1/archive")).digest() == hashlib.sha256(first).digest()
    assert _multipart_uploads(s3) == []


@pytest.mark.platform
def test_s3_calls_after_the_deadline_are_refused_but_deletes_still_work(s3: S3Store) -> None:
    s3.put_bytes("ns/host/b1/header", b"written in time")
    s3.set_deadline(time.monotonic() - 1)
    for refused in (
        s3.check_writable,
        lambda: s3.put_bytes("ns/host/b1/manifest", b"{}"),
        lambda: s3.stat("ns/host/b1/header"),
        lambda: list(s3.list_objects()),
    ):
        with pytest.raises(DeadlineExceeded, match="did not finish before the backup's deadline"):
            refused()
    # What undoes a failed backup's writes has a bound of its own.
    s3.delete("ns/host/b1/header")
    s3.set_deadline(None)
    assert s3.stat("ns/host/b1/header") is None


@pytest.mark.platform
def test_s3_deadline_passing_mid_upload_aborts_it(s3: S3Store) -> None:
    s3.set_deadline(time.monotonic() + 60)
    with (
        pytest.raises(DeadlineExceeded, match="did not finish before the backup's deadline"),
        s3.open_upload("ns/host/b1/archive") as upload,
    ):
        upload.write(os.urandom(6 * MiB))  # a part is sent: the multipart upload exists
        assert len(_multipart_uploads(s3)) == 1
        s3.set_deadline(time.monotonic())
        upload.write(os.urandom(6 * MiB))
        upload.commit()
    s3.set_deadline(None)
    assert s3.stat("ns/host/b1/archive") is None
    assert _multipart_uploads(s3) == []


@pytest.mark.platform
def test_s3_missing_bucket(s3_endpoint: S3Endpoint) -> None:
    store = S3Store(s3_endpoint.config(bucket="idm-no-such-bucket"))
    with pytest.raises(StorageError, match="bucket 'idm-no-such-bucket' does not exist at http://127"):
        store.check_writable()


@pytest.mark.platform
def test_s3_unknown_access_key(s3_endpoint: S3Endpoint) -> None:
    store = S3Store(s3_endpoint.config(access_key_id="AKIDONOTEXIST0000000"))
    with pytest.raises(StorageError, match="does not know the access key ID"):
        store.check_writable()


@pytest.mark.platform
def test_s3_wrong_secret_key(s3_endpoint: S3Endpoint) -> None:
    store = S3Store(s3_endpoint.config(secret_access_key="wrong"))
    with pytest.raises(StorageError, match="the secret access key is wrong"):
        store.check_writable()


@pytest.mark.platform
def test_s3_unreachable_endpoint(s3_endpoint: S3Endpoint) -> None:
    store = S3Store(s3_endpoint.config(endpoint_url=f"http://127.0.0.1:{_free_port()}", max_attempts=1))
    with pytest.raises(StorageError, match=r"http://127\.0\.0\.1:\d+ is unreachable"):
        store.check_writable()


def test_s3_server_side_encryption(moto_endpoint: S3Endpoint) -> None:
    # moto: versitygw accepts the header but neither encrypts nor reports it.
    store = S3Store(
        moto_endpoint.config(prefix=f"sse-{uuid.uuid4().hex[:8]}/", server_side_encryption="AES256")
    )
    store.put_bytes("sse/small", b"x")
    _write_all(store, "sse/large", 6 * MiB)
    for key in ("sse/small", "sse/large"):
        head = store.client.head_object(Bucket=store.config.bucket, Key=f"{store.config.prefix}{key}")
        assert head["ServerSideEncryption"] == "AES256"


def test_s3_config_is_validated() -> None:
    endpoint = S3Endpoint("http://127.0.0.1:9", "access", "secret", "bucket", moto=False)
    with pytest.raises(StorageError, match="at least 5 MiB"):
        endpoint.config(part_size=MiB)
    with pytest.raises(StorageError, match="needs server-side encryption 'aws:kms'"):
        endpoint.config(server_side_encryption="AES256", kms_key_id="key")
    with pytest.raises(StorageError, match="invalid prefix"):
        endpoint.config(prefix="../elsewhere")
    with pytest.raises(StorageError, match="timeouts must be positive"):
        endpoint.config(cleanup_timeout=0)


@pytest.mark.platform
@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "", "a/"])
def test_s3_invalid_keys(s3: S3Store, key: str) -> None:
    with pytest.raises(StorageError, match="invalid object key"):
        s3.open_upload(key)


# --- PVC --------------------------------------------------------------------------------------------


@pytest.fixture
def pvc(tmp_path: Path) -> PVCStore:
    (tmp_path / "mnt").mkdir()
    return PVCStore(tmp_path / "mnt", "backups/idm")


def test_pvc_round_trip(pvc: PVCStore, tmp_path: Path) -> None:
    key = "default/ipa.example.test/ipa-full-2026-11-26-03-00-00/ipa-full.tar.gpg"
    sha256, size = _write_all(pvc, key, 3 * MiB + 17)
    path = tmp_path / "mnt/backups/idm" / key
    assert pvc.uri(key) == str(path)
    assert path.stat().st_size == size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256 == _read_sha256(pvc, key)
    assert [p.name for p in path.parent.iterdir()] == ["ipa-full.tar.gpg"]


def test_pvc_final_name_appears_only_at_commit_and_durably(
    pvc: PVCStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    final = tmp_path / "mnt/backups/idm/b1/archive"
    with pvc.open_upload("b1/archive") as upload:
        upload.write(b"first half, ")
        (partial,) = final.parent.iterdir()
        assert partial.name.startswith(".archive.partial-")
        assert not final.exists()
        upload.write(b"second half")
        upload.commit()
    assert final.read_bytes() == b"first half, second half"
    assert not partial.exists()
    # The data before the rename, the directory entry after it, and each directory created on the way.
    assert synced[-2:] == [str(partial), str(final.parent)]
    assert str(tmp_path / "mnt") in synced


def test_pvc_abort_and_exception_remove_the_temporary_file(pvc: PVCStore, tmp_path: Path) -> None:
    upload = pvc.open_upload("b/aborted")
    upload.write(b"data")
    upload.abort()
    with pytest.raises(RuntimeError), pvc.open_upload("b/broken") as broken:
        broken.write(b"data")
        raise RuntimeError
    with pvc.open_upload("b/uncommitted") as uncommitted:
        uncommitted.write(b"data")
    assert list((tmp_path / "mnt/backups/idm/b").iterdir()) == []


def test_pvc_crash_leftovers_are_cleaned(pvc: PVCStore, tmp_path: Path) -> None:
    pvc.put_bytes("b/header", b"[ipa]\n")
    crashed = pvc.open_upload("b/ipa-full.tar.gpg")
    crashed.write(b"half an archive")  # and the operator "dies" before commit or abort
    now = datetime.datetime.now(datetime.UTC)
    assert [o.key for o in pvc.list_objects()] == ["b/header"]
    assert pvc.clean_incomplete(started_before=now - datetime.timedelta(hours=1)) == []
    assert pvc.clean_incomplete("other/", started_before=now + SOON) == []
    (removed,) = pvc.clean_incomplete("b/", started_before=now + SOON)
    assert removed.startswith("b/.ipa-full.tar.gpg.partial-")
    assert [p.name for p in (tmp_path / "mnt/backups/idm/b").iterdir()] == ["header"]


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "a//b", "a/./b", "", "a/", "a\\b"])
def test_pvc_refuses_keys_that_escape(pvc: PVCStore, key: str) -> None:
    with pytest.raises(StorageError, match="invalid object key"):
        pvc.open_upload(key)
    with pytest.raises(StorageError, match="invalid object key"):
        pvc.stat(key)


def test_pvc_refuses_sub_paths_that_escape(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"invalid prefix '\.\./up'"):
        PVCStore(tmp_path, "../up")


def test_pvc_refuses_reserved_names(pvc: PVCStore) -> None:
    with pytest.raises(StorageError, match="reserved for temporary files"):
        pvc.open_upload("b/.archive.partial-abc123")


def test_pvc_list_stat_delete(pvc: PVCStore, tmp_path: Path) -> None:
    for key in ["ns/a/1", "ns/a/2", "ns/ab/3", "other/4"]:
        pvc.put_bytes(key, key.encode())
    assert sorted(o.key for o in pvc.list_objects("ns/a/")) == ["ns/a/1", "ns/a/2"]
    assert sorted(o.key for o in pvc.list_objects("ns/a")) == ["ns/a/1", "ns/a/2", "ns/ab/3"]
    assert len(list(pvc.list_objects())) == 4
    assert list(pvc.list_objects("nothing/here")) == []
    stat = pvc.stat("other/4")
    assert stat is not None and stat.size == 7 and stat.modified is not None
    assert pvc.stat("ns/a") is None  # a directory is not an object
    pvc.delete("ns/a/1")
    pvc.delete("ns/a/2")
    pvc.delete("ns/a/2")
    assert pvc.stat("ns/a/1") is None
    assert not (tmp_path / "mnt/backups/idm/ns/a").exists()  # emptied backup directories go too
    assert (tmp_path / "mnt/backups/idm").is_dir()
    with pytest.raises(ObjectNotFound, match="ns/a/1 does not exist"):
        pvc.open_read("ns/a/1")


def test_pvc_check_writable(pvc: PVCStore, tmp_path: Path) -> None:
    pvc.check_writable()
    assert [p.name for p in (tmp_path / "mnt/backups/idm").iterdir()] == []


def test_pvc_missing_mount_is_not_created(tmp_path: Path) -> None:
    store = PVCStore(tmp_path / "not-mounted", "sub")
    with pytest.raises(StorageError, match="not-mounted does not exist or is not a directory: is the volume"):
        store.check_writable()
    with pytest.raises(StorageError, match="is the volume mounted"):
        store.put_bytes("x", b"")
    assert not (tmp_path / "not-mounted").exists()


def test_pvc_unwritable_directory(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt/file").write_text("not a directory")
    store = PVCStore(tmp_path / "mnt", "file/sub")
    with pytest.raises(StorageError, match=r"cannot write to .*/mnt/file/sub: "):
        store.check_writable()


def test_pvc_never_replaces_an_object(pvc: PVCStore, tmp_path: Path) -> None:
    pvc.put_bytes("ns/host/b1/header", b"the first backup's header")
    path = tmp_path / "mnt/backups/idm/ns/host/b1/header"
    with pytest.raises(ObjectExists, match=f"^{path} already exists: a stored object is never replaced$"):
        pvc.put_bytes("ns/host/b1/header", b"a hostile pod's header")
    assert path.read_bytes() == b"the first backup's header"
    assert [p.name for p in path.parent.iterdir()] == ["header"]


def test_pvc_link_refuses_a_key_taken_meanwhile(pvc: PVCStore, tmp_path: Path) -> None:
    # Both pass the check at open; only the final link() can tell them apart (a rename would replace).
    with pvc.open_upload("b1/archive") as late, pvc.open_upload("b1/archive") as early:
        early.write(b"first")
        early.commit()
        late.write(b"second")
        with pytest.raises(ObjectExists, match="b1/archive already exists"):
            late.commit()
    directory = tmp_path / "mnt/backups/idm/b1"
    assert (directory / "archive").read_bytes() == b"first"
    assert [p.name for p in directory.iterdir()] == ["archive"]


@pytest.mark.parametrize("missing", ["link", "link-and-renameat2"])
def test_pvc_never_replaces_without_hard_links(
    pvc: PVCStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    """Volumes without hard links (some FUSE and SMB ones) fall back to renameat2(RENAME_NOREPLACE),
    then to a check and a rename."""

    def no_link(source: Any, target: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    if missing == "link-and-renameat2":
        renamed: list[str] = []
        rename = os.rename

        def no_renameat2(source: Path, target: Path) -> None:
            raise OSError(errno.EINVAL, "Invalid argument")

        def spy(source: Any, target: Any) -> None:
            renamed.append(str(target))
            rename(source, target)

        monkeypatch.setattr(pvc_module, "_rename_noreplace", no_renameat2)
        monkeypatch.setattr(os, "rename", spy)
    with pvc.open_upload("b1/header") as late:
        pvc.put_bytes("b1/header", b"first")
        late.write(b"second")
        with pytest.raises(ObjectExists, match="b1/header already exists"):
            late.commit()
    directory = tmp_path / "mnt/backups/idm/b1"
    assert (directory / "header").read_bytes() == b"first"
    assert [p.name for p in directory.iterdir()] == ["header"]
    if missing == "link-and-renameat2":
        assert renamed == [str(directory / "header")]


def test_pvc_writes_stop_at_the_deadline_but_deletes_do_not(pvc: PVCStore, tmp_path: Path) -> None:
    pvc.put_bytes("b1/header", b"written in time")
    pvc.set_deadline(time.monotonic() + 60)
    with pvc.open_upload("b1/archive") as upload:
        upload.write(b"in time")
        pvc.set_deadline(time.monotonic())
        with pytest.raises(DeadlineExceeded, match="did not finish before the backup's deadline"):
            upload.write(b"too late")
        with pytest.raises(DeadlineExceeded):
            upload.commit()
    for refused in (pvc.check_writable, lambda: pvc.put_bytes("b1/manifest", b"{}")):
        with pytest.raises(DeadlineExceeded):
            refused()
    pvc.delete("b1/header")
    assert not (tmp_path / "mnt/backups/idm/b1").exists()


@pytest.mark.parametrize(
    "name", ["..", ".", "", "a/b", "../etc", "backups/..", "a..b", "-a", "a-", "Backups", "a\\b", "a" * 254]
)
def test_claim_mount_refuses_what_is_not_a_claim_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(StorageError, match="invalid claim name"):
        claim_mount(tmp_path, name)
    with pytest.raises(StorageError, match="invalid claim name"):
        PVCStore.for_claim(tmp_path, name)


def test_claim_mount(tmp_path: Path) -> None:
    assert claim_mount(tmp_path, "backups") == tmp_path / "backups"
    assert claim_mount(tmp_path, "idm.backups-2") == tmp_path / "idm.backups-2"
    store = PVCStore.for_claim(tmp_path, "backups", "prod")
    assert store.uri("a/b") == str(tmp_path / "backups/prod/a/b")
    # The operator's own mount points may be links (the platform tests link a claim's volume there): the
    # mount is where its files go, and the store keeps every key inside it.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root/linked").symlink_to(tmp_path / "elsewhere")
    linked = PVCStore.for_claim(tmp_path / "root", "linked")
    linked.put_bytes("a/b", b"data")
    assert (tmp_path / "elsewhere/a/b").read_bytes() == b"data"


def test_pvc_refuses_links_out_of_the_volume(tmp_path: Path) -> None:
    """A symbolic link planted on a shared volume must not lead the operator outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("the operator's own file")
    mount = tmp_path / "mnt"
    (mount / "backups").mkdir(parents=True)
    (mount / "backups/ns").symlink_to(outside)  # a directory on the way to a key
    (mount / "backups/leak").symlink_to(outside / "secret")  # a key itself
    (mount / "escape").symlink_to(outside)  # a sub-path
    store = PVCStore(mount, "backups")
    out = "outside the volume mounted at"
    with pytest.raises(StorageError, match=out):
        store.put_bytes("ns/host/b1/header", b"data")
    with pytest.raises(StorageError, match=out):
        store.open_read("leak")
    with pytest.raises(StorageError, match=out):
        store.stat("leak")
    with pytest.raises(StorageError, match=out):
        store.delete("ns/secret")
    with pytest.raises(StorageError, match=out):
        list(store.list_objects("ns/"))
    assert [o.key for o in store.list_objects()] == []  # neither link is an object
    with pytest.raises(StorageError, match=out):
        PVCStore(mount, "escape/sub").check_writable()
    with pytest.raises(StorageError, match=out):
        PVCStore(mount, "escape").put_bytes("x", b"data")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "the operator's own file"
