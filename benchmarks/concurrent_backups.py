"""N backups of N FreeIPA servers due in the same minute: one operator's backup slots at work. Run by hand.

    .venv/bin/python benchmarks/concurrent_backups.py [--pods 20] [--payload-mib 64] [--slots 4,8]
        [--skip-sequential]

Against the local platform (started if needed, never stopped here), in the namespace bench-concurrent
(deleted and created again at the start):
- PODS hidden replicas are added to the platform's 389-ds topology (bc1 ... bcN, removed at the end), each
  with a ready stand-in FreeIPA pod whose archive carries PAYLOAD_MIB of incompressible bytes;
- phase A, once per --slots value (default: the operator's own default, the flag is not passed): a fresh
  operator and PODS IdmBackupSchedules, one per server, type Data, encrypted to a throw-away public key,
  to S3. Their cron names one minute (`M H D MON *`, UTC): the next whole minute at least 30 s away, so
  exactly one tick fires and nothing has to be suspended after it. Measured: tick lateness (a backup's
  creationTimestamp minus its idm-backup.io/scheduled-for tick, 1 s resolution), tick -> last completion,
  aggregate MB/s (10^6 B: the plaintext archive sizes summed over tick -> last completion), the most
  backups seen Running at once and queued for a slot (0.5 s poll), the operator's peak RSS (VmHWM);
- phase B (unless --skip-sequential; once, with the first configuration's operator): the same PODS
  backups as plain IdmBackups, each created only when the one before has finished; total time (first
  creationTimestamp -> last completionTime) and MB/s.
Results are printed; copy them into benchmarks/concurrent.md.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root holds the testbed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from kubernetes import client, config

from testbed import freeipa_pod, processes, stack
from testbed.deploy import OperatorProcess, drop_finalizers, install_crds
from testbed.gpgkeys import Keyring
from testbed.ldap_server import ALL_ROLES, HIDDEN, Server

GROUP, VERSION = "idm-backup.io", "v1alpha1"
BACKUPS, SCHEDULES = "idmbackups", "idmbackupschedules"
NAMESPACE = "bench-concurrent"
PREFIX = "bench-concurrent"  # S3 prefix of every archive written here; emptied at start and end
S3_SECRET, KEY_SECRET = "s3-credentials", "backup-public-key"
SCHEDULE_LABEL = "idm-backup.io/schedule"
TICK_ANNOTATION = "idm-backup.io/scheduled-for"
WAITING_STEP = "waiting for a backup slot"
FINISHED = ("Succeeded", "Failed")
MiB = 1 << 20


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else float("nan")


def backup_spec(plat: stack.Platform, pod: str) -> dict[str, Any]:
    """What tests/helpers.py backup_spec makes, but with the CRD's default S3 part size."""
    return {
        "type": "Data",
        "target": {
            "podName": pod,
            "ldap": {"url": plat.ldap_uri, "passwordSecretRef": {"name": freeipa_pod.DM_PASSWORD_SECRET}},
        },
        "encryption": {"publicKeysSecretRef": {"name": KEY_SECRET}},
        "storage": {
            "s3": {
                "bucket": plat.s3_bucket,
                "prefix": PREFIX,
                "endpoint": plat.s3_endpoint,
                "forcePathStyle": True,
                "credentialsSecretRef": {"name": S3_SECRET},
            }
        },
    }


def once_cron(tick: datetime.datetime) -> str:
    """A cron expression (UTC) that fires at `tick` and then not for a year."""
    return f"{tick.minute} {tick.hour} {tick.day} {tick.month} *"


@dataclass
class Observed:
    backups: list[dict[str, Any]]
    max_running: int
    max_queued: int
    finished: bool


