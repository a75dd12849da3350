"""Archives in an S3 bucket (AWS or any S3-compatible server), under an optional key prefix.

An archive is streamed as a multipart upload: one part is buffered at a time and sent when full, so memory
stays at one part whatever the archive's size, and nothing is ever copied to a temporary file. S3 shows the
object only once the upload is completed; an aborted upload leaves nothing, and one interrupted by a crash
leaves an invisible multipart upload that costs storage until `clean_incomplete` aborts it.

No write replaces an object (see `base`): the single PUT and the CompleteMultipartUpload are conditional
(``If-None-Match: *``), so S3 itself refuses an existing key atomically, and `open_upload` checks first,
so that a refusal comes before an archive is streamed rather than after. A server that ignores the
condition is left with the check, which another writer could race.

Time: every call is bounded by the store's deadline (`Store.set_deadline`). botocore's own timeouts bound
each socket operation, not a call: a server that trickles a byte a second, or stops reading mid-part,
holds a call for as long as it likes. So each call made under a deadline has a timer that, when the
deadline passes, shuts down the socket the call is using; botocore then sees a closed connection, and
its retry is refused (as is any call started after the deadline), which raises `DeadlineExceeded`. A
multipart upload cut off this way is aborted. The few seconds of slack: a call caught in botocore's
retry back-off wakes up before failing (under a second for connection errors, up to 20 s while the
server throttles), and a TCP connect in progress is cut at its own connect timeout.
"""

import contextlib
import datetime
import io
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypedDict, cast

import boto3
import botocore.config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    SSLError,
)

from idm_backup_operator.storage.base import (
    DeadlineExceeded,
    ObjectExists,
    ObjectNotFound,
    StorageError,
    StorageFull,
    Store,
    StoredObject,
    Upload,
    check_key,
)
from idm_backup_operator.streams import CHUNK_SIZE

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum: 16 MiB parts allow archives of up to 160 GiB
# What an upload holds at most: the part being sent, one waiting for the sender, the one being filled.
PARTS_IN_MEMORY = 3

_PROBE = ".idm-backup-probe-"
_WAIT = 0.25  # seconds: how often a writer waiting for the part sender looks at failures and the deadline


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None  # None for AWS itself
    region: str | None = None
    access_key_id: str | None = None  # None: boto3's own credential chain (environment, IRSA, ...)
    secret_access_key: str | None = None
    verify: bool | str = True  # False to skip TLS verification, or the path of a CA bundle
    force_path_style: bool = False  # most self-hosted servers need it: no per-bucket DNS names
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    part_size: int = 16 * MiB
    # Per socket operation (botocore's meaning); whole calls are bounded by the store's deadline.
    connect_timeout: float = 10
    read_timeout: float = 60
    max_attempts: int = 5
    # Wall-clock bounds of their own: the pre-flight probe (within the deadline, if one is set), and each
    # call that undoes a write (delete, abort), which must still work once the deadline has passed.
    check_timeout: float = 30
    cleanup_timeout: float = 30

    def __post_init__(self) -> None:
        if not self.bucket:
            raise StorageError("an S3 bucket name is required")
        if self.part_size < MIN_PART_SIZE:
            raise StorageError(f"the S3 part size must be at least 5 MiB, not {self.part_size} bytes")
        if self.kms_key_id and self.server_side_encryption != "aws:kms":
            raise StorageError("a KMS key ID needs server-side encryption 'aws:kms'")
        check_key(self.prefix, prefix=True)
        if min(self.connect_timeout, self.read_timeout, self.check_timeout, self.cleanup_timeout) <= 0:
            raise StorageError("S3 timeouts must be positive")

    @property
    def where(self) -> str:
        return self.endpoint_url or "AWS S3"


