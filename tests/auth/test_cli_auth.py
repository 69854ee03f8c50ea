"""The client commands (emit, chat) carry a credential: ``--token`` or ``$TOKENFAN_TOKEN``."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from broker.publisher import Publisher, Rejected
from tests.auth.conftest import API_KEY, StartAuth, token


async def _tokenfan(*args: str, env: dict[str, str]) -> trio.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFAN_")}
    with trio.fail_after(30):
        return await trio.run_process([sys.executable, "-m", "broker.cli", *args], env={**clean, **env},
                                      capture_stdout=True, capture_stderr=True, check=False)


async def test_emit_without_a_credential_is_refused_and_with_one_goes_through(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    url = f"http://127.0.0.1:{broker.port}"
    refused = await _tokenfan("emit", "news", "note", '{"n": 1}', env={"TOKENFAN_URL": url})
    assert refused.returncode == 1 and b"401" in refused.stderr and b"Bearer" in refused.stderr
    sent = await _tokenfan("emit", "news", "note", "{}", env={"TOKENFAN_URL": url, "TOKENFAN_TOKEN": API_KEY})
    assert sent.returncode == 0, sent.stderr
    flagged = await _tokenfan("emit", "--token", API_KEY, "--url", url, "news", "note", "{}", env={})
    assert flagged.returncode == 0, flagged.stderr
    assert broker.statistics().hub.publications == 2


async def test_chat_with_a_user_token_streams_its_own_session(auth_broker: StartAuth) -> None:
    broker = await auth_broker(ai_demo_tokens_per_second=2000, ai_max_tokens=20)
    url = f"http://127.0.0.1:{broker.port}"
    env = {"TOKENFAN_URL": url, "TOKENFAN_TOKEN": token(channels=["ai-chat/alice-*"], ai=["alice-*"])}
    done = await _tokenfan("chat", "--session", "alice-1", "hello", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    theirs = await _tokenfan("chat", "--session", "bob-1", "hello", env=env)
    assert theirs.returncode == 1 and b"does not grant" in theirs.stderr


async def test_the_publisher_sends_its_api_key(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    url = f"http://127.0.0.1:{broker.port}"

    def publish(api_key: str | None) -> int:
        with Publisher(url, api_key=api_key) as publisher:
            return publisher.emit("news", "note", {"n": 1}).offset

    with pytest.raises(Rejected) as refused:
        await trio.to_thread.run_sync(publish, None)
    assert refused.value.status == 401
    assert await trio.to_thread.run_sync(publish, API_KEY) >= 0