class Bench:
    def __init__(self, plat: stack.Platform, work: Path) -> None:
        self.plat, self.work = plat, work
        self.api = config.new_client_from_config(config_file=plat.kubeconfig)
        self.core, self.custom = client.CoreV1Api(self.api), client.CustomObjectsApi(self.api)
        self.s3 = boto3.client(
            "s3",
            endpoint_url=plat.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id=plat.s3_access_key,
            aws_secret_access_key=plat.s3_secret_key,
        )

    # -- namespace, Secrets, S3 ------------------------------------------------------------------

    def fresh_namespace(self) -> None:
        try:
            drop_finalizers(self.api, NAMESPACE)  # left by an interrupted earlier run
            self.core.delete_namespace(NAMESPACE)
            processes.wait_until("old namespace gone", self._namespace_gone, 300)
        except client.ApiException:
            pass
        self.core.create_namespace({"metadata": {"name": NAMESPACE}})
        # Pods are refused until the controller-manager has made the default ServiceAccount.
        processes.wait_until(
            "default ServiceAccount",
            lambda: bool(self.core.read_namespaced_service_account("default", NAMESPACE)),
            60,
        )

    def _namespace_gone(self) -> bool:
        try:
            self.core.read_namespace(NAMESPACE)
        except client.ApiException as err:
            return bool(err.status == 404)
        return False

    def delete_namespace(self) -> None:
        drop_finalizers(self.api, NAMESPACE)
        self.core.delete_namespace(NAMESPACE, propagation_policy="Background")

    def create_secrets(self, armored_public_key: bytes) -> None:
        for body in (
            freeipa_pod.dm_password_secret(self.plat.ldap_password),
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": S3_SECRET},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": self.plat.s3_access_key,
                    "AWS_SECRET_ACCESS_KEY": self.plat.s3_secret_key,
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": KEY_SECRET},
                "data": {"restore.asc": base64.b64encode(armored_public_key).decode()},
            },
        ):
            self.core.create_namespaced_secret(NAMESPACE, body)

    def empty_s3_prefix(self) -> int:
        deleted = 0
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.plat.s3_bucket, Prefix=PREFIX + "/"
        )
        for page in pages:
            if contents := page.get("Contents", []):
                self.s3.delete_objects(
                    Bucket=self.plat.s3_bucket, Delete={"Objects": [{"Key": o["Key"]} for o in contents]}
                )
                deleted += len(contents)
        return deleted

    # -- stand-in FreeIPA pods ------------------------------------------------------------------

    def create_pods(self, hosts: list[str], payload: int) -> list[str]:
        pods = [host.split(".", 1)[0] for host in hosts]
        for pod, host in zip(pods, hosts, strict=True):
            self.core.create_namespaced_persistent_volume_claim(
                NAMESPACE, freeipa_pod.data_claim(f"{pod}-data")
            )
            self.core.create_namespaced_pod(
                NAMESPACE, freeipa_pod.freeipa_pod(pod, host, self.plat.ldap_uri, payload_bytes=payload)
            )
        self.wait_ready(pods, 120 + 15 * len(pods))
        return pods

    def wait_ready(self, pods: list[str], timeout: float = 120) -> None:
        """Until every pod is Ready. After an offline backup its readiness probe (ipactl status, every
        2 s) lags the services' restart, and the operator refuses a pod that is not Ready
        (TargetUnavailable): each phase starts with all servers Ready, as at 02:00."""
        processes.wait_until(
            f"{len(pods)} FreeIPA pods ready", lambda: all(self.pod_ready(p) for p in pods), timeout
        )

    def pod_ready(self, pod: str) -> bool:
        status = self.core.read_namespaced_pod(pod, NAMESPACE).status
        return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])

    def delete_pods(self, pods: list[str]) -> None:
        for pod in pods:
            try:
                self.core.delete_namespaced_pod(pod, NAMESPACE)
                self.core.delete_namespaced_persistent_volume_claim(f"{pod}-data", NAMESPACE)
            except client.ApiException as err:
                if err.status != 404:
                    raise

    # -- the operator -----------------------------------------------------------------------------

    @contextmanager
    def operator(self, slots: int | None, label: str) -> Iterator[OperatorProcess]:
        args = ["--max-concurrent-backups", str(slots)] if slots is not None else []
        # Debug logging would be measured too: run the operator as it runs in production.
        operator = OperatorProcess(
            NAMESPACE,
            self.plat.kubeconfig,
            self.work,
            self.work / f"operator-{label}.log",
            verbose=False,
            args=args,
        )
        operator.start()
        try:
            yield operator
        finally:
            self.delete_all(operator)
            operator.stop()

    def delete_all(self, operator: OperatorProcess) -> None:
        """Schedules and backups, while the operator still runs to release its finalizers."""
        if operator.proc is None or operator.proc.poll() is not None:
            drop_finalizers(self.api, NAMESPACE)
        for plural in (SCHEDULES, BACKUPS):
            self.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural)

        def none_left() -> bool:
            return not any(
                self.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural)["items"]
                for plural in (SCHEDULES, BACKUPS)
            )

        try:
            processes.wait_until("schedules and backups deleted", none_left, 120, operator.log)
        except processes.ProcessError as err:
            log(f"{err}; dropping their finalizers")
            drop_finalizers(self.api, NAMESPACE)

    def backups(self, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, BACKUPS, label_selector=selector
        )["items"]
        return items

    def observe(self, operator: OperatorProcess, selector: str, expected: int, deadline: float) -> Observed:
        """Poll every 0.5 s until `expected` backups exist and have all finished, or the deadline."""
        max_running = max_queued = 0
        items: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if operator.proc is not None and operator.proc.poll() is not None:
                sys.exit(f"the operator exited ({operator.proc.returncode}):\n{operator.output()[-3000:]}")
            items = self.backups(selector)
            statuses = [item.get("status") or {} for item in items]
            max_running = max(max_running, sum(1 for s in statuses if s.get("phase") == "Running"))
            max_queued = max(
                max_queued,
                sum(1 for s in statuses if s.get("phase") == "Pending" and s.get("step") == WAITING_STEP),
            )
            if len(items) >= expected and all(s.get("phase") in FINISHED for s in statuses):
                return Observed(items, max_running, max_queued, True)
            time.sleep(0.5)
        return Observed(items, max_running, max_queued, False)

    # -- phase A: one tick of PODS schedules -------------------------------------------------------

    def concurrent_phase(self, operator: OperatorProcess, pods: list[str], label: str) -> dict[str, Any]:
        assert operator.proc is not None
        self.wait_ready(pods)
        now = datetime.datetime.now(datetime.UTC)
        tick = (now + datetime.timedelta(seconds=30 + len(pods))).replace(
            second=0, microsecond=0
        ) + datetime.timedelta(minutes=1)
        for pod in pods:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "IdmBackupSchedule",
                "metadata": {"name": pod},
                "spec": {
                    "schedule": once_cron(tick),
                    "timeZone": "UTC",
                    "template": {"spec": backup_spec(self.plat, pod)},
                    # Failed backups stay for inspection; nothing else is ever due for deletion here.
                    "retention": {"failedHistoryLimit": len(pods)},
                },
            }
            self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, SCHEDULES, body)
        wanted = tick.isoformat().replace("+00:00", "Z")

        def picked_up() -> int:
            items = self.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, SCHEDULES)["items"]
            return sum(1 for s in items if (s.get("status") or {}).get("nextScheduleTime") == wanted)

        while picked_up() < len(pods) and datetime.datetime.now(datetime.UTC) < tick:
            time.sleep(0.5)
        ready_before_tick = picked_up()
        rss_before = status_kib(operator.proc.pid, "VmRSS") / 1024
        log(f"[{label}] {ready_before_tick}/{len(pods)} schedules due at {wanted}; waiting for the tick")
        wait = (tick - datetime.datetime.now(datetime.UTC)).total_seconds()
        observed = self.observe(
            operator, SCHEDULE_LABEL, len(pods), time.monotonic() + max(0.0, wait) + 120 + 60 * len(pods)
        )
        hwm = status_kib(operator.proc.pid, "VmHWM") / 1024
        items = [b for b in observed.backups if b["metadata"]["annotations"].get(TICK_ANNOTATION) == wanted]
        lateness = [(parse_time(b["metadata"]["creationTimestamp"]) - tick).total_seconds() for b in items]
        return {
            "label": label,
            "tick": tick,
            "ready_before_tick": ready_before_tick,
            "rss_before": rss_before,
            "hwm": hwm,
            "observed": observed,
            "items": items,
            "lateness": lateness,
            **summary(items, tick),
        }

    # -- phase B: the same backups one after another ----------------------------------------------

    def sequential_phase(self, operator: OperatorProcess, pods: list[str]) -> dict[str, Any]:
        time.sleep(5)  # a readiness probe that saw phase A's backup stop the services may still report it
        self.wait_ready(pods)
        items, max_running = [], 0
        for pod in pods:
            name = f"seq-{pod}"
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "IdmBackup",
                # IdmBackups carry no label with their own name, and `observe` takes a label selector.
                "metadata": {"name": name, "labels": {"bench-sequential": name}},
                "spec": backup_spec(self.plat, pod),
            }
            self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, BACKUPS, body)
            observed = self.observe(operator, f"bench-sequential={name}", 1, time.monotonic() + 600)
            if not observed.finished:
                log(f"[sequential] {name} did not finish within 600 s")
            items.extend(observed.backups)
            max_running = max(max_running, observed.max_running)
            log(f"[sequential] {name}: {(observed.backups[0].get('status') or {}).get('phase')}")
        start = min(parse_time(b["metadata"]["creationTimestamp"]) for b in items)
        return {"label": "sequential", "items": items, "max_running": max_running, **summary(items, start)}


