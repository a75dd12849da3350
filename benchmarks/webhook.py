"""Admission webhook latency as a client sees it; how fast deleting a running backup stops it. Run by hand.

    .venv/bin/python benchmarks/webhook.py [--requests 200] [--runs 5]

Against the local platform (started if needed, never stopped here), in the namespace bench-webhook: a
stand-in FreeIPA pod, its Directory Manager password Secret, S3 credentials and a public key made by gpg.
The real operator runs as a local process with its validating webhook on 127.0.0.1 (the platform CA's
serving certificate), and the Helm chart's ValidatingWebhookConfiguration, rendered in URL mode for this
namespace, points the API server at it.

1. admission: REQUESTS server-side dry-run creates (dryRun=All: admitted or refused, never stored, so no
   backup runs) of each of
   (a) a valid IdmBackup: the webhook reads the pod and three Secrets and imports the public key with gpg;
   (b) an IdmBackup refused for a missing Secret (its public keys);
   (c) a valid IdmBackupSchedule (the same checks on its template, plus the cron expression);
   (d) the valid IdmBackup of (a) once the webhook configuration is deleted: the API server and the CRD's
       schema and CEL rules alone, the baseline.
   Each create is timed around the API client call (HTTPS to the API server, kept alive); 5 unmeasured
   ones come first. The operator's CPU time (/proc/PID/stat: its own, and its children's, i.e. gpg's) is
   read before and after each case.
2. cancellation: RUNS times, an offline Full IdmBackup on the pod with its fault set to "hang" (ipa-backup
   stops the services and then waits for ever); once status.step starts with "ipa-backup" and `ipactl
   status` says stopped, the IdmBackup is deleted. Timed from the delete: until `pgrep -x ipa-backup` in
   the pod finds none, and until `ipactl status` says running again (polled back to back through exec).
   The pod is Ready again before the next run.
Results are printed; copy them into benchmarks/webhook.md.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root holds the testbed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml
from kubernetes import client, config

from testbed import freeipa_pod, pki, processes, stack
from testbed.deploy import REPO, OperatorProcess, drop_finalizers, install_crds
from testbed.gpgkeys import Keyring
from tests.helpers import backup_spec, pod_exec, pod_ready, s3_storage

GROUP, VERSION = "idm-backup.io", "v1alpha1"
BACKUPS, SCHEDULES = "idmbackups", "idmbackupschedules"
NAMESPACE = "bench-webhook"
RELEASE = "bench-webhook"
POD, HOST = "ipa-hidden", "ipa-hidden.example.test"
S3_SECRET, KEY_SECRET = "s3-credentials", "backup-public-key"
FAULT_FILE = "/data/ipa-standin-fault"
WARMUP = 5
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """The process's own CPU time, and that of its children it waited for (gpg)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return own, (int(fields[13]) + int(fields[14])) / CLK_TCK  # cutime + cstime


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the cluster ----------------------------------------------------------------------------------------


def namespace_gone(core: client.CoreV1Api) -> bool:
    try:
        core.read_namespace(NAMESPACE)
    except client.ApiException as err:
        return bool(err.status == 404)
    return False


def remove_leftovers(api: client.ApiClient, core: client.CoreV1Api) -> None:
    """What an interrupted earlier run left: its webhook configuration first, then its namespace."""
    admission = client.AdmissionregistrationV1Api(api)
    for item in admission.list_validating_webhook_configuration().items:
        if (item.metadata.labels or {}).get("app.kubernetes.io/instance") == RELEASE:
            admission.delete_validating_webhook_configuration(item.metadata.name)
    if not namespace_gone(core):
        drop_finalizers(api, NAMESPACE)
        core.delete_namespace(NAMESPACE)
        processes.wait_until("the old namespace to go", lambda: namespace_gone(core), 300)


def create_namespace(core: client.CoreV1Api, plat: stack.Platform) -> None:
    core.create_namespace({"metadata": {"name": NAMESPACE}})

    def default_service_account() -> bool:
        try:
            core.read_namespaced_service_account("default", NAMESPACE)
        except client.ApiException:
            return False
        return True

    processes.wait_until("the default ServiceAccount", default_service_account, 30)
    # The public key of whoever will restore, made by gpg as a user would (a short home: gpg-agent's
    # socket path has a length limit).
    home = Path(tempfile.mkdtemp(prefix="idm-bw-", dir="/tmp"))
    home.chmod(0o700)
    try:
        ring = Keyring(home)
        armored = ring.export(ring.make("IdM Restore <restore@example.test>")).armored
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)
        shutil.rmtree(home, ignore_errors=True)
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
    core.create_namespaced_secret(
        NAMESPACE,
        {"metadata": {"name": KEY_SECRET}, "data": {"restore.asc": base64.b64encode(armored).decode()}},
    )
    core.create_namespaced_persistent_volume_claim(NAMESPACE, freeipa_pod.data_claim(f"{POD}-data"))
    core.create_namespaced_pod(NAMESPACE, freeipa_pod.freeipa_pod(POD, HOST, plat.ldap_uri))
    processes.wait_until(
        "the stand-in FreeIPA pod to be ready", lambda: pod_ready(core.api_client, NAMESPACE, POD), 180
    )


