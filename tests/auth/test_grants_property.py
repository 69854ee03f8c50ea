"""For random claims and random requests, the broker allows exactly what the claims grant.

The model is :func:`fnmatch.fnmatchcase` over each claim's patterns (what docs/security.md
promises); the broker is a real one, asked over a real WebSocket and over HTTP.
"""

from __future__ import annotations

import fnmatch
import functools

import hypothesis.strategies as st
import trio
import wsproto.events as wse
from hypothesis import given, settings

import protocol as p
from broker import Broker, Config
from broker.config import AuthConfig
from tests.auth.conftest import SECRET, call, reply, token
from tests.broker.rawclient import RawClient

_SESSIONS = st.sampled_from(["a", "b", "ab", "a-1", "b-22", "x.y"])
_PATTERNS = st.lists(st.sampled_from(["*", "a*", "b?", "a-?", "ab", "x.*", "[ab]", "*-*", "ai-chat/a*",
                                      "ai-chat/*", "ai-chat/b-??", "ai-chat/[!a]*", "ai-chat/ab"]),
                     max_size=4, unique=True)
_REQUESTS = st.lists(st.tuples(st.sampled_from(["sub", "pub", "history", "ai"]), _SESSIONS),
                     min_size=1, max_size=6)


def _granted(patterns: list[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@settings(max_examples=40, deadline=None)
@given(channels=_PATTERNS, publish=_PATTERNS, ai=_PATTERNS, requests=_REQUESTS)
async def test_the_broker_allows_exactly_what_the_claims_grant(
        channels: list[str], publish: list[str], ai: list[str], requests: list[tuple[str, str]]) -> None:
    broker = Broker(Config(port=0, auth=AuthConfig(jwt_secret=(SECRET,)), ai_request_rate=1000,
                           ai_request_burst=1000))
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", broker.port))
            client = RawClient(sock)
            await client.send(wse.Request(host="127.0.0.1", target="/ws"))
            while not any(isinstance(e, wse.AcceptConnection) for e in await client.receive()):
                pass
            await _check(broker, client, channels, publish, ai, requests)
        nursery.cancel_scope.cancel()


async def _check(broker: Broker, client: RawClient, channels: list[str], publish: list[str], ai: list[str],
                 requests: list[tuple[str, str]]) -> None:
    user = token(channels=channels, publish=publish, ai=ai)
    assert isinstance(await reply(client, p.Hello(id=1, token=user)), p.Ok)
    subscribed: set[str] = set()
    for index, (kind, session) in enumerate(requests, start=2):
        channel = f"ai-chat/{session}"
        if kind == "sub":
            answer = await reply(client, p.Sub(id=index, ch=channel))
            if channel in subscribed:
                continue
            allowed = isinstance(answer, p.Ok)
            assert allowed == _granted(channels, channel), (channels, channel, answer)
            if allowed:
                subscribed.add(channel)
            else:
                assert isinstance(answer, p.Err) and answer.code == p.Code.NOT_ALLOWED
        elif kind == "pub":
            answer = await reply(client, p.Pub(id=index, ch=channel, ev="ai:cancel"))
            assert isinstance(answer, p.Ok) == _granted(publish, channel), (publish, channel, answer)
        elif kind == "history":
            url = f"http://127.0.0.1:{broker.port}/api/history?channel={channel}"
            status, _, _ = await trio.to_thread.run_sync(functools.partial(call, url, credential=user))
            assert status == (200 if _granted(channels, channel) else 403), (channels, channel, status)
        else:
            url = f"http://127.0.0.1:{broker.port}/ai/cancel"
            status, _, _ = await trio.to_thread.run_sync(
                functools.partial(call, url, {"sessionId": session}, credential=user))
            assert status == (200 if _granted(ai, session) else 403), (ai, session, status)
    assert client.close_code is None