def summary(items: list[dict[str, Any]], start: datetime.datetime) -> dict[str, Any]:
    statuses = [b.get("status") or {} for b in items]
    phases = Counter(s.get("phase") or "none" for s in statuses)
    failures = {
        b["metadata"]["name"]: f"{s.get('phase')}: {s.get('reason')}: {s.get('message')}"
        for b, s in zip(items, statuses, strict=True)
        if s.get("phase") != "Succeeded"
    }
    ends = [parse_time(s["completionTime"]) for s in statuses if s.get("completionTime")]
    last = max(ends, default=None)
    elapsed = (last - start).total_seconds() if last else float("nan")
    plaintext = sum(
        (s.get("archive") or {}).get("plaintextSizeBytes", 0)
        for s in statuses
        if s.get("phase") == "Succeeded"
    )
    durations = [float(s["durationSeconds"]) for s in statuses if s.get("durationSeconds") is not None]
    return {
        "phases": phases,
        "failures": failures,
        "elapsed": elapsed,
        "plaintext": plaintext,
        "mbps": plaintext / 1e6 / elapsed if elapsed and elapsed > 0 else float("nan"),
        "durations": durations,
    }


def log_problems(operator: OperatorProcess) -> str:
    text = operator.output()
    counts = {
        "Traceback": text.count("Traceback"),
        "retry": text.lower().count("will retry"),
        "WebSocket": text.count("WebSocket"),
    }
    return ", ".join(f"{key} {value}" for key, value in counts.items())