# -- the webhook ----------------------------------------------------------------------------------------


def webhook_configuration(port: int, ca: Path, work: Path) -> dict[str, Any]:
    """The chart's ValidatingWebhookConfiguration for this namespace, calling https://127.0.0.1:PORT."""
    home = work / "helm-home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    ca_bundle = base64.b64encode(ca.read_bytes()).decode()
    rendered = subprocess.run(
        [
            str(stack.helm_binary()), "template", RELEASE, str(REPO / "charts" / "idm-backup-operator"),
            "-n", NAMESPACE, "--kube-version", stack.versions()["K8S_VERSION"],
            "--set", "rbac.scope=namespace", "--set", f"watchNamespaces={{{NAMESPACE}}}",
            "--set", f"webhook.url=https://127.0.0.1:{port}", "--set", "webhook.certificate.mode=secret",
            "--set", "webhook.certificate.secretName=unused-with-a-url",
            "--set", f"webhook.certificate.caBundle={ca_bundle}",
        ],
        env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    configurations: list[dict[str, Any]] = [
        d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "ValidatingWebhookConfiguration"
    ]
    (configuration,) = configurations
    return configuration


# -- the objects ----------------------------------------------------------------------------------------


def spec(plat: stack.Platform, **fields: Any) -> dict[str, Any]:
    """The tests' IdmBackup spec for the pod ipa-hidden, storing under this benchmark's prefix."""
    return backup_spec(plat, s3_storage(plat, NAMESPACE), **fields)


def body(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}


class DryRun:
    """One kind of dry-run create, expected to be admitted or refused by the webhook."""

    def __init__(self, custom: client.CustomObjectsApi, plural: str, obj: dict[str, Any], refused: bool):
        self.custom, self.plural, self.obj, self.refused = custom, plural, obj, refused

    def outcome(self) -> bool | None:
        """True: admitted; False: refused by the webhook; an error otherwise."""
        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, self.plural, self.obj, dry_run="All"
            )
        except client.ApiException as err:
            if err.status == 422 and "denied the request" in (err.body or ""):
                return False
            raise
        return True

    def timed(self) -> float:
        started = time.perf_counter()
        admitted = self.outcome()
        elapsed = time.perf_counter() - started
        if admitted == self.refused:
            raise AssertionError(f"{self.obj['metadata']['name']}: admitted={admitted}")
        return elapsed * 1000


def measure(what: str, dry_run: DryRun, count: int, pid: int) -> dict[str, float]:
    for _ in range(WARMUP):
        dry_run.timed()
    own0, children0 = cpu_seconds(pid)
    times = sorted(dry_run.timed() for _ in range(count))
    own1, children1 = cpu_seconds(pid)
    say(f"{what}: {count} dry-run creates, median {statistics.median(times):.1f} ms")
    return {
        "p50": statistics.median(times),
        "p95": times[int(0.95 * (len(times) - 1))],
        "max": times[-1],
        "cpu100": (own1 - own0) / count * 100,
        "children100": (children1 - children0) / count * 100,
    }


# -- cancellation ---------------------------------------------------------------------------------------


def cancel_once(
    api: client.ApiClient, custom: client.CustomObjectsApi, plat: stack.Platform, name: str
) -> tuple[float, float, int]:
    """Seconds from the delete until no ipa-backup runs, and until the services run; exec polls made."""
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        NAMESPACE,
        BACKUPS,
        body("IdmBackup", name, spec(plat, type="Full")),
    )

    def step() -> str:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, BACKUPS, name)
        status = obj.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(f"{name} finished before it was deleted: {status}")
        return str(status.get("step") or "")

    processes.wait_until(f"{name}: ipa-backup to run", lambda: step().startswith("ipa-backup"), 180)
    processes.wait_until(
        f"{name}: the services to be stopped",
        lambda: pod_exec(api, NAMESPACE, POD, ["ipactl", "status"])[0] != 0,
        60,
    )
    deleted = time.monotonic()
    custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, BACKUPS, name)
    stopped = running = None
    polls = 0
    while running is None:
        if time.monotonic() - deleted > 120:
            raise TimeoutError(f"{name}: ipa-backup still running or services stopped after 120 s")
        polls += 1
        if stopped is None:
            if pod_exec(api, NAMESPACE, POD, ["pgrep", "-x", "ipa-backup"])[0] == 1:
                stopped = time.monotonic() - deleted
        elif pod_exec(api, NAMESPACE, POD, ["ipactl", "status"])[0] == 0:
            running = time.monotonic() - deleted
    assert stopped is not None
    return stopped, running, polls


