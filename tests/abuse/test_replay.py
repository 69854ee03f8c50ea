"""Finding 2: replays are built in bounded steps and charged to the connection that asks for them.

The broker runs as its own process, so that a step that freezes it shows as a
slow round trip to a client of this test (in one process the test would freeze
with it and never notice).
"""

from __future__ import annotations

import json
import urllib.request

import trio
import wsproto.events as wse

import protocol as p
from broker.client import connect
from tests.abuse.conftest import StartHostile
from tests.broker.conftest import StartBroker
from tests.broker.rawclient import RawClient


def _fill_history(port: int) -> None:
    """16 MB of history on one channel: 4,000 tokens of 4 KB."""
    for batch in range(40):
        events = [{"channel": "ai-chat/big", "event": "ai:token",
                   "data": {"token": f"{100 * batch + index:05d}" + "x" * 4000}} for index in range(100)]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/emit/batch",
                                         json.dumps({"events": events}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200


async def test_a_message_of_replays_does_not_freeze_anyone(hostile_broker: StartHostile) -> None:
    """Once, 100 sub {since: 0} / unsub pairs in one 6.5 KB message froze every client for 18.7 s."""
    served = hostile_broker()
    await trio.to_thread.run_sync(_fill_history, served.port)
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", served.port))
    attacker = RawClient(sock)
    await attacker.send(wse.Request(host="127.0.0.1", target="/ws"))
    while not any(isinstance(e, wse.AcceptConnection) for e in await attacker.receive()):
        pass
    pairs: list[p.ClientFrame] = []
    for index in range(100):
        pairs += [p.Sub(id=2 * index + 1, ch="ai-chat/big", since=p.Position(o=0)),
                  p.Unsub(id=2 * index + 2, ch="ai-chat/big")]
    message = p.encode_batch(pairs)
    assert len(message) < 8 * 1024
    worst = 0.0
    async with connect(f"ws://127.0.0.1:{served.port}/ws", reconnect=False) as honest:
        await honest.ping()
        await attacker.send(wse.Message(data=message))

        async def drain() -> None:
            while attacker.close_code is None:
                await attacker.receive()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            started = trio.current_time()
            with trio.move_on_after(4):
                while True:
                    started = trio.current_time()
                    await honest.ping()
                    worst = max(worst, trio.current_time() - started)
                    started = trio.current_time()  # (not waiting for a ping from here)
                    await trio.sleep(0.01)
            if trio.current_time() - started > 0.02:  # a ping still unanswered when time ran out
                worst = max(worst, trio.current_time() - started)
            nursery.cancel_scope.cancel()
    sock.close()
    assert worst < 0.1, f"a ping took {worst * 1000:.0f} ms while another client asked for replays"
    answered = sum(1 for frame in attacker.frames if isinstance(frame, p.Ok | p.Err))
    # Its replays were charged to it: in 4 s it got far fewer than its 200 answers' worth of work.
    assert answered < 200, answered


async def test_a_replay_of_many_pages_racing_publications_arrives_exactly_once(
        start_broker: StartBroker) -> None:
    """Read in steps, a recovery still gets every publication once, in order, live ones included."""
    broker = await start_broker(outbox_limit=4 * 1024 * 1024)
    tokens = [f"<{index}:" + "t" * 300 + ">" for index in range(6000)]
    for token in tokens[:2999]:  # about 1 MB: four pages of history
        broker.emit_nowait("ai-chat/pages", "ai:token", {"token": token})
    epoch = (await broker.emit("ai-chat/pages", "ai:token", {"token": tokens[2999]})).epoch  # all are out

    async def publish_the_rest() -> None:
        for token in tokens[3000:]:
            broker.emit_nowait("ai-chat/pages", "ai:token", {"token": token})
            await trio.lowlevel.checkpoint()
        broker.emit_nowait("ai-chat/pages", "ai:done", {})

    text: list[str] = []
    async with trio.open_nursery() as nursery, \
            connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        nursery.start_soon(publish_the_rest)
        sub = await client.subscribe("ai-chat/pages", since=p.Position(o=0, ep=epoch))
        assert sub.recovered
        with trio.fail_after(20):
            async for event in sub:
                if event.event == "ai:done":
                    break
                text.append(event.data["token"])
    assert "".join(text) == "".join(tokens)


async def test_an_exact_recovery_that_cannot_fit_says_so_and_replays_nothing(
        start_broker: StartBroker) -> None:
    broker = await start_broker()  # room for a replay: half of 1 MiB
    for index in range(1499):  # 1.5 MB of events that cannot be coalesced
        broker.emit_nowait("ai-chat/wide", "x", {"n": index, "pad": "p" * 1000})
    last = await broker.emit("ai-chat/wide", "x", {"n": 1499, "pad": "p" * 1000})
    epoch, top = last.epoch, last.offset
    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        sub = await client.subscribe("ai-chat/wide", since=p.Position(o=0, ep=epoch))
        assert not sub.recovered and sub.offset == top
        broker.emit_nowait("ai-chat/wide", "x", {"n": "live"})
        with trio.fail_after(5):
            event = await sub.__anext__()
        assert event.data == {"n": "live"}  # nothing from history came before it


async def test_a_publication_larger_than_a_page_is_replayed(start_broker: StartBroker) -> None:
    broker = await start_broker(outbox_limit=4 * 1024 * 1024)
    broker.emit_nowait("ai-chat/huge", "x", {"pad": "h" * 300_000})  # more than a replay page alone
    epoch = (await broker.emit("ai-chat/huge", "x", {"pad": "after"})).epoch
    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        with trio.fail_after(5):
            sub = await client.subscribe("ai-chat/huge", since=p.Position(o=0, ep=epoch))
            assert sub.recovered
            first, second = [await sub.__anext__() for _ in range(2)]
    assert len(first.data["pad"]) == 300_000 and second.data == {"pad": "after"}


async def test_every_replay_is_charged_even_one_page_long(start_broker: StartBroker) -> None:
    broker = await start_broker(replay_rate=256 * 1024, outbox_limit=64 * 1024)  # bursts of 1 MiB
    for index in range(100):
        broker.emit_nowait("ai-chat/small", "x", {"n": index, "pad": "s" * 1000})  # 100 KB: one page
    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        started = trio.current_time()
        for _ in range(20):  # 2 MB of replays: the burst, then 256 KiB a second
            sub = await client.subscribe("ai-chat/small", since=p.Position(o=0))
            await sub.unsubscribe()
        took = trio.current_time() - started
    assert took > 2.0, f"20 replays of 100 KB took {took:.2f} s at 256 KiB/s"


async def test_a_catch_up_that_skipped_publications_says_so(start_broker: StartBroker) -> None:
    broker = await start_broker(outbox_limit=64 * 1024)  # room for a replay: 32 KiB
    for index in range(250):
        broker.emit_nowait("ai-chat/skip", "x", {"n": index, "pad": "k" * 2000})  # 500 KB
    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        sub = await client.subscribe("ai-chat/skip", since=p.Position(o=0))
        assert not sub.recovered  # the newest that fit, and it says it is not everything


async def test_replays_and_history_answers_share_the_brokers_read_rate(start_broker: StartBroker) -> None:
    """Per-connection rates do not bound many connections together: history_read_rate does."""
    broker = await start_broker(history_read_rate=1024 * 1024)  # bursts of a second's worth
    for index in range(100):
        broker.emit_nowait("ai-chat/shared", "x", {"n": index, "pad": "r" * 10_000})  # 1 MB of history
    url = f"http://127.0.0.1:{broker.port}/api/history?channel=ai-chat/shared&limit=10000"
    recovered: list[bool] = []

    async def replay() -> None:
        async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
            sub = await client.subscribe("ai-chat/shared", since=p.Position(o=0))
            recovered.append(sub.recovered)

    def read_history() -> None:
        read, since, more = 0, 0, True
        while more:  # pages of at most 256 KiB
            with urllib.request.urlopen(f"{url}&since={since}", timeout=30) as response:
                page = json.loads(response.read())
            read, since, more = read + len(page["publications"]), page["next"], page["more"]
        assert read == 100

    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as bystander:
        started = trio.current_time()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(replay)
                nursery.start_soon(trio.to_thread.run_sync, read_history)
                await trio.sleep(0.5)
                ping_started = trio.current_time()
                await bystander.ping()  # waits for nobody's turn
                ping = trio.current_time() - ping_started
        took = trio.current_time() - started
    assert len(recovered) == 3
    # 4 MB read at 1 MiB a second after a 1 MiB burst: at least 3 s (each alone could take 16 MiB/s).
    assert took > 2.5, f"3 replays and a history answer of 1 MB each took {took:.2f} s at 1 MiB/s"
    assert ping < 0.1, f"a ping took {ping * 1000:.0f} ms while others waited for their turns"
