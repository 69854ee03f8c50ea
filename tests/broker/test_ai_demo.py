"""The offline demo provider: deterministic, paced, bounded, cancellable."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from broker.ai import ChatMessage, DemoProvider, MarkovChain
from broker.ai.demo import load_corpus

QUESTION = [ChatMessage(role="user", content="Who is late?")]


async def collect(provider: DemoProvider, messages: list[ChatMessage], max_tokens: int = 1000) -> list[str]:
    return [token async for token in provider.stream(messages, model=provider.default_model,
                                                     max_tokens=max_tokens)]


async def test_same_seed_and_conversation_give_the_same_answer() -> None:
    provider = DemoProvider(tokens_per_second=0, answer_tokens=40, seed=3)
    first = await collect(provider, QUESTION)
    assert first == await collect(provider, QUESTION)
    assert len(first) == 40
    assert first != await collect(DemoProvider(tokens_per_second=0, answer_tokens=40, seed=4), QUESTION)
    other = [ChatMessage(role="user", content="Where is the key?")]
    assert first != await collect(provider, other)


async def test_tokens_are_words_of_the_text_with_their_spaces() -> None:
    tokens = await collect(DemoProvider(tokens_per_second=0, answer_tokens=200), QUESTION)
    vocabulary = set(load_corpus().split())
    assert not tokens[0].startswith(" ")
    assert all(t.startswith(" ") for t in tokens[1:])
    assert {t.strip() for t in tokens} <= vocabulary


async def test_max_tokens_bounds_the_answer() -> None:
    provider = DemoProvider(tokens_per_second=0, answer_tokens=50)
    assert len(await collect(provider, QUESTION, max_tokens=7)) == 7


async def test_paced_at_its_rate(autojump_clock: trio.testing.MockClock) -> None:
    provider = DemoProvider(tokens_per_second=20, answer_tokens=30)
    start = trio.current_time()
    assert len(await collect(provider, QUESTION)) == 30
    assert trio.current_time() - start == pytest.approx(1.5)


async def test_cancelling_the_callers_scope_stops_it(autojump_clock: trio.testing.MockClock) -> None:
    provider = DemoProvider(tokens_per_second=10, answer_tokens=100)
    got: list[str] = []
    with trio.move_on_after(1.05):
        async for token in provider.stream(QUESTION, model="demo-markov", max_tokens=100):
            got.append(token)
    assert len(got) == 10


def test_bad_settings_and_texts_are_refused() -> None:
    with pytest.raises(ValueError, match="tokens_per_second"):
        DemoProvider(tokens_per_second=-1)
    with pytest.raises(ValueError, match="answer_tokens"):
        DemoProvider(answer_tokens=0)
    with pytest.raises(ValueError, match="no words"):
        MarkovChain("  \n ")
