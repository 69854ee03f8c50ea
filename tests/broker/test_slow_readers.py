"""Slow readers: lossless coalescing, the drop policy, and recovery, over real sockets."""

from __future__ import annotations

import random
import string

import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import protocol as p
from bench.cswarm import CSwarm, SwarmSpec
from broker import Broker, ChannelOptions, Config
from broker.client import Event, StreamLost, Subscription, connect
from broker.config import SlowPolicy
from tests.broker.conftest import OpenRaw, StartBroker, ws_url


def words(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = string.ascii_letters + "éü世"
    return [" " + "".join(rng.choices(letters, k=rng.randint(1, 9))) for _ in range(count)]


def text_of(frames: list[p.Frame], channel: str) -> tuple[str, list[int]]:
    """The ``ai:token`` text of ``channel`` in ``frames`` and every offset its events covered."""
    text, covered = [], []
    for frame in frames:
        if isinstance(frame, p.Ev) and frame.ch == channel:
            covered += range(frame.o if frame.o0 is None else frame.o0, frame.o + 1)
            if frame.ev == "ai:token":
                text.append(frame.d["token"])
    return "".join(text), covered


async def test_a_stalled_reader_gets_its_tokens_coalesced_losslessly(
        start_broker: StartBroker, open_raw: OpenRaw) -> None:
    broker = await start_broker(outbox_limit=64 * 1024)
    channel = "ai-chat/coalesce"
    reader = await open_raw(broker, rcvbuf=4096)
    await reader.command(p.Sub(id=1, ch=channel))
    await reader.receive()  # the ok
    tokens = words(6000, seed=1)  # about 200 KB as separate frames: more than the outbox holds
    for i, token in enumerate(tokens):
        broker.emit_nowait(channel, "ai:token", {"token": token})
        if i % 100 == 0:
            await trio.lowlevel.checkpoint()
    broker.emit_nowait(channel, "ai:done", {"reason": "stop", "tokens": len(tokens)})
    await reader.read_for(1.0)
    assert reader.close_code is None, "coalescing should have kept the reader connected"
    text, covered = text_of(reader.frames, channel)
    assert text == "".join(tokens)
    assert covered == list(range(1, len(tokens) + 2))  # every offset once, in order, ai:done last
    last = reader.frames[-1]
    assert isinstance(last, p.Ev) and (last.ev, last.o0) == ("ai:done", None)
    assert broker.statistics().backlog.coalesced > 0
    assert any(isinstance(f, p.Ev) and f.o0 is not None for f in reader.frames)


async def test_the_drop_policy_skips_ahead_and_names_the_gap(
        start_broker: StartBroker, open_raw: OpenRaw) -> None:
    broker = await start_broker(outbox_limit=16 * 1024, channels={
        "cur/*": ChannelOptions(slow_policy=SlowPolicy.DROP, keep_events=("final",))})
    reader = await open_raw(broker, rcvbuf=4096)
    await reader.command(p.Sub(id=1, ch="cur/1"))
    await reader.receive()
    total = 3000
    for i in range(1, total):
        broker.emit_nowait("cur/1", "move", {"x": i, "pad": "." * 40})  # not coalescible
        if i == 1500:
            broker.emit_nowait("cur/1", "final", {"at": i})  # offset 1501: never dropped
        if i % 100 == 0:
            await trio.lowlevel.checkpoint()
    await reader.read_for(1.0)
    assert reader.close_code is None
    covered: list[int] = []
    for frame in reader.frames:
        if isinstance(frame, p.Ev):
            covered.append(frame.o)
        elif isinstance(frame, p.Gap):
            covered += range(frame.o0, frame.o + 1)
    assert covered == list(range(1, total + 1))  # events and gaps together: each offset once
    assert any(isinstance(f, p.Gap) for f in reader.frames)
    assert any(isinstance(f, p.Ev) and f.ev == "final" for f in reader.frames)
    assert broker.statistics().backlog.dropped > 0
    assert broker.statistics().slow_disconnects == 0


async def test_replies_to_pings_do_not_wait_behind_a_backlog(
        start_broker: StartBroker, open_raw: OpenRaw) -> None:
    broker = await start_broker(outbox_limit=4 * 1024 * 1024)
    reader = await open_raw(broker, rcvbuf=4096)
    await reader.command(p.Sub(id=1, ch="blobs"))
    await reader.receive()
    for i in range(2000):
        broker.emit_nowait("blobs", "blob", {"i": i, "pad": "." * 200})  # about 450 KB: most of it queued
    await trio.sleep(0.1)
    assert broker.statistics().bytes_queued > 100_000
    await reader.command(p.Ping(id=7))
    await trio.sleep(0.1)
    await reader.read_for(1.0)
    kinds = [("ok" if isinstance(f, p.Ok) and f.id == 7 else "ev") for f in reader.frames[1:]]
    assert kinds.count("ok") == 1
    assert kinds.index("ok") < len(kinds) - 500  # ahead of the events still queued in the broker


async def test_a_paused_reader_ends_with_the_exact_text_while_100_others_get_everything(
        start_broker: StartBroker) -> None:
    outbox_limit = 256 * 1024
    broker = await start_broker(outbox_limit=outbox_limit)
    channel = "ai-chat/pause-0"
    total = 20_000
    tokens = words(total, seed=2)
    swarm = CSwarm(SwarmSpec(host="127.0.0.1", port=broker.port or 0, subscribers=100, channels=1,
                             prefix="ai-chat/pause-", tokens=total + 1, timeout=60), cpu=None)
    try:
        await trio.to_thread.run_sync(swarm.wait_ready, 30.0)
        async with connect(ws_url(broker)) as client:
            paused = await client.subscribe(channel, buffer=8)
            most_queued = 0
            for i, token in enumerate(tokens):  # the paused reader reads nothing meanwhile
                broker.emit_nowait(channel, "ai:token", {"token": token})
                if i % 200 == 0:
                    await trio.sleep(0.002)
                    most_queued = max([most_queued, *(c.outbox.statistics().bytes_queued
                                                      for c in broker.connections)])
            broker.emit_nowait(channel, "ai:done", {"reason": "stop", "tokens": total})
            text, last = await read_answer(paused, 0)
        result = await trio.to_thread.run_sync(swarm.finish, 60.0)
    finally:
        swarm.close()
    assert text == "".join(tokens)
    assert last == total + 1
    assert (result["delivered"], result["lost_gaps"], result["out_of_order"], result["duplicates"]) == \
        (100 * (total + 1), 0, 0, 0)
    stats = broker.statistics()
    assert stats.backlog.coalesced > 0 or stats.hub.recoveries > 0, "the pause never got the reader behind"
    assert most_queued <= outbox_limit
    assert stats.history.bytes <= broker.config.history_max_bytes


async def read_answer(sub: Subscription, after: int) -> tuple[str, int]:
    """Read ``ai:token`` events until ``ai:done``; return the text and ai:done's offset, checking order."""
    text: list[str] = []
    expected = after + 1
    with trio.fail_after(30):
        async for event in sub:
            assert event.first_offset == expected, (event.first_offset, expected)
            expected = event.offset + 1
            if event.event == "ai:token":
                text.append(event.data["token"])
            elif event.event == "ai:done":
                return "".join(text), event.offset
    raise AssertionError("the subscription ended before ai:done")


# -- random interleavings ------------------------------------------------------------------

Step = tuple[str, int, int]  # ("emit", tokens, _) | ("pause", client, ms) | ("drop", client, _)

steps = st.lists(
    st.one_of(
        st.tuples(st.just("emit"), st.integers(1, 400), st.just(0)),
        st.tuples(st.just("pause"), st.integers(0, 2), st.integers(1, 100)),
        st.tuples(st.just("drop"), st.integers(0, 2), st.just(0)),
    ),
    min_size=1, max_size=12,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps, seed=st.integers(0, 1000))
# Every reader dropped before the first publication: the stream is forgotten and must come back
# in the same epoch, or the readers' recoveries fail (found by this test).
@example(plan=[("drop", 0, 0), ("pause", 2, 74), ("pause", 2, 67), ("drop", 1, 0), ("drop", 2, 0),
               ("pause", 1, 89), ("pause", 0, 8), ("drop", 0, 0), ("drop", 0, 0), ("drop", 2, 0),
               ("drop", 0, 0), ("emit", 53, 0)], seed=183)
async def test_every_reader_reconstructs_the_emitted_text(plan: list[Step], seed: int) -> None:
    """Emits, reader pauses (coalescing, slow-consumer cut-offs) and dropped connections, in any order."""
    channel = "ai-chat/prop"
    tokens = words(sum(n for kind, n, _ in plan if kind == "emit"), seed)
    config = Config(port=0, outbox_limit=64 * 1024, shutdown_timeout=1)
    async with trio.open_nursery() as nursery:
        broker: Broker = await nursery.start(Broker(config).serve)
        async with connect(ws_url(broker), backoff=(0.01, 0.05)) as c0, \
                connect(ws_url(broker), backoff=(0.01, 0.05)) as c1, \
                connect(ws_url(broker), backoff=(0.01, 0.05)) as c2:
            subs = [await c.subscribe(channel, buffer=4) for c in (c0, c1, c2)]
            pauses = [trio.Event() for _ in subs]
            for event in pauses:
                event.set()
            texts: list[list[str]] = [[] for _ in subs]

            async def read(index: int) -> None:
                sub = subs[index]
                while True:
                    await pauses[index].wait()
                    try:
                        event: Event = await sub.__anext__()
                    except StreamLost:  # pragma: no cover - history holds 10,000: never here
                        raise AssertionError("a reader lost its stream") from None
                    if event.event == "ai:token":
                        texts[index].append(event.data["token"])
                    elif event.event == "ai:done":
                        return

            async def unpause(pause: trio.Event, delay: float) -> None:
                await trio.sleep(delay)
                pause.set()

            with trio.fail_after(60):
                async with trio.open_nursery() as readers:
                    for index in range(len(subs)):
                        readers.start_soon(read, index)
                    emitted = 0
                    for kind, a, b in plan:
                        if kind == "emit":
                            for token in tokens[emitted:emitted + a]:
                                broker.emit_nowait(channel, "ai:token", {"token": token})
                            emitted += a
                            await trio.lowlevel.checkpoint()
                        elif kind == "pause":
                            pauses[a] = trio.Event()
                            readers.start_soon(unpause, pauses[a], b / 1000)
                        else:
                            connections = sorted(broker.connections, key=id)
                            if len(connections) > a:
                                connections[a].close(p.Code.SHUTTING_DOWN, "test: connection dropped")
                            await trio.lowlevel.checkpoint()
                    broker.emit_nowait(channel, "ai:done", {})
        broker.shutdown()
    expected = "".join(tokens)
    for text in texts:
        assert "".join(text) == expected


@pytest.mark.parametrize("policy", [SlowPolicy.DISCONNECT, SlowPolicy.DROP])
async def test_control_and_terminal_frames_survive_a_full_buffer(
        start_broker: StartBroker, open_raw: OpenRaw, policy: SlowPolicy) -> None:
    broker = await start_broker(outbox_limit=8 * 1024, channels={
        "ai-chat/*": ChannelOptions(history_size=100, slow_policy=policy)})
    reader = await open_raw(broker, rcvbuf=4096)
    await reader.command(p.Sub(id=1, ch="ai-chat/t"))
    await reader.receive()
    for i in range(3000):
        broker.emit_nowait("ai-chat/t", "note", {"i": i, "pad": "." * 60})
        if i % 100 == 0:
            await trio.lowlevel.checkpoint()
    broker.emit_nowait("ai-chat/t", "ai:done", {"reason": "stop"})
    await reader.read_for(1.0)
    if policy is SlowPolicy.DISCONNECT:
        assert isinstance(reader.frames[-1], p.Bye) and reader.frames[-1].code == p.Code.SLOW_CONSUMER
    else:
        assert reader.close_code is None
        done = [f for f in reader.frames if isinstance(f, p.Ev) and f.ev == "ai:done"]
        assert len(done) == 1 and done[0].o == 3001
