"""Every shell and Python example in the README and docs/ runs as written, against a live broker.

For each Markdown file, a broker is started (``tokenfan serve --port 0``, the
demo model sped up) and every fenced ``sh`` and ``python`` block runs in order,
with ``8765`` (the documented port) rewritten to the broker's port and
``TOKENFAN_URL`` naming it (so ``tokenfan tail`` without ``--url`` finds it), from
a scratch folder where ``.venv`` is this checkout's venv. A block must exit 0
within :data:`BLOCK_TIMEOUT` seconds. An HTML comment on the line before a
fence says otherwise:

- ``<!-- docs-test: skip: <why> -->``: not run (the reason is required: ``make run``
  runs forever, a command needs a real model, ...).
- ``<!-- docs-test: background -->``: started and left running (a ``tail``) while
  the rest of the file runs; stopped at the end. It must not fail before that.
- ``<!-- docs-test: prints -->`` before any block (usually ``text``): each of its
  non-empty lines must appear, in order, in the output of the block run just
  before it; ``<!-- docs-test: watcher prints -->``: in the output of the latest
  background block (a ``tail`` watching what the blocks after it emitted), by
  the end of the file.

So a doc that shows a command and what it prints cannot drift from what the
command really does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_TIMEOUT = 60
RUNNABLE = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "python", "py": "python"}
_FENCE = re.compile(
    r"^(?:<!-- docs-test: (?P<directive>[^\n]*?) -->\n)?```(?P<lang>[\w-]*)\n(?P<code>.*?)^```",
    re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    directive: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    text = path.read_text()
    return [Block(path, text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["code"],
                  m["directive"] or "") for m in _FENCE.finditer(text)]


def test_directives_are_known_and_skips_say_why() -> None:
    for path in DOCS:
        text = path.read_text()
        for directive in re.findall(r"<!-- docs-test: ([^\n]*?) -->", text):
            known = directive in ("background", "prints", "watcher prints")
            assert known or re.fullmatch(r"skip: \S.{5,}", directive), (
                f"{path.name}: unknown docs-test directive {directive!r}")
        # A directive must sit right above a fence, or it silently applies to nothing.
        assert text.count("<!-- docs-test:") == sum(1 for b in blocks_of(path) if b.directive), path.name


@dataclass
class Started:
    block: Block
    process: subprocess.Popen[bytes]
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    return tmp_path


def _environment(port: int | None = None) -> dict[str, str]:
    """A user's environment; with ``port``, the CLI's commands talk to that broker by default."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("TOKENFAN_", "OPENAI_"))}
    if port is not None:
        env["TOKENFAN_URL"] = f"http://127.0.0.1:{port}"
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["TOKENFAN_AI_DEMO_TOKENS_PER_SECOND"] = "2000"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def live_broker(scratch: Path) -> Iterator[int]:
    """A broker for one doc file, started as a user would (``tokenfan serve``)."""
    with subprocess.Popen([str(ROOT / ".venv" / "bin" / "tokenfan"), "serve", "--port", "0"], cwd=scratch,
                          env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as server:
        try:
            assert server.stdout is not None
            line = server.stdout.readline().decode()
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            assert match, f"the broker did not start: {line!r}"
            yield int(match.group(1))
        finally:
            server.terminate()
            server.wait(timeout=15)


def _start(block: Block, port: int, scratch: Path, index: int) -> Started:
    code = block.code.replace("8765", str(port))
    output = scratch / f"block-{index}.out"
    if RUNNABLE[block.lang] == "python":
        script = scratch / f"block_{index}.py"
        script.write_text(code)
        argv = [str(ROOT / ".venv" / "bin" / "python"), str(script)]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", code]
    with output.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=scratch, env=_environment(port), stdout=sink,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Started(block, process, output)


def _stop(started: Started) -> None:
    if started.process.poll() is None:
        os.killpg(started.process.pid, signal.SIGTERM)
        try:
            started.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(started.process.pid, signal.SIGKILL)
            started.process.wait()


def _appears_in_order(expected: list[str], text: str) -> bool:
    position = 0
    for line in expected:
        found = text.find(line, position)
        if found < 0:
            return False
        position = found + len(line)
    return True


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_examples_run_as_written(path: Path, live_broker: int, scratch: Path) -> None:
    background: list[Started] = []
    checks: list[tuple[Block, Started]] = []
    last: Started | None = None
    try:
        for index, block in enumerate(blocks_of(path)):
            if block.directive in ("prints", "watcher prints"):
                source = background[-1] if block.directive == "watcher prints" and background else last
                assert source is not None, f"{block.where}: '{block.directive}' follows no block that ran"
                checks.append((block, source))
                continue
            if block.lang not in RUNNABLE or block.directive.startswith("skip:"):
                continue
            last = _start(block, live_broker, scratch, index)
            if block.directive == "background":
                background.append(last)
                time.sleep(1.0)  # let it connect before the next block emits
                assert last.process.poll() in (None, 0), f"{block.where} failed at once:\n{last.text()}"
                continue
            try:
                code = last.process.wait(timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                _stop(last)
                pytest.fail(f"{block.where} ran over {BLOCK_TIMEOUT} s:\n{last.text()}")
            assert code == 0, f"{block.where} exited {code}:\n{last.text()}"
        for block, started in checks:
            expected = [line.strip() for line in block.code.splitlines() if line.strip()]
            deadline = time.monotonic() + 10
            while not _appears_in_order(expected, started.text()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _appears_in_order(expected, started.text()), (
                f"{block.where}: the doc says {started.block.where} prints\n{block.code}\nbut it printed\n"
                f"{started.text()}")
        for started in background:
            code = started.process.poll()
            assert code in (None, 0), f"{started.block.where} exited {code}:\n{started.text()}"
    finally:
        for started in background:
            _stop(started)


def test_links_between_docs_point_at_files() -> None:
    for path in DOCS:
        for link in re.findall(r"\]\(([\w./-]+\.(?:md|py|toml|json|js|html))(?:#[\w-]+)?\)",
                               path.read_text()):
            assert (path.parent / link).is_file(), f"{path.name} links to {link}, which does not exist"
