"""The stored-size check of a backup, made to fail for real.

After an archive's upload is committed, the operator asks storage how big the stored object is (S3Store.stat,
a HEAD request) and fails the backup with VerificationFailed when the answer is not the size it wrote.
Nothing short of a misbehaving server makes that answer wrong, so here one misbehaves: testbed.faultproxy's
`misreport-size` mode sits in front of the platform's versitygw and changes the Content-Length of every
successful HEAD answer, as a caching gateway serving stale metadata would; every other byte passes as it
came. What was really stored is read with plain boto3 directly from versitygw, not through the proxy.

The first test is the proxy's own, against a small HTTP server on loopback, with no platform: the
HTTP/1.1 framing it follows (keep-alive, 100 Continue, chunked bodies with trailers, bodies that contain
what looks like a request) must leave everything but that one header untouched.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from kubernetes import client

from idm_backup_operator.storage import S3Config, S3Store
from testbed import stack
from testbed.deploy import OperatorProcess
from testbed.faultproxy import Fault, FaultProxy
from tests.helpers import (
    Backup,
    backup_dirs,
    backup_spec,
    event_messages,
    leases,
    s3_keys,
    s3_storage,
    services_running,
    wait_for,
)

MiB = 1024 * 1024
HOST = "ipa-hidden.example.test"

# What a body may contain that a proxy reading it as headers would get wrong.
LOOKALIKE = b"HEAD /object HTTP/1.1\r\nHost: x\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"


# -- the proxy mode against a plain HTTP/1.1 server ----------------------------------------------------


class _Origin(http.server.BaseHTTPRequestHandler):
    """Answers with fixed bodies, over keep-alive HTTP/1.1; PUT answers with the sha256 of what arrived."""

    protocol_version = "HTTP/1.1"
    body = LOOKALIKE + os.urandom(200_000) + LOOKALIKE

    def do_HEAD(self) -> None:
        if self.path == "/missing":
            self._head(404, 11)  # a length that must not be changed: not a 2xx
        else:
            self._head(200, len(self.body))

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (LOOKALIKE, self.body[:70_000]):
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\nX-Trailer: 1\r\n\r\n")
            return
        self._head(200, len(self.body))
        self.wfile.write(self.body)

    def do_PUT(self) -> None:
        received = self.rfile.read(int(self.headers["Content-Length"]))
        answer = hashlib.sha256(received).hexdigest().encode()
        self._head(200, len(answer))
        self.wfile.write(answer)

    def _head(self, status: int, length: int) -> None:
        self.send_response(status)
        self.send_header("ETag", '"fixed-etag"')
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _exchange(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None, expect: bool = False
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Expect": "100-continue"} if expect else {}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    kept = {k.lower(): v for k, v in response.getheaders() if k.lower() not in ("date", "server")}
    return response.status, kept, data


def test_misreport_size_changes_only_the_content_length_of_successful_head_answers(origin: str) -> None:
    size = len(_Origin.body)
    upload = os.urandom(300_000) + LOOKALIKE  # longer than the proxy reads at once
    with FaultProxy(origin, Fault("misreport-size", size_delta=-1), lifetime=60) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            assert _exchange(conn, "HEAD", "/object") == (
                200,
                {"etag": '"fixed-etag"', "content-length": str(size - 1)},
                b"",
            )
            status, _, data = _exchange(conn, "GET", "/object")
            assert (status, data) == (200, _Origin.body)
            # http.server answers an Expect with 100 Continue before the real answer: that interim
            # answer must not be paired with a request.
            status, _, data = _exchange(conn, "PUT", "/object", upload, expect=True)
            assert (status, data) == (200, hashlib.sha256(upload).hexdigest().encode())
            status, headers, data = _exchange(conn, "GET", "/chunked")
            assert (status, headers.get("transfer-encoding"), data) == (
                200,
                "chunked",
                LOOKALIKE + _Origin.body[:70_000],
            )
            assert _exchange(conn, "HEAD", "/missing") == (
                404,
                {"etag": '"fixed-etag"', "content-length": "11"},
                b"",
            )
            # The answer after a 100 Continue is still the HEAD's, however odd the Expect on a HEAD.
            assert _exchange(conn, "HEAD", "/object", expect=True)[1]["content-length"] == str(size - 1)
        finally:
            conn.close()
        assert proxy.accepted == 1  # all of it on one keep-alive connection
        assert proxy.misreported == [(size, size - 1), (size, size - 1)]
        assert proxy.unframed == 0


# -- the proxy mode in front of versitygw ---------------------------------------------------------------


def _store(platform: stack.Platform, endpoint: str, prefix: str) -> S3Store:
    return S3Store(
        S3Config(
            bucket=platform.s3_bucket,
            prefix=prefix,
            endpoint_url=endpoint,
            access_key_id=platform.s3_access_key,
            secret_access_key=platform.s3_secret_key,
            force_path_style=True,
            part_size=5 * MiB,
        )
    )


@pytest.fixture
def scratch_prefix(s3: Any, platform: stack.Platform) -> Iterator[str]:
    prefix = f"test/stored-size-{uuid.uuid4().hex[:10]}"
    yield prefix
    for key in s3_keys(s3, platform.s3_bucket, prefix):
        s3.delete_object(Bucket=platform.s3_bucket, Key=key)


def test_versitygw_behind_misreport_size_reports_another_size_to_head_and_nothing_else(
    platform: stack.Platform, s3: Any, scratch_prefix: str
) -> None:
    small, large = os.urandom(1234), os.urandom(6 * MiB)  # large: a multipart upload, 100 Continue and all
    s3.put_object(Bucket=platform.s3_bucket, Key=f"{scratch_prefix}/small", Body=small)
    with FaultProxy(platform.s3_endpoint, Fault("misreport-size", size_delta=4096), lifetime=120) as proxy:
        through = boto3.client(
            "s3",
            endpoint_url=proxy.url,
            region_name="us-east-1",
            aws_access_key_id=platform.s3_access_key,
            aws_secret_access_key=platform.s3_secret_key,
        )
        head = through.head_object(Bucket=platform.s3_bucket, Key=f"{scratch_prefix}/small")
        assert head["ContentLength"] == 1234 + 4096
        got = through.get_object(Bucket=platform.s3_bucket, Key=f"{scratch_prefix}/small")
        assert (got["ContentLength"], got["Body"].read()) == (1234, small)
        with pytest.raises(ClientError) as missing:
            through.head_object(Bucket=platform.s3_bucket, Key=f"{scratch_prefix}/missing")
        assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        # What the operator's verify step calls, after an upload through the same proxy.
        store = _store(platform, proxy.url, scratch_prefix)
        with store.open_upload("large") as upload:
            upload.write(large)
            written = upload.commit()
        assert written.size == len(large)
        found = store.stat("large")
        assert found is not None and found.size == len(large) + 4096
        assert {o.key: o.size for o in store.list_objects()} == {"small": 1234, "large": len(large)}
        assert proxy.misreported == [(1234, 1234 + 4096), (len(large), len(large) + 4096)]
        assert proxy.unframed == 0
    direct = s3.get_object(Bucket=platform.s3_bucket, Key=f"{scratch_prefix}/large")
    assert hashlib.sha256(direct["Body"].read()).digest() == hashlib.sha256(large).digest()


# -- through the operator ------------------------------------------------------------------------------


def test_an_s3_endpoint_that_misreports_the_stored_size_fails_verification_failed_and_leaves_nothing(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Backup,
    s3: Any,
) -> None:
    """An offline Full backup whose upload (multipart) succeeds, but whose stored archive is reported one
    byte short by the only HEAD that finds it: the verify step's. The upload's other HEADs (is the key
    free?) are 404s and pass unchanged."""
    pod = freeipa(payload_bytes=6 * MiB)  # incompressible: two 5 MiB parts
    prefix = f"stored-size/{namespace}"
    with FaultProxy(platform.s3_endpoint, Fault("misreport-size", size_delta=-1)) as proxy:
        storage = s3_storage(platform, prefix)
        storage["s3"]["endpoint"] = proxy.url
        obj = run_backup("misreported", backup_spec(platform, storage, type="Full"))
        misreported, unframed = list(proxy.misreported), proxy.unframed

    status = obj["status"]
    assert (status["phase"], status.get("reason")) == ("Failed", "VerificationFailed"), status
    completed = next(c for c in status["conditions"] if c["type"] == "Completed")
    assert (completed["status"], completed["reason"]) == ("False", "VerificationFailed"), completed
    # The size versitygw really answered is the one the operator wrote: it reports both, exactly.
    assert unframed == 0
    assert len(misreported) == 1, misreported
    ((real, reported),) = misreported
    assert reported == real - 1 and real > 6 * MiB
    dirname = status["ipaBackup"]["directory"].rsplit("/", 1)[1]
    uri = f"s3://{platform.s3_bucket}/{prefix}/{namespace}/{HOST}/{dirname}/ipa-full.tar.gpg"
    message = f"{uri} has {real - 1} bytes in storage, expected {real}"
    assert status["message"] == message
    assert re.fullmatch(r"ipa-full-\d{4}(-\d\d){5}", dirname), dirname
    assert event_messages(api, namespace, "misreported", "BackupFailed") == [message]
    assert "archive" not in status  # never reported as stored

    # Nothing is left under the backup's name: the verified-bad archive and the header beside it were
    # deleted, the manifest never written, no multipart upload left open. Read without the proxy.
    assert s3_keys(s3, platform.s3_bucket, prefix) == []
    uploads = s3.list_multipart_uploads(Bucket=platform.s3_bucket, Prefix=prefix).get("Uploads", [])
    assert uploads == [], uploads

    # IPA was stopped by ipa-backup and is running again; the pod's plaintext copy is gone.
    running = next(c for c in status["conditions"] if c["type"] == "ServicesRunning")
    assert (running["status"], running["reason"]) == ("True", "StartedByIpaBackup"), running
    assert services_running(api, namespace, pod)
    assert backup_dirs(api, namespace, pod) == []
    wait_for("the Lease to be released", lambda: leases(api, namespace) == [], timeout=30)
    assert "Traceback" not in operator.output(), operator.output()[-3000:]
