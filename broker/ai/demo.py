"""The offline token source: a small Markov chain over a public-domain text.

It makes the quick start and the tests work with no network and no key. The
text is the opening of Lewis Carroll's *Alice's Adventures in Wonderland*
(1865, public domain), shipped as ``corpus.txt``. Words are chosen by a
second-order Markov chain with a :class:`random.Random` seeded from the
provider's seed and the prompt, so the same question gets the same answer;
each word (with its leading space) is one token, paced at
``tokens_per_second``. (The ``markovify`` package does the same job but draws
from the global ``random`` state, which makes seeding per answer awkward.)
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import AsyncGenerator, Sequence
from importlib import resources

import trio

from broker.ai.providers import ChatMessage

_START = ("", "")


class MarkovChain:
    """Second-order word chain: which words followed each pair of words in the text."""

    def __init__(self, text: str) -> None:
        self._next: dict[tuple[str, str], list[str]] = defaultdict(list)
        for line in text.splitlines():
            words = line.split()
            previous = _START
            for word in words:
                self._next[previous].append(word)
                previous = (previous[1], word)
        if not self._next[_START]:
            raise ValueError("the text has no words")

    def generate(self, rng: random.Random, count: int) -> list[str]:
        """``count`` words, restarting from the start of a line whenever the chain runs out."""
        out: list[str] = []
        state = _START
        while len(out) < count:
            choices = self._next.get(state)
            if not choices:
                state = _START
                continue
            word = rng.choice(choices)
            out.append(word)
            state = (state[1], word)
        return out


def load_corpus() -> str:
    return resources.files("broker.ai").joinpath("corpus.txt").read_text(encoding="utf-8")


class DemoProvider:
    """Answers from the Markov chain, ``tokens_per_second`` tokens a second (0: as fast as possible)."""

    default_model = "demo-markov"

    def __init__(self, *, tokens_per_second: float = 30.0, answer_tokens: int = 60, seed: int = 0,
                 text: str | None = None) -> None:
        if tokens_per_second < 0:
            raise ValueError(f"tokens_per_second must not be negative, got {tokens_per_second}")
        if answer_tokens < 1:
            raise ValueError(f"answer_tokens must be at least 1, got {answer_tokens}")
        self.tokens_per_second = tokens_per_second
        self.answer_tokens = answer_tokens
        self.seed = seed
        self._chain = MarkovChain(load_corpus() if text is None else text)

    def answer(self, messages: Sequence[ChatMessage], count: int) -> list[str]:
        """The tokens of the answer to ``messages`` (deterministic for a seed and a conversation)."""
        digest = hashlib.sha256(repr((self.seed, [(m.role, m.content) for m in messages])).encode())
        rng = random.Random(int.from_bytes(digest.digest()[:8], "big"))
        words = self._chain.generate(rng, count)
        return [word if i == 0 else " " + word for i, word in enumerate(words)]

    async def stream(self, messages: Sequence[ChatMessage], *, model: str,
                     max_tokens: int) -> AsyncGenerator[str, None]:
        interval = 1.0 / self.tokens_per_second if self.tokens_per_second else 0.0
        for token in self.answer(messages, min(self.answer_tokens, max_tokens)):
            await trio.sleep(interval)
            yield token
