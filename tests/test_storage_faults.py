"""S3Store against a misbehaving network: the platform's versitygw behind testbed.faultproxy.

Each fault is one that has held, or could hold, a backup past its deadline or leave something behind: a
server that stops reading or answering, one that trickles a byte a second (no per-read timeout ever
fires), connections reset mid-part, a byte flipped on the way. Whatever happens, the store must fail with
a StorageError within its deadline and a few seconds, leave no object under the final key, and leave no
multipart upload behind.
"""

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from idm_backup_operator.storage import DeadlineExceeded, S3Config, S3Store, StorageError
from testbed import stack
from testbed.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.platform

MiB = 1024 * 1024
KEY = "ns/ipa.example.test/ipa-full-2026-11-26-03-00-00/ipa-full.tar.gpg"
# How late a failure may come after the deadline: the timer's own latency, the writer's polling interval,
# and the abort of the multipart upload, all on loopback.
SLACK = 3.0


@pytest.fixture
def prefix() -> str:
    return f"test/faults-{uuid.uuid4().hex[:10]}/"


def _config(platform: stack.Platform, prefix: str, endpoint: str, **overrides: Any) -> S3Config:
    settings: dict[str, Any] = {
        "bucket": platform.s3_bucket,
        "prefix": prefix,
        "endpoint_url": endpoint,
        "access_key_id": platform.s3_access_key,
        "secret_access_key": platform.s3_secret_key,
        "force_path_style": True,
        "part_size": 5 * MiB,
        "connect_timeout": 2,
        "max_attempts": 3,
        **overrides,
    }
    return S3Config(**settings)


@pytest.fixture
def direct(platform: stack.Platform, prefix: str) -> Iterator[S3Store]:
    """The same prefix without the proxy: to see what the server really holds, and to clean up."""
    store = S3Store(_config(platform, prefix, platform.s3_endpoint))
    yield store
    uploads = store.client.list_multipart_uploads(Bucket=store.config.bucket, Prefix=prefix)
    for upload in uploads.get("Uploads", []):
        store.client.abort_multipart_upload(
            Bucket=store.config.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
        )
    for stored in store.list_objects():
        store.delete(stored.key)


def _through(proxy: FaultProxy, platform: stack.Platform, prefix: str, **overrides: Any) -> S3Store:
    return S3Store(_config(platform, prefix, proxy.url, **overrides))


def _upload(store: S3Store, key: str, total: int) -> None:
    with store.open_upload(key) as upload:
        for offset in range(0, total, MiB):
            upload.write(os.urandom(min(MiB, total - offset)))
        upload.commit()


def _assert_nothing_left(direct: S3Store, key: str) -> None:
    assert direct.stat(key) is None
    uploads = direct.client.list_multipart_uploads(Bucket=direct.config.bucket, Prefix=direct.config.prefix)
    assert uploads.get("Uploads", []) == []


def _fails_at_deadline(store: S3Store, seconds: float, action: Any) -> float:
    """Run action under a deadline `seconds` away; it must fail with DeadlineExceeded close to it."""
    start = time.monotonic()
    store.set_deadline(start + seconds)
    with pytest.raises(DeadlineExceeded, match="did not finish before the backup's deadline"):
        action()
    elapsed = time.monotonic() - start
    assert seconds - 0.5 <= elapsed <= seconds + SLACK, f"failed after {elapsed:.1f}s, deadline {seconds}s"
    return elapsed


def test_proxy_passes_a_multipart_round_trip(platform: stack.Platform, prefix: str, direct: S3Store) -> None:
    data = os.urandom(12 * MiB)
    with FaultProxy(platform.s3_endpoint) as proxy:
        store = _through(proxy, platform, prefix)
        with store.open_upload(KEY) as upload:
            upload.write(data)
            upload.commit()
        assert proxy.accepted >= 1
    with direct.open_read(KEY) as reader:
        assert hashlib.sha256(reader.read()).digest() == hashlib.sha256(data).digest()


def test_stalled_part_upload_ends_at_the_deadline(
    platform: stack.Platform, prefix: str, direct: S3Store
) -> None:
    # The server stops reading 1 MiB into a part: the client blocks in send(), where botocore's
    # read_timeout (60 s here, per send) is all that would end it, once per retry. Every connection that
    # carries a part stalls (which one botocore uses, or retries on, is its own choice); the small
    # requests (create, abort) stay under 1 MiB and pass. 5 s: versitygw itself drops a part whose body
    # stops coming after about 9 s, which would end the call before a longer deadline could.
    with FaultProxy(platform.s3_endpoint, Fault("stall", after=MiB)) as proxy:
        store = _through(proxy, platform, prefix)
        _fails_at_deadline(store, 5, lambda: _upload(store, KEY, 12 * MiB))
        assert proxy.faulted >= 1
    _assert_nothing_left(direct, KEY)


