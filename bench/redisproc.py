"""A private ``redis-server`` for a test or a bench run: its own free loopback port and directory.

Never the machine's shared Redis on 6379: each server gets a port the kernel
has just said is free, a temporary directory and, unless asked, no persistence.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def redis_server_path() -> str:
    """The ``redis-server`` to run (``TOKENFAN_REDIS_SERVER``, else the one on PATH)."""
    path = os.environ.get("TOKENFAN_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(path, os.X_OK):
        raise RuntimeError("the Redis tests need redis-server: run 'make test-prereqs' "
                           "(or set TOKENFAN_REDIS_SERVER=/path/to/redis-server)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process. ``start()`` waits until it answers; ``stop()`` kills it."""

    def __init__(self, *, appendonly: bool = False, password: str | None = None) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="tokenfan-redis-"))
        self.appendonly = appendonly
        self.password = password
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def start(self, *, port: int | None = None, core: int | None = None) -> None:
        """Start (again, on the same port and directory, if it ran before); pinned to ``core``."""
        for _attempt in range(5):
            self.port = port or self.port or free_port()
            args = [redis_server_path(), "--port", str(self.port), "--bind", "127.0.0.1",
                    "--dir", str(self.directory), "--save", "", "--daemonize", "no",
                    "--appendonly", "yes" if self.appendonly else "no", "--logfile", "redis.log"]
            if self.password:
                args += ["--requirepass", self.password]
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
            if self._wait_ready():
                if core is not None:
                    usable = sorted(os.sched_getaffinity(0))
                    os.sched_setaffinity(self.process.pid, {usable[core % len(usable)]})
                return
            self.kill()
            if port is not None:
                break
            self.port = 0  # someone took the port meanwhile: another one
        raise RuntimeError(f"redis-server did not start; its log: {self.log()[-2000:]}")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
                    sock.sendall(auth + b"PING\r\n")
                    data = b""
                    while b"PONG" not in data and b"-" not in data[:1]:
                        chunk = sock.recv(100)
                        if not chunk:
                            break
                        data += chunk
                    if b"PONG" in data:
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """Stop at once (SIGKILL: nothing saved that ``appendonly`` has not written)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        """Stop gracefully (SIGTERM)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
