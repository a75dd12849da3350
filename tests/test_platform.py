"""Done-criteria of the local platform (testbed/), checked against the real thing: no mocks.

A real kube-apiserver serves a structural CRD with its status subresource and enforces RBAC on a
ServiceAccount token; exec goes through the API server to the test node and into stand-in FreeIPA pods
(exit codes, separate stderr, binary stdout, stdin with EOF); pods do not share their backup directory;
versitygw round-trips a multipart upload; and every platform port listens on 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest
from kubernetes import client
from kubernetes.client import ApiException
from kubernetes.stream import stream, ws_client

from conftest import wait_for
from testbed import freeipa_pod, processes, stack
from tests.helpers import token_client

pytestmark = pytest.mark.platform

MiB = 1024 * 1024
CONTAINER = "freeipa-server"
CRD_GROUP = "platformtest.idm-backup.io"
# Every TCP port of the platform (stack.py): API server, etcd client and peer, the node, the
# controller-manager, the scheduler, S3 and LDAP.
PLATFORM_PORTS = {6443, 2379, 2380, 10250, 10257, 10259, 7070, 3389}
ROLE_ERROR = (
    "Error: Local roles CA do not match globally used roles ADTRUST, CA, DNS, DNSKeySync, KRA. "
    "A backup done on this host would not be complete enough to restore a fully functional, "
    "identical cluster."
)

# `stream()` cannot pass `capture_all` on to the WSClient (the API method drops unknown keyword
# arguments), so by default every byte of stdout and stderr is also kept in an in-memory copy until the
# connection closes. The same call through websocket_call with capture_all=False keeps only what has not
# been read yet.
assert stream.args == (ws_client.websocket_call, None)
stream_uncaptured = functools.partial(
    stream.func, functools.partial(ws_client.websocket_call, capture_all=False), None
)


# --- exec helpers -----------------------------------------------------------------------------------


def open_exec(
    api: client.ApiClient,
    namespace: str,
    pod: str,
    argv: list[str],
    *,
    stdin: bool = False,
    binary: bool = False,
) -> ws_client.WSClient:
    return stream_uncaptured(
        client.CoreV1Api(api).connect_get_namespaced_pod_exec,
        pod,
        namespace,
        command=argv,
        container=CONTAINER,
        stdin=stdin,
        stdout=True,
        stderr=True,
        tty=False,
        _preload_content=False,
        binary=binary,
    )


def finish(ws: ws_client.WSClient, on_stdout: Any, on_stderr: Any, timeout: float) -> int:
    """Pump frames until the server closes the connection; returns the command's exit code."""
    deadline = time.monotonic() + timeout
    try:
        while ws.is_open():
            if time.monotonic() > deadline:
                pytest.fail(f"exec did not end within {timeout:.0f}s")
            ws.update(timeout=1)
            # Drain after every frame, so nothing piles up in the client.
            if out := ws.read_stdout(timeout=0):
                on_stdout(out)
            if err := ws.read_stderr(timeout=0):
                on_stderr(err)
        # read_stderr() may have pulled in a last stdout frame just before the connection closed.
        if out := ws.read_stdout(timeout=0):
            on_stdout(out)
        if err := ws.read_stderr(timeout=0):
            on_stderr(err)
        rc = ws.returncode
    finally:
        ws.close()
    assert isinstance(rc, int)
    return rc


def run(
    api: client.ApiClient,
    namespace: str,
    pod: str,
    argv: list[str],
    *,
    stdin_data: bytes | None = None,
    timeout: float = 60,
) -> tuple[int, str, str]:
    """Run argv in the pod through the API server: (exit code, stdout, stderr)."""
    ws = open_exec(api, namespace, pod, argv, stdin=stdin_data is not None)
    if stdin_data is not None:
        # v5.channel.k8s.io is what lets a client close stdin alone (CLOSE frame 255 + channel 0);
        # with v4 close_channel() silently does nothing and the command would wait for EOF forever.
        assert ws.subprotocol == ws_client.V5_CHANNEL_PROTOCOL
        for i in range(0, len(stdin_data), MiB):
            ws.write_stdin(stdin_data[i : i + MiB])
        ws.close_channel(ws_client.STDIN_CHANNEL)
    out: list[str] = []
    err: list[str] = []
    rc = finish(ws, out.append, err.append, timeout)
    return rc, "".join(out), "".join(err)


