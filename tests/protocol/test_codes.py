"""The codes table in docs/protocol.md and the Code enum agree."""

from __future__ import annotations

import re
from pathlib import Path

from protocol import Code

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented_codes() -> list[tuple[int, str, bool]]:
    text = DOC.read_text()
    table = text.split("<!-- codes-table")[1].split("<!-- /codes-table -->")[0]
    rows = re.findall(r"^\| (\d+) \| (\w+) \| (yes|no) \|", table, re.MULTILINE)
    return [(int(code), name, flag == "yes") for code, name, flag in rows]


def test_docs_table_matches_the_enum() -> None:
    assert documented_codes() == [(c.value, c.name, c.reconnect) for c in Code]


def test_codes_are_websocket_application_close_codes() -> None:
    assert all(4000 <= c <= 4999 for c in Code)
