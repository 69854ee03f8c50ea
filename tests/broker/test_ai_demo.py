"""The offline demo provider: says what it is, reads its book in order, deterministic, paced, cancellable."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from broker.ai import ChatMessage, DemoProvider
from broker.ai.demo import ECHO_WORDS, load_corpus

QUESTION = [ChatMessage(role="user", content="Who is late?")]


async def collect(provider: DemoProvider, messages: list[ChatMessage], max_tokens: int = 1000) -> list[str]:
    return [token async for token in provider.stream(messages, model=provider.default_model,
                                                     max_tokens=max_tokens)]


def bare(words: list[str]) -> list[str]:
    """Words without the ellipses an answer adds where it cuts a sentence (and the comma it drops there)."""
    return [word.strip("…").rstrip(",;:-") for word in words]


def book_part(answer: str) -> list[str]:
    """The words the answer read from the book (after its first paragraph break)."""
    return bare(answer.split("\n\n", 1)[1].split())


async def test_same_seed_and_conversation_give_the_same_answer() -> None:
    provider = DemoProvider(tokens_per_second=0, answer_tokens=120, seed=3)
    first = await collect(provider, QUESTION)
    assert first == await collect(provider, QUESTION)
    assert len(first) == 120
    assert first != await collect(DemoProvider(tokens_per_second=0, answer_tokens=120, seed=4), QUESTION)
    other = [ChatMessage(role="user", content="Where is the key?")]
    assert first != await collect(provider, other)


async def test_it_says_it_is_the_demo_and_quotes_the_question_first() -> None:
    answer = "".join(await collect(DemoProvider(tokens_per_second=0), QUESTION))
    intro = answer.split("\n\n", 1)[0]
    assert intro.startswith("This is tokenfan's offline demo model, not an LLM")
    assert '"Who is late?"' in intro
    assert "docs/ai-streaming.md" in intro  # where to learn to use a real model


async def test_then_it_reads_the_book_in_order_at_a_readable_length() -> None:
    provider = DemoProvider(tokens_per_second=0)
    answer = "".join(await collect(provider, QUESTION))
    words = book_part(answer)
    assert len(words) >= 100
    assert words == bare(load_corpus().split())[:len(words)]
    assert answer.split("\n\n")[1] == "CHAPTER I. Down the Rabbit-Hole"
    assert answer.endswith("…")  # it stops in the middle of a sentence and says so


async def test_a_follow_up_goes_on_where_the_answer_before_ended() -> None:
    provider = DemoProvider(tokens_per_second=0)
    first = "".join(await collect(provider, QUESTION))
    conversation = [*QUESTION, ChatMessage(role="assistant", content=first),
                    ChatMessage(role="user", content="And then?")]
    second = "".join(await collect(provider, conversation))
    assert second.startswith("This is still tokenfan's offline demo model")
    assert '"And then?"' in second.split("\n\n", 1)[0]
    assert second.split("\n\n", 1)[1].startswith("…")
    read = book_part(first) + book_part(second)
    assert read == bare(load_corpus().split())[:len(read)]


async def test_tokens_are_words_with_the_space_or_paragraph_break_before_them() -> None:
    tokens = await collect(DemoProvider(tokens_per_second=0, answer_tokens=300), QUESTION)
    assert tokens[0] == "This"
    assert all(t.startswith((" ", "\n\n")) for t in tokens[1:])
    assert all(len(t.split()) == 1 for t in tokens)


async def test_a_long_question_is_quoted_cut_and_an_empty_one_not_at_all() -> None:
    long = [ChatMessage(role="user", content=" ".join(f"w{i}" for i in range(500)))]
    intro = "".join(await collect(DemoProvider(tokens_per_second=0), long)).split("\n\n", 1)[0]
    assert '"w0 w1 w2' in intro and f'w{ECHO_WORDS - 1}…"' in intro and f"w{ECHO_WORDS}" not in intro
    blank = [ChatMessage(role="user", content=" \n ")]
    assert "cannot answer that." in "".join(await collect(DemoProvider(tokens_per_second=0), blank))


async def test_the_text_wraps_around_to_its_start() -> None:
    provider = DemoProvider(tokens_per_second=0, answer_tokens=80, text="One two.\n\nThree four five.")
    words = book_part("".join(await collect(provider, QUESTION)))
    assert words[:7] == ["One", "two.", "Three", "four", "five.", "One", "two."]


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
        async for token in provider.stream(QUESTION, model="tokenfan-demo", max_tokens=100):
            got.append(token)
    assert len(got) == 10


def test_the_shipped_text_says_it_is_public_domain() -> None:
    from importlib import resources

    raw = resources.files("broker.ai").joinpath("corpus.txt").read_text(encoding="utf-8")
    assert "Public domain" in raw.split("\n\n", 1)[0]
    assert "#" not in load_corpus() and load_corpus().startswith("CHAPTER I.")


def test_bad_settings_and_texts_are_refused() -> None:
    with pytest.raises(ValueError, match="tokens_per_second"):
        DemoProvider(tokens_per_second=-1)
    with pytest.raises(ValueError, match="answer_tokens"):
        DemoProvider(answer_tokens=0)
    with pytest.raises(ValueError, match="no words"):
        DemoProvider(text="  \n\n ")