def spread(values: list[float]) -> str:
    return f"min {min(values):.1f}, median {statistics.median(values):.1f}, max {max(values):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="dry-run creates per case")
    parser.add_argument("--runs", type=int, default=5, help="cancellations")
    args = parser.parse_args()

    plat = stack.up()
    api = config.new_client_from_config(config_file=plat.kubeconfig)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    admission = client.AdmissionregistrationV1Api(api)
    install_crds(api)
    remove_leftovers(api, core)
    work = Path(tempfile.mkdtemp(prefix="idm-bench-webhook-"))
    say(f"load average at the start: {os.getloadavg()}")
    create_namespace(core, plat)

    pki_dir = Path(plat.state_dir) / "pki"
    certs = pki.webhook_cert_dir(pki_dir, work / "webhook-tls")
    (work / "pvc").mkdir()
    port = processes.free_port()
    # Debug logging would be measured too: run the operator as it runs in production.
    operator = OperatorProcess(
        NAMESPACE,
        plat.kubeconfig,
        work / "pvc",
        work / "operator.log",
        verbose=False,
        args=(
            "--webhook-port",
            str(port),
            "--webhook-address",
            "127.0.0.1",
            "--webhook-cert-dir",
            str(certs),
        ),
    )
    configuration = webhook_configuration(port, pki_dir / "ca.crt", work)
    config_name = configuration["metadata"]["name"]
    operator.start()
    assert operator.proc is not None
    pid = operator.proc.pid
    try:
        admission.create_validating_webhook_configuration(configuration)
        valid = DryRun(
            custom,
            BACKUPS,
            body("IdmBackup", "valid", spec(plat)),
            refused=False,
        )
        missing = backup_spec(
            plat, s3_storage(plat, NAMESPACE), encryption={"publicKeysSecretRef": {"name": "no-such-keys"}}
        )
        refused = DryRun(custom, BACKUPS, body("IdmBackup", "missing-secret", missing), refused=True)
        schedule_spec = {
            "schedule": "0 3 * * *",
            "template": {"spec": spec(plat)},
        }
        schedule = DryRun(
            custom, SCHEDULES, body("IdmBackupSchedule", "nightly", schedule_spec), refused=False
        )

        # The configuration reaches the API server's webhook manager asynchronously, and the operator
        # needs a moment to listen: until a refusal that only the webhook can give comes back.
        def answering() -> bool:
            try:
                return refused.outcome() is False
            except client.ApiException:  # failurePolicy Fail: refused while the operator is not listening
                return False

        processes.wait_until("the webhook to answer", answering, 60)
        results = {
            "(a) valid IdmBackup": measure("valid IdmBackup", valid, args.requests, pid),
            "(b) IdmBackup refused (missing Secret)": measure("refused", refused, args.requests, pid),
            "(c) valid IdmBackupSchedule": measure("valid schedule", schedule, args.requests, pid),
        }
        admission.delete_validating_webhook_configuration(config_name)
        processes.wait_until("the webhook to be no longer called", lambda: refused.outcome() is True, 60)
        time.sleep(2)
        baseline = DryRun(custom, BACKUPS, valid.obj, refused=False)
        results["(d) valid IdmBackup, no webhook"] = measure("no webhook", baseline, args.requests, pid)

        say(f"cancellation: {args.runs} runs")
        assert pod_exec(api, NAMESPACE, POD, ["sh", "-c", f"echo hang > {FAULT_FILE}"])[0] == 0
        stopped, running, polls = [], [], 0
        for run in range(args.runs):
            processes.wait_until("the pod to be ready", lambda: pod_ready(api, NAMESPACE, POD), 120)
            took = cancel_once(api, custom, plat, f"cancel-{run}")
            stopped.append(took[0])
            running.append(took[1])
            polls += took[2]
            say(f"run {run + 1}: ipa-backup gone after {took[0]:.1f} s, services up after {took[1]:.1f} s")
        poll_period = sum(running) / polls
        load = os.getloadavg()
    finally:
        operator.stop()
        try:
            admission.delete_validating_webhook_configuration(config_name)
        except client.ApiException as err:
            if err.status != 404:
                raise
        drop_finalizers(api, NAMESPACE)
        core.delete_namespace(NAMESPACE)

    print(f"admission: {args.requests} dry-run creates per case after {WARMUP} unmeasured ones")
    print("| case | p50 ms | p95 ms | max ms | operator CPU s per 100 | its children's (gpg) |")
    print("|---|---|---|---|---|---|")
    for case, r in results.items():
        print(
            f"| {case} | {r['p50']:.1f} | {r['p95']:.1f} | {r['max']:.1f} | {r['cpu100']:.2f} "
            f"| {r['children100']:.2f} |"
        )
    print(f"cancellation, {args.runs} runs, seconds from the delete:")
    print(f"  no ipa-backup left in the pod: {spread(stopped)}")
    print(f"  ipactl status running again:   {spread(running)}")
    print(f"  one exec poll every {poll_period:.2f} s on average")
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"operator log: {operator.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
