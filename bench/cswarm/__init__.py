"""Build and drive the C subscriber swarm (``swarm.c``).

The binary is compiled with the system C compiler on first use and cached by
the hash of its source, so a changed source is rebuilt and an unchanged one is
not.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.target import pin_to, raise_fd_limit

SOURCE = Path(__file__).with_name("swarm.c")
CACHE = Path(os.environ.get("TOKENFAN_BENCH_CACHE", Path.home() / ".cache" / "tokenfan-bench"))


class SwarmError(RuntimeError):
    """The swarm could not be built, could not connect, or said something unexpected."""


def build() -> Path:
    """Compile ``swarm.c`` if needed; return the binary's path."""
    source = SOURCE.read_bytes()
    binary = CACHE / f"swarm-{hashlib.sha256(source).hexdigest()[:16]}"
    if binary.exists():
        return binary
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SwarmError("no C compiler (cc or gcc) found; install gcc to run the bench")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".tmp")
    result = subprocess.run([compiler, "-O2", "-o", str(partial), str(SOURCE)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SwarmError(f"cannot compile {SOURCE}: {result.stderr.strip()}")
    partial.rename(binary)
    return binary


@dataclass(frozen=True, slots=True, kw_only=True)
class SwarmSpec:
    """What the swarm connects to and expects."""

    host: str
    port: int | str  #: a port, or several comma-separated (subscribers take them in turn)
    mode: str = "ws"  #: "ws" or "sse"
    path: str = "/ws"
    subscribers: int = 1000
    channels: int = 1
    prefix: str = "bench/ch-"
    tokens: int = 500  #: events expected on every channel
    timeout: float = 120.0
    slow_share: float = 0.0  #: share of subscribers that pause reading after their first event
    slow_ms: float = 0.0
    rcvbuf: int = 0  #: SO_RCVBUF for each subscriber socket (0: the kernel's default)
    churn: float = 0.0  #: subscribers per second that leave and are replaced while the stream runs


class CSwarm:
    """A running swarm process."""

    def __init__(self, spec: SwarmSpec, *, cpu: int | None = 1) -> None:
        binary = build()
        args = [str(binary), spec.host, str(spec.port), spec.mode, spec.path, str(spec.subscribers),
                str(spec.channels), spec.prefix, str(spec.tokens), str(spec.timeout), str(spec.slow_share),
                str(spec.slow_ms), str(spec.rcvbuf), str(spec.churn)]
        def prepare() -> None:
            if cpu is not None:
                pin_to(cpu)
            raise_fd_limit()

        self.spec = spec
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, preexec_fn=prepare)

    def wait_ready(self, timeout: float) -> None:
        """Block until every subscriber is subscribed."""
        line = self._read_line(timeout)
        if not line.startswith("READY"):
            raise SwarmError(f"swarm did not get ready: {line!r} {self._stderr()}")

    def _read_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SwarmError(f"swarm said nothing within {timeout:.0f}s {self._stderr()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1)
                if not chunk:
                    raise SwarmError(f"swarm exited early: {data!r} {self._stderr()}")
                data += chunk
        return data.decode()

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace").strip()

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float, *, stop: bool = False) -> dict[str, Any]:
        """Wait for the result (asking the swarm to stop first if ``stop``) and return it."""
        assert self.proc.stdin is not None
        if stop and self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"STOP\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
        result: dict[str, Any] = json.loads(self._read_line(timeout))
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