# --- 1. CRD: structural schema, validation, status subresource -------------------------------------


@pytest.fixture(scope="module")
def crd(api: client.ApiClient) -> Iterator[dict[str, str]]:
    """A namespaced test-only CRD with a name unique to this run; deleted afterwards."""
    suffix = uuid.uuid4().hex[:8]
    plural, kind = f"backupprobes{suffix}", f"BackupProbe{suffix.upper()}"
    name = f"{plural}.{CRD_GROUP}"
    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name, "labels": {"idm-backup.io/test": "true"}},
            "spec": {
                "group": CRD_GROUP,
                "scope": "Namespaced",
                "names": {"plural": plural, "singular": f"backupprobe{suffix}", "kind": kind},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "subresources": {"status": {}},
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "required": ["spec"],
                                "properties": {
                                    "spec": {
                                        "type": "object",
                                        "required": ["host", "type"],
                                        "properties": {
                                            "host": {"type": "string", "minLength": 1},
                                            "type": {"type": "string", "enum": ["full", "data"]},
                                            "retain": {"type": "integer", "minimum": 1},
                                        },
                                    },
                                    "status": {
                                        "type": "object",
                                        "properties": {
                                            "phase": {"type": "string"},
                                            "lastBackup": {"type": "string"},
                                        },
                                    },
                                },
                            }
                        },
                    }
                ],
            },
        }
    )

    def established() -> bool:
        conds = ext.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    wait_for(f"CRD {name} established", established, timeout=30)
    conds = {c.type: c.status for c in ext.read_custom_resource_definition(name).status.conditions}
    assert conds.get("NamesAccepted") == "True"
    assert "NonStructuralSchema" not in conds
    yield {"name": name, "plural": plural, "kind": kind}
    ext.delete_custom_resource_definition(name)


def _probe(crd: dict[str, str], name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{CRD_GROUP}/v1", "kind": crd["kind"], "metadata": {"name": name}, "spec": spec}


def _create_probe(
    api: client.ApiClient, crd: dict[str, str], namespace: str, obj: dict[str, Any]
) -> dict[str, Any]:
    custom = client.CustomObjectsApi(api)

    def created() -> dict[str, Any] | None:
        try:
            made: dict[str, Any] = custom.create_namespaced_custom_object(
                CRD_GROUP, "v1", namespace, crd["plural"], obj
            )
            return made
        except ApiException as err:
            if err.status == 404:  # the new resource is not in the API server's handlers yet
                return None
            raise

    made: dict[str, Any] = wait_for("custom resource handler", created, timeout=30)
    return made


def test_crd_valid_object_is_served_and_pruned(
    api: client.ApiClient, crd: dict[str, str], namespace: str
) -> None:
    created = _create_probe(
        api,
        crd,
        namespace,
        _probe(
            crd,
            "ok",
            {"host": "ipa-hidden.example.test", "type": "data", "retain": 3, "unknownField": "dropped"},
        ),
    )
    # A structural schema prunes unknown fields on the way in.
    assert created["spec"] == {"host": "ipa-hidden.example.test", "type": "data", "retain": 3}
    got = client.CustomObjectsApi(api).get_namespaced_custom_object(
        CRD_GROUP, "v1", namespace, crd["plural"], "ok"
    )
    assert got["spec"] == created["spec"]
    assert got["metadata"]["generation"] == 1
    assert "status" not in got


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            {"host": "h", "type": "data", "retain": "seven"},
            "spec.retain",
            'spec.retain: Invalid value: "string": spec.retain in body must be of type integer: "string"',
        ),
        ({"type": "full"}, "spec.host", "spec.host: Required value"),
        (
            {"host": "h", "type": "weekly"},
            "spec.type",
            'spec.type: Unsupported value: "weekly": supported values: "full", "data"',
        ),
        (
            {"host": "h", "type": "full", "retain": 0},
            "spec.retain",
            "spec.retain: Invalid value: 0: spec.retain in body should be greater than or equal to 1",
        ),
    ],
    ids=["wrong-type", "missing-required", "enum", "minimum"],
)
def test_crd_schema_violations_are_refused(
    api: client.ApiClient, crd: dict[str, str], namespace: str, spec: dict[str, Any], field: str, message: str
) -> None:
    _create_probe(api, crd, namespace, _probe(crd, "warmup", {"host": "h", "type": "full"}))
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            CRD_GROUP, "v1", namespace, crd["plural"], _probe(crd, "bad", spec)
        )
    err = refused.value
    assert err.status == 422
    body = json.loads(err.body)
    assert body["reason"] == "Invalid"
    assert body["message"].startswith(f'{crd["kind"]}.{CRD_GROUP} "bad" is invalid: ')
    assert message in body["message"]
    assert field in {c["field"] for c in body["details"]["causes"]}
    with pytest.raises(ApiException) as missing:
        client.CustomObjectsApi(api).get_namespaced_custom_object(
            CRD_GROUP, "v1", namespace, crd["plural"], "bad"
        )
    assert missing.value.status == 404


