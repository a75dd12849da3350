"""The command line: verify (name, URI, directory; corrupted; wrong key), list, describe, backup-now,
restore, drill; what scripts get (-o json|yaml, exit codes, one-line errors) and what people get
(progress, human sizes, help with examples, completion, escaped control characters), on the platform
where it talks to something.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from idm_backup_operator.archive.encryption import encrypt, load_recipients
from idm_backup_operator.cli import (
    EXIT_BROKEN,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    build_parser,
    main,
    manual_backup_name,
    read_claim_template,
    read_pod_template,
    restore_location,
    restore_name,
)
from idm_backup_operator.cli_output import (
    Progress,
    bash_completion,
    clean,
    restore_document,
    restore_text,
    transfer_detail,
    zsh_completion,
)
from idm_backup_operator.streams import human_size
from testbed import stack
from testbed.deploy import OperatorProcess
from testbed.gpgkeys import ExportedKey, Keyring
from tests import test_restore as restore_tests
from tests.helpers import (
    GROUP,
    S3_SECRET,
    VERSION,
    backup_spec,
    create_backup,
    create_schedule,
    get_backup,
    pod_ready,
    s3_storage,
    wait_finished,
    wait_for,
)

# The restore tests' own 389-ds (one per module: a restore replaces whole backends) and stand-in server on
# it, and the drills' scratch directory, as this module's fixtures too: pytest finds a module's fixtures by
# its names.
directory = restore_tests.directory
server = restore_tests.server
drill_directory = restore_tests.drill_directory

Run = Callable[..., tuple[int, str]]
Run3 = Callable[..., tuple[int, str, str]]
FINGERPRINT = re.compile(r"^[0-9A-F]{40}$")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    """main() in this process: its exit code, and stdout and stderr together."""

    def run(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


@pytest.fixture
def cli3(capsys: pytest.CaptureFixture[str]) -> Run3:
    """main() in this process: its exit code, stdout and stderr apart (neither is a terminal)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def command(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command in its own process: what a shell or a script sees, logging included."""
    return subprocess.run(
        [sys.executable, "-m", "idm_backup_operator", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def key_file(tmp_path: Path, backup_key: ExportedKey) -> Path:
    path = tmp_path / "restore.key"
    path.write_bytes(backup_key.secret)
    return path


def test_manual_backup_names_fit_kubernetes_limits() -> None:
    moment = datetime.datetime(2026, 11, 26, 2, 3, 4, tzinfo=datetime.UTC)
    assert manual_backup_name("nightly", moment) == "nightly-manual-20261126020304"
    long = manual_backup_name("x" * 60, moment)
    assert len(long) == 63 and long.endswith("-manual-20261126020304")
    assert long != manual_backup_name("x" * 59 + "y", moment)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def record(name: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def make_backup_dir(path: Path, key: ExportedKey, members: dict[str, bytes], kind: str = "FULL") -> Path:
    """A backup directory as the operator writes it: header, encrypted archive, manifest."""
    path.mkdir(parents=True)
    plaintext = tar_gz(members)
    archive = b"".join(encrypt([plaintext], load_recipients(key.public)))
    header = b"[ipa]\nhost = ipa.example.test\n"
    (path / "header").write_bytes(header)
    (path / "ipa-full.tar.gpg").write_bytes(archive)
    manifest = {
        "format": 1,
        "createdAt": "2026-11-26T02:00:00+00:00",
        "resource": {"kind": "IdmBackup", "namespace": "identity", "name": "nightly", "uid": "u-1"},
        "server": {"host": "ipa.example.test", "pod": "ipa"},
        "header": {"type": kind, "host": "ipa.example.test"},
        "files": {
            "header": record("header", header),
            "archive": {
                **record("ipa-full.tar.gpg", archive),
                "plaintext": record("ipa-full.tar", plaintext),
                "encryption": {"tool": "gpg", "recipients": [key.fingerprint]},
            },
        },
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_verify_reads_a_local_directory_and_names_what_a_restore_would_miss(
    tmp_path: Path, backup_key: ExportedKey, key_file: Path, cli: Run, cli3: Run3
) -> None:
    files_tar = tar_gz({"etc/ipa/default.conf": b"[global]\n"})
    good = make_backup_dir(
        tmp_path / "good",
        backup_key,
        {"EXAMPLE-TEST-userRoot.ldif": b"dn: x\n" * 50_000, "files.tar": files_tar},
    )
    code, out = cli("verify", str(good), "--key", str(key_file))
    assert code == 0 and out.strip().endswith("can be restored: yes"), out
    assert "files.tar, a readable tar of 1 entries" in out
    no_ldif = make_backup_dir(tmp_path / "no-ldif", backup_key, {"files.tar": files_tar})
    code, out = cli("verify", str(no_ldif / "manifest.json"), "--key", str(key_file))
    assert code == 1 and "because the archive has no <SERVERID>-userRoot.ldif" in out, out
    no_files = make_backup_dir(tmp_path / "no-files", backup_key, {"EXAMPLE-TEST-userRoot.ldif": b"dn: x\n"})
    code, out = cli("verify", str(no_files), "--key", str(key_file))
    assert code == 1 and "the full backup's archive has no files.tar" in out, out
    # Without a key nothing says the backup is broken: it could not be checked, a usage error in one line.
    code, _, stderr = cli3("verify", str(good))
    assert code == EXIT_USAGE, stderr
    assert stderr.splitlines() == [
        f"error: cannot check {good}/: the archive is encrypted (to {backup_key.fingerprint}) and no "
        "private key was given (--key)"
    ]
    (good / "header").write_bytes(b"[ipa]\nhost = other.example.test\n")
    code, out = cli("verify", str(good), "--key", str(key_file))
    assert code == EXIT_BROKEN and "because the header is 32 bytes, the manifest says 30" in out, out


def test_verify_shows_plain_progress_and_human_sizes_or_prints_one_json_or_yaml_document(
    tmp_path: Path, backup_key: ExportedKey, key_file: Path, cli3: Run3
) -> None:
    # Random bytes do not compress: the archive is over 256 KiB, so its sizes read in KiB.
    members = {"EXAMPLE-TEST-userRoot.ldif": os.urandom(300_000), "files.tar": tar_gz({"a": b"x"})}
    good = make_backup_dir(tmp_path / "ipa-full-2026-11-26-02-00-00", backup_key, members)
    size = (good / "ipa-full.tar.gpg").stat().st_size
    code, stdout, stderr = cli3("verify", str(good), "--key", str(key_file))
    assert (code, stderr) == (EXIT_OK, ""), stdout + stderr
    # Not a terminal: a plain line per step, and one when the archive is read to its end.
    progress = [re.sub(r"^\[\s*\d+s\] ", "", line) for line in stdout.splitlines() if line.startswith("[")]
    reading = "reading ipa-full.tar.gpg"
    assert progress[:3] == ["reading the manifest", "checking the header", reading], stdout
    assert progress[3].startswith(f"{reading}: {human_size(size)} of {human_size(size)} (100%)"), stdout
    assert len(progress) == 4, stdout
    assert f"archive ipa-full.tar.gpg: {human_size(size)} ({size} bytes), sha256 matches" in stdout
    assert stdout.splitlines()[-1] == "can be restored: yes"

    code, stdout, stderr = cli3("verify", str(good), "--key", str(key_file), "-o", "json")
    document = json.loads(stdout)  # all of stdout: no progress in it
    assert (code, stderr) == (EXIT_OK, "")
    assert (document["restorable"], document["reasons"]) == (True, [])
    assert (document["location"], document["type"], document["host"]) == (
        f"{good}/",
        "FULL",
        "ipa.example.test",
    )
    assert document["sizeBytes"] == size and isinstance(document["plaintextSizeBytes"], int)
    assert document["resource"] == {"namespace": "identity", "name": "nightly", "uid": "u-1"}
    assert document["recipients"] == [backup_key.fingerprint] and FINGERPRINT.match(backup_key.fingerprint)
    code, stdout, stderr = cli3("verify", str(good), "--key", str(key_file), "-o", "yaml")
    assert (code, stderr, yaml.safe_load(stdout)) == (EXIT_OK, "", document)

    (good / "header").write_bytes(b"[ipa]\nhost = other.example.test\n")
    code, stdout, stderr = cli3("verify", str(good), "--key", str(key_file), "-o", "json")
    document = json.loads(stdout)
    assert (code, stderr, document["restorable"]) == (EXIT_BROKEN, "", False)
    assert document["reasons"][0].startswith("the header is 32 bytes, the manifest says 30")

    code, stdout, stderr = cli3("verify", str(good), "--key", str(tmp_path / "missing.key"))
    assert (code, stdout) == (EXIT_ERROR, "")
    assert stderr.splitlines() == [
        f"error: cannot read the key file {tmp_path}/missing.key: No such file or directory"
    ]


def test_verify_and_list_say_in_one_line_when_the_storage_cannot_be_reached(
    key_file: Path, monkeypatch: pytest.MonkeyPatch, cli3: Run3
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    directory = "s3://idm-backups/prod/identity/ipa.example.test/ipa-full-2026-11-26-02-00-03/"
    code, stdout, stderr = cli3(
        "verify", directory, "--key", str(key_file), "--s3-endpoint", endpoint, "-o", "json"
    )
    # Could not check (3), not "cannot be restored" (1): the backup may be fine.
    assert (code, stdout) == (EXIT_ERROR, ""), stderr
    (line,) = stderr.splitlines()
    assert line.startswith(f"error: could not check {directory}: manifest.json cannot be read: "), line
    assert f"{endpoint} is unreachable" in line
    code, stdout, stderr = cli3("list", "--storage", "s3://idm-backups/prod", "--s3-endpoint", endpoint)
    assert (code, stdout) == (EXIT_ERROR, "")
    (line,) = stderr.splitlines()
    assert (
        line.startswith("error: cannot list s3://idm-backups/prod/") and f"{endpoint} is unreachable" in line
    )


def test_an_unreachable_api_server_is_one_line_on_stderr_and_exit_3(tmp_path: Path) -> None:
    port = closed_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "gone",
                "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
                "users": [{"name": "someone", "user": {"token": "t"}}],
                "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "someone"}}],
            }
        )
    )
    expected = [f"error: cannot reach the Kubernetes API server https://127.0.0.1:{port}: Connection refused"]
    # Its own process: no warning a library logs (urllib3 retries) may reach stderr.
    for argv in (
        ["list", "-A", "-o", "json"],
        ["describe", "schedule", "nightly", "-n", "identity", "-o", "yaml"],
        ["backup-now", "nightly", "-n", "identity", "--wait"],
    ):
        result = command(*argv, env={"KUBECONFIG": str(kubeconfig)})
        assert (result.returncode, result.stdout, result.stderr.splitlines()) == (EXIT_ERROR, "", expected), (
            argv
        )
    result = command("verify", "nightly-1", "--kubeconfig", str(kubeconfig), "--key", str(kubeconfig))
    assert (result.returncode, result.stderr.splitlines()) == (EXIT_ERROR, expected)
    result = command("list", "--kubeconfig", str(tmp_path / "none"))
    assert (result.returncode, result.stdout) == (EXIT_ERROR, "")
    assert result.stderr.splitlines() == [
        f"error: no usable Kubernetes configuration in {tmp_path}/none: Invalid kube-config file. No "
        "configuration found."
    ]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_help_has_examples_that_parse_and_says_what_the_exit_codes_mean() -> None:
    commands = _subcommands()
    assert set(commands) == {
        "run",
        "backup-now",
        "list",
        "describe",
        "verify",
        "restore",
        "drill",
        "completion",
    }
    for name, sub in commands.items():
        text = sub.format_help()
        examples = text.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
        lines = [line.strip() for line in examples.splitlines() if not line.strip().startswith("#")]
        runs = [re.sub(r"^(\w+=\S+ )+", "", line) for line in lines]
        runs = [line for line in runs if line.startswith("idm-backup-operator ")]
        assert len(runs) >= 2, (name, examples)
        for line in runs:
            argv = shlex.split(re.split(r" \| | > |  #", line)[0])[1:]
            args = build_parser().parse_args(argv)  # an example that does not parse fails here
            assert args.command == name, line
        if name not in ("run", "completion"):
            assert "exit status:\n  0 " in text and "\n  3    could not do it or could not check" in text
    main_help = build_parser().format_help()
    assert "exit status of every command but run:" in main_help
    for code, meaning in ((EXIT_OK, "done"), (EXIT_BROKEN, "the backup is broken"), (EXIT_USAGE, "usage")):
        assert f"\n  {code}    {meaning}" in main_help


def test_completion_scripts_offer_every_subcommand_and_option(tmp_path: Path, cli3: Run3) -> None:
    code, bash, _ = cli3("completion", "bash")
    assert code == EXIT_OK and bash == bash_completion(build_parser())
    code, zsh, _ = cli3("completion", "zsh")
    assert (
        code == EXIT_OK
        and zsh == zsh_completion(build_parser())
        and zsh.startswith("#compdef idm-backup-operator\n")
    )
    for name, sub in _subcommands().items():
        assert f"\n        {name})\n" in bash and f"\n        ({name})\n" in zsh
        assert re.search(rf"^        '{name}:\w", zsh, re.M), name  # listed with its help
        for option in (s for action in sub._actions for s in action.option_strings):
            assert re.search(rf"[ \"|]{re.escape(option)}[ \"|)]", bash), (name, option)
            assert option in zsh, (name, option)
    script = tmp_path / "completion.bash"
    script.write_text(bash)

    def complete(*words: str) -> list[str]:
        quoted = " ".join(shlex.quote(w) for w in ("idm-backup-operator", *words))
        shell = f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; _idm_backup_operator; "
        result = subprocess.run(
            ["bash", "-c", shell + 'printf "%s\\n" "${COMPREPLY[@]}"'],
            capture_output=True,
            text=True,
            check=True,
        )
        return [line for line in result.stdout.splitlines() if line]

    assert set(_subcommands()) <= set(complete(""))
    assert complete("de") == ["describe"]
    assert complete("list", "-o", "") == ["table", "wide", "json", "yaml"]
    assert complete("describe", "") == ["backup", "schedule"]
    assert complete("verify", "--ke") == ["--key"]
    assert complete("completion", "") == ["bash", "zsh"]
    assert complete("restore", "--back") == ["--backend"]
    assert complete("restore", "--backend", "") == ["userRoot", "ipaca"]
    assert complete("restore", "--type", "") == ["Data", "Full"]
    assert complete("restore", "--no-w") == ["--no-wait"]
    assert complete("drill", "--pod-t") == ["--pod-template"]
    assert complete("drill", "--pod-template", str(tmp_path / "compl")) == [str(script)]


def test_progress_is_live_on_a_terminal_and_plain_lines_otherwise() -> None:
    assert transfer_detail(1 << 30, 4 << 30, 10.0) == "1.0 GiB of 4.0 GiB (25%), 102.4 MiB/s, about 30s left"
    assert transfer_detail(5 << 20, None, 0.1) == "5.0 MiB"
    plain = io.StringIO()  # not a terminal
    with Progress(plain, interval=3600) as progress:
        progress.step("reading x")
        progress.transferred(1 << 20, 4 << 20)  # within the interval: no line
        progress.tick()
        progress.transferred(4 << 20, 4 << 20)  # the end of it: a line
        progress.step("reading x")  # the same step: no line
        progress.step("checking \x1b[2J[bold]y")
    lines = [re.sub(r"^\[\s*\d+s\] ", "", line) for line in plain.getvalue().splitlines()]
    assert lines == ["reading x", "reading x: 4.0 MiB of 4.0 MiB (100%)", "checking \\x1b[2J[bold]y"]
    terminal = io.StringIO()
    with Progress(terminal, live=True) as progress:
        progress.step("reading ipa-full.tar.gpg")
        progress.transferred(1 << 20, 4 << 20)
    shown = terminal.getvalue()
    # rich drew it (cursor and colour sequences), with the same numbers as the plain lines.
    assert (
        "\x1b[?25l" in shown and "reading ipa-full.tar.gpg" in shown and "1.0 MiB of 4.0 MiB (25%)" in shown
    )
    assert clean("a\x1b]0;t\x07b\u202ec\x9bd\ne") == "a\\x1b]0;t\\x07b\\u202ec\\x9bd\\x0ae"
    assert clean("one\ntwo\x1b", newlines=True) == "one\ntwo\\x1b"


def test_run_options_come_from_flags_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["run"])
    assert (args.peering, args.log_format, args.metrics_port) == (None, "text", 9090)
    assert args.metrics_address == "127.0.0.1"  # outside a pod: loopback only
    monkeypatch.setenv("IDM_BACKUP_LOG_FORMAT", "json")
    monkeypatch.setenv("IDM_BACKUP_METRICS_PORT", "0")
    # Only its presence matters (it says "in a pod"); nothing connects to it.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    args = build_parser().parse_args(["run", "--peering", "idm-backup"])
    assert (args.peering, args.log_format, args.metrics_port) == ("idm-backup", "json", 0)
    assert args.metrics_address == "0.0.0.0"  # in a pod, where Prometheus scrapes the pod IP
    capsys.readouterr()
    # argparse's refusal of a mutually exclusive pair: usage error, exit code 2, and which pair it was.
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["run", "--peering", "x", "--standalone"])
    assert refused.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last_line
        == "idm-backup-operator run: error: argument --standalone: not allowed with argument --peering"
    )


@pytest.mark.platform
def test_verify_by_name_uri_and_directory_and_what_makes_it_fail(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    s3: Any,
    cli: Run,
    cli3: Run3,
    key_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    freeipa()
    prefix = f"test/{namespace}"
    create_backup(api, namespace, "full", backup_spec(platform, s3_storage(platform, prefix), type="Full"))
    status = wait_finished(api, namespace, "full", operator)["status"]
    assert status["phase"] == "Succeeded", status
    directory_uri = status["archive"]["uri"].rsplit("/", 1)[0] + "/"
    directory_key = directory_uri.removeprefix(f"s3://{platform.s3_bucket}/")

    # By name: the location and the S3 credentials come from the resource and its Secret.
    code, out = cli("verify", "full", "-n", namespace, "--key", str(key_file))
    assert code == 0, out
    assert out.strip().endswith("can be restored: yes")
    assert "EXAMPLE-TEST-userRoot.ldif" in out and "files.tar, a readable tar" in out
    size, recipients = status["archive"]["sizeBytes"], status["archive"]["recipients"]
    assert recipients and all(FINGERPRINT.match(r) for r in recipients), recipients
    code, stdout, stderr = cli3("verify", "full", "-n", namespace, "--key", str(key_file), "-o", "json")
    verdict = json.loads(stdout)
    assert (code, stderr, verdict["restorable"], verdict["sizeBytes"]) == (EXIT_OK, "", True, size)
    assert verdict["recipients"] == recipients and verdict["location"] == directory_uri

    # describe: status, conditions, Events, and the files as stored, read back from S3.
    code, stdout, stderr = cli3("describe", "backup", "full", "-n", namespace, "-o", "json")
    described = json.loads(stdout)
    assert (code, stderr) == (EXIT_OK, "")
    assert (described["kind"], described["phase"], described["type"]) == ("IdmBackup", "Succeeded", "Full")
    assert described["archive"]["sizeBytes"] == size and described["archive"]["recipients"] == recipients
    assert described["target"]["pod"] == "ipa-hidden"
    assert {c["type"]: c["status"] for c in described["conditions"]}["Completed"] == "True"
    assert {"BackupStarted", "BackupCompleted"} <= {e["reason"] for e in described["events"]}
    stored_files = described["storedFiles"]
    assert (stored_files["location"], stored_files["problem"]) == (directory_uri, None), stored_files
    assert stored_files["manifest"]["ownedByThisBackup"] is True
    assert stored_files["manifest"]["resourceUID"] == get_backup(api, namespace, "full")["metadata"]["uid"]
    files = {f["name"]: f for f in stored_files["files"]}
    assert set(files) == {"header", "ipa-full.tar.gpg", "manifest.json"} and all(
        f["stored"] for f in files.values()
    )
    archive_file = files["ipa-full.tar.gpg"]
    assert archive_file["sizeBytes"] == archive_file["manifestSizeBytes"] == size
    assert archive_file["manifestSHA256"] == status["archive"]["sha256"]
    assert archive_file["uri"] == status["archive"]["uri"]
    code, out = cli("describe", "backup", "full", "-n", namespace)
    assert code == EXIT_OK and human_size(size) in out and recipients[0] in out, out
    assert re.search(r"^Phase:\s+Succeeded$", out, re.M) and "BackupCompleted" in out, out
    assert re.search(rf"^  ipa-full\.tar\.gpg\s+yes\s+{re.escape(human_size(size))}\s", out, re.M), out
    code, stdout, _ = cli3("describe", "idmbackup", "full", "-n", namespace, "--skip-storage", "-o", "yaml")
    skipped = yaml.safe_load(stdout)["storedFiles"]
    assert (code, skipped["problem"], skipped["files"]) == (EXIT_OK, "not read (--skip-storage)", [])

    # By URI: the credentials from the environment, as on a laptop.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", platform.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", platform.s3_secret_key)
    endpoint = ("--s3-endpoint", platform.s3_endpoint)
    code, out = cli("verify", directory_uri, *endpoint, "--key", str(key_file))
    assert code == 0, out
    assert "can be restored: yes" in out

    # A downloaded directory (or a PVC's).
    local = tmp_path / directory_key.rstrip("/").rsplit("/", 1)[1]
    local.mkdir()
    for name in ("header", "ipa-full.tar.gpg", "manifest.json"):
        s3.download_file(platform.s3_bucket, directory_key + name, str(local / name))
    code, out = cli("verify", str(local), "--key", str(key_file))
    assert code == 0 and "can be restored: yes" in out, out

    code, out = cli("list", "-n", namespace)
    assert code == 0
    assert re.search(rf"^full\s+Succeeded\s+Full\s+{re.escape(human_size(size))}\s+\S+\s+s3://", out, re.M), (
        out
    )
    code, stdout, _ = cli3("list", "-n", namespace, "-o", "json")
    (item,) = json.loads(stdout)["items"]
    assert (item["name"], item["phase"], item["sizeBytes"]) == ("full", "Succeeded", size)
    assert (item["archiveURI"], item["recipients"], item["host"]) == (
        status["archive"]["uri"],
        recipients,
        status["target"]["host"],
    )
    code, out = cli("list", "-n", namespace, "-o", "wide")
    assert code == 0 and recipients[0] in out and status["target"]["host"] in out, out
    code, out = cli("list", "--storage", f"s3://{platform.s3_bucket}/{prefix}", *endpoint)
    assert code == 0
    assert directory_uri in out and "FULL" in out and f"{namespace}/full" in out, out
    code, stdout, _ = cli3(
        "list", "--storage", f"s3://{platform.s3_bucket}/{prefix}", *endpoint, "-o", "yaml"
    )
    (found,) = yaml.safe_load(stdout)["items"]
    assert (found["directory"], found["sizeBytes"], found["recipients"]) == (directory_uri, size, recipients)
    assert (found["type"], found["resource"]["name"], found["problem"]) == ("FULL", "full", None)

    # The wrong key: refused before anything is downloaded, saying which keys would do.
    home = tmp_path / "other-gnupg"
    home.mkdir(mode=0o700)
    ring = Keyring(home)
    other = ring.export(ring.make("Someone Else <else@example.test>"))
    (tmp_path / "other.key").write_bytes(other.secret)
    # That says nothing about the backup: it could not be checked with this key (usage, 2).
    code, stdout, stderr = cli3("verify", directory_uri, *endpoint, "--key", str(tmp_path / "other.key"))
    assert code == EXIT_USAGE and "can be restored" not in stdout, stdout + stderr
    (line,) = stderr.splitlines()
    assert line.startswith(f"error: cannot check {directory_uri}: the key (") and recipients[0] in line, line
    assert "is not one this archive is encrypted to" in line
    (tmp_path / "public.key").write_bytes(other.armored)
    code, out = cli("verify", directory_uri, *endpoint, "--key", str(tmp_path / "public.key"))
    assert code == EXIT_USAGE and "holds no OpenPGP private key" in out, out

    # One byte changed in the stored archive.
    archive_key = directory_key + "ipa-full.tar.gpg"
    data = bytearray(s3.get_object(Bucket=platform.s3_bucket, Key=archive_key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=platform.s3_bucket, Key=archive_key, Body=bytes(data))
    code, out = cli("verify", "full", "-n", namespace, "--key", str(key_file))
    assert code == 1, out
    assert "can be restored: no, because the stored archive's sha256 is" in out
    assert "corrupted or was altered" in out

    # No manifest: an incomplete directory.
    s3.delete_object(Bucket=platform.s3_bucket, Key=directory_key + "manifest.json")
    code, out = cli("verify", directory_uri, *endpoint, "--key", str(key_file))
    assert code == 1 and "there is no manifest.json" in out, out
    code, stdout, _ = cli3("describe", "backup", "full", "-n", namespace, "-o", "json")
    stored_files = json.loads(stdout)["storedFiles"]
    assert stored_files["problem"].startswith("no manifest.json: the backup is incomplete"), stored_files
    assert {f["name"]: f["stored"] for f in stored_files["files"]} == {
        "header": True,
        "ipa-full.tar.gpg": True,
        "manifest.json": False,
    }


@pytest.mark.platform
def test_backup_now_creates_a_backup_of_the_schedule_that_the_operator_completes(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Callable[..., str],
    operator: OperatorProcess,
    secrets: None,
    cli: Run,
    cli3: Run3,
    key_file: Path,
) -> None:
    freeipa()
    template = backup_spec(platform, s3_storage(platform, f"test/{namespace}"), type="Data", online=True)
    created = create_schedule(
        api, namespace, "nightly", {"schedule": "0 2 * * *", "template": {"spec": template}}
    )
    code, stdout, stderr = cli3("backup-now", "nightly", "-n", namespace, "--wait", "--timeout", "180")
    assert (code, stderr) == (EXIT_OK, ""), stdout + stderr
    lines = stdout.splitlines()
    name = re.fullmatch(
        rf"idmbackup {namespace}/(nightly-manual-\d{{14}}) created from schedule nightly", lines[0]
    )
    assert name, stdout
    # Not a terminal: a plain line each time the step changes, with the time it has run.
    progress = lines[1:-1]
    assert progress and all(re.fullmatch(r"\[\s*[\dsmhd]+\] (Pending|Running): \S.*", p) for p in progress), (
        stdout
    )
    assert len(set(progress)) == len(progress), stdout  # a line per change, not per poll
    assert re.fullmatch(r"Succeeded: stored s3://\S+ \(\d+(\.\d)? (B|KiB|MiB|GiB)\)", lines[-1]), stdout
    backup = get_backup(api, namespace, name[1])
    assert backup["status"]["phase"] == "Succeeded"
    assert backup["metadata"]["labels"]["idm-backup.io/schedule"] == "nightly"
    owner = backup["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (
        "IdmBackupSchedule",
        created["metadata"]["uid"],
        True,
    )
    code, out = cli("list", "-n", namespace, "--schedule", "nightly")
    assert code == 0 and name[1] in out
    # The schedule's storage, opened with the template's credentials Secret.
    code, out = cli("list", "-n", namespace, "--schedule", "nightly", "--storage")
    assert code == 0 and f"{namespace}/{name[1]}" in out and "DATA" in out, out
    code, stdout, stderr = cli3("describe", "schedule", "nightly", "-n", namespace, "-o", "json")
    described = json.loads(stdout)
    assert (code, stderr, described["kind"], described["schedule"]) == (
        EXIT_OK,
        "",
        "IdmBackupSchedule",
        "0 2 * * *",
    )
    assert [(b["name"], b["phase"]) for b in described["backups"]] == [(name[1], "Succeeded")]
    assert (
        isinstance(described["backups"][0]["sizeBytes"], int)
        and described["uid"] == created["metadata"]["uid"]
    )
    code, out = cli("describe", "schedule", "nightly", "-n", namespace)
    assert code == EXIT_OK and re.search(rf"^  {name[1]}\s+Succeeded\s+Data\s+\S+ [KM]iB\s", out, re.M), out

    # A backup that fails: exit 1, the reason on the last line; verify says it cannot be restored (1).
    broken = backup_spec(
        platform,
        s3_storage(platform, f"test/{namespace}"),
        type="Data",
        online=True,
        target={"podName": "gone"},
    )
    create_schedule(api, namespace, "broken", {"schedule": "0 2 * * *", "template": {"spec": broken}})
    code, stdout, stderr = cli3("backup-now", "broken", "-n", namespace, "--wait", "--timeout", "120")
    assert (code, stderr) == (EXIT_BROKEN, ""), stdout + stderr
    assert stdout.splitlines()[-1].startswith("Failed: TargetUnavailable: "), stdout
    failed = re.search(r"idmbackup \S+/(broken-manual-\d{14}) created", stdout)
    assert failed, stdout
    code, _, stderr = cli3("verify", failed[1], "-n", namespace, "--key", str(key_file))
    assert code == EXIT_BROKEN and stderr.startswith(
        f"error: IdmBackup {namespace}/{failed[1]} stored nothing (phase Failed"
    )

    code, stdout, stderr = cli3("backup-now", "missing", "-n", namespace)
    assert (code, stdout) == (EXIT_ERROR, "")
    assert stderr.splitlines() == [f"error: IdmBackupSchedule {namespace}/missing not found"]


# What a resource's fields may hold that a terminal would act on: an OSC title, CSI colours and screen
# clearing, a bidirectional override, a C1 CSI.
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e]")


def test_list_and_describe_escape_what_resources_say_and_kubeconfig_options_choose_the_cluster(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    crds: None,
    cli3: Run3,
    key_file: Path,
    tmp_path: Path,
) -> None:
    """No operator here: the status and an Event are written as a hostile or broken one could."""
    create_backup(api, namespace, "hostile", backup_spec(platform, s3_storage(platform, "esc"), type="Data"))
    uid = get_backup(api, namespace, "hostile")["metadata"]["uid"]
    status = {
        "phase": "Failed",
        "reason": "Boom\x1b[2J",
        "step": "step \u202egnp.exe",
        "message": "\x1b]0;owned\x07title \x1b[31mred\nsecond line \x9b1m",
        "target": {"pod": "ipa", "host": "ipa\x1b[1m.example.test"},
        "ipaBackup": {"directory": "/etc/passwd"},
        "conditions": [
            {
                "type": "Completed",
                "status": "False",
                "reason": "Boom",
                "message": "condition \x1b[5mblink",
                "lastTransitionTime": "2026-11-26T02:00:00Z",
            }
        ],
    }
    client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        "idm-backup.io", "v1alpha1", namespace, "idmbackups", "hostile", {"status": status}
    )
    now = datetime.datetime.now(datetime.UTC).isoformat()
    client.CoreV1Api(api).create_namespaced_event(
        namespace,
        {
            "metadata": {"generateName": "hostile."},
            "involvedObject": {
                "apiVersion": "idm-backup.io/v1alpha1",
                "kind": "IdmBackup",
                "name": "hostile",
                "namespace": namespace,
                "uid": uid,
            },
            "reason": "Hostile",
            "message": "event \x1b[41mred",
            "type": "Warning",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 2,
            "source": {"component": "test"},
        },
    )
    for argv in (("list", "-n", namespace, "-o", "wide"), ("describe", "backup", "hostile", "-n", namespace)):
        code, stdout, stderr = cli3(*argv)
        assert (code, stderr) == (EXIT_OK, ""), stdout + stderr
        assert not UNSAFE.search(stdout), repr(stdout)
        assert "\\x1b]0;owned\\x07title \\x1b[31mred" in stdout and "step \\u202egnp.exe" in stdout, stdout
        assert "ipa\\x1b[1m.example.test" in stdout
    assert "event \\x1b[41mred" in stdout and "condition \\x1b[5mblink" in stdout and "(x2)" in stdout, stdout
    # The message's own line break stays a line break in describe, indented under it.
    assert re.search(r"^\s+second line \\x9b1m$", stdout, re.M), stdout

    # Scripts get the values as they are, escaped by JSON and YAML themselves.
    code, stdout, _ = cli3("describe", "backup", "hostile", "-n", namespace, "-o", "json")
    described = json.loads(stdout)
    assert code == EXIT_OK and "\x1b" not in stdout
    assert (described["message"], described["step"], described["target"]["host"]) == (
        status["message"],
        status["step"],
        status["target"]["host"],
    )
    assert [(e["reason"], e["message"], e["count"]) for e in described["events"]] == [
        ("Hostile", "event \x1b[41mred", 2)
    ]
    assert described["conditions"][0]["message"] == "condition \x1b[5mblink"
    assert described["storedFiles"]["problem"] == (
        f"cannot tell where IdmBackup {namespace}/hostile stored: backup directory '/etc/passwd' is not "
        "directly inside /var/lib/ipa/backup"
    )
    code, stdout, stderr = cli3("verify", "hostile", "-n", namespace, "--key", str(key_file))
    assert (code, stdout, len(stderr.splitlines())) == (EXIT_ERROR, "", 1), stderr
    code, stdout, _ = cli3("list", "-n", namespace, "-o", "yaml")
    (item,) = yaml.safe_load(stdout)["items"]
    assert code == EXIT_OK and "\x1b" not in stdout and item["message"] == status["message"]
    # The same keys for every backup, whatever it holds.
    assert list(item) == [
        "namespace", "name", "schedule", "type", "phase", "step", "reason", "message", "host", "createdAt",
        "startTime", "completionTime", "durationSeconds", "sizeBytes", "archiveURI", "encrypted",
        "recipients",
    ]  # fmt: skip
    assert (item["sizeBytes"], item["archiveURI"], item["recipients"]) == (None, None, [])

    # --kubeconfig and --context as kubectl: the context's namespace is the default; its current-context
    # here points at nothing, which is one line and exit 3.
    testbed = json.loads(Path(platform.kubeconfig).read_text())
    port = closed_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                **testbed,
                "current-context": "gone",
                "clusters": [
                    *testbed["clusters"],
                    {"name": "gone", "cluster": {"server": f"https://127.0.0.1:{port}"}},
                ],
                "contexts": [
                    {"name": "gone", "context": {"cluster": "gone", "user": "admin"}},
                    {
                        "name": "here",
                        "context": {"cluster": "testbed", "user": "admin", "namespace": namespace},
                    },
                ],
            }
        )
    )
    code, stdout, stderr = cli3("list", "--kubeconfig", str(kubeconfig), "--context", "here", "-o", "json")
    assert (code, stderr) == (EXIT_OK, "") and [i["name"] for i in json.loads(stdout)["items"]] == ["hostile"]
    code, stdout, stderr = cli3(
        "describe", "backup", "hostile", "--kubeconfig", str(kubeconfig), "--context", "here"
    )
    assert code == EXIT_OK and "Name:" in stdout and "hostile" in stdout, stdout + stderr
    code, stdout, stderr = cli3("list", "--kubeconfig", str(kubeconfig), "-n", namespace)
    assert (code, stdout) == (EXIT_ERROR, "")
    assert stderr.splitlines() == [
        f"error: cannot reach the Kubernetes API server https://127.0.0.1:{port}: Connection refused"
    ]
    code, stdout, stderr = cli3("list", "--kubeconfig", str(kubeconfig), "--context", "nowhere")
    assert (code, stdout, len(stderr.splitlines())) == (EXIT_ERROR, "", 1) and "nowhere" in stderr, stderr


def test_restore_names_and_locations_are_what_the_idmrestore_needs(cli3: Run3) -> None:
    moment = datetime.datetime(2026, 11, 26, 2, 3, 4, tzinfo=datetime.UTC)
    assert restore_name("nightly-202611260200", moment) == "nightly-202611260200-restore-20261126020304"
    assert restore_name("ipa-data-2026-11-26-02-00-03", moment).startswith("ipa-data-2026-11-26-02-00-03-")
    assert len(restore_name("x" * 80, moment)) == 63
    s3 = {"endpoint": "https://s3.example.com", "forcePathStyle": True}
    found = restore_location(
        "s3://idm-backups/prod/eu/identity/ipa.example.test/ipa-data-2026-11-26-02-00-03/ipa-data.tar.gpg",
        pvc_root="/pvc",
        s3=s3,
    )
    assert found.storage == {"s3": {"bucket": "idm-backups", "prefix": "prod/eu", **s3}}
    assert (found.directory, found.host) == (
        "identity/ipa.example.test/ipa-data-2026-11-26-02-00-03/",
        "ipa.example.test",
    )
    # As a PVC backup's status.archive.uri shows it: under the operator's PVC root.
    for uri in (
        "/pvc/backups/idm/identity/ipa.example.test/ipa-full-1/",
        "pvc://backups/idm/identity/ipa.example.test/ipa-full-1",
    ):
        found = restore_location(uri, pvc_root="/pvc", s3={})
        assert found.storage == {"pvc": {"claimName": "backups", "subPath": "idm"}}, uri
        assert found.directory == "identity/ipa.example.test/ipa-full-1/"
    for wrong in ("https://example.com/x/", "s3://bucket", "s3://bucket/../x/", "/elsewhere/a/b/c/"):
        with pytest.raises(CommandError) as refused:
            restore_location(wrong, pvc_root="/pvc", s3={})
        assert refused.value.code == EXIT_USAGE, wrong
    # Usage errors before anything is read: one line, exit 2.
    for argv, expected in (
        (
            [],
            "error: restore what? Give one of BACKUP (an IdmBackup's name), --schedule NAME or --location "
            "URI",
        ),
        (
            ["b", "--schedule", "s"],
            "error: restore what? Give one of BACKUP (an IdmBackup's name), --schedule "
            "NAME or --location URI, not BACKUP and --schedule",
        ),
        (
            ["b", "--s3-region", "eu-west-1"],
            "error: --s3-region: only with --location (a backup is read from its own storage)",
        ),
        (
            ["--location", "s3://b/ns/ipa.example.test/ipa-data-1/"],
            "error: which server to restore into? --pod or --host, --ldap-url, --ldap-password-secret "
            "needed (there is no IdmBackup to take spec.target from)",
        ),
        (
            [
                "--location",
                "s3://b/ns/ipa.example.test/ipa-data-1/",
                "--pod",
                "ipa",
                "--ldap-url",
                "ldaps://ipa",
                "--ldap-password-secret",
                "dm",
            ],
            "error: a restore overwrites the live directory of ipa.example.test: if "
            "that is what you want, add --confirm ipa.example.test",
        ),
    ):
        code, stdout, stderr = cli3("restore", "--kubeconfig", os.devnull, "-n", "identity", *argv)
        assert (code, stdout, stderr.splitlines()) == (EXIT_USAGE, "", [expected]), argv


def list_restores(api: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    found = client.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, "idmrestores"
    )
    items: list[dict[str, Any]] = found["items"]
    return items


@pytest.mark.platform
def test_restore_creates_an_idmrestore_prints_each_step_and_how_it_ended(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: Any,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
    cli3: Run3,
) -> None:
    host, key = restore_tests.HOST, ("--key-secret", restore_tests.PRIVATE_KEY_SECRET)
    server()
    backup = run_backup("before", restore_tests.data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    restore_tests.change_after_backup(directory)

    # Without --confirm: refused, saying what to type (the FQDN the backup was taken on); nothing created.
    code, stdout, stderr = cli3("restore", "before", "-n", namespace, *key)
    assert (code, stdout) == (EXIT_USAGE, ""), stderr
    assert stderr.splitlines() == [
        f"error: a restore overwrites the live directory of {host}: if that is what you want, add "
        f"--confirm {host}"
    ]
    assert list_restores(api, namespace) == []

    # Another server's FQDN: the operator refuses it before anything changes; exit 1 with the reason.
    wrong = ("--confirm", "ipa-visible.example.test", "--timeout", "60")
    code, stdout, stderr = cli3("restore", "before", "-n", namespace, *key, *wrong, "--name", "wrong")
    assert (code, stderr) == (EXIT_BROKEN, ""), stdout + stderr
    assert (
        stdout.splitlines()[0]
        == f"idmrestore {namespace}/wrong created: IdmBackup before into pod ipa-hidden"
    )
    assert re.search(r"^Phase:\s+Failed$", stdout, re.M), stdout
    assert re.search(r"^Reason:\s+ConfirmationMismatch$", stdout, re.M), stdout
    assert re.search(
        rf"^Message:\s+spec.confirm is 'ipa-visible.example.test', but pod ipa-hidden is {host}", stdout, re.M
    )
    assert re.search(r"^ipa-restore:\s+not run$", stdout, re.M), stdout
    assert re.search(r"^Source:\s+IdmBackup before \(not read\)$", stdout, re.M), stdout
    code, stdout, stderr = cli3(
        "restore", "before", "-n", namespace, *key, *wrong, "--name", "wrong2", "-o", "json"
    )
    document = json.loads(stdout)  # all of stdout: no progress, no summary
    assert (code, stderr) == (EXIT_BROKEN, "")
    assert (document["name"], document["phase"], document["reason"]) == (
        "wrong2",
        "Failed",
        "ConfirmationMismatch",
    )
    assert document["ipaRestore"]["exitCode"] is None and document["confirm"] == "ipa-visible.example.test"
    assert restore_tests.exists(directory, restore_tests.MALLORY)

    # The restore: a line per step as it starts, then what was restored, checked, and is left to do.
    code, stdout, stderr = cli3(
        "restore", "before", "-n", namespace, *key, "--confirm", host, "--timeout", "120"
    )
    assert (code, stderr) == (EXIT_OK, ""), stdout + stderr
    lines = stdout.splitlines()
    created = re.fullmatch(
        rf"idmrestore {namespace}/(before-restore-\d{{14}}) created: IdmBackup before into pod ipa-hidden",
        lines[0],
    )
    assert created, stdout
    progress = [re.sub(r"^\[\s*[\dsmhd]+\] ", "", line) for line in lines if line.startswith("[")]
    assert all(re.fullmatch(r"(Pending|Running): \S.*", line) for line in progress), stdout
    steps = [line.split(": ", 1)[1] for line in progress]
    pipeline = ["verify", "stage", "ipa-restore", "check", "re-hide", "replication", "clean-up"]
    assert [step for step in steps if step in pipeline] == pipeline, stdout  # every step, once, in order
    summary = "\n".join(lines[1 + len(progress) :])
    assert re.match(r"Phase:\s+Succeeded\nReason:\s+RestoreSucceeded\n", summary), summary
    archive_dir = backup["status"]["archive"]["uri"].rsplit("/", 1)[0] + "/"
    assert re.search(rf"^Source:\s+{re.escape(archive_dir)} \(IdmBackup before\)$", summary, re.M), summary
    assert re.search(rf"^Target:\s+{host} \(pod ipa-hidden\)$", summary, re.M), summary
    assert re.search(r"^ipa-restore:\s+exit code 0: ipa-restore ", summary, re.M), summary
    restored = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "idmrestores", created[1]
    )["status"]
    for entry in restored["check"]["entries"]:
        expected = f"{entry['backend']}: {entry['expected']} in the archive, {entry['found']} found"
        assert re.search(rf"^(Entries checked:)?\s+{expected}$", summary, re.M), summary
    assert re.search(
        r"^Replication:\s+re-initialize every other master from " + re.escape(host), summary, re.M
    )
    assert re.search(
        rf"^\s+ipa-ca\.example\.test \(CA master\):\n\s+ipa-replica-manage re-initialize --from {host}\n"
        rf"\s+ipa-csreplica-manage re-initialize --from {host}$",
        summary,
        re.M,
    ), summary
    assert restore_tests.exists(directory, restore_tests.BOB)
    assert not restore_tests.exists(directory, restore_tests.MALLORY)

    # From the bucket alone, by the archive's URI: the server and its LDAP given on the command line.
    restore_tests.change_after_backup(directory)
    # (The restore restarted IPA's services: the pod is ready again when they all answer.)
    wait_for("pod ready", lambda: pod_ready(api, namespace, restore_tests.POD), timeout=60)
    code, stdout, stderr = cli3(
        "restore",
        "-n",
        namespace,
        *key,
        "--location",
        backup["status"]["archive"]["uri"],
        "--s3-endpoint",
        platform.s3_endpoint,
        "--s3-credentials-secret",
        S3_SECRET,
        "--pod",
        restore_tests.POD,
        "--ldap-url",
        directory.uri,
        "--ldap-password-secret",
        restore_tests.DM_SECRET,
        "--confirm",
        host,
        "--timeout",
        "120",
        "-o",
        "yaml",
    )
    document = yaml.safe_load(stdout)
    assert (code, stderr, document["phase"]) == (EXIT_OK, "", "Succeeded"), stdout + stderr
    assert (document["source"]["uri"], document["source"]["backup"]) == (archive_dir, None)
    assert document["name"].startswith(archive_dir.rstrip("/").rsplit("/", 1)[1] + "-restore-")
    assert [m["host"] for m in document["replication"]] == [m["host"] for m in restored["replication"]]
    assert restore_tests.exists(directory, restore_tests.BOB)
    spec = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "idmrestores", document["name"]
    )["spec"]
    assert spec["source"]["location"]["storage"]["s3"]["prefix"] == f"restore/{namespace}"
    assert spec["source"]["location"]["directory"] == archive_dir.split(f"restore/{namespace}/", 1)[1]


def test_drill_templates_are_checked_before_anything_is_created_and_its_summary_says_what_it_proved(
    tmp_path: Path, cli3: Run3
) -> None:
    # A Pod manifest as `kubectl get pod -o yaml` prints it: its labels and spec, not where it was scheduled.
    pod = tmp_path / "pod.yaml"
    spec = {
        "nodeName": "node-1",
        "containers": [{"name": "freeipa", "image": "freeipa"}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "ipa-data"}}],
    }
    manifest = {"kind": "Pod", "metadata": {"name": "ipa", "uid": "1", "labels": {"a": "b"}}, "spec": spec}
    pod.write_text(yaml.safe_dump({**manifest, "status": {"phase": "Running"}}))
    del spec["nodeName"]
    assert read_pod_template(str(pod), claim_replaces_data=True) == {
        "metadata": {"labels": {"a": "b"}},
        "spec": spec,
    }
    claim = tmp_path / "claim.yaml"
    claim.write_text(
        yaml.safe_dump({"kind": "PersistentVolumeClaim", "spec": {"accessModes": ["ReadWriteOnce"]}})
    )
    assert read_claim_template(str(claim)) == {"accessModes": ["ReadWriteOnce"]}
    # Usage errors, one line and exit 2, before the cluster is asked anything (there is none here: it would
    # be "no usable Kubernetes configuration", exit 3).
    files = {
        "not.yaml": "spec: [containers\n",
        "list.yaml": "- containers: []\n",
        "empty.yaml": "",
        "no-containers.yaml": "metadata: {labels: {a: b}}\nspec: {volumes: []}\n",
        "deployment.yaml": "kind: Deployment\nspec: {template: {spec: {containers: [{name: c}]}}}\n",
    }
    expected = {
        "not.yaml": "is not YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'",
        "list.yaml": "holds a list, not one YAML mapping",
        "empty.yaml": "holds nothing, not one YAML mapping",
        "no-containers.yaml": "has no spec.containers: a PodTemplateSpec (metadata, spec) or a Pod manifest "
        "is needed",
        "deployment.yaml": "is a Deployment, not a Pod or a PodTemplateSpec: its spec.template is a "
        "PodTemplateSpec",
        "pod.yaml": "mounts data (claim ipa-data) read-write: the drill would restore into a volume it "
        "shares, production's perhaps. Give --volume-claim-template (a claim of its own for the volume "
        "named data), or take that volume out",
    }
    base = ["drill", "nightly", "--kubeconfig", os.devnull, "-n", "identity", "--ldap-url", "ldaps://ipa"]
    base += ["--ldap-password-secret", "dm"]
    for name, message in expected.items():
        path = tmp_path / name
        if name in files:
            path.write_text(files[name])
        code, stdout, stderr = cli3(*base, "--pod-template", str(path))
        assert (code, stdout, stderr.splitlines()) == (
            EXIT_USAGE,
            "",
            [f"error: --pod-template {path} {message}"],
        )
    code, _, stderr = cli3(*base, "--pod-template", str(pod), "--volume-claim-template", str(pod))
    assert (code, stderr) == (
        EXIT_USAGE,
        f"error: --volume-claim-template {pod} is a Pod, not a PersistentVolumeClaim or its spec\n",
    )
    code, _, stderr = cli3(*base, "--pod-template", str(tmp_path / "missing.yaml"))
    assert (code, stderr) == (
        EXIT_ERROR,
        f"error: cannot read --pod-template file {tmp_path}/missing.yaml: No such file or directory\n",
    )
    # What a drill proved, for people and as a document: no replication, the scratch server's fate instead.
    obj: dict[str, Any] = {
        "metadata": {"namespace": "identity", "name": "d"},
        "spec": {"mode": "Drill", "source": {"backupRef": {"name": "nightly"}}},
        "status": {
            "phase": "Succeeded",
            "target": {"pod": "d-drill", "host": "ipa.example.test"},
            "check": {"entries": [{"backend": "userRoot", "expected": 146, "found": 146}]},
            "drill": {"pod": "d-drill", "restoreSeconds": 754.2, "entries": 146},
        },
    }
    document = restore_document(obj)
    assert document["drill"] == {"pod": "d-drill", "restoreSeconds": 754.2, "entries": 146, "remaining": None}
    for remaining, fate in (
        ([], "deleted, nothing of it is left (pod, claim, NetworkPolicy)"),
        (["pod/d-drill"], "still there: pod/d-drill"),
    ):
        document["drill"]["remaining"] = remaining
        text = "\n".join(restore_text(document))
        assert re.search(
            rf"^Scratch server:\s+ipa.example.test \(pod d-drill\): {re.escape(fate)}$", text, re.M
        )
        assert re.search(
            r"^Restore time:\s+the restore took 754.2 s \(12m34s\): your recovery time$", text, re.M
        )
        assert re.search(r"^Entries:\s+146 in the restored directory, every backend together$", text, re.M)
        assert "Replication" not in text and "Target" not in text
    failed = {**obj, "status": {"phase": "Failed", "reason": "DrillsDisabled"}}
    text = "\n".join(restore_text(restore_document(failed)))
    assert re.search(r"^Scratch server:\s+not created$", text, re.M), text
    assert re.search(r"^Restore time:\s+not measured", text, re.M), text
    assert restore_document({**obj, "spec": {"mode": "InPlace"}})["drill"] is None


@pytest.fixture
def drills_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set before the operator starts (usefixtures come first): it runs drills only if told to."""
    monkeypatch.setenv("IDM_BACKUP_ENABLE_DRILLS", "true")


@pytest.mark.platform
@pytest.mark.usefixtures("drills_enabled")
def test_drill_restores_into_a_scratch_server_says_how_long_it_took_and_leaves_nothing(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    directory: Any,
    drill_directory: Any,
    server: Callable[..., str],
    operator: OperatorProcess,
    run_backup: Callable[..., dict[str, Any]],
    tmp_path: Path,
    cli3: Run3,
) -> None:
    server()
    secret = restore_tests.DRILL_DM_SECRET
    restore_tests.apply_drill_dm_secret(api, namespace, drill_directory.password)
    backup = run_backup("nightly", restore_tests.data_backup(platform, directory, f"restore/{namespace}"))
    assert backup["status"]["phase"] == "Succeeded", backup["status"]
    (tmp_path / "drill-data").mkdir()
    template = restore_tests.drill_spec(drill_directory, tmp_path / "drill-data", {})["drill"]["podTemplate"]
    argv = ["drill", "nightly", "-n", namespace, "--key-secret", restore_tests.PRIVATE_KEY_SECRET]
    argv += ["--ldap-url", drill_directory.uri, "--ldap-password-secret", secret, "--ready-timeout", "60"]

    # A template that is none: refused, nothing created.
    wrong = tmp_path / "deployment.yaml"
    wrong.write_text(yaml.safe_dump({"kind": "Deployment", "spec": {"template": template}}))
    code, stdout, stderr = cli3(*argv, "--pod-template", str(wrong))
    assert (code, stdout) == (EXIT_USAGE, ""), stderr
    assert stderr.startswith(f"error: --pod-template {wrong} is a Deployment, not a Pod"), stderr
    assert list_restores(api, namespace) == []

    # A whole Pod manifest as kubectl prints it; with its node, which would leave the scratch pod unscheduled.
    pod = tmp_path / "pod.yaml"
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ipa-hidden", **template["metadata"]}}
    pod.write_text(yaml.safe_dump({**manifest, "spec": {**template["spec"], "nodeName": "gone"}}))
    # What a restore restores, as for a restore: here userRoot only.
    how = ["--backend", "userRoot", "--allow-version-mismatch"]
    code, stdout, stderr = cli3(*argv, *how, "--pod-template", str(pod), "--timeout", "120")
    assert (code, stderr) == (EXIT_OK, ""), stdout + stderr
    lines = stdout.splitlines()
    created = re.fullmatch(
        rf"idmrestore {namespace}/(nightly-drill-\d{{14}}) created: IdmBackup nightly into scratch pod "
        r"(\S+-drill), walled off, deleted afterwards",
        lines[0],
    )
    assert created, stdout
    name, scratch = created.groups()
    progress = [re.sub(r"^\[\s*[\dsmhd]+\] ", "", line) for line in lines if line.startswith("[")]
    steps = [line.split(": ", 1)[1] for line in progress if re.match(r"(Pending|Running): ", line)]
    pipeline = ["scratch server", "verify", "stage", "ipa-restore", "check", "clean-up"]
    assert [step for step in steps if step in pipeline] == pipeline, stdout  # no re-hide, no replication
    summary = "\n".join(lines[1 + len(progress) :])
    made = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "idmrestores", name
    )
    assert (made["spec"]["backends"], made["spec"]["allowVersionMismatch"]) == (["userRoot"], True)
    status = made["status"]
    assert status["drill"]["pod"] == scratch and status["drill"]["entries"] > 0, status
    assert [entry["backend"] for entry in status["check"]["entries"]] == ["userRoot"], status
    assert re.match(r"Phase:\s+Succeeded\nReason:\s+RestoreSucceeded\n", summary), summary
    assert re.search(
        rf"^Scratch server:\s+{restore_tests.HOST} \(pod {scratch}\): deleted, nothing of it is left",
        summary,
        re.M,
    ), summary
    seconds = status["drill"]["restoreSeconds"]
    assert re.search(rf"^Restore time:\s+the restore took {seconds:g} s: your recovery time$", summary, re.M)
    assert re.search(rf"^Entries:\s+{status['drill']['entries']} in the restored directory", summary, re.M)
    assert "Replication" not in summary
    assert restore_tests.scratch_objects(api, namespace) == []
