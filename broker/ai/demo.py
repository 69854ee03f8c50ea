"""The offline token source: it says what it is, then reads a public-domain book aloud.

It makes the quick start and the tests work with no network and no key, and
its answers must make sense to someone trying the demo chat who expects an
LLM. So an answer first says that it comes from tokenfan's offline demo model,
not an LLM, and quotes the question; then it streams Lewis Carroll's *Alice's
Adventures in Wonderland*, chapter I (1865, public domain, shipped as
``corpus.txt``), in order. The text is real, so what a newcomer watches is a
readable answer arriving word by word, as a model's would.

Theory of operation
-------------------
An answer is a pure function of the provider's ``seed`` and the
conversation: the first answer of a conversation starts at paragraph ``seed``
(0: the chapter's title), and each follow-up goes on where the answer before
it ends when it runs its course, found by laying the earlier answers out again
(a conversation holds at most a few dozen turns). The text wraps around to the
chapter's start. Each word, with the space or paragraph break before it, is
one token; an answer is exactly ``answer_tokens`` tokens (fewer when the caller
allows fewer), and one that stops in the middle of a sentence ends with "…",
as the next one starts with it. Tokens come ``tokens_per_second`` a second.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from importlib import resources

import trio

from broker.ai.providers import ChatMessage

#: Words of the question quoted back at most; a longer one is cut with "…".
ECHO_WORDS = 24

_FIRST = ("This is tokenfan's offline demo model, not an LLM, so it cannot answer {question}. "
          "Instead it streams a public-domain book, Alice's Adventures in Wonderland (Lewis Carroll, "
          "1865), a word at a time, to everyone watching this conversation. For real answers, point "
          "the broker at a real model (see docs/ai-streaming.md).")
_NEXT = ("This is still tokenfan's offline demo model, so it cannot answer {question} either. "
         "Here is what comes next in the book:")
_SENTENCE_END = (".", "!", "?", ".'", "!'", "?'", ".)", "!)", "?)", ".')", "!')", "?')")


def load_corpus() -> str:
    """The shipped text, without its ``#`` header: paragraphs separated by blank lines."""
    text = resources.files("broker.ai").joinpath("corpus.txt").read_text(encoding="utf-8")
    return "\n".join(line for line in text.splitlines() if not line.startswith("#")).strip()


class Book:
    """A text as a list of words, knowing which words start a paragraph."""

    def __init__(self, text: str) -> None:
        self.words: list[str] = []
        self.paragraphs: list[int] = []  # index of each paragraph's first word
        for paragraph in text.split("\n\n"):
            words = paragraph.split()
            if words:
                self.paragraphs.append(len(self.words))
                self.words.extend(words)
        if not self.words:
            raise ValueError("the text has no words")
        self._starts = frozenset(self.paragraphs)

    def starts_paragraph(self, index: int) -> bool:
        return index % len(self.words) in self._starts

    def mid_sentence(self, index: int) -> bool:
        """True when word ``index`` is inside a sentence (not the first of a paragraph or of a sentence)."""
        before = self.words[(index - 1) % len(self.words)]
        return not self.starts_paragraph(index) and not before.endswith(_SENTENCE_END)


class DemoProvider:
    """The offline demo model, ``tokens_per_second`` tokens a second (0: as fast as possible)."""

    default_model = "tokenfan-demo"

    def __init__(self, *, tokens_per_second: float = 30.0, answer_tokens: int = 200, seed: int = 0,
                 text: str | None = None) -> None:
        if tokens_per_second < 0:
            raise ValueError(f"tokens_per_second must not be negative, got {tokens_per_second}")
        if answer_tokens < 1:
            raise ValueError(f"answer_tokens must be at least 1, got {answer_tokens}")
        self.tokens_per_second = tokens_per_second
        self.answer_tokens = answer_tokens
        self.seed = seed
        self._book = Book(load_corpus() if text is None else text)

    def answer(self, messages: Sequence[ChatMessage], count: int) -> list[str]:
        """The first ``count`` tokens of the answer to ``messages`` (deterministic for a seed and a
        conversation)."""
        book = self._book
        position = book.paragraphs[self.seed % len(book.paragraphs)]
        question, follow_up = "", False
        for message in messages[:-1]:
            if message.role == "user":
                question = message.content
            elif message.role == "assistant":
                _, position = self._layout(question, follow_up, position, self.answer_tokens)
                follow_up = True
        if messages and messages[-1].role == "user":
            question = messages[-1].content
        return self._layout(question, follow_up, position, count)[0]

    def _layout(self, question: str, follow_up: bool, position: int, count: int) -> tuple[list[str], int]:
        """The answer's tokens, reading the book from word ``position``, and where the next answer starts."""
        book = self._book
        intro = (_NEXT if follow_up else _FIRST).format(question=_quote(question)).split()
        tokens = [word if i == 0 else " " + word for i, word in enumerate(intro[:count])]
        start = position
        while len(tokens) < count:
            word = book.words[position % len(book.words)]
            if position == start and book.mid_sentence(position):
                word = "…" + word  # it goes on in the middle of a sentence
            new_paragraph = position == start or book.starts_paragraph(position)
            tokens.append(("\n\n" if new_paragraph else " ") + word)
            position += 1
        if position > start and book.mid_sentence(position):
            tokens[-1] = tokens[-1].rstrip(",;:-") + "…"  # it stops in the middle of a sentence
        return tokens, position % len(book.words)

    async def stream(self, messages: Sequence[ChatMessage], *, model: str,
                     max_tokens: int) -> AsyncGenerator[str, None]:
        interval = 1.0 / self.tokens_per_second if self.tokens_per_second else 0.0
        for token in self.answer(messages, min(self.answer_tokens, max_tokens)):
            await trio.sleep(interval)
            yield token


def _quote(question: str) -> str:
    words = question.split()
    if not words:
        return "that"
    if len(words) > ECHO_WORDS:
        words = [*words[:ECHO_WORDS - 1], words[ECHO_WORDS - 1].rstrip(",;:-") + "…"]
    return '"' + " ".join(words) + '"'