def slots_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of numbers >= 1, e.g. 4,8")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pods", type=int, default=20, help="FreeIPA servers, i.e. backups per phase")
    parser.add_argument("--payload-mib", type=int, default=64, help="incompressible bytes in each archive")
    parser.add_argument(
        "--slots",
        type=slots_list,
        default=None,
        help="--max-concurrent-backups of the operator, comma-separated to run several configurations; "
        "default: the operator's default (the flag not passed)",
    )
    parser.add_argument("--skip-sequential", action="store_true", help="no phase B")
    args = parser.parse_args()
    configurations: list[int | None] = list(args.slots) if args.slots else [None]

    plat = stack.up()
    work = Path(tempfile.mkdtemp(prefix="idm-bench-concurrent-"))
    bench = Bench(plat, work)
    install_crds(bench.api)
    bench.fresh_namespace()
    if removed := bench.empty_s3_prefix():
        log(f"removed {removed} S3 objects left under {PREFIX}/ by an earlier run")
    gnupg = work / "gnupg"
    gnupg.mkdir(mode=0o700)
    ring = Keyring(gnupg)
    bench.create_secrets(ring.export(ring.make("IdM Restore <restore@example.test>")).armored)

    results: list[dict[str, Any]] = []
    sequential: dict[str, Any] | None = None
    servers = [Server(f"bc{i}", HIDDEN, ALL_ROLES) for i in range(1, args.pods + 1)]
    began = time.monotonic()
    try:
        with stack.directory().more_servers(servers) as hosts:
            pods: list[str] = []
            try:
                started = time.monotonic()
                pods = bench.create_pods(hosts, args.payload_mib * MiB)
                log(f"{len(pods)} FreeIPA pods ready in {time.monotonic() - started:.0f}s")
                for index, slots in enumerate(configurations):
                    label = f"slots={slots}" if slots is not None else "slots=default"
                    with bench.operator(slots, label.replace("=", "-")) as operator:
                        result = bench.concurrent_phase(operator, pods, label)
                        result["log_problems"] = log_problems(operator)
                        result["log"] = operator.log
                        results.append(result)
                        report_concurrent(result, len(pods))
                        if index == 0 and not args.skip_sequential:
                            bench.delete_all(operator)
                            sequential = bench.sequential_phase(operator, pods)
                            sequential["log_problems"] = log_problems(operator)
                            report_sequential(sequential)
                    bench.empty_s3_prefix()  # this configuration's archives: not kept until the end
            finally:
                bench.delete_pods(pods)
    finally:
        bench.delete_namespace()
        bench.empty_s3_prefix()
        subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "gpg-agent"], check=False)
        # Also after a failure or Ctrl-C: what was measured until then.
        print()
        print(
            f"pods {args.pods}, payload {args.payload_mib} MiB each; whole run "
            f"{time.monotonic() - began:.0f}s; operator logs in {work}"
        )
        print_table(results, sequential, args.pods)
    failed = any(r["failures"] for r in results) or bool(sequential and sequential["failures"])
    return 1 if failed else 0


