"""Debian's nginx in front of the broker, as docs/deployment.md configures both: a watcher behind
it streams an answer, and the per-address limits count clients, not nginx."""

from __future__ import annotations

import httpx
import trio

import protocol as p
from broker import Broker
from tests.deploy.conftest import API_KEY, SITE, Nginx, ProxiedWs, StartBroker, StartNginx


def _token(broker: Broker, channels: list[str]) -> str:
    token, _ = broker.auth.mint(user="watcher", ttl=300, channels=channels)
    return token


async def _clients_seen(broker: Broker, expected: list[str]) -> list[str]:
    """The client addresses of the broker's WebSocket connections, once they are ``expected``
    (a refused connection may take a moment to leave), or as they are after 5 s."""
    for _ in range(500):
        if sorted(c.client for c in broker.connections) == expected:
            break
        await trio.sleep(0.01)
    return sorted(c.client for c in broker.connections)


async def _watcher(nginx: Nginx, broker: Broker, source: str) -> ProxiedWs:
    """A watcher connected through nginx from ``source``, proven live by a ping."""
    client = await nginx.open_ws(source=source, target=f"/ws?token={_token(broker, ['ai-chat/*'])}")
    assert client.accepted, client.status
    assert isinstance(await client.reply(p.Ping(id=1)), p.Ok)
    return client


async def test_a_watcher_behind_nginx_streams_an_answer(
        deployment_broker: StartBroker, start_nginx: StartNginx) -> None:
    broker = await deployment_broker()
    nginx = await start_nginx(broker)
    session = "deploy-1"
    # As a browser would: wss://chat.example.com/ws?token=..., with its Origin.
    watcher = await nginx.open_ws(target=f"/ws?token={_token(broker, [f'ai-chat/{session}'])}")
    assert watcher.accepted, watcher.status
    subscribed = await watcher.reply(p.Sub(id=1, ch=f"ai-chat/{session}"))
    assert isinstance(subscribed, p.Ok), subscribed

    # The app starts an answer through the same proxy, with its API key.
    async with nginx.https() as http:
        response = await http.post("/ai/chat", json={"message": "hi", "sessionId": session},
                                    headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text

    def events() -> list[p.Ev]:
        return [f for f in watcher.frames if isinstance(f, p.Ev)]

    await watcher.read_until(lambda: any(e.ev == "ai:done" for e in events()), "ai:done")
    names = [e.ev for e in events()]
    assert names[0] == "ai:start" and names[-1] == "ai:done", names
    assert len(names) > 2 and set(names[1:-1]) == {"ai:token"}, names
    assert "".join(e.d["token"] for e in events()[1:-1]).strip()
    assert events()[-1].d["tokens"] == response.json()["tokens"]
    assert await _clients_seen(broker, ["127.0.0.1"]) == ["127.0.0.1"]


async def test_nginx_passes_the_host_on_and_redirects_http(
        deployment_broker: StartBroker, start_nginx: StartNginx) -> None:
    broker = await deployment_broker()
    nginx = await start_nginx(broker)
    async with nginx.https() as http:
        assert (await http.get("/healthz")).status_code == 200
        # The broker, not nginx, refuses a name it does not serve: the Host reached it.
        other = await http.get("/healthz", headers={"Host": "elsewhere.example"})
        assert other.status_code == 421, other.text
        assert "elsewhere.example" in other.text
        # Connection: upgrade on /ws is harmless to a request that is no upgrade.
        assert (await http.get("/ws")).status_code == 426
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{nginx.http_port}",
                                 headers={"Host": SITE}) as plain:
        moved = await plain.get("/ws?token=x")
    assert moved.status_code == 301
    assert moved.headers["location"] == f"https://{SITE}/ws?token=x"
    # Apps on the broker's own machine still call it directly (allowed_hosts keeps 127.0.0.1).
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.port}") as direct:
        assert (await direct.get("/healthz")).status_code == 200


async def test_the_per_address_limit_counts_each_client_behind_nginx(
        deployment_broker: StartBroker, start_nginx: StartNginx) -> None:
    broker = await deployment_broker(max_connections_per_ip=2)
    nginx = await start_nginx(broker)
    await _watcher(nginx, broker, "127.0.0.2")
    await _watcher(nginx, broker, "127.0.0.2")

    # The third from 127.0.0.2 is one too many, whatever X-Forwarded-For it sends: nginx
    # appends the address it saw, and the broker reads that one.
    third = await nginx.open_ws(source="127.0.0.2", target=f"/ws?token={_token(broker, ['*'])}",
                                headers=[(b"X-Forwarded-For", b"10.9.9.9")])
    assert third.accepted, third.status  # accepted, then told why it is closed
    await third.read_until_closed()
    assert third.close_code == p.Code.TOO_MANY_CONNECTIONS
    assert third.bye().code == p.Code.TOO_MANY_CONNECTIONS
    assert "max_connections_per_ip" in third.bye().msg

    # Another client through the same nginx still gets in.
    await _watcher(nginx, broker, "127.0.0.3")
    assert await _clients_seen(broker, ["127.0.0.2", "127.0.0.2", "127.0.0.3"]) == [
        "127.0.0.2", "127.0.0.2", "127.0.0.3"]


async def test_without_trusted_proxies_every_client_has_nginx_address(
        deployment_broker: StartBroker, start_nginx: StartNginx) -> None:
    """What the doc warns of: without trusted_proxies, one client's limit is everyone's."""
    broker = await deployment_broker(max_connections_per_ip=2, trusted_proxies=[])
    nginx = await start_nginx(broker)
    await _watcher(nginx, broker, "127.0.0.2")
    await _watcher(nginx, broker, "127.0.0.2")
    other = await nginx.open_ws(source="127.0.0.3", target=f"/ws?token={_token(broker, ['*'])}")
    await other.read_until_closed()
    assert other.close_code == p.Code.TOO_MANY_CONNECTIONS
    assert await _clients_seen(broker, ["127.0.0.1", "127.0.0.1"]) == ["127.0.0.1", "127.0.0.1"]
