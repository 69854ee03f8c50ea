"""Finding 9: file descriptors. A flood of half-open connections cannot starve everyone else."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import urllib.request
from pathlib import Path

from tests.abuse.conftest import ServedBroker, StartHostile, wait_until
from tests.abuse.test_http_answers import answers


def _health(served: ServedBroker) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/healthz", timeout=5) as response:
        result: dict[str, object] = json.load(response)
        return result


def _flood(served: ServedBroker, source: str, count: int) -> list[socket.socket]:
    """``count`` connections from the loopback address ``source`` that never send a byte."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", served.port))
        sockets.append(sock)
    return sockets


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(hostile_broker: StartHostile) -> None:
    served = hostile_broker(open_files=(512, 4096))
    limits = Path(f"/proc/{served.process.pid}/limits").read_text()
    assert re.search(r"Max open files\s+4096\s+4096", limits), limits
    wait_until(lambda: "open files limit raised from 512 to 4096" in served.log_text(), 5, "the log line")


def test_half_open_connections_from_one_address_are_capped(hostile_broker: StartHostile) -> None:
    served = hostile_broker(max_http_connections_per_ip=50, handshake_timeout="30s")
    flood = _flood(served, "127.0.0.2", 80)
    try:
        refused = 0
        for sock in flood[50:]:
            raw = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(4096):
                    raw += chunk
            [(status, body)] = answers(raw)
            assert status == 503 and body is not None and "max_http_connections_per_ip" in str(body["error"])
            refused += 1
        assert refused == 30
        # Everyone else is served as usual meanwhile.
        assert _health(served)["ok"] is True
    finally:
        for sock in flood:
            sock.close()


def test_out_of_descriptors_the_listener_backs_off_and_recovers(hostile_broker: StartHostile) -> None:
    served = hostile_broker(open_files=(64, 64), handshake_timeout="30s")
    flood: list[socket.socket] = []
    try:
        with contextlib.suppress(OSError):  # the kernel's backlog fills once accept stops
            flood += _flood(served, "127.0.0.3", 120)
        wait_until(lambda: "accept failed (EMFILE)" in served.log_text(), 10, "the EMFILE log line")
        cpu = served.cpu_seconds()
        time.sleep(2.0)
        assert served.cpu_seconds() - cpu < 0.5, "the listener spins while out of descriptors"
        assert served.log_text().count("accept failed") == 1  # once per 10 s, not per attempt
    finally:
        for sock in flood:
            sock.close()
    wait_until(lambda: _health(served)["ok"] is True, 10, "serving again")
