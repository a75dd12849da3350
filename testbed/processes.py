"""Long-running platform processes: started detached, remembered by pid file, stopped by that pid only.

A process is "ours" only if its pid file names it and /proc shows the same executable we started, so a
recycled pid never gets a signal meant for something else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class ProcessError(RuntimeError):
    pass


def _pid_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def running_pid(run_dir: Path, name: str) -> int | None:
    path = _pid_path(run_dir, name)
    try:
        pid_text, exe = path.read_text().split("\n", 1)
        pid = int(pid_text)
        if os.readlink(f"/proc/{pid}/exe") == exe.strip():
            return pid
    except (OSError, ValueError):
        pass
    return None


def start(run_dir: Path, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start argv detached (its own session, so it outlives the caller) unless it already runs."""
    pid = running_pid(run_dir, name)
    if pid is not None:
        return pid
    log = (run_dir / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    log.close()
    time.sleep(0.05)
    try:
        exe = os.readlink(f"/proc/{proc.pid}/exe")
    except OSError as err:
        raise ProcessError(f"{name} exited at once; see {run_dir / (name + '.log')}") from err
    _pid_path(run_dir, name).write_text(f"{proc.pid}\n{exe}\n")
    return proc.pid


def stop(run_dir: Path, name: str, timeout: float = 10.0) -> None:
    pid = running_pid(run_dir, name)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and running_pid(run_dir, name) == pid:
            time.sleep(0.1)
        if running_pid(run_dir, name) == pid:
            os.kill(pid, signal.SIGKILL)
    _pid_path(run_dir, name).unlink(missing_ok=True)


def wait_until(what: str, check: Callable[[], bool], timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise ProcessError(f"{what} not ready after {timeout:.0f}s{tail}")


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now, for a server a test or benchmark starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
