"""Archives in an S3 bucket (AWS or any S3-compatible server), under an optional key prefix.

An archive is streamed as a multipart upload: one part is buffered at a time and sent when full, so memory
stays at one part whatever the archive's size, and nothing is ever copied to a temporary file. S3 shows the
object only once the upload is completed; an aborted upload leaves nothing, and one interrupted by a crash
leaves an invisible multipart upload that costs storage until `clean_incomplete` aborts it.
"""

import contextlib
import datetime
import io
import logging
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Literal, TypedDict, cast

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
    ObjectNotFound,
    StorageError,
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

_PROBE = ".idm-backup-probe-"


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
    connect_timeout: float = 10
    read_timeout: float = 60
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if not self.bucket:
            raise StorageError("an S3 bucket name is required")
        if self.part_size < MIN_PART_SIZE:
            raise StorageError(f"the S3 part size must be at least 5 MiB, not {self.part_size} bytes")
        if self.kms_key_id and self.server_side_encryption != "aws:kms":
            raise StorageError("a KMS key ID needs server-side encryption 'aws:kms'")
        check_key(self.prefix, prefix=True)

    @property
    def where(self) -> str:
        return self.endpoint_url or "AWS S3"


class S3Store(Store):
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
                # Recent botocore adds CRC trailers to every upload by default, which several S3-compatible
                # servers reject; checksums only where S3 requires them keeps those servers usable.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def uri(self, key: str) -> str:
        return f"s3://{self.config.bucket}/{self._key(key, prefix=True)}"

    def open_upload(self, key: str) -> Upload:
        return _MultipartUpload(self, key)

    def open_read(self, key: str) -> BinaryIO:
        with self._errors("read", key):
            body = self.client.get_object(Bucket=self.config.bucket, Key=self._key(key))["Body"]
        return io.BufferedReader(_BodyReader(self, key, body), CHUNK_SIZE)

    def stat(self, key: str) -> StoredObject | None:
        try:
            with self._errors("stat", key):
                head = self.client.head_object(Bucket=self.config.bucket, Key=self._key(key))
        except ObjectNotFound:
            return None
        return StoredObject(key, self.uri(key), head["ContentLength"], head["LastModified"])

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors("list", prefix):
            pages = paginator.paginate(Bucket=self.config.bucket, Prefix=self._key(prefix, prefix=True))
            for page in pages:
                for item in page.get("Contents", []):
                    key = self._relative(item["Key"])
                    yield StoredObject(key, self.uri(key), item["Size"], item["LastModified"])

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.config.bucket, Key=self._key(key))

    def check_writable(self) -> None:
        # A write says more than head_bucket: its error body names the problem (NoSuchBucket,
        # InvalidAccessKeyId, AccessDenied, ...), where a HEAD answers a bare 403 or 404.
        probe = f"{_PROBE}{uuid.uuid4().hex}"
        self.put_bytes(probe, b"probe\n")
        try:
            self.delete(probe)
        except StorageError as error:
            # Write-once buckets are a legitimate choice; retention will fail there, not backups.
            logger.warning("Could write but not delete a probe object: %s", error)

    def clean_incomplete(self, prefix: str = "", *, started_before: datetime.datetime) -> list[str]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        aborted = []
        with self._errors("clean up incomplete uploads under", prefix):
            pages = paginator.paginate(Bucket=self.config.bucket, Prefix=self._key(prefix, prefix=True))
            for page in pages:
                for item in page.get("Uploads", []):
                    if item["Initiated"] < started_before:
                        self.client.abort_multipart_upload(
                            Bucket=self.config.bucket, Key=item["Key"], UploadId=item["UploadId"]
                        )
                        aborted.append(self._relative(item["Key"]))
        return aborted

    def _key(self, key: str, *, prefix: bool = False) -> str:
        """The S3 key of a store key (or prefix)."""
        check_key(key, prefix=prefix)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _relative(self, s3_key: str) -> str:
        return s3_key[len(self._prefix) + 1 :] if self._prefix else s3_key

    @contextlib.contextmanager
    def _errors(self, doing: str, key: str) -> Iterator[None]:
        """Turn botocore's exceptions into StorageErrors that say what went wrong, without the noise."""
        try:
            yield
        except (ClientError, BotoCoreError) as error:
            raise _translate(error, self.config, doing, self.uri(key)) from None


def _translate(error: Exception, config: S3Config, doing: str, uri: str) -> StorageError:
    what = f"cannot {doing} {uri}"
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFound(f"{uri} does not exist")
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
            with self._store._errors("upload", self.key):
                self._store.client.put_object(
                    Bucket=config.bucket, Key=self._s3_key, Body=rest, **self._encryption()
                )
            return
        if rest:
            self._queue_part(rest)
        self._stop_sender()
        self._raise_failure()
        with self._store._errors("complete the upload of", self.key):
            self._store.client.complete_multipart_upload(
                Bucket=config.bucket,
                Key=self._s3_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])},
            )

    def _abort(self) -> None:
        self._part = bytearray()
        self._stop_sender()
        if self._upload_id is None:
            return
        try:
            with self._store._errors("abort the upload of", self.key):
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
            with self._store._errors("upload", self.key):
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
                self._outbox.put((self._queued, body), timeout=1)
                return
            except queue.Full:
                self._raise_failure()

    def _send_parts(self) -> None:
        config = self._store.config
        while (item := self._outbox.get()) is not None:
            if self._failure is not None:
                continue  # drain: the writer sees the failure at its next write
            number, body = item
            try:
                with self._store._errors("upload", self.key):
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
        with self._store._errors("read", self._key):
            data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()
