"""Start-up aborts the multipart uploads that backups killed with their operator left in S3."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from testbed import stack
from testbed.deploy import OperatorProcess
from tests.helpers import backup_spec, create_schedule, s3_storage, wait_for


def uploads(s3: Any, bucket: str, prefix: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])]


def test_start_up_aborts_old_uploads_under_the_namespaces_it_serves_and_nothing_else(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    operator: OperatorProcess,
    secrets: None,
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = f"leftovers/{namespace}"
    template = backup_spec(platform, s3_storage(platform, prefix), type="Data")
    create_schedule(api, namespace, "yearly", {"schedule": "0 0 1 1 *", "template": {"spec": template}})
    bucket = platform.s3_bucket
    orphan = f"{prefix}/{namespace}/ipa-hidden.example.test/ipa-data-2026-01-01-00-00-00/ipa-data.tar.gpg"
    foreign = (
        f"{prefix}/another-namespace/ipa-hidden.example.test/ipa-data-2026-01-01-00-00-00/ipa-data.tar.gpg"
    )
    for key in (orphan, foreign):
        s3.create_multipart_upload(Bucket=bucket, Key=key)
    # Deployed, only uploads older than 7 days count as abandoned: these fresh ones stay.
    operator.stop()
    operator.start()
    wait_for("the sweep", lambda: "checked 1 storages for uploads older than 7 days" in operator.output())
    assert sorted(uploads(s3, bucket, prefix)) == sorted([orphan, foreign])
    # Any upload older than 0 s counts as abandoned here.
    monkeypatch.setenv("IDM_BACKUP_LEFTOVER_AGE_SECONDS", "0")
    operator.stop()
    operator.start()
    wait_for(
        "the orphaned upload to be aborted", lambda: orphan not in uploads(s3, bucket, prefix), timeout=60
    )
    # Another namespace's prefix is not this operator's (it watches one namespace): left alone.
    assert uploads(s3, bucket, prefix) == [foreign]
    assert "removed an upload no backup will finish" in operator.output()
    s3.abort_multipart_upload(
        Bucket=bucket,
        Key=foreign,
        UploadId=s3.list_multipart_uploads(Bucket=bucket, Prefix=foreign)["Uploads"][0]["UploadId"],
    )