def test_unanswered_part_upload_ends_at_the_deadline(
    platform: stack.Platform, prefix: str, direct: S3Store
) -> None:
    # The part arrives whole, and the answer never comes.
    fault = Fault("stall", after=MiB, direction="down", connections=1)
    with FaultProxy(platform.s3_endpoint, fault) as proxy:
        store = _through(proxy, platform, prefix)
        _fails_at_deadline(store, 5, lambda: _upload(store, KEY, 12 * MiB))
        assert proxy.faulted == 1
    _assert_nothing_left(direct, KEY)


def test_trickled_answer_ends_at_the_deadline(platform: stack.Platform, prefix: str, direct: S3Store) -> None:
    # A byte a second: every read returns within read_timeout, so botocore alone would wait for all of it.
    fault = Fault("trickle", after=MiB, direction="down", connections=1)
    with FaultProxy(platform.s3_endpoint, fault) as proxy:
        store = _through(proxy, platform, prefix)
        _fails_at_deadline(store, 5, lambda: _upload(store, KEY, 12 * MiB))
        assert proxy.faulted == 1
    _assert_nothing_left(direct, KEY)


def test_trickled_part_ends_at_the_deadline(platform: stack.Platform, prefix: str, direct: S3Store) -> None:
    # Every connection that carries a part trickles: a part retried on a fresh connection must not pass.
    with FaultProxy(platform.s3_endpoint, Fault("trickle", after=MiB)) as proxy:
        store = _through(proxy, platform, prefix)
        _fails_at_deadline(store, 5, lambda: _upload(store, KEY, 12 * MiB))
        assert proxy.faulted >= 1
    _assert_nothing_left(direct, KEY)


def test_stalled_single_put_ends_at_the_deadline(
    platform: stack.Platform, prefix: str, direct: S3Store
) -> None:
    # Past the HEAD that checks for an existing object, into the body of the PUT.
    with FaultProxy(platform.s3_endpoint, Fault("stall", after=64 * 1024, connections=1)) as proxy:
        store = _through(proxy, platform, prefix)
        _fails_at_deadline(store, 4, lambda: store.put_bytes("ns/header", os.urandom(256 * 1024)))
        assert proxy.faulted == 1
    _assert_nothing_left(direct, "ns/header")


def test_check_writable_is_bounded_without_a_deadline(platform: stack.Platform, prefix: str) -> None:
    # Every byte is held: the probe's PUT is cut at check_timeout, its DELETE at cleanup_timeout.
    with FaultProxy(platform.s3_endpoint, Fault("stall")) as proxy:
        store = _through(proxy, platform, prefix, check_timeout=2, cleanup_timeout=2)
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"cannot upload .*: it did not finish within 2 s"):
            store.check_writable()
        elapsed = time.monotonic() - start
        assert 1.5 <= elapsed <= 2 + SLACK
        assert proxy.faulted >= 1


def test_check_writable_is_bounded_by_the_deadline(platform: stack.Platform, prefix: str) -> None:
    with FaultProxy(platform.s3_endpoint, Fault("stall")) as proxy:
        store = _through(proxy, platform, prefix, check_timeout=60)
        _fails_at_deadline(store, 2, store.check_writable)


def test_reset_mid_upload_fails_and_leaves_nothing(
    platform: stack.Platform, prefix: str, direct: S3Store
) -> None:
    # Every connection that gets 1 MiB into a request is reset, retries included; the abort, small, passes.
    with FaultProxy(platform.s3_endpoint, Fault("reset", after=MiB)) as proxy:
        store = _through(proxy, platform, prefix)
        store.set_deadline(time.monotonic() + 60)
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"cannot upload s3://") as raised:
            _upload(store, KEY, 12 * MiB)
        assert not isinstance(raised.value, DeadlineExceeded)
        assert time.monotonic() - start < 20
        assert proxy.faulted >= 3  # botocore's three attempts at the part, each reset
    _assert_nothing_left(direct, KEY)


def test_flipped_byte_in_a_part_is_refused(platform: stack.Platform, prefix: str, direct: S3Store) -> None:
    # The request is signed with the SHA-256 of its body (botocore does so over http, and over https for
    # any request without a Content-MD5 or checksum header, which these have not); the server recomputes
    # it, so one flipped bit on the way is refused rather than stored.
    with FaultProxy(platform.s3_endpoint, Fault("flip", after=MiB + 17, connections=1)) as proxy:
        store = _through(proxy, platform, prefix)
        with pytest.raises(StorageError, match=r"cannot upload s3://.*(XAmzContentSHA256Mismatch|BadDigest)"):
            _upload(store, KEY, 12 * MiB)
        assert proxy.faulted == 1
    _assert_nothing_left(direct, KEY)


def test_refused_connections_fail_fast(platform: stack.Platform, prefix: str) -> None:
    with FaultProxy(platform.s3_endpoint, Fault("refuse")) as proxy:
        store = _through(proxy, platform, prefix, max_attempts=2)
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"cannot upload s3://"):
            store.check_writable()
        assert time.monotonic() - start < 5
        assert proxy.accepted >= 2
