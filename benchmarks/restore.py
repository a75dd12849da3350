"""Restore benchmark: an encrypted archive in S3 → gpg → a stand-in FreeIPA pod, by the operator and by a
shell pipeline.

Run by hand against an already running local platform (`python -m testbed up`), from the repository root:

    IDM_TESTBED_KEEP=1 .venv/bin/python benchmarks/restore.py            # 1 GiB and 4 GiB
    IDM_TESTBED_KEEP=1 .venv/bin/python benchmarks/restore.py --sizes 1  # sizes in GiB, comma-separated

For each size it starts a 389-ds of its own (a restore replaces whole backends), creates a fresh namespace
with the Secrets and a stand-in FreeIPA pod whose /data is a host directory (389-ds, a host process, imports
the staged LDIF from there) and whose archive carries that many bytes of incompressible payload, and has the
real operator back it up to S3 (IdmBackup, Data, encrypted). Then it starts a fresh operator process
(sampling its VmRSS/VmHWM every 0.2 s), creates an IdmRestore of that backup and times its status steps.
Then, for the very same object in S3, it times the shell pipeline a user would write instead:

    aws s3 cp s3://BUCKET/KEY - | gpg --batch --decrypt | kubectl exec -i ... -- sh -c 'cat > FILE'

It prints a table and appends it to benchmarks/restore.md (unless --no-record). The platform is shared: it
is never stopped here; only this run's namespace, S3 objects, 389-ds and temporary directories are removed.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import functools
import os
import resource
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
sys.path[:0] = [str(REPO), str(REPO / "operator"), str(REPO / "benchmarks")]

import boto3  # noqa: E402
import botocore.config  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402
from transfer import (  # noqa: E402
    KUBECTL,
    RssSampler,
    ensure_crds,
    load_platform,
    log,
    machine,
    stop_process,
    wait_until,
)

from testbed import freeipa_pod, stack  # noqa: E402
from testbed.gpgkeys import Keyring  # noqa: E402
from testbed.ldap_server import DirectoryServer  # noqa: E402
from testbed.processes import free_port  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
GROUP, VERSION = "idm-backup.io", "v1alpha1"
BACKUPS, RESTORES = "idmbackups", "idmrestores"
S3_SECRET, PUBLIC_KEY_SECRET = "s3-credentials", "backup-public-key"
PRIVATE_KEY_SECRET = "restore-private-key"
POD, HOST = "ipa-hidden", "ipa-hidden.example.test"
CONTAINER = "freeipa-server"
MD = REPO / "benchmarks" / "restore.md"
PIPE_FILE = "/var/lib/ipa/backup/bench.tar"
# The stand-in's ipa-backup and ipa-restore put their temporary copy / extraction in $TMPDIR; the pod's /tmp
# is a tmpfs (RAM), so both go to the pod's volume, as the stand-in's README advises for multi-GiB payloads.
POD_TMPDIR = "/data/tmp"
WANTED_STEPS = ("verify", "stage", "ipa-restore", "check", "re-hide", "replication", "clean-up", "done")


@dataclass
class Result:
    size_gib: float
    run: int = 1
    plaintext_bytes: int = 0
    ciphertext_bytes: int = 0
    op_verify_s: float = 0.0  # step verify → stage
    op_stage_s: float = 0.0  # step stage → ipa-restore (includes the sha256sum in the pod)
    op_stream_s: float | None = None  # the pod's `head -c N` process, first to last seen (0.1 s poll)
    op_sha_s: float | None = None  # the pod's `sha256sum .../ipa-data.tar`, first to last seen
    op_ipa_restore_s: float = 0.0  # step ipa-restore → check
    op_total_s: float = 0.0  # status.durationSeconds
    op_hwm_mib: float = 0.0
    op_idle_rss_mib: float = 0.0
    backup_s: float = 0.0
    pipe_s: float = 0.0
    pipe_sha_s: float = 0.0  # `kubectl exec ... sha256sum` of the pipeline's file, end to end
    cached_before_restore: float | None = None  # fraction of the S3 object in the page cache
    cached_before_pipe: float | None = None
    load_restore: float = 0.0  # 1-minute load average when the restore / the pipeline started
    load_pipe: float = 0.0
    op_stage_cpu_s: float | None = None  # the operator process's own CPU (user+sys, not gpg's) while staging
    pipe_cpu_s: float = 0.0  # the pipeline's processes' CPU (aws, gpg, kubectl, bash)
    steps: list[tuple[float, str]] = field(default_factory=list)
    timed_by: str = "watch"

    def mbps(self, seconds: float | None) -> float:
        return self.plaintext_bytes / seconds / 1e6 if seconds else 0.0

    @property
    def ratio(self) -> float:
        return self.mbps(self.op_stage_s) / self.mbps(self.pipe_s)


class StepWatcher(threading.Thread):
    """Every status.step of one object as the API server announces it, with its arrival time."""

    def __init__(self, custom: client.CustomObjectsApi, ns: str, plural: str, name: str) -> None:
        super().__init__(name="step-watcher", daemon=True)
        self.custom, self.ns, self.plural, self.name = custom, ns, plural, name
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
                self.plural,
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


def step_times(steps: list[tuple[float, str]]) -> dict[str, float]:
    """The first time each step was seen."""
    seen: dict[str, float] = {}
    for t, s in steps:
        seen.setdefault(s, t)
    return seen


class CpuSampler(threading.Thread):
    """The CPU time (user + system, in seconds) of one process, from /proc/PID/stat every 0.2 s."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(name="cpu-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return
        self.samples.append((time.monotonic(), (int(fields[11]) + int(fields[12])) / self._tick))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def at(self, when: float) -> float | None:
        """The CPU time of the sample nearest to `when`."""
        if not self.samples:
            return None
        return min(self.samples, key=lambda s: abs(s[0] - when))[1]

    def between(self, start: float, end: float) -> float | None:
        a, b = self.at(start), self.at(end)
        return None if a is None or b is None else b - a


