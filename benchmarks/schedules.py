"""One operator following 500 IdmBackupSchedules: tick lateness, peak RSS and idle CPU. Run by hand.

    .venv/bin/python benchmarks/schedules.py [--count 500] [--ticks 2] [--real 0]

Two phases against the local platform (started if needed, never stopped here):
1. idle: COUNT schedules that are not due (03:00 daily); the operator's CPU time over 60 s;
2. ticking: the same COUNT schedules switched to every minute; each tick creates COUNT backups. Their
   target pod does not exist, so each backup fails in pre-flight in milliseconds: what is measured is the
   schedule machinery, not ipa-backup. Lateness = the backup's creationTimestamp (1 s resolution) minus
   its tick (the scheduled-for annotation).
Peak RSS is the operator's VmHWM at the end. Results are printed; copy them into benchmarks/schedules.md.

--real N adds N schedules (r000 ...) whose backups succeed: N hidden replicas in the 389-ds topology (bs1 ...,
removed at the end), each with a ready stand-in FreeIPA pod (1 MiB payload) made before the operator starts;
their backups (Data, unencrypted, to S3 under bench-schedules/, emptied at the end) go through the exec path.
They follow the same crons as the COUNT schedules; after the last tick every schedule is suspended, and the
run waits (up to 600 s) until their backups have finished. Their phases and lateness are reported on their
own lines, and are not part of the COUNT schedules' figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root holds the testbed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from kubernetes import client, config

from testbed import freeipa_pod, processes, stack
from testbed.deploy import OperatorProcess, drop_finalizers, install_crds
from testbed.ldap_server import ALL_ROLES, HIDDEN, Server

GROUP, VERSION = "idm-backup.io", "v1alpha1"
NAMESPACE = "bench-schedules"
CLK_TCK = os.sysconf("SC_CLK_TCK")
REAL_PAYLOAD = 1 << 20  # bytes in each real backup's archive: small, the schedule machinery is measured
S3_SECRET = "s3-credentials"
SCHEDULE_LABEL = "idm-backup.io/schedule"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def schedule_body(name: str, cron: str, plat: stack.Platform) -> dict[str, Any]:
    template = {
        "target": {
            "podName": "no-such-pod",
            "ldap": {"url": plat.ldap_uri, "passwordSecretRef": {"name": "x"}},
        },
        "encryption": {"mode": "None"},
        "storage": {
            "s3": {
                "bucket": plat.s3_bucket,
                "endpoint": plat.s3_endpoint,
                "forcePathStyle": True,
                "credentialsSecretRef": {"name": "x"},
            }
        },
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "IdmBackupSchedule",
        "metadata": {"name": name},
        "spec": {"schedule": cron, "template": {"spec": template}, "retention": {"failedHistoryLimit": 10}},
    }


def real_schedule_body(name: str, pod: str, cron: str, plat: stack.Platform) -> dict[str, Any]:
    """Like schedule_body, but its backups reach a real stand-in pod and succeed."""
    body = schedule_body(name, cron, plat)
    template = body["spec"]["template"]["spec"]
    template["type"] = "Data"
    template["target"]["podName"] = pod
    template["target"]["ldap"]["passwordSecretRef"]["name"] = freeipa_pod.DM_PASSWORD_SECRET
    template["storage"]["s3"]["credentialsSecretRef"]["name"] = S3_SECRET
    template["storage"]["s3"]["prefix"] = NAMESPACE
    return body


def create_real_pods(api: client.ApiClient, plat: stack.Platform, hosts: list[str]) -> list[str]:
    """Secrets and one ready stand-in FreeIPA pod per host; pod names."""
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(NAMESPACE, freeipa_pod.dm_password_secret(plat.ldap_password))
    core.create_namespaced_secret(
        NAMESPACE,
        {
            "metadata": {"name": S3_SECRET},
            "stringData": {
                "AWS_ACCESS_KEY_ID": plat.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": plat.s3_secret_key,
            },
        },
    )
    # Pods are refused until the controller-manager has made the namespace's default ServiceAccount.
    processes.wait_until(
        "default ServiceAccount", lambda: bool(core.read_namespaced_service_account("default", NAMESPACE)), 60
    )
    pods = [host.split(".", 1)[0] for host in hosts]
    for pod, host in zip(pods, hosts, strict=True):
        core.create_namespaced_persistent_volume_claim(NAMESPACE, freeipa_pod.data_claim(f"{pod}-data"))
        core.create_namespaced_pod(
            NAMESPACE, freeipa_pod.freeipa_pod(pod, host, plat.ldap_uri, payload_bytes=REAL_PAYLOAD)
        )

    def ready(pod: str) -> bool:
        status = core.read_namespaced_pod(pod, NAMESPACE).status
        return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])

    processes.wait_until(
        f"{len(pods)} FreeIPA pods ready", lambda: all(map(ready, pods)), 120 + 15 * len(pods)
    )
    return pods


def delete_pods(core: client.CoreV1Api, pods: list[str]) -> None:
    for pod in pods:
        try:
            core.delete_namespaced_pod(pod, NAMESPACE)
        except client.ApiException as err:
            if err.status != 404:  # gone with the namespace
                raise


def empty_s3_prefix(plat: stack.Platform) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=plat.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=plat.s3_access_key,
        aws_secret_access_key=plat.s3_secret_key,
    )
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=plat.s3_bucket, Prefix=NAMESPACE + "/"):
        if contents := page.get("Contents", []):
            s3.delete_objects(
                Bucket=plat.s3_bucket, Delete={"Objects": [{"Key": o["Key"]} for o in contents]}
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--ticks", type=int, default=2)
    parser.add_argument(
        "--real",
        type=int,
        default=0,
        help="more schedules whose backups reach real stand-in pods and succeed",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as cleanup:
        return run(args, cleanup)


def run(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> int:
    plat = stack.up()
    api = config.new_client_from_config(config_file=plat.kubeconfig)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    install_crds(api)
    try:
        drop_finalizers(api, NAMESPACE)  # left by an interrupted earlier run
        core.delete_namespace(NAMESPACE)
        processes.wait_until("old namespace gone", lambda: _gone(core), 300)
    except client.ApiException:
        pass
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    real: dict[str, str] = {}  # schedule name -> pod
    if args.real:
        servers = [Server(f"bs{i}", HIDDEN, ALL_ROLES) for i in range(1, args.real + 1)]
        hosts = cleanup.enter_context(stack.directory().more_servers(servers))
        started = time.monotonic()
        pods = create_real_pods(api, plat, hosts)
        print(f"{len(pods)} FreeIPA pods ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
        real = {f"r{i:03d}": pod for i, pod in enumerate(pods)}
        cleanup.callback(empty_s3_prefix, plat)
        # Pods go before their servers leave the topology (callbacks run last in, first out).
        cleanup.callback(delete_pods, core, pods)
    names = [f"s{i:04d}" for i in range(args.count)]
    started = time.monotonic()
    for name in names:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "idmbackupschedules", schedule_body(name, "0 3 * * *", plat)
        )
    for name, pod in real.items():
        custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "idmbackupschedules", real_schedule_body(name, pod, "0 3 * * *", plat)
        )
    print(f"created {args.count + len(real)} schedules in {time.monotonic() - started:.1f}s", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="idm-bench-schedules-"))
    # Debug logging would be measured too: run the operator as it runs in production.
    operator = OperatorProcess(NAMESPACE, plat.kubeconfig, work, work / "operator.log", verbose=False)
    operator.start()
    cleanup.callback(operator.stop)
    assert operator.proc is not None
    pid = operator.proc.pid

    def all_scheduled() -> bool:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "idmbackupschedules")["items"]
        scheduled = sum(1 for s in items if (s.get("status") or {}).get("nextScheduleTime"))
        return bool(scheduled == args.count + len(real))

    processes.wait_until("every schedule picked up", all_scheduled, 600, operator.log)
    print(
        f"operator following {args.count + len(real)} schedules after {time.monotonic() - started:.1f}s",
        file=sys.stderr,
    )
    time.sleep(10)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(60)
    idle = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    rss_idle = status_kib(pid, "VmRSS") / 1024

    for name in [*names, *real]:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "idmbackupschedules", name, {"spec": {"schedule": "* * * * *"}}
        )
    now = datetime.datetime.now(datetime.UTC)
    first_tick = now.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    last_tick = first_tick + datetime.timedelta(minutes=args.ticks - 1)
    time.sleep(max(0.0, (last_tick - datetime.datetime.now(datetime.UTC)).total_seconds()) + 45)
    # No tick after the measured ones: every minute would add COUNT more backups to the queue, and the
    # real schedules' backups would wait behind them for as long as the run lasts.
    for name in [*names, *real]:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "idmbackupschedules", name, {"spec": {"suspend": True}}
        )
    real_wait = 0.0
    if real:
        waited_from = time.monotonic()
        with contextlib.suppress(processes.ProcessError):  # reported below as unfinished phases
            processes.wait_until(
                "the real schedules' backups finished",
                lambda: real_finished(custom, set(real), first_tick, last_tick),
                600,
            )
        real_wait = time.monotonic() - waited_from

    lateness, real_lateness = [], []
    real_phases: Counter[str] = Counter()
    real_failures: dict[str, str] = {}
    for backup in custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "idmbackups")["items"]:
        meta = backup["metadata"]
        tick = datetime.datetime.fromisoformat(
            meta["annotations"]["idm-backup.io/scheduled-for"].replace("Z", "+00:00")
        )
        if first_tick <= tick <= last_tick:
            created = datetime.datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00"))
            if meta["labels"].get(SCHEDULE_LABEL) in real:
                status = backup.get("status") or {}
                real_lateness.append((created - tick).total_seconds())
                real_phases[status.get("phase") or "none"] += 1
                if status.get("phase") != "Succeeded":
                    real_failures[meta["name"]] = f"{status.get('phase')}: {status.get('message')}"
                continue
            lateness.append((created - tick).total_seconds())
    hwm = status_kib(pid, "VmHWM") / 1024
    operator.stop()
    expected = args.count * args.ticks
    lateness.sort()
    p99 = lateness[int(0.99 * (len(lateness) - 1))] if lateness else float("nan")
    print(
        f"schedules: {args.count}; ticks: {args.ticks}; backups seen for them: {len(lateness)} of {expected}"
    )
    print(f"idle CPU: {idle * 100:.2f}% of one core over 60 s; RSS idle {rss_idle:.0f} MiB")
    print(f"peak RSS {hwm:.0f} MiB")
    if lateness:
        print(f"lateness s: p50 {statistics.median(lateness):.0f}, p99 {p99:.0f}, max {lateness[-1]:.0f}")
    if real:
        print(
            f"real schedules: {len(real)}; backups seen for them: {len(real_lateness)} of "
            f"{len(real) * args.ticks}; phases {dict(sorted(real_phases.items()))}; "
            f"waited {real_wait:.0f}s after the last tick + 45 s for them to finish"
        )
        if real_lateness:
            real_lateness.sort()
            p99_real = real_lateness[int(0.99 * (len(real_lateness) - 1))]
            print(
                f"real lateness s: p50 {statistics.median(real_lateness):.0f}, p99 {p99_real:.0f}, "
                f"max {real_lateness[-1]:.0f}"
            )
        for name, why in sorted(real_failures.items()):
            print(f"real backup {name} not Succeeded: {why}")
    print(f"operator log: {operator.log}")
    drop_finalizers(api, NAMESPACE)
    core.delete_namespace(NAMESPACE)
    return 0


def real_finished(
    custom: client.CustomObjectsApi,
    schedules: set[str],
    first_tick: datetime.datetime,
    last_tick: datetime.datetime,
) -> bool:
    """Whether the real schedules' backups of the measured ticks have finished. Asked from 45 s after the
    last tick on, when all of them exist: a schedule may skip a tick while its previous backup is still
    active (concurrencyPolicy Forbid), so fewer than one per schedule and tick is no reason to wait."""
    items = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "idmbackups")["items"]

    def measured(backup: dict[str, Any]) -> bool:
        meta = backup["metadata"]
        tick = datetime.datetime.fromisoformat(
            meta["annotations"]["idm-backup.io/scheduled-for"].replace("Z", "+00:00")
        )
        return meta["labels"].get(SCHEDULE_LABEL) in schedules and first_tick <= tick <= last_tick

    phases = [(b.get("status") or {}).get("phase") for b in items if measured(b)]
    return bool(phases) and all(p in ("Succeeded", "Failed") for p in phases)


def _gone(core: client.CoreV1Api) -> bool:
    try:
        core.read_namespace(NAMESPACE)
    except client.ApiException as err:
        return bool(err.status == 404)
    return False


if __name__ == "__main__":
    sys.exit(main())