def test_crd_status_subresource_changes_status_not_spec(
    api: client.ApiClient, crd: dict[str, str], namespace: str
) -> None:
    custom = client.CustomObjectsApi(api)
    args = (CRD_GROUP, "v1", namespace, crd["plural"])
    spec = {"host": "ipa-hidden.example.test", "type": "full"}
    obj = _create_probe(api, crd, namespace, _probe(crd, "probe", spec))

    # PUT /status with a different spec: the status is stored, the spec change is ignored.
    obj["spec"] = {"host": "changed.example.test", "type": "data"}
    obj["status"] = {"phase": "Succeeded", "lastBackup": "ipa-data-2026-01-01-00-00-00"}
    after_status = custom.replace_namespaced_custom_object_status(*args, "probe", obj)
    assert after_status["status"] == {"phase": "Succeeded", "lastBackup": "ipa-data-2026-01-01-00-00-00"}
    assert after_status["spec"] == spec
    assert after_status["metadata"]["generation"] == 1

    # PUT on the main resource with a different status: the status change is ignored, the spec stored.
    after_status["spec"] = {"host": "ipa-hidden.example.test", "type": "data"}
    after_status["status"] = {"phase": "Overwritten"}
    after_main = custom.replace_namespaced_custom_object(*args, "probe", after_status)
    assert after_main["spec"] == {"host": "ipa-hidden.example.test", "type": "data"}
    assert after_main["status"]["phase"] == "Succeeded"
    assert after_main["metadata"]["generation"] == 2

    # The status is validated too.
    after_main["status"] = {"phase": 42}
    with pytest.raises(ApiException) as refused:
        custom.replace_namespaced_custom_object_status(*args, "probe", after_main)
    assert refused.value.status == 422
    assert "status.phase: Invalid value" in json.loads(refused.value.body)["message"]


# --- 2. RBAC ----------------------------------------------------------------------------------------