def report_concurrent(result: dict[str, Any], expected: int) -> None:
    log(
        f"[{result['label']}] tick {result['tick']:%H:%M:%S}: {len(result['items'])}/{expected} backups, "
        f"{dict(result['phases'])}, tick -> last completion {result['elapsed']:.0f}s"
    )
    if not result["observed"].finished:
        log(f"[{result['label']}] timed out before every backup had finished")
    if result["ready_before_tick"] < expected:
        log(f"[{result['label']}] only {result['ready_before_tick']} schedules were due before the tick")
    for name, why in result["failures"].items():
        log(f"[{result['label']}] NOT SUCCEEDED {name}: {why}")


def report_sequential(result: dict[str, Any]) -> None:
    log(f"[sequential] {dict(result['phases'])}, total {result['elapsed']:.0f}s")
    for name, why in result["failures"].items():
        log(f"[sequential] NOT SUCCEEDED {name}: {why}")


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} / {percentile(values, 0.99):.0f} / {max(values):.0f}"


def _phases(result: dict[str, Any]) -> str:
    return ", ".join(f"{phase} {count}" for phase, count in sorted(result["phases"].items()))


def _durations(result: dict[str, Any]) -> str:
    values = result["durations"]
    return f"{statistics.median(values):.0f} / {max(values):.0f}" if values else "-"


def print_table(results: list[dict[str, Any]], sequential: dict[str, Any] | None, pods: int) -> None:
    print()
    print(
        "| run | tick (UTC) | backups | phases | tick lateness s p50 / p99 / max | tick -> last completion s "
        "| aggregate MB/s | backup s p50 / max | max Running | max queued | peak RSS MiB "
        "| RSS before tick MiB | operator log |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['label']} | {r['tick']:%H:%M} | {len(r['items'])} / {pods} | {_phases(r)} "
            f"| {_spread(r['lateness'])} | {r['elapsed']:.0f} | {r['mbps']:.1f} | {_durations(r)} "
            f"| {r['observed'].max_running} | {r['observed'].max_queued} | {r['hwm']:.0f} "
            f"| {r['rss_before']:.0f} | {r['log_problems']} |"
        )
    if sequential is not None:
        s = sequential
        print(
            f"| sequential | - | {len(s['items'])} / {pods} | {_phases(s)} | - | {s['elapsed']:.0f} "
            f"| {s['mbps']:.1f} | {_durations(s)} | {s['max_running']} | - | - | - | {s['log_problems']} |"
        )
    for r in [*results, *([sequential] if sequential else [])]:
        for name, why in r["failures"].items():
            print(f"{r['label']}: {name} {why}")


if __name__ == "__main__":
    sys.exit(main())
