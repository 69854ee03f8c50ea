"""Host names the broker answers to (DNS rebinding), decided from allowed_hosts and the bound address."""

from __future__ import annotations

import pytest

from broker import Config
from broker.hosts import HostPolicy


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:8765", True), ("localhost:8765", True), ("LOCALHOST", True), ("[::1]:8765", True),
    ("[::1]", True), ("127.0.0.1", True),
    ("attacker.example:8765", False), ("localhost.attacker.example", False), ("127.0.0.2:8765", False),
    ("localhost:8765:1", False), ("", False), ("localhost:", False),
])
def test_a_broker_on_loopback_answers_loopback_names(host: str, allowed: bool) -> None:
    policy = HostPolicy.from_config(Config(host="127.0.0.1"))
    assert (policy.problem(host) is None) is allowed


def test_a_broker_on_every_interface_answers_any_name_unless_told() -> None:
    assert HostPolicy.from_config(Config(host="0.0.0.0")).problem("chat.example.com") is None
    hosts = ("chat.example.com", "*.corp.example")
    policy = HostPolicy.from_config(Config(host="0.0.0.0", allowed_hosts=hosts))
    assert policy.problem("chat.example.com:443") is None
    assert policy.problem("eu.corp.example") is None
    assert policy.problem("corp.example") is not None
    problem = policy.problem("attacker.example")
    assert problem is not None and "allowed_hosts" in problem and "chat.example.com" in problem


def test_host_is_required_in_http11_only() -> None:
    policy = HostPolicy.from_config(Config())
    assert policy.problem(None, http10=True) is None
    assert policy.problem(None) == "an HTTP/1.1 request needs a Host header"