def test_rbac_is_enforced_for_a_service_account_token(
    api: client.ApiClient, platform: stack.Platform, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "pod-reader"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "pod-reader", "namespace": namespace}],
        },
    )
    token = core.create_namespaced_service_account_token(
        "pod-reader", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    assert token.count(".") == 2  # a signed JWT

    user = f"system:serviceaccount:{namespace}:pod-reader"
    as_sa = token_client(platform, token)
    review = client.AuthenticationV1Api(as_sa).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    )
    assert review.status.user_info.username == user
    assert f"system:serviceaccounts:{namespace}" in review.status.user_info.groups

    sa_core = client.CoreV1Api(as_sa)

    def can_list_pods() -> bool:
        try:
            sa_core.list_namespaced_pod(namespace)
            return True
        except ApiException as err:
            if err.status != 403:  # the authorizer's cache may not have the binding yet
                raise
            return False

    wait_for("RoleBinding to take effect", can_list_pods, timeout=15)
    assert sa_core.list_namespaced_pod(namespace).items == []

    def refused(call: Any, *args: Any) -> ApiException:
        with pytest.raises(ApiException) as caught:
            call(*args)
        caught.value.message = json.loads(caught.value.body)["message"]
        return caught.value

    err = refused(sa_core.list_namespaced_secret, namespace)
    assert err.status == 403
    assert (
        f'User "{user}" cannot list resource "secrets" in API group "" in the namespace "{namespace}"'
        in err.message
    )
    err = refused(
        sa_core.create_namespaced_pod,
        namespace,
        freeipa_pod.freeipa_pod("intruder", "ipa-hidden.example.test", platform.ldap_uri),
    )
    assert err.status == 403
    assert f'User "{user}" cannot create resource "pods"' in err.message
    # The Role grants nothing outside its namespace.
    err = refused(sa_core.list_namespaced_pod, "default")
    assert err.status == 403
    assert 'cannot list resource "pods" in API group "" in the namespace "default"' in err.message

    # The authorizer agrees when asked directly, and a forged token is not authenticated at all.
    authz = client.AuthorizationV1Api(api)

    def allowed(verb: str, resource: str) -> bool:
        return bool(
            authz.create_subject_access_review(
                {
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SubjectAccessReview",
                    "spec": {
                        "user": user,
                        "groups": [f"system:serviceaccounts:{namespace}"],
                        "resourceAttributes": {"namespace": namespace, "verb": verb, "resource": resource},
                    },
                }
            ).status.allowed
        )

    assert allowed("list", "pods") and allowed("get", "pods")
    assert not allowed("create", "pods")
    assert not allowed("list", "secrets")
    assert not allowed("create", "pods/exec")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    err = refused(client.CoreV1Api(token_client(platform, forged)).list_namespaced_pod, namespace)
    assert err.status == 401


# --- 3. exec through the API server -----------------------------------------------------------------
#
# Tests that start stand-in pods have short names on purpose: the namespace fixture names the namespace
# after the test, and the pods' FQDN (<host>.freeipa.<namespace>.svc.cluster.local, setHostnameAsFQDN)
# must fit the 64 characters of a Linux hostname, or the node never starts the pod.


def test_exec_codes(api: client.ApiClient, namespace: str, freeipa: Any) -> None:
    """ipa-backup's exit codes (0, 2, 1) and its stderr come back through exec, stdout kept apart."""
    hidden = freeipa("ipa-hidden.example.test")
    partial = freeipa("ipa-partial.example.test")

    rc, out, err = run(api, namespace, hidden, ["ipa-backup", "--data"])
    assert rc == 0, err
    assert out == ""  # ipa-backup writes everything to stderr
    match = re.search(r"^Backed up to (/var/lib/ipa/backup/ipa-data-\d{4}(?:-\d\d){5})$", err, re.M)
    assert match, err
    assert err.rstrip().endswith("The ipa-backup command was successful")
    rc, out, _ = run(api, namespace, hidden, ["ls", match.group(1)])
    assert (rc, sorted(out.split())) == (0, ["header", "ipa-data.tar"])

    rc, out, err = run(api, namespace, hidden, ["ipa-backup", "--online"])
    assert rc == 2
    assert out == ""
    assert "You cannot specify --online without --data" in err
    assert "Backed up to" not in err

    rc, out, err = run(api, namespace, partial, ["ipa-backup", "--data"])
    assert rc == 1
    assert out == ""
    assert "Preparing backup on ipa-partial.example.test" in err
    assert ROLE_ERROR in err
    assert "The ipa-backup command failed. See /var/log/ipabackup.log for more information" in err
    assert "Backed up to" not in err

    # Arbitrary exit codes and the split of the two streams survive the trip.
    rc, out, err = run(api, namespace, hidden, ["sh", "-c", "echo to-out; echo to-err >&2; exit 37"])
    assert (rc, out, err) == (37, "to-out\n", "to-err\n")