class PodProcessWatcher(threading.Thread):
    """When the staging processes in the pod ran, from the host's /proc (the pod is a PID namespace on this
    host): `head -c SIZE` (the operator's write of the archive: its lifetime is the stream) and
    `sha256sum .../ipa-data.tar` (the check after it). First and last seen, every 0.1 s."""

    def __init__(self, size: int, pid_namespace: str, interval: float = 0.1) -> None:
        super().__init__(name="pod-process-watcher", daemon=True)
        self.size_arg = str(size)
        # Only this pod's processes: other pods on the shared platform checksum their archives too.
        self.pid_namespace = pid_namespace
        self.interval = interval
        self.seen: dict[str, list[float]] = {}
        self._halt = threading.Event()

    def classify(self, argv: list[str]) -> str | None:
        if not argv:
            return None
        if any(a.endswith("head") for a in argv[:1]) and "-c" in argv and self.size_arg in argv:
            return "stream"
        if any(a.endswith("sha256sum") for a in argv[:2]) and argv[-1].endswith("/ipa-data.tar"):
            return "sha256sum"
        return None

    def scan(self) -> None:
        now = time.monotonic()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                raw = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            what = self.classify([a.decode("utf-8", "replace") for a in raw.split(b"\0") if a])
            if what is not None and self.in_pod(entry.path):
                span = self.seen.setdefault(what, [now, now])
                span[1] = now

    def in_pod(self, proc: str) -> bool:
        try:
            return os.readlink(f"{proc}/ns/pid") == self.pid_namespace
        except OSError:
            return False

    def run(self) -> None:
        while not self._halt.is_set():
            self.scan()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def duration(self, what: str) -> float | None:
        span = self.seen.get(what)
        return span[1] - span[0] if span else None


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
        name = f"rbench-{str(size_gib).replace('.', 'p')}g-{uuid.uuid4().hex[:6]}"
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

    def create_secrets(self, ns: str, ds: DirectoryServer, armored_public: bytes, secret: bytes) -> None:
        self.core.create_namespaced_secret(ns, freeipa_pod.dm_password_secret(ds.password))
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
            ns,
            {"metadata": {"name": PUBLIC_KEY_SECRET}, "stringData": {"restore.asc": armored_public.decode()}},
        )
        self.core.create_namespaced_secret(
            ns,
            {
                "metadata": {"name": PRIVATE_KEY_SECRET},
                "data": {"private.asc": base64.b64encode(secret).decode()},
            },
        )

    def create_pod(self, ns: str, ds: DirectoryServer, data: Path, payload: int) -> None:
        (data / POD_TMPDIR.removeprefix("/data/")).mkdir(parents=True)
        pod = freeipa_pod.freeipa_pod(POD, HOST, ds.uri, data_host_path=str(data), payload_bytes=payload)
        pod["spec"]["containers"][0]["env"].append({"name": "TMPDIR", "value": POD_TMPDIR})
        self.core.create_namespaced_pod(ns, pod)

        def ready() -> bool:
            got = self.core.read_namespaced_pod(POD, ns)
            return any(c.type == "Ready" and c.status == "True" for c in got.status.conditions or [])

        wait_until(f"pod {POD} ready", ready, 120)

    def start_operator(self, ns: str, work: Path, log_name: str) -> subprocess.Popen[bytes]:
        pvc_root = work / f"pvc-{log_name}"
        pvc_root.mkdir()
        env = {**os.environ, "KUBECONFIG": self.plat.kubeconfig, "IDM_BACKUP_PVC_ROOT": str(pvc_root)}
        argv = [sys.executable, "-m", "idm_backup_operator", "run", "--namespace", ns]
        if self.verbose_operator:
            argv.append("--verbose")
        with (work / f"operator-{log_name}.log").open("ab") as out:
            return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def ldap_target(self, ds: DirectoryServer) -> dict[str, Any]:
        return {
            "podName": POD,
            "ldap": {"url": ds.uri, "passwordSecretRef": {"name": freeipa_pod.DM_PASSWORD_SECRET}},
        }

    def backup_spec(self, ds: DirectoryServer, prefix: str) -> dict[str, Any]:
        return {
            "type": "Data",
            "online": True,
            "tmpDir": POD_TMPDIR,
            "target": self.ldap_target(ds),
            "encryption": {"publicKeysSecretRef": {"name": PUBLIC_KEY_SECRET}},
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

    def restore_spec(self, ds: DirectoryServer) -> dict[str, Any]:
        return {
            "source": {"backupRef": {"name": "bench"}},
            "decryption": {"secretKeySecretRef": {"name": PRIVATE_KEY_SECRET}},
            "target": self.ldap_target(ds),
            "confirm": HOST,
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

    def cached_fraction(self, key: str) -> float | None:
        """How much of the S3 object's file (versitygw's posix backend) is in the page cache."""
        path = Path(self.plat.state_dir) / "s3" / self.plat.s3_bucket / key
        try:
            out = subprocess.run(
                ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            return int(out.split()[0]) / path.stat().st_size
        except (OSError, ValueError, IndexError, subprocess.CalledProcessError):
            return None

    def pod_pid_namespace(self, ns: str) -> str:
        """The PID namespace of the pod's sandbox: the node simulator records its first process."""
        uid = self.core.read_namespaced_pod(POD, ns).metadata.uid
        pid = (Path(self.plat.state_dir) / "node" / "pods" / uid / "sandbox.pid").read_text().strip()
        return os.readlink(f"/proc/{pid}/ns/pid")

    def settle_disk(self) -> None:
        if self.flush:
            os.sync()
            time.sleep(1)

    # -- the operator's backup and restore -------------------------------------------------------------

    def create(self, ns: str, plural: str, kind: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": "bench"},
            "spec": spec,
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, body)

    def wait_finished(
        self, ns: str, plural: str, timeout: float, on_step: Callable[[float, str], None] | None = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, plural, "bench")
            status: dict[str, Any] = obj.get("status") or {}
            step = status.get("step")
            if step != last and on_step is not None:
                on_step(time.monotonic(), str(step))
            last = step
            if status.get("phase") in ("Succeeded", "Failed"):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"{plural}/bench did not finish in {timeout:.0f}s: {status}")
            time.sleep(0.1)

    def run_backup(self, ns: str, ds: DirectoryServer, prefix: str, timeout: float) -> dict[str, Any]:
        self.create(ns, BACKUPS, "IdmBackup", self.backup_spec(ds, prefix))
        status = self.wait_finished(ns, BACKUPS, timeout)
        if status["phase"] != "Succeeded":
            raise RuntimeError(f"the backup failed: {status.get('reason')}: {status.get('message')}")
        return status

    def run_restore(
        self, ns: str, ds: DirectoryServer, result: Result, timeout: float, operator_pid: int
    ) -> dict[str, Any]:
        cpu = CpuSampler(operator_pid)
        cpu.start()
        watcher = StepWatcher(self.custom, ns, RESTORES, "bench")
        watcher.start()
        watcher.ready.wait()
        time.sleep(0.5)  # let the watch connect before the object exists
        procs = PodProcessWatcher(result.plaintext_bytes, self.pod_pid_namespace(ns))
        procs.start()
        polled: list[tuple[float, str]] = []
        created = time.monotonic()
        self.create(ns, RESTORES, "IdmRestore", self.restore_spec(ds))
        try:
            status = self.wait_finished(ns, RESTORES, timeout, lambda t, s: polled.append((t, s)))
        finally:
            procs.stop()
            cpu.stop()
        time.sleep(0.5)
        watcher.stop()
        if status["phase"] != "Succeeded":
            raise RuntimeError(f"the restore failed: {status.get('reason')}: {status.get('message')}")
        steps = watcher.steps
        if not all(s in step_times(steps) for s in ("verify", "stage", "ipa-restore", "check")):
            result.timed_by, steps = "poll", polled
        at = step_times(steps)
        result.steps = [(t - created, s) for t, s in steps]
        result.op_verify_s = at["stage"] - at["verify"]
        result.op_stage_s = at["ipa-restore"] - at["stage"]
        result.op_ipa_restore_s = at["check"] - at["ipa-restore"]
        result.op_stage_cpu_s = cpu.between(at["stage"], at["ipa-restore"])
        result.op_stream_s = procs.duration("stream")
        result.op_sha_s = procs.duration("sha256sum")
        result.op_total_s = float(status.get("durationSeconds") or 0)
        polled_at = step_times(polled)
        if "stage" in polled_at and "ipa-restore" in polled_at:
            log(
                f"   staging by {result.timed_by} {result.op_stage_s:.2f}s, by 0.1 s poll "
                f"{polled_at['ipa-restore'] - polled_at['stage']:.2f}s"
            )
        return status

    # -- the shell pipeline ----------------------------------------------------------------------------

    def run_pipeline(self, ns: str, bucket: str, key: str, gpg_home: Path, work: Path) -> tuple[float, float]:
        """Its wall time, and the CPU time of its processes (all children of bash, waited for)."""
        aws_config = work / "aws-config"
        aws_config.write_text("[default]\ns3 =\n    addressing_style = path\n")
        download = ["aws", "--endpoint-url", self.plat.s3_endpoint, "s3", "cp", f"s3://{bucket}/{key}", "-"]
        gpg = ["gpg", "--batch", "--homedir", str(gpg_home), "--decrypt"]
        kubectl = [str(KUBECTL), "exec", "-i", "-n", ns, POD, "-c", CONTAINER, "--"]
        kubectl += ["sh", "-c", f"cat > {PIPE_FILE}"]
        line = " | ".join(shlex.join(part) for part in (download, gpg, kubectl))
        env = {
            **os.environ,
            "KUBECONFIG": self.plat.kubeconfig,
            "AWS_ACCESS_KEY_ID": self.plat.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.plat.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(aws_config),
        }
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        done = subprocess.run(["bash", "-o", "pipefail", "-c", line], env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"the pipeline failed ({done.returncode}): {done.stderr[-2000:]}")
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return elapsed, cpu

    def exec_in_pod(self, ns: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(KUBECTL), "exec", "-n", ns, POD, "-c", CONTAINER, "--", *argv],
            env={**os.environ, "KUBECONFIG": self.plat.kubeconfig},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

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

    def delete_namespace(self, ns: str) -> None:
        self.core.delete_namespace(ns, propagation_policy="Background")

        def pod_gone() -> bool:
            try:
                self.core.read_namespaced_pod(POD, ns)
                return False
            except client.ApiException as err:
                return bool(err.status == 404)

        wait_until(f"pod {POD} in {ns} to go", pod_gone, 120, 0.5)

    # -- one size --------------------------------------------------------------------------------------

    def run_size(self, size_gib: float, timeout: float, run: int = 1) -> Result:
        result = Result(size_gib, run)
        payload = int(size_gib * GiB)
        work = Path(tempfile.mkdtemp(prefix="idm-bench-restore-"))
        ns = prefix = ""
        ds: DirectoryServer | None = None
        operator: subprocess.Popen[bytes] | None = None
        sampler: RssSampler | None = None
        try:
            log(f"== {size_gib:g} GiB: a key, a 389-ds, namespace, secrets, pod")
            keyring_home, pipe_home, data = work / "keyring", work / "pipeline-gnupg", work / "data"
            for home in (keyring_home, pipe_home):
                home.mkdir(mode=0o700)
            data.mkdir()
            ring = Keyring(keyring_home)
            exported = ring.export(ring.make("IdM Restore <restore@example.test>"))
            # The pipeline's gpg home holds the private key, as the operator's Secret does.
            Keyring(pipe_home).gpg("--import", input=exported.secret)

            ds = DirectoryServer(work / "ds", port=free_port())
            ds.start()
            ds.load_topology()
            ns = self.create_namespace(size_gib)
            prefix = f"bench/{ns}"
            self.create_secrets(ns, ds, exported.armored, exported.secret)
            self.create_pod(ns, ds, data, payload)
            log(f"   namespace {ns}, pod ready, 389-ds at {ds.uri}; backing up")

            operator = self.start_operator(ns, work, "backup")
            started = time.monotonic()
            backup = self.run_backup(ns, ds, prefix, timeout)
            result.backup_s = time.monotonic() - started
            stop_process(operator)
            archive = backup["archive"]
            result.plaintext_bytes = int(archive["plaintextSizeBytes"])
            result.ciphertext_bytes = int(archive["sizeBytes"])
            bucket, key = archive["uri"].removeprefix("s3://").split("/", 1)
            log(
                f"   backup: {result.plaintext_bytes} plaintext, {result.ciphertext_bytes} stored bytes "
                f"in {result.backup_s:.1f}s; restoring with a fresh operator"
            )

            operator = self.start_operator(ns, work, "restore")
            sampler = RssSampler(operator.pid)
            sampler.start()
            result.op_idle_rss_mib = self.settled_rss(operator.pid) / 1024
            self.settle_disk()
            result.cached_before_restore = self.cached_fraction(key)
            result.load_restore = os.getloadavg()[0]
            self.run_restore(ns, ds, result, timeout, operator.pid)
            sampler.stop()
            result.op_hwm_mib = sampler.hwm_kib / 1024
            log(
                f"   operator: verify {result.op_verify_s:.1f}s, staging {result.op_stage_s:.1f}s "
                f"({result.mbps(result.op_stage_s):.1f} MB/s; in the pod: stream "
                f"{result.op_stream_s or 0:.1f}s, sha256sum {result.op_sha_s or 0:.1f}s), ipa-restore "
                f"{result.op_ipa_restore_s:.1f}s, restore {result.op_total_s:.1f}s, VmHWM "
                f"{result.op_hwm_mib:.1f} MiB ({sampler.samples} samples), operator CPU while staging "
                f"{fmt(result.op_stage_cpu_s)}s"
            )
            stop_process(operator)

            self.settle_disk()
            result.cached_before_pipe = self.cached_fraction(key)
            result.load_pipe = os.getloadavg()[0]
            log(f"   pipeline from s3://{bucket}/{key}")
            result.pipe_s, result.pipe_cpu_s = self.run_pipeline(ns, bucket, key, pipe_home, work)
            size = self.exec_in_pod(ns, "stat", "-c", "%s", PIPE_FILE).stdout.strip()
            started = time.monotonic()
            summed = self.exec_in_pod(ns, "sha256sum", PIPE_FILE)
            result.pipe_sha_s = time.monotonic() - started
            digest = summed.stdout.split(" ", 1)[0]
            log(
                f"   pipeline: {result.pipe_s:.1f}s ({result.mbps(result.pipe_s):.1f} MB/s), CPU "
                f"{result.pipe_cpu_s:.1f}s, {size} bytes "
                f"written; sha256sum of it in the pod (kubectl exec) {result.pipe_sha_s:.1f}s"
            )
            if size != str(result.plaintext_bytes) or digest != archive["plaintextSHA256"]:
                raise RuntimeError(
                    f"the pipeline's file is not the archive: {size} bytes, sha256 {digest}; expected "
                    f"{result.plaintext_bytes}, {archive['plaintextSHA256']}"
                )
            self.exec_in_pod(ns, "rm", "-f", PIPE_FILE)
            return result
        finally:
            self.cleanup(ns, prefix, work, ds, operator, sampler)

    def cleanup(
        self,
        ns: str,
        prefix: str,
        work: Path,
        ds: DirectoryServer | None,
        operator: subprocess.Popen[bytes] | None,
        sampler: RssSampler | None,
    ) -> None:
        steps: list[tuple[str, Callable[[], object]]] = []
        if sampler is not None and sampler.is_alive():
            steps.append(("stop the RSS sampler", sampler.stop))
        if operator is not None and operator.poll() is None:
            steps.append(("stop the operator", lambda: stop_process(operator)))
        for name in ("backup", "restore"):
            if (work / f"operator-{name}.log").exists():
                keep = Path(tempfile.gettempdir()) / f"idm-bench-{ns or 'x'}-operator-{name}.log"
                steps.append(
                    (
                        f"keep the operator log as {keep}",
                        functools.partial(shutil.copy, work / f"operator-{name}.log", keep),
                    )
                )
        if ns:
            steps.append((f"delete namespace {ns}", lambda: self.delete_namespace(ns)))
        if prefix:
            steps.append(
                (
                    f"delete S3 objects under {prefix}/",
                    lambda: log(f"   removed {self.delete_prefix(prefix + '/')} S3 objects under {prefix}/"),
                )
            )
        if ds is not None:
            steps.append(("stop the 389-ds", ds.stop))
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


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "?" if value is None else f"{value * 100:.0f} %"


def table(results: list[Result]) -> str:
    head = (
        "| size | run | plaintext bytes | operator staging s | operator MB/s | pipeline s | pipeline MB/s "
        "| ratio | in-pod stream s / sha256sum s (operator) | sha256sum s (pipeline's file) | verify s "
        "| ipa-restore s | restore duration s (status) | operator peak RSS MiB (VmHWM) "
        "| operator RSS before the restore MiB | S3 object cached before restore / pipeline "
        "| load average at restore / pipeline start "
        "| CPU s: operator process while staging / pipeline's processes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = ""
    for r in results:
        rows += (
            f"| {r.size_gib:g} GiB | {r.run} | {r.plaintext_bytes} | {r.op_stage_s:.1f} "
            f"| {r.mbps(r.op_stage_s):.1f} | {r.pipe_s:.1f} | {r.mbps(r.pipe_s):.1f} | {r.ratio:.2f} "
            f"| {fmt(r.op_stream_s)} / {fmt(r.op_sha_s)} | {r.pipe_sha_s:.1f} | {r.op_verify_s:.1f} "
            f"| {r.op_ipa_restore_s:.1f} | {r.op_total_s:.1f} | {r.op_hwm_mib:.1f} | {r.op_idle_rss_mib:.1f} "
            f"| {pct(r.cached_before_restore)} / {pct(r.cached_before_pipe)} "
            f"| {r.load_restore:.1f} / {r.load_pipe:.1f} | {fmt(r.op_stage_cpu_s)} / {r.pipe_cpu_s:.1f} |\n"
        )
    return head + rows


def key_steps(r: Result) -> str:
    """When each step began, in seconds after the IdmRestore was created."""
    return ", ".join(f"{s} +{t:.1f}" for t, s in r.steps if s in WANTED_STEPS)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="1,4", help="archive payload sizes in GiB, comma-separated (default 1,4)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="per backup and per restore, seconds")
    parser.add_argument("--no-record", action="store_true", help="do not append the results to restore.md")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size, each from scratch (default 1)")
    parser.add_argument(
        "--no-flush", action="store_true", help="no sync before the transfers (see restore.md, 'Method')"
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
        print(f"{r.size_gib:g} GiB run {r.run} steps ({r.timed_by}): {key_steps(r)}")
    if not args.no_record:
        when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        cmd = "IDM_TESTBED_KEEP=1 .venv/bin/python benchmarks/restore.py " + shlex.join(sys.argv[1:])
        with MD.open("a") as md:
            md.write(f"\n### Run {when}\n\n{facts}; `{cmd.strip()}`\n\n{out}\n")
            for r in results:
                md.write(
                    f"- {r.size_gib:g} GiB run {r.run}, step start times (s after creation, by "
                    f"{r.timed_by}): {key_steps(r)}\n"
                )
        log(f"appended to {MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
