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


#: The cores this process may use, read once at import, before anything is pinned.
CORES = sorted(os.sched_getaffinity(0))


def pin_to(cpu: int) -> set[int]:
    """Pin this process to the ``cpu``-th usable core (modulo their number); return the previous affinity."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CORES[cpu % len(CORES)]})
    return previous


@dataclass(frozen=True, slots=True)
class TargetKind:
    """How to start one kind of broker and how its clients reach it."""

    name: str
    command: tuple[str, ...]
    mode: str  #: how subscribers connect: "ws" (the tokenfan sub frame) or "sse"
    path: str  #: WebSocket or SSE path
    promises_order: bool = True  #: whether the target promises no loss, disorder or duplicate


TARGETS: dict[str, TargetKind] = {
    "tokenfan": TargetKind("tokenfan", ("-m", "broker.cli", "serve", "--port", "0"), "ws", "/ws"),
    "websockets": TargetKind("websockets", ("-m", "bench.peers.websockets_peer"), "ws", "/ws"),
    "picows": TargetKind("picows", ("-m", "bench.peers.picows_peer"), "ws", "/ws"),
    "trio-websocket": TargetKind("trio-websocket", ("-m", "bench.peers.trio_websocket_peer"), "ws", "/ws"),
    "sse": TargetKind("sse", ("-m", "bench.peers.sse_peer"), "sse", "/sse"),
}


@dataclass
class BrokerProcess:
    """A running broker process and how to measure it."""

    proc: subprocess.Popen[bytes]
    kind: TargetKind
    port: int  #: where subscribers connect
    emit_port: int  #: where ``POST /api/emit`` goes

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU time the process has used so far (every thread).

        ``/proc/PID/task/*/schedstat`` counts nanoseconds on the CPU; ``/proc/PID/stat``
        (clock ticks, 10 ms) is the fallback where scheduler statistics are off.
        """
        try:
            total = 0
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            if total:
                return total / 1e9
        except (OSError, ValueError, IndexError):
            pass
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


#: Every bench client comes from 127.0.0.1, where the broker's per-address limits would see one
#: user opening thousands of connections: they are lifted (the peers have none to lift).
ONE_ADDRESS_MANY_CLIENTS = {"TOKENFAN_MAX_CONNECTIONS_PER_IP": "1000000",
                            "TOKENFAN_UPGRADE_RATE_PER_IP": "1000000"}


def start_target(name: str, *, env: dict[str, str] | None = None, cpu: int = 0,
                 timeout: float = 30.0) -> BrokerProcess:
    """Start target ``name`` on a free port, pinned to ``cpu``; return once it listens.

    tokenfan prints ``tokenfan listening on http://HOST:PORT``; the peers print
    ``peer listening WS_PORT EMIT_PORT``.
    """
    kind = TARGETS[name]

    def prepare() -> None:
        pin_to(cpu)
        raise_fd_limit()

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_ADDRESS_MANY_CLIENTS, **(env or {})}
    proc = subprocess.Popen([sys.executable, *kind.command], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=full_env, preexec_fn=prepare)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            raise RuntimeError(f"{name} did not start (said {line!r})")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            line += os.read(proc.stdout.fileno(), 1)
    words = line.decode().split()
    if words[0] == "tokenfan":
        port = emit_port = int(words[-1].rsplit(":", 1)[1])
    else:
        port, emit_port = int(words[-2]), int(words[-1])
    return BrokerProcess(proc, kind, port, emit_port)
