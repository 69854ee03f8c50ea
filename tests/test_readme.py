"""The README's Python example runs as written (on a free port), and its doc links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]


def test_readme_links_point_at_files() -> None:
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", text)
    assert links
    for link in links:
        assert (ROOT / link).is_file(), link


def test_readme_embedding_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    [code] = [block for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL)
              if "broker.serve" in block]
    code = code.replace("port=8765", "port=0").replace("trio.run(main)", "")
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    main = namespace["main"]

    async def bounded() -> None:
        with trio.fail_after(10):
            await main()  # type: ignore[operator]

    trio.run(bounded)