def test_exec_binary(api: client.ApiClient, namespace: str, freeipa: Any) -> None:
    """64 MiB of random bytes come out of `cat` intact, streamed frame by frame."""
    pod = freeipa()
    size = 64 * MiB
    rc, out, err = run(
        api, namespace, pod, ["sh", "-c", f"head -c {size} /dev/urandom > /tmp/blob && sha256sum /tmp/blob"]
    )
    assert rc == 0, err
    expected = out.split()[0]
    assert re.fullmatch(r"[0-9a-f]{64}", expected)

    ws = open_exec(api, namespace, pod, ["cat", "/tmp/blob"], binary=True)
    digest = hashlib.sha256()
    received = 0
    largest = 0
    err_bytes = bytearray()

    def on_stdout(chunk: bytes) -> None:
        nonlocal received, largest
        assert isinstance(chunk, bytes)
        digest.update(chunk)
        received += len(chunk)
        largest = max(largest, len(chunk))

    rc = finish(ws, on_stdout, err_bytes.extend, timeout=60)
    assert rc == 0
    assert bytes(err_bytes) == b""
    assert received == size
    assert digest.hexdigest() == expected
    # The data was streamed, not buffered: each read returned one frame, and there is no capture copy.
    assert largest <= 4 * MiB
    with pytest.raises(TypeError, match="configured to not capture"):
        ws.read_all()


def test_exec_stdin(api: client.ApiClient, namespace: str, freeipa: Any) -> None:
    """Bytes written to stdin reach the command, and closing the channel (v5) gives it EOF."""
    pod = freeipa()
    data = os.urandom(3 * MiB + 12345)
    rc, out, err = run(api, namespace, pod, ["sha256sum"], stdin_data=data, timeout=30)
    assert (rc, err) == (0, "")
    assert out == f"{hashlib.sha256(data).hexdigest()}  -\n"

    # The command sees EOF, ends on its own, and says what it read.
    rc, out, err = run(
        api,
        namespace,
        pod,
        ["sh", "-c", 'n=$(wc -c); echo "read $n bytes"; echo eof >&2; exit 5'],
        stdin_data=b"x" * 100_001,
        timeout=30,
    )
    assert (rc, out, err) == (5, "read 100001 bytes\n", "eof\n")

    # Closing stdin with nothing written is a clean, empty EOF.
    rc, out, _ = run(api, namespace, pod, ["wc", "-c"], stdin_data=b"", timeout=30)
    assert (rc, out.strip()) == (0, "0")


# --- 4. pod isolation -------------------------------------------------------------------------------


def test_pod_isolation(api: client.ApiClient, namespace: str, freeipa: Any) -> None:
    """Two stand-in pods do not share /var/lib/ipa/backup (each has its own volume)."""
    first = freeipa("ipa-hidden.example.test", name="ipa-one")
    second = freeipa("ipa-hidden.example.test", name="ipa-two")
    marker = f"/var/lib/ipa/backup/marker-{uuid.uuid4().hex}"

    rc, _, err = run(api, namespace, first, ["sh", "-c", f"echo one > {marker}"])
    assert rc == 0, err
    assert run(api, namespace, first, ["cat", marker])[:2] == (0, "one\n")

    rc, out, _ = run(api, namespace, second, ["ls", "-A", "/var/lib/ipa/backup"])
    assert rc == 0  # the directory exists in the second pod too; the file just is not in it
    assert marker.rsplit("/", 1)[1] not in out.split()
    assert run(api, namespace, second, ["test", "-e", marker])[0] == 1

    # And writes in the second pod do not reach the first.
    assert run(api, namespace, second, ["sh", "-c", f"echo two > {marker}"])[0] == 0
    assert run(api, namespace, first, ["cat", marker])[:2] == (0, "one\n")
    assert run(api, namespace, second, ["cat", marker])[:2] == (0, "two\n")


# --- 5. S3 ------------------------------------------------------------------------------------------


