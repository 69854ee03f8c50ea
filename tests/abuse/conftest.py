"""A broker as its own process (``tokenfan serve``), so an attack's memory and a traceback are its own.

``hostile_broker(**settings)`` starts one on a free port with ``TOKENFAN_*``
settings and returns a :class:`ServedBroker`: its port, its peak RSS read from
``/proc``, and its log (standard error), which the fixture checks for a
traceback when the test ends.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.target import ONE_ADDRESS_MANY_CLIENTS

# The in-process broker fixtures (start_broker, broker, open_raw) serve here too.
from tests.broker.conftest import broker, open_raw, start_broker  # noqa: F401


@dataclass
class ServedBroker:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def status(self, field: str) -> int:
        """A ``/proc/PID/status`` size field (``VmRSS``, ``VmHWM``) in bytes."""
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        assert match, field
        return int(match.group(1)) * 1024

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """User plus system CPU time the broker process has used."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


StartHostile = Callable[..., ServedBroker]


@pytest.fixture
def hostile_broker(tmp_path: Path) -> Iterator[StartHostile]:
    started: list[ServedBroker] = []

    def start(*, open_files: tuple[int, int] | None = None, **settings: object) -> ServedBroker:
        """``tokenfan serve`` with ``TOKENFAN_*`` ``settings`` and ``RLIMIT_NOFILE`` = ``open_files``."""

        def limit_files() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

        env = {key: value for key, value in os.environ.items() if not key.startswith("TOKENFAN_")}
        env.update(ONE_ADDRESS_MANY_CLIENTS)  # the tests' clients all come from 127.0.0.1
        env.update({f"TOKENFAN_{key.upper()}": str(value) for key, value in settings.items()})
        log = tmp_path / f"broker-{len(started)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen([sys.executable, "-m", "broker.cli", "serve", "--port", "0"],
                                       env=env, stdout=subprocess.PIPE, stderr=sink, preexec_fn=limit_files)
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        match = re.search(r"listening on http://[^\s]+:(\d+)", line)
        if match is None:
            process.kill()
            process.wait()
            process.stdout.close()
            pytest.fail(f"the broker did not start: {line!r} {log.read_text()}")
        served = ServedBroker(process, int(match.group(1)), log)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.terminate()
            try:
                served.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                served.process.kill()
                served.process.wait()
        assert served.process.stdout is not None
        served.process.stdout.close()
        assert "Traceback" not in served.log_text(), served.log_text()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)
