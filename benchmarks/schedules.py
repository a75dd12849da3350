"""One operator following 500 IdmBackupSchedules: tick lateness, peak RSS and idle CPU. Run by hand.

    .venv/bin/python benchmarks/schedules.py [--count 500] [--ticks 2]

Two phases against the local platform (started if needed, never stopped here):
1. idle: COUNT schedules that are not due (03:00 daily); the operator's CPU time over 60 s;
2. ticking: the same COUNT schedules switched to every minute; each tick creates COUNT backups. Their
   target pod does not exist, so each backup fails in pre-flight in milliseconds: what is measured is the
   schedule machinery, not ipa-backup. Lateness = the backup's creationTimestamp (1 s resolution) minus
   its tick (the scheduled-for annotation).
Peak RSS is the operator's VmHWM at the end. Results are printed; copy them into benchmarks/schedules.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root holds the testbed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes import client, config

from testbed import processes, stack
from testbed.deploy import OperatorProcess, drop_finalizers, install_crds

GROUP, VERSION = "idm-backup.io", "v1alpha1"
NAMESPACE = "bench-schedules"
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--ticks", type=int, default=2)
    args = parser.parse_args()

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
    names = [f"s{i:04d}" for i in range(args.count)]
    started = time.monotonic()
    for name in names:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "idmbackupschedules", schedule_body(name, "0 3 * * *", plat)
        )
    print(f"created {args.count} schedules in {time.monotonic() - started:.1f}s", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="idm-bench-schedules-"))
    # Debug logging would be measured too: run the operator as it runs in production.
    operator = OperatorProcess(NAMESPACE, plat.kubeconfig, work, work / "operator.log", verbose=False)
    operator.start()
    assert operator.proc is not None
    pid = operator.proc.pid

    def all_scheduled() -> bool:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "idmbackupschedules")["items"]
        return sum(1 for s in items if (s.get("status") or {}).get("nextScheduleTime")) == args.count

    processes.wait_until("every schedule picked up", all_scheduled, 600, operator.log)
    print(
        f"operator following {args.count} schedules after {time.monotonic() - started:.1f}s", file=sys.stderr
    )
    time.sleep(10)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(60)
    idle = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    rss_idle = status_kib(pid, "VmRSS") / 1024

    for name in names:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "idmbackupschedules", name, {"spec": {"schedule": "* * * * *"}}
        )
    now = datetime.datetime.now(datetime.UTC)
    first_tick = now.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    last_tick = first_tick + datetime.timedelta(minutes=args.ticks - 1)
    time.sleep(max(0.0, (last_tick - datetime.datetime.now(datetime.UTC)).total_seconds()) + 45)

    lateness = []
    for backup in custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "idmbackups")["items"]:
        meta = backup["metadata"]
        tick = datetime.datetime.fromisoformat(
            meta["annotations"]["idm-backup.io/scheduled-for"].replace("Z", "+00:00")
        )
        if first_tick <= tick <= last_tick:
            created = datetime.datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00"))
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
    print(f"operator log: {operator.log}")
    drop_finalizers(api, NAMESPACE)
    core.delete_namespace(NAMESPACE)
    return 0


def _gone(core: client.CoreV1Api) -> bool:
    try:
        core.read_namespace(NAMESPACE)
    except client.ApiException as err:
        return err.status == 404
    return False


if __name__ == "__main__":
    sys.exit(main())
