"""Where a bench command's results go: one JSON line each on standard output, and appended to
the ``--json FILE`` it was given."""

from __future__ import annotations

import json
from typing import Any


def report(result: dict[str, Any], json_path: str | None) -> None:
    """Print ``result`` as one JSON line (flushed), and append it to ``json_path`` if given."""
    line = json.dumps(result)
    print(line, flush=True)
    if json_path:
        with open(json_path, "a") as out:
            out.write(line + "\n")
