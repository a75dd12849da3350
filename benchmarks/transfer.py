"""Transfer benchmark: a stand-in FreeIPA archive pod → gpg → S3, by the operator and by a shell pipeline.

Run by hand against an already running local platform (`python -m testbed up`), from the repository root:

    IDM_TESTBED_KEEP=1 .venv/bin/python benchmarks/transfer.py            # 1 GiB and 4 GiB
    IDM_TESTBED_KEEP=1 .venv/bin/python benchmarks/transfer.py --sizes 1  # sizes in GiB, comma-separated

For each size it creates a fresh namespace with the Secrets and a stand-in FreeIPA pod whose archive carries
that many bytes of incompressible payload, starts the real operator process for that namespace (sampling its
VmRSS/VmHWM every 0.2 s), creates an IdmBackup (Data, online, podCleanup Keep, tmpDir /data/tmp, S3 parts of
16 MiB) and times its status steps. Then, on the very same archive file left in the pod, it times the shell
pipeline a user would write instead:

    kubectl exec ... -- cat FILE | gpg --encrypt ... | python -c '... upload_fileobj(sys.stdin.buffer, ...)'

It prints a table and appends it to benchmarks/transfer.md (unless --no-record). The platform is shared:
it is never stopped here; only this run's namespace, S3 objects and temporary directories are removed.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform as pyplatform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "operator")]

import boto3  # noqa: E402
import botocore.config  # noqa: E402
import yaml  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402

from testbed import freeipa_pod, stack  # noqa: E402
from testbed.gpgkeys import Keyring  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
GROUP, VERSION, PLURAL = "idm-backup.io", "v1alpha1", "idmbackups"
S3_SECRET, KEY_SECRET = "s3-credentials", "backup-public-key"
POD, HOST = "ipa-hidden", "ipa-hidden.example.test"
CONTAINER = "freeipa-server"
KUBECTL = Path.home() / ".cache/idm-backup-operator/bin/kubernetes-v1.36.3/kubectl"
MD = REPO / "benchmarks" / "transfer.md"
UPLOADING, VERIFYING = "uploading", "verifying the stored archive"
CHECKSUM = "computing the archive's checksum"

# The uploader of the pipeline: boto3's managed (multipart, 10 threads) upload of a non-seekable stream,
# with boto3's defaults; credentials and region come from the environment, as a user would set them.
UPLOADER = """\
import resource, sys
import boto3, botocore.config
path_style = botocore.config.Config(s3={"addressing_style": "path"})
s3 = boto3.client("s3", endpoint_url=sys.argv[1], config=path_style)
s3.upload_fileobj(sys.stdin.buffer, sys.argv[2], sys.argv[3])
print("uploader-maxrss-kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def load_platform() -> stack.Platform:
    if not stack.is_up():
        sys.exit(
            "the local platform is not running: start it with `python -m testbed up` (never stopped here)"
        )
    data = json.loads((stack.state_dir() / "platform.json").read_text())
    return stack.Platform(**data)


def wait_until(what: str, check: Any, timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def ensure_crds(api: client.ApiClient) -> None:
    """Create the CRDs if missing; existing ones are left alone (the platform is shared)."""
    ext = client.ApiextensionsV1Api(api)
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(crd)
            time.sleep(0.5)  # discovery lags the Established condition a little
        except client.ApiException as err:
            if err.status != 409:
                raise

        def established(name: str = crd["metadata"]["name"]) -> bool:
            conditions = ext.read_custom_resource_definition(name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        wait_until(f"CRD {path.name} established", established, 30)


class RssSampler(threading.Thread):
    """Reads VmRSS and VmHWM of one process from /proc every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.max_rss_kib = 0
        self.hwm_kib = 0
        self.samples = 0
        self._halt = threading.Event()

    def read(self) -> tuple[int, int] | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def sample(self) -> None:
        got = self.read()
        if got is not None:
            rss, hwm = got
            self.max_rss_kib = max(self.max_rss_kib, rss)
            self.hwm_kib = max(self.hwm_kib, hwm)
            self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self.sample()  # VmHWM at the end: the process is still alive here
        self._halt.set()
        self.join()


class StepWatcher(threading.Thread):
    """Every status.step of one IdmBackup as the API server announces it, with its arrival time.

    A watch sees each status patch, including steps shorter than the 0.1 s poll (verifying is one HEAD).
    """

    def __init__(self, custom: client.CustomObjectsApi, ns: str, name: str) -> None:
        super().__init__(name="step-watcher", daemon=True)
        self.custom, self.ns, self.name = custom, ns, name
        self.steps: list[tuple[float, str]] = []
        self._watch = watch.Watch()
        self.ready = threading.Event()
        self.stopped = False

    def run(self) -> None:
        last = None
        self.ready.set()
        try:
            for event in self._watch.stream(
                self.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.ns,
                PLURAL,
                field_selector=f"metadata.name={self.name}",
                timeout_seconds=7200,
            ):
                now = time.monotonic()
                step = (event["object"].get("status") or {}).get("step")
                if step != last:
                    self.steps.append((now, str(step)))
                    last = step
        except Exception as err:  # the poll remains; say why the watch ended
            if not self.stopped:
                log(f"  (step watch ended: {err})")

    def stop(self) -> None:
        self.stopped = True
        self._watch.stop()

    def transfer(self) -> tuple[float, float] | None:
        start = next((t for t, s in self.steps if s.startswith(UPLOADING)), None)
        end = next((t for t, s in self.steps if s == VERIFYING), None)
        return (start, end) if start is not None and end is not None else None


@dataclass
class Result:
    size_gib: float
    run: int = 1
    plaintext_bytes: int = 0
    ciphertext_bytes: int = 0
    op_transfer_s: float = 0.0
    op_total_s: float = 0.0  # status.durationSeconds
    op_wall_s: float = 0.0  # IdmBackup created → Succeeded seen
    op_hwm_mib: float = 0.0
    op_idle_rss_mib: float = 0.0
    op_max_rss_sampled_mib: float = 0.0
    pipe_s: float = 0.0
    pipe_object_bytes: int = 0
    pipe_uploader_rss_mib: float = 0.0
    steps: list[tuple[float, str]] = field(default_factory=list)
    timed_by: str = "watch"

    @property
    def op_mbps(self) -> float:
        return self.plaintext_bytes / self.op_transfer_s / 1e6

    @property
    def pipe_mbps(self) -> float:
        return self.plaintext_bytes / self.pipe_s / 1e6

    @property
    def ratio(self) -> float:
        return self.op_mbps / self.pipe_mbps


class Bench:
    def __init__(self, plat: stack.Platform, verbose_operator: bool, flush: bool = True) -> None:
        self.plat = plat
        self.verbose_operator = verbose_operator
        self.flush = flush
        self.api = config.new_client_from_config(config_file=plat.kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.s3 = boto3.client(
            "s3",
            endpoint_url=plat.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id=plat.s3_access_key,
            aws_secret_access_key=plat.s3_secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    # -- set-up ----------------------------------------------------------------------------------------

    def create_namespace(self, size_gib: float) -> str:
        # Short: the pod's FQDN (host.subdomain.<namespace>.svc.cluster.local) must fit in 64 characters.
        name = f"bench-{str(size_gib).replace('.', 'p')}g-{uuid.uuid4().hex[:6]}"
        self.core.create_namespace(
            {"metadata": {"name": name, "labels": {"idm-backup.io/benchmark": "true"}}}
        )

        def has_default_sa() -> bool:
            try:
                self.core.read_namespaced_service_account("default", name)
                return True
            except client.ApiException:
                return False

        wait_until("the default ServiceAccount", has_default_sa, 30, 0.2)
        return name

    def create_secrets(self, ns: str, armored_public_key: bytes) -> None:
        self.core.create_namespaced_secret(ns, freeipa_pod.dm_password_secret(self.plat.ldap_password))
        self.core.create_namespaced_secret(
            ns,
            {
                "metadata": {"name": S3_SECRET},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": self.plat.s3_access_key,
                    "AWS_SECRET_ACCESS_KEY": self.plat.s3_secret_key,
                },
            },
        )
        self.core.create_namespaced_secret(
            ns, {"metadata": {"name": KEY_SECRET}, "stringData": {"restore.asc": armored_public_key.decode()}}
        )

    def create_pod(self, ns: str, payload: int) -> None:
        self.core.create_namespaced_persistent_volume_claim(ns, freeipa_pod.data_claim(f"{POD}-data", "20Gi"))
        self.core.create_namespaced_pod(
            ns, freeipa_pod.freeipa_pod(POD, HOST, self.plat.ldap_uri, payload_bytes=payload)
        )

        def ready() -> bool:
            pod = self.core.read_namespaced_pod(POD, ns)
            return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])

        wait_until(f"pod {POD} ready", ready, 120)

    def start_operator(self, ns: str, work: Path) -> subprocess.Popen[bytes]:
        pvc_root = work / "pvc"
        pvc_root.mkdir()
        env = {**os.environ, "KUBECONFIG": self.plat.kubeconfig, "IDM_BACKUP_PVC_ROOT": str(pvc_root)}
        argv = [sys.executable, "-m", "idm_backup_operator", "run", "--namespace", ns]
        if self.verbose_operator:
            argv.append("--verbose")
        with (work / "operator.log").open("ab") as out:
            return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def backup_spec(self, prefix: str) -> dict[str, Any]:
        return {
            "type": "Data",
            "online": True,
            "podCleanup": "Keep",
            "tmpDir": "/data/tmp",
            "target": {
                "podName": POD,
                "ldap": {
                    "url": self.plat.ldap_uri,
                    "passwordSecretRef": {"name": freeipa_pod.DM_PASSWORD_SECRET},
                },
            },
            "encryption": {"publicKeysSecretRef": {"name": KEY_SECRET}},
            "storage": {
                "s3": {
                    "bucket": self.plat.s3_bucket,
                    "prefix": prefix,
                    "endpoint": self.plat.s3_endpoint,
                    "forcePathStyle": True,
                    "credentialsSecretRef": {"name": S3_SECRET},
                    "partSizeMiB": 16,
                }
            },
        }

    def settled_rss(self, pid: int) -> int:
        """The operator's VmRSS (KiB) once it has started up: unchanged for 1 s, or after 15 s."""
        probe = RssSampler(pid)
        last, since, deadline = -1, time.monotonic(), time.monotonic() + 15
        while time.monotonic() < deadline:
            got = probe.read()
            rss = got[0] if got else 0
            if abs(rss - last) > 256:
                last, since = rss, time.monotonic()
            elif time.monotonic() - since >= 1.0:
                break
            time.sleep(0.1)
        return last

    # -- the operator's backup -------------------------------------------------------------------------

    def run_backup(self, ns: str, prefix: str, result: Result, timeout: float) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "IdmBackup",
            "metadata": {"name": "bench"},
            "spec": self.backup_spec(prefix),
        }
        watcher = StepWatcher(self.custom, ns, "bench")
        watcher.start()
        watcher.ready.wait()
        time.sleep(0.5)  # let the watch connect before the object exists
        created = time.monotonic()
        self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        last_step = None
        upload_start = upload_end = None
        deadline = created + timeout
        while True:
            obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "bench")
            now = time.monotonic()
            status = obj.get("status") or {}
            step = status.get("step")
            if step != last_step:
                if self.flush and step and step.startswith(CHECKSUM):
                    # ipa-backup has just written the archive: flush it to disk while the pod checksums it
                    # (excluded from the transfer), so that its write-back does not land in the transfer.
                    threading.Thread(target=os.sync, daemon=True).start()
                result.steps.append((now - created, str(step)))
                log(f"  +{now - created:7.1f}s  step: {step}")
                if upload_start is None and step and step.startswith(UPLOADING):
                    upload_start = now
                elif (
                    upload_start is not None and upload_end is None and not (step or "").startswith(UPLOADING)
                ):
                    # Normally "verifying the stored archive"; if a 0.1 s poll missed it, the next step.
                    upload_end = now
                    if step != VERIFYING:
                        log(f"  (missed '{VERIFYING}': transfer ends at step {step!r})")
                last_step = step
            if status.get("phase") in ("Succeeded", "Failed"):
                result.op_wall_s = now - created
                break
            if now > deadline:
                raise TimeoutError(f"the backup did not finish within {timeout:.0f}s: {status}")
            time.sleep(0.1)
        if status["phase"] != "Succeeded":
            raise RuntimeError(f"the backup failed: {status.get('reason')}: {status.get('message')}")
        time.sleep(0.5)
        watcher.stop()
        assert upload_start is not None and upload_end is not None
        watched = watcher.transfer()
        if watched is not None:
            result.op_transfer_s = watched[1] - watched[0]
            result.steps = [(t - created, s) for t, s in watcher.steps]
            log(
                f"  transfer by watch {result.op_transfer_s:.2f}s, "
                f"by 0.1 s poll {upload_end - upload_start:.2f}s"
            )
        else:
            result.timed_by = "poll"
            result.op_transfer_s = upload_end - upload_start
        result.op_total_s = float(status.get("durationSeconds") or 0)
        result.plaintext_bytes = int(status["archive"]["plaintextSizeBytes"])
        result.ciphertext_bytes = int(status["archive"]["sizeBytes"])
        return status

    # -- the shell pipeline ----------------------------------------------------------------------------

    def run_pipeline(
        self, ns: str, archive: str, fingerprint: str, gpg_home: Path, key: str
    ) -> tuple[float, str]:
        kubectl = [str(KUBECTL), "exec", "-n", ns, POD, "-c", CONTAINER, "--", "cat", archive]
        gpg = [
            "gpg",
            "--batch",
            "--trust-model",
            "always",
            "--compress-algo",
            "none",
            "-r",
            fingerprint,
            "--homedir",
            str(gpg_home),
            "--encrypt",
        ]
        upload = [sys.executable, "-c", UPLOADER, self.plat.s3_endpoint, self.plat.s3_bucket, key]
        line = " | ".join(shlex.join(part) for part in (kubectl, gpg, upload))
        env = {
            **os.environ,
            "KUBECONFIG": self.plat.kubeconfig,
            "AWS_ACCESS_KEY_ID": self.plat.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.plat.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        if self.flush:
            os.sync()  # the operator's object has just been written to S3: flush it first, likewise
            time.sleep(1)
        started = time.monotonic()
        done = subprocess.run(["bash", "-o", "pipefail", "-c", line], env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"the pipeline failed ({done.returncode}): {done.stderr[-2000:]}")
        return elapsed, done.stderr

    # -- clean-up --------------------------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        bucket = self.plat.s3_bucket
        deleted = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                self.s3.delete_object(Bucket=bucket, Key=item["Key"])
                deleted += 1
        for upload in self.s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []):
            self.s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        return deleted

    def exec_in_pod(self, ns: str, *argv: str) -> None:
        subprocess.run(
            [str(KUBECTL), "exec", "-n", ns, POD, "-c", CONTAINER, "--", *argv],
            env={**os.environ, "KUBECONFIG": self.plat.kubeconfig},
            capture_output=True,
            timeout=300,
            check=False,
        )

    # -- one size --------------------------------------------------------------------------------------

    def run_size(self, size_gib: float, timeout: float, run: int = 1) -> Result:
        result = Result(size_gib, run)
        payload = int(size_gib * GiB)
        work = Path(tempfile.mkdtemp(prefix="idm-bench-"))
        ns = prefix = ""
        operator: subprocess.Popen[bytes] | None = None
        sampler: RssSampler | None = None
        try:
            log(f"== {size_gib:g} GiB: generating a key, namespace, secrets, pod")
            keyring_home, pipe_home = work / "keyring", work / "pipeline-gnupg"
            keyring_home.mkdir(mode=0o700)
            pipe_home.mkdir(mode=0o700)
            ring = Keyring(keyring_home)
            exported = ring.export(ring.make("IdM Restore <restore@example.test>"))
            # The pipeline's gpg home holds the public key only, as the operator's does.
            Keyring(pipe_home).gpg("--import", input=exported.public)

            ns = self.create_namespace(size_gib)
            prefix = f"bench/{ns}"
            self.create_secrets(ns, exported.armored)
            self.create_pod(ns, payload)
            log(f"   namespace {ns}, pod ready; starting the operator")

            operator = self.start_operator(ns, work)
            sampler = RssSampler(operator.pid)
            sampler.start()
            result.op_idle_rss_mib = self.settled_rss(operator.pid) / 1024
            status = self.run_backup(ns, prefix, result, timeout)
            sampler.stop()
            result.op_hwm_mib = sampler.hwm_kib / 1024
            result.op_max_rss_sampled_mib = sampler.max_rss_kib / 1024
            log(
                f"   operator: {result.plaintext_bytes} plaintext bytes, "
                f"transfer {result.op_transfer_s:.1f}s "
                f"({result.op_mbps:.1f} MB/s), VmHWM {result.op_hwm_mib:.1f} MiB "
                f"({sampler.samples} samples), backup {result.op_total_s:.1f}s"
            )
            stop_process(operator)

            archive = status["ipaBackup"]["directory"].rstrip("/") + "/ipa-data.tar"
            key = f"{prefix}/pipeline/ipa-data.tar.gpg"
            log(f"   pipeline on {archive}")
            result.pipe_s, stderr = self.run_pipeline(ns, archive, exported.fingerprint, pipe_home, key)
            for line in stderr.splitlines():
                if line.startswith("uploader-maxrss-kib"):
                    result.pipe_uploader_rss_mib = int(line.split()[1]) / 1024
            result.pipe_object_bytes = self.s3.head_object(Bucket=self.plat.s3_bucket, Key=key)[
                "ContentLength"
            ]
            log(
                f"   pipeline: {result.pipe_s:.1f}s ({result.pipe_mbps:.1f} MB/s), object "
                f"{result.pipe_object_bytes} bytes (operator's: {result.ciphertext_bytes}), uploader "
                f"max RSS {result.pipe_uploader_rss_mib:.0f} MiB"
            )
            if abs(result.pipe_object_bytes - result.ciphertext_bytes) > MiB:
                raise RuntimeError(
                    "the pipeline's object differs in size from the operator's: not the same work"
                )
            return result
        finally:
            self.cleanup(ns, prefix, work, operator, sampler)

    def cleanup(
        self,
        ns: str,
        prefix: str,
        work: Path,
        operator: subprocess.Popen[bytes] | None,
        sampler: RssSampler | None,
    ) -> None:
        steps: list[tuple[str, Callable[[], object]]] = []
        if sampler is not None and sampler.is_alive():
            steps.append(("stop the RSS sampler", sampler.stop))
        if operator is not None and operator.poll() is None:
            steps.append(("stop the operator", lambda: stop_process(operator)))
        if (work / "operator.log").exists():
            keep = Path(tempfile.gettempdir()) / f"idm-bench-{ns or 'x'}-operator.log"
            steps.append(
                (f"keep the operator log as {keep}", lambda: shutil.copy(work / "operator.log", keep))
            )
        if ns:
            steps.append(
                (
                    "remove the backup in the pod",
                    lambda: self.exec_in_pod(ns, "rm", "-rf", "/data/var/lib/ipa/backup", "/data/tmp"),
                )
            )
            steps.append(
                (
                    f"delete namespace {ns}",
                    lambda: self.core.delete_namespace(ns, propagation_policy="Background"),
                )
            )
        if prefix:
            steps.append(
                (
                    f"delete S3 objects under {prefix}/",
                    lambda: log(f"   removed {self.delete_prefix(prefix + '/')} S3 objects under {prefix}/"),
                )
            )
        for home in (work / "keyring", work / "pipeline-gnupg"):
            steps.append(
                (
                    "stop gpg daemons",
                    functools.partial(
                        subprocess.run,
                        ["gpgconf", "--homedir", str(home), "--kill", "all"],
                        capture_output=True,
                    ),
                )
            )
        steps.append(("remove the temporary directory", lambda: shutil.rmtree(work, ignore_errors=True)))
        log(f"   cleaning up {ns}")
        for what, step in steps:
            try:
                step()
            except Exception as err:  # keep cleaning up
                log(f"   could not {what}: {err}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def table(results: list[Result]) -> str:
    head = (
        "| size | run | plaintext bytes | operator transfer s | operator MB/s | pipeline s | pipeline MB/s "
        "| ratio | operator peak RSS MiB (VmHWM) | operator RSS before the backup MiB "
        "| backup duration s (status) | pipeline uploader max RSS MiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = ""
    for r in results:
        rows += (
            f"| {r.size_gib:g} GiB | {r.run} | {r.plaintext_bytes} | {r.op_transfer_s:.1f} | {r.op_mbps:.1f} "
            f"| {r.pipe_s:.1f} | {r.pipe_mbps:.1f} | {r.ratio:.2f} | {r.op_hwm_mib:.1f} "
            f"| {r.op_idle_rss_mib:.1f} "
            f"| {r.op_total_s:.1f} | {r.pipe_uploader_rss_mib:.0f} |\n"
        )
    return head + rows


def key_steps(r: Result) -> str:
    """When the steps that bound the transfer began, in seconds after the IdmBackup was created."""
    wanted = ("ipa-backup: starting", CHECKSUM, UPLOADING, VERIFYING, "done")
    found = [(t, s) for t, s in r.steps if s.startswith(wanted)]
    return ", ".join(f"{s.split(' ', 1)[0] if s.startswith(UPLOADING) else s} +{t:.1f}" for t, s in found)


def machine() -> str:
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    mem_gib = int(mem.split()[1]) / (1 << 20)
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores, {mem_gib:.1f} GiB RAM, Python {pyplatform.python_version()}, "
        f"load average before the run {load[0]:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="1,4", help="archive payload sizes in GiB, comma-separated (default 1,4)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="per backup, seconds")
    parser.add_argument("--no-record", action="store_true", help="do not append the results to transfer.md")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size, each from scratch (default 1)")
    parser.add_argument(
        "--no-flush", action="store_true", help="no sync before the transfers (see transfer.md, 'Method')"
    )
    parser.add_argument("--verbose-operator", action="store_true", help="run the operator with --verbose")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]

    plat = load_platform()
    bench = Bench(plat, args.verbose_operator, flush=not args.no_flush)
    ensure_crds(bench.api)
    facts = machine()
    log(facts)
    results: list[Result] = []
    for size in sizes:
        for run in range(1, args.repeat + 1):
            results.append(bench.run_size(size, args.timeout, run))
    out = table(results)
    print()
    print(out)
    for r in results:
        print(f"{r.size_gib:g} GiB run {r.run} steps: {key_steps(r)}")
    if not args.no_record:
        when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        cmd = "IDM_TESTBED_KEEP=1 .venv/bin/python benchmarks/transfer.py " + shlex.join(sys.argv[1:])
        with MD.open("a") as md:
            md.write(f"\n### Run {when}\n\n{facts}; `{cmd.strip()}`\n\n{out}\n")
            for r in results:
                md.write(
                    f"- {r.size_gib:g} GiB run {r.run}, step start times (s after creation): {key_steps(r)}\n"
                )
        log(f"appended to {MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
