"""Start the broker under test in its own process, pinned to one core, and read its CPU and memory."""

from __future__ import annotations

import os
import resource
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")
FD_LIMIT = 65536


def raise_fd_limit(want: int = FD_LIMIT) -> int:
    """Raise this process's open-file limit as far as allowed; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin_to(cpu: int) -> set[int]:
    """Pin this process to ``cpu`` (modulo the cores we may use); return the previous affinity."""
    previous = os.sched_getaffinity(0)
    cores = sorted(previous)
    os.sched_setaffinity(0, {cores[cpu % len(cores)]})
    return previous


@dataclass
class BrokerProcess:
    """A running broker process and how to measure it."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def _status_kib(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def rss_mib(self) -> float:
        return self._status_kib("VmRSS") / 1024

    def peak_rss_mib(self) -> float:
        return self._status_kib("VmHWM") / 1024

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def start_tokenfan(*, env: dict[str, str] | None = None, cpu: int = 0,
                   timeout: float = 30.0) -> BrokerProcess:
    """Start ``tokenfan serve --port 0`` pinned to ``cpu``; return once it listens."""

    def prepare() -> None:
        pin_to(cpu)
        raise_fd_limit()

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=full_env,
                            preexec_fn=prepare)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"broker did not start (said {line!r})")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            line += os.read(proc.stdout.fileno(), 1)
    port = int(line.decode().strip().rsplit(":", 1)[1])
    return BrokerProcess(proc, port)