class S3Store(Store):
    """A bucket, under a key prefix.

    With a deadline set, every call is cut off at it (see the module's docstring for the slack), except
    `delete` and the abort of a failed upload, bounded by `cleanup_timeout` each; `check_writable` is
    bounded by `check_timeout` as well. Without one, only `delete`, aborts and `check_writable` have a
    wall-clock bound; other calls have botocore's per-read timeouts and retries.
    """

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._prefix = config.prefix.strip("/")
        self.client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            # S3-compatible servers mostly ignore the region, but request signatures need one.
            region_name=config.region or "us-east-1",
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            verify=config.verify,
            config=botocore.config.Config(
                s3={"addressing_style": "path" if config.force_path_style else "auto"},
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
                retries={"mode": "standard", "max_attempts": config.max_attempts},
                # A peer that vanished without a FIN (a NAT timeout, a dead node) is noticed by the kernel.
                tcp_keepalive=True,
                # Recent botocore adds CRC trailers to every upload by default, which several S3-compatible
                # servers reject; checksums only where S3 requires them keeps those servers usable.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self._guard = _Guard(self.client)
        self._local = threading.local()  # .limit: a tighter bound for this thread's calls (the probe)

    def uri(self, key: str) -> str:
        return f"s3://{self.config.bucket}/{self._key(key, prefix=True)}"

    def open_upload(self, key: str) -> Upload:
        self._key(key)  # an invalid key is refused before anything is sent
        # S3 refuses an existing key again, atomically, at the end; this spares streaming a whole archive
        # first, and is all there is on a server that ignores If-None-Match. Only an answer counts: a HEAD
        # refused says less than the write's own refusal will (a bare 403), so that is left to the write.
        if not key.startswith(_PROBE):
            try:
                found = self.stat(key)
            except DeadlineExceeded:
                raise
            except StorageError as error:
                logger.debug("Not checking for an existing %s: %s", self.uri(key), error)
                found = None
            if found is not None:
                raise _exists(self.uri(key))
        return _MultipartUpload(self, key)

    def open_read(self, key: str) -> BinaryIO:
        with self._call("read", key):
            body = self.client.get_object(Bucket=self.config.bucket, Key=self._key(key))["Body"]
        return io.BufferedReader(_BodyReader(self, key, body), CHUNK_SIZE)

    def stat(self, key: str) -> StoredObject | None:
        try:
            with self._call("stat", key):
                head = self.client.head_object(Bucket=self.config.bucket, Key=self._key(key))
        except ObjectNotFound:
            return None
        return StoredObject(key, self.uri(key), head["ContentLength"], head["LastModified"])

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.config.bucket, Prefix=self._key(prefix, prefix=True)))
        # One bounded call per page: the caller's work between pages is not the store's to time.
        while page := self._next_page(pages, "list", prefix):
            for item in page.get("Contents", []):
                key = self._relative(item["Key"])
                yield StoredObject(key, self.uri(key), item["Size"], item["LastModified"])

    def delete(self, key: str) -> None:
        with self._call("delete", key, cleanup=True):
            self.client.delete_object(Bucket=self.config.bucket, Key=self._key(key))

    def check_writable(self) -> None:
        # A write says more than head_bucket: its error body names the problem (NoSuchBucket,
        # InvalidAccessKeyId, AccessDenied, ...), where a HEAD answers a bare 403 or 404.
        probe = f"{_PROBE}{uuid.uuid4().hex}"
        self._local.limit = (time.monotonic() + self.config.check_timeout, self.config.check_timeout)
        try:
            self.put_bytes(probe, b"probe\n")
        finally:
            self._local.limit = None
        try:
            self.delete(probe)
        except StorageError as error:
            # Write-once buckets are a legitimate choice; retention will fail there, not backups.
            logger.warning("Could write but not delete a probe object: %s", error)

    def clean_incomplete(self, prefix: str = "", *, started_before: datetime.datetime) -> list[str]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        aborted = []
        doing = "clean up incomplete uploads under"
        pages = iter(paginator.paginate(Bucket=self.config.bucket, Prefix=self._key(prefix, prefix=True)))
        while page := self._next_page(pages, doing, prefix):
            for item in page.get("Uploads", []):
                if item["Initiated"] < started_before:
                    relative = self._relative(item["Key"])
                    with self._call("abort the upload of", relative, cleanup=True):
                        self.client.abort_multipart_upload(
                            Bucket=self.config.bucket, Key=item["Key"], UploadId=item["UploadId"]
                        )
                    aborted.append(relative)
        return aborted

    def _next_page(self, pages: Iterator[Any], doing: str, prefix: str) -> Any:
        with self._call(doing, prefix):
            return next(pages, None)

    def _key(self, key: str, *, prefix: bool = False) -> str:
        """The S3 key of a store key (or prefix)."""
        check_key(key, prefix=prefix)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _relative(self, s3_key: str) -> str:
        return s3_key[len(self._prefix) + 1 :] if self._prefix else s3_key

    def _bound(self, *, cleanup: bool = False) -> tuple[float, str] | None:
        """The wall-clock bound of a call made now in this thread, and how to name it; None: unbounded."""
        now = time.monotonic()
        if cleanup:
            return now + self.config.cleanup_timeout, f"within {self.config.cleanup_timeout:g} s"
        bounds = []
        if self._deadline is not None:
            bounds.append((self._deadline, "before the backup's deadline"))
        limit: tuple[float, float] | None = getattr(self._local, "limit", None)
        if limit is not None:
            bounds.append((limit[0], f"within {limit[1]:g} s"))
        return min(bounds, default=None)

    def check_deadline(self, doing: str) -> None:
        bound = self._bound()
        if bound is not None and time.monotonic() >= bound[0]:
            raise DeadlineExceeded(f"{doing}: it did not finish {bound[1]}")

    @contextlib.contextmanager
    def _call(self, doing: str, key: str, *, cleanup: bool = False) -> Iterator[None]:
        """A call (or a few) to S3 in the block: bounded in time, with errors that say what went wrong."""
        deadline, why = self._bound(cleanup=cleanup) or (None, "")
        try:
            with self._guard.bounded(deadline):
                yield
        except _Cut:
            raise DeadlineExceeded(f"cannot {doing} {self.uri(key)}: it did not finish {why}") from None
        except (ClientError, BotoCoreError) as error:
            if deadline is not None and time.monotonic() >= deadline:
                # Whatever broke, the call was cut off (or would have been): that is the news.
                what = f"cannot {doing} {self.uri(key)}: it did not finish {why}"
                raise DeadlineExceeded(f"{what} ({error})") from None
            raise _translate(error, self.config, doing, self.uri(key)) from None