def test_s3_multipart_round_trip_100mib(platform: stack.Platform) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=platform.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=platform.s3_access_key,
        aws_secret_access_key=platform.s3_secret_key,
        config=botocore.config.Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    bucket, key = platform.s3_bucket, f"platform-test/{uuid.uuid4().hex}.bin"
    size, part_size = 100 * MiB, 8 * MiB
    data = os.urandom(size)
    expected = hashlib.sha256(data).hexdigest()

    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        parts: list[Any] = []
        for number, offset in enumerate(range(0, size, part_size), start=1):
            etag = s3.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data[offset : offset + part_size],
            )["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        assert len(parts) == 13  # 12 x 8 MiB + 4 MiB
        listed = s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
        assert [p["Size"] for p in listed] == [part_size] * 12 + [4 * MiB]
        s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
        upload_id = ""
        del data

        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ContentLength"] == size
        assert head["ETag"].strip('"').endswith("-13")  # a multipart object's ETag
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        digest, received = hashlib.sha256(), 0
        for chunk in body.iter_chunks(chunk_size=MiB):
            digest.update(chunk)
            received += len(chunk)
        assert received == size
        assert digest.hexdigest() == expected
    finally:
        if upload_id:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        s3.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(s3.exceptions.ClientError) as gone:
        s3.head_object(Bucket=bucket, Key=key)
    assert gone.value.response["Error"]["Code"] in {"404", "NoSuchKey"}
    assert not any(u["Key"] == key for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


# --- 6. loopback only -------------------------------------------------------------------------------


def _platform_pids(platform: stack.Platform) -> dict[str, int]:
    run_dir = Path(platform.state_dir) / "run"
    pids = {name: processes.running_pid(run_dir, name) for name in stack.STOP_ORDER}
    slapd = Path(platform.state_dir) / "ldap" / "run" / "slapd.pid"
    pids["ns-slapd"] = int(slapd.read_text().strip())
    missing = [name for name, pid in pids.items() if pid is None]
    assert not missing, f"platform processes not running: {missing}"
    return pids  # type: ignore[return-value]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _listening(proto: str) -> list[tuple[str, int, str]]:
    """(address, port, inode) of every listening TCP socket / bound UDP socket in /proc/net/<proto>."""
    found = []
    for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if proto.startswith("tcp") and state != "0A":  # LISTEN
            continue
        hex_addr, hex_port = local.split(":")
        raw = bytes.fromhex(hex_addr)
        if len(raw) == 4:
            addr = ".".join(str(b) for b in raw[::-1])
        else:  # IPv6: four little-endian 32-bit words
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
            addr = ":".join(words[i : i + 2].hex() for i in range(0, 16, 2))
        found.append((addr, int(hex_port, 16), inode))
    return found


def test_platform_listens_on_loopback_only(platform: stack.Platform) -> None:
    # What `ss` reports for the well-known ports.
    ss = subprocess.run(["ss", "-ltnH"], check=True, capture_output=True, text=True).stdout
    by_port: dict[int, set[str]] = {}
    for line in ss.splitlines():
        host, _, number = line.split()[3].rpartition(":")
        by_port.setdefault(int(number), set()).add(host)
    for wanted in sorted(PLATFORM_PORTS):
        assert by_port.get(wanted) == {"127.0.0.1"}, f"port {wanted} listens on {by_port.get(wanted)}"

    # And every socket any platform process listens on (not only the well-known ports), by owner.
    pids = _platform_pids(platform)
    owned = {inode: name for name, pid in pids.items() for inode in _socket_inodes(pid)}
    seen: dict[str, set[tuple[str, int]]] = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for addr, port, inode in _listening(proto):
            if inode in owned:
                seen.setdefault(owned[inode], set()).add((addr, port))
    for name in pids:
        assert seen.get(name), f"{name} listens on nothing"
    exposed = {name: sorted(s for s in socks if s[0] != "127.0.0.1") for name, socks in seen.items()}
    assert all(not socks for socks in exposed.values()), f"non-loopback listeners: {exposed}"
    assert {port for socks in seen.values() for _, port in socks} >= PLATFORM_PORTS
