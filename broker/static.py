"""The files the broker serves as they are: the browser client, the msgpack library it imports, the
demo chat and its icon.

The table is built once from the package's ``static/`` directory, so only
those files can be asked for (no path from a request ever reaches the file
system). A few files are also served under a second path that browsers ask
for by convention: ``/favicon.ico`` is the SVG icon (browsers sniff the type).
"""

from __future__ import annotations

from importlib import resources

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".mjs": "text/javascript; charset=utf-8", ".ts": "text/plain; charset=utf-8",
          ".svg": "image/svg+xml"}

#: Second URL paths for files of the table: alias -> path.
_ALIASES = {"/favicon.ico": "/favicon.svg"}


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
    for alias, path in _ALIASES.items():
        files[alias] = files[path]
    return files


#: URL path -> (body, content type).
STATIC_FILES = _collect()