def _exists(uri: str) -> ObjectExists:
    return ObjectExists(f"{uri} already exists: a stored object is never replaced")


# A full disk or an exhausted quota, in each server's own words (AWS S3 itself has neither). versitygw's
# posix backend answers ENOSPC with InsufficientStorage (507) and EDQUOT with QuotaExceeded (403); Ceph
# RGW a user or bucket quota with QuotaExceeded (403); MinIO a drive below its free-space threshold with
# XMinioStorageFull (507) and a bucket's hard quota with XMinioAdminBucketQuotaExceeded (400). botocore
# retries none of them, rightly: no attempt fits until someone makes room.
_FULL_CODES = frozenset(
    {"InsufficientStorage", "QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded"}
)
# 507 Insufficient Storage (RFC 4918): the same news from a server whose code is none of the above.
_FULL_STATUS = 507


def _translate(error: Exception, config: S3Config, doing: str, uri: str) -> StorageError:
    what = f"cannot {doing} {uri}"
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _FULL_CODES or status == _FULL_STATUS:
            said = f"{code}: {message}" if message else code
            return StorageFull(
                f"{what}: bucket {config.bucket!r} at {config.where} is full or over its quota ({said})"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFound(f"{uri} does not exist")
        # The answer to If-None-Match: * on an existing key; 409 while another conditional write to the
        # same key is in progress, which will take the key if it succeeds.
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return _exists(uri)
        if code == "NoSuchBucket":
            return StorageError(f"{what}: bucket {config.bucket!r} does not exist at {config.where}")
        # versitygw names the same refusal XAdminUserNotFound.
        if code in ("InvalidAccessKeyId", "XAdminUserNotFound"):
            return StorageError(f"{what}: {config.where} does not know the access key ID")
        if code == "SignatureDoesNotMatch":
            return StorageError(f"{what}: the secret access key is wrong for this access key ID")
        if code in ("AccessDenied", "403", "Forbidden"):
            return StorageError(f"{what}: access denied with the configured credentials")
        return StorageError(f"{what}: {code}: {message}".rstrip(": "))
    if isinstance(error, SSLError):
        return StorageError(f"{what}: TLS with {config.where} failed (is the CA bundle right?): {error}")
    if isinstance(error, NoCredentialsError):
        return StorageError(f"{what}: no S3 credentials are configured")
    if isinstance(error, EndpointConnectionError | ConnectTimeoutError):
        return StorageError(f"{what}: {config.where} is unreachable: {error}")
    return StorageError(f"{what}: {error}")


class _Cut(Exception):
    """Raised inside botocore, by the guard's event handlers, when a call's deadline has passed."""


class _Guard:
    """Wall-clock bounds for the calls of one botocore client, whatever the server does.

    A bounded block (`bounded`) starts a timer for the calling thread. When it fires, the socket of the
    connection that thread is using is shut down, which ends a blocked send or receive at once; botocore's
    next attempt, or its decision to retry, raises `_Cut`, as does any request sent after the deadline.
    Shutting down (rather than closing) leaves the descriptor to its owner, so no other connection can
    be handed the same number meanwhile.

    Which connection a thread uses is learnt from the connection classes of the client's pools: botocore
    has no public hook that sees the socket. Should a botocore release rename what is used here, calls
    are still refused past their deadline, but one running then stops only at its socket timeouts.
    """

    def __init__(self, client: "S3Client") -> None:
        self._lock = threading.Lock()
        self._using: dict[int, Any] = {}  # thread ident -> the connection it sends on
        self._local = threading.local()  # .deadline: of the call running in this thread
        client.meta.events.register_first("before-send.s3", self._before_send)
        client.meta.events.register_first("needs-retry.s3", self._needs_retry)
        self.cuts_connections = _track_connections(client, self)

    @contextlib.contextmanager
    def bounded(self, deadline: float | None) -> Iterator[None]:
        if deadline is None:
            yield
            return
        if time.monotonic() >= deadline:
            raise _Cut
        me = threading.get_ident()
        outer = getattr(self._local, "deadline", None)
        self._local.deadline = deadline
        timer = threading.Timer(deadline - time.monotonic(), self._cut, (me, deadline))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            self._local.deadline = outer
            with self._lock:
                self._using.pop(me, None)

    def remaining(self) -> float | None:
        deadline: float | None = getattr(self._local, "deadline", None)
        return None if deadline is None else deadline - time.monotonic()

    def sending(self, connection: Any) -> None:
        """Called by a connection, in the thread that is about to use it."""
        me = threading.get_ident()
        with self._lock:
            # A pooled connection changes threads: the one that used it before must not cut it now.
            for thread in [t for t, c in self._using.items() if c is connection and t != me]:
                del self._using[thread]
            self._using[me] = connection

    def _cut(self, thread: int, deadline: float) -> None:
        # Never early, even by a rounding error: the cut thread's retry must find its deadline passed, or
        # it would start an attempt that no timer watches any more.
        if (early := deadline - time.monotonic()) > 0:
            time.sleep(early)
        with self._lock:
            connection = self._using.get(thread)
        sock = getattr(connection, "sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                # socket.socket's own method: an SSLSocket's would also tear down its TLS state, which the
                # thread blocked in it is still using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _before_send(self, **kwargs: Any) -> None:
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise _Cut

    def _needs_retry(
        self, response: Any = None, caught_exception: BaseException | None = None, **kwargs: Any
    ) -> None:
        remaining = self.remaining()
        if remaining is None or remaining > 0:
            return  # botocore's own retry policy decides
        if caught_exception is not None or (response is not None and response[0].status_code >= 300):
            raise _Cut  # out of botocore's retry loop: no retry, and no back-off sleep first


def _track_connections(client: "S3Client", guard: _Guard) -> bool:
    """Make the client's connections tell `guard` which thread uses them; False if that is impossible."""
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    pools = getattr(session, "_pool_classes_by_scheme", None)
    # The pool managers share this very dict, so replacing its entries reaches every pool created later.
    if not isinstance(pools, dict) or not all(hasattr(pool, "ConnectionCls") for pool in pools.values()):
        logger.warning("Cannot track botocore's connections: S3 calls stop at their socket timeouts only")
        return False
    for scheme, pool in list(pools.items()):
        tracked = _tracked_connection(pool.ConnectionCls, guard)
        pools[scheme] = type(pool.__name__, (pool,), {"ConnectionCls": tracked})
    return True


def _tracked_connection(base: type[Any], guard: _Guard) -> type[Any]:
    class Tracked(base):  # type: ignore[misc]
        def connect(self) -> None:
            guard.sending(self)
            # The connection has no socket to shut down before this returns: a connect gets no more
            # time than is left.
            remaining, timeout = guard.remaining(), getattr(self, "timeout", None)
            if remaining is not None and isinstance(timeout, int | float):
                self.timeout = max(0.001, min(timeout, remaining))
            super().connect()

        def request(self, *args: Any, **kwargs: Any) -> Any:
            guard.sending(self)
            return super().request(*args, **kwargs)

    Tracked.__name__ = Tracked.__qualname__ = f"Tracked{base.__name__}"
    return Tracked


class _Encryption(TypedDict, total=False):
    ServerSideEncryption: Literal["AES256", "aws:kms"]
    SSEKMSKeyId: str


class _MultipartUpload(Upload):
    """Parts are filled here and sent by a background thread, so reading never waits for the network.

    Sending a 16 MiB part takes long enough that, done inline, it stalls gpg and the stream from the pod
    for a third of the transfer. At most one full part waits while one is being sent: memory stays at
    three parts whatever the archive's size. The multipart upload starts only once a first part is full;
    an object smaller than a part (header, manifest, a small archive) is sent with a single PUT.
    """

    def __init__(self, store: S3Store, key: str) -> None:
        self._s3_key = store._key(key)
        super().__init__(key, store.uri(key))
        self._store = store
        self._part_size = store.config.part_size
        self._part = bytearray(self._part_size)
        self._filled = 0
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._queued = 0
        self._outbox: queue.Queue[tuple[int, bytes | bytearray] | None] = queue.Queue(maxsize=1)
        self._sender: threading.Thread | None = None
        self._failure: BaseException | None = None

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self._part_size - self._filled
            chunk = view[:room]
            self._part[self._filled : self._filled + len(chunk)] = chunk
            self._filled += len(chunk)
            view = view[len(chunk) :]
            if self._filled == self._part_size:
                # The full buffer itself goes to the sender: no copy, and a fresh one is filled meanwhile.
                self._queue_part(self._part)
                self._part = bytearray(self._part_size)
                self._filled = 0

    def _commit(self) -> None:
        config = self._store.config
        rest = bytes(memoryview(self._part)[: self._filled])
        if self._upload_id is None:
            with self._store._call("upload", self.key):
                self._store.client.put_object(
                    Bucket=config.bucket, Key=self._s3_key, Body=rest, IfNoneMatch="*", **self._encryption()
                )
            return
        if rest:
            self._queue_part(rest)
        self._stop_sender()
        self._raise_failure()
        with self._store._call("complete the upload of", self.key):
            self._store.client.complete_multipart_upload(
                Bucket=config.bucket,
                Key=self._s3_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])},
                IfNoneMatch="*",
            )

    def _abort(self) -> None:
        self._part = bytearray()
        self._stop_sender()
        if self._upload_id is None:
            return
        try:
            with self._store._call("abort the upload of", self.key, cleanup=True):
                self._store.client.abort_multipart_upload(
                    Bucket=self._store.config.bucket, Key=self._s3_key, UploadId=self._upload_id
                )
        except StorageError as error:
            # Raising here would hide the error that caused the abort; clean_incomplete catches up later.
            logger.warning("%s", error)

    def _queue_part(self, body: bytes | bytearray) -> None:
        self._raise_failure()
        config = self._store.config
        if self._queued >= MAX_PARTS:
            raise StorageError(
                f"cannot upload {self.uri}: more than {MAX_PARTS} parts of {config.part_size} bytes, "
                f"raise the part size"
            )
        if self._upload_id is None:
            with self._store._call("upload", self.key):
                created = self._store.client.create_multipart_upload(
                    Bucket=config.bucket, Key=self._s3_key, **self._encryption()
                )
            self._upload_id = created["UploadId"]
            self._sender = threading.Thread(
                target=self._send_parts, name=f"s3-upload-{self.key}", daemon=True
            )
            self._sender.start()
        self._queued += 1
        while True:
            try:
                self._outbox.put((self._queued, body), timeout=_WAIT)
                return
            except queue.Full:
                self._raise_failure()
                self._store.check_deadline(f"cannot upload {self.uri}")

    def _send_parts(self) -> None:
        config = self._store.config
        while (item := self._outbox.get()) is not None:
            if self._failure is not None:
                continue  # drain: the writer sees the failure at its next write
            number, body = item
            try:
                with self._store._call("upload", self.key):
                    sent = self._store.client.upload_part(
                        Bucket=config.bucket,
                        Key=self._s3_key,
                        UploadId=self._upload_id or "",
                        PartNumber=number,
                        # botocore sends any bytes-like body; the stubs only name bytes.
                        Body=cast(bytes, body),
                    )
                self._parts.append({"ETag": sent["ETag"], "PartNumber": number})
            except BaseException as error:  # handed to the writer's thread and raised there
                self._failure = error

    def _stop_sender(self) -> None:
        if self._sender is not None:
            self._outbox.put(None)
            self._sender.join()
            self._sender = None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _encryption(self) -> _Encryption:
        config = self._store.config
        args: _Encryption = {}
        if config.server_side_encryption:
            args["ServerSideEncryption"] = config.server_side_encryption
        if config.kms_key_id:
            args["SSEKMSKeyId"] = config.kms_key_id
        return args


class _BodyReader(io.RawIOBase):
    """A response body as a raw stream, so that readers get a real buffered file object."""

    def __init__(self, store: S3Store, key: str, body: "io.IOBase") -> None:
        self._store = store
        self._key = key
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "WriteableBuffer") -> int:
        view = memoryview(buffer).cast("B")
        with self._store._call("read", self._key):
            data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()
