"""The files the broker serves as they are: the browser client and the msgpack library it imports.

The table is built once from the package's ``static/`` directory, so only
those files can be asked for (no path from a request ever reaches the file
system).
"""

from __future__ import annotations

from importlib import resources

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".mjs": "text/javascript; charset=utf-8", ".ts": "text/plain; charset=utf-8"}


def _collect() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    root = resources.files("broker").joinpath("static")
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        for entry in folder.iterdir():
            if entry.is_dir():
                stack.append((entry, f"{prefix}/{entry.name}"))
                continue
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            if suffix in _TYPES:
                files[f"{prefix}/{entry.name}"] = (entry.read_bytes(), _TYPES[suffix])
    return files


#: URL path -> (body, content type).
STATIC_FILES = _collect()
