"""Cross-origin access for browsers: which pages may call the broker's HTTP API.

A page on another origin (an app at ``http://localhost:3000`` using the broker at
``http://127.0.0.1:8765``) can read the broker's answers only if they carry
``Access-Control-Allow-Origin``, and sends a preflight ``OPTIONS`` before any
``POST`` with a JSON body. The rules here:

- The browser client and the files it imports are public code: served to any
  origin (``Access-Control-Allow-Origin: *``), so ``import { Realtime } from
  'http://broker:8765/tokenfan.js'`` works from any page.
- The API (emit, history, ``/ai/*``, health) answers an allowed origin only:
  those listed in ``[auth] allowed_origins`` (``*`` for any). While that list is
  empty, the allowed origins are the loopback ones on any port
  (``http://localhost:3000``, ``http://127.0.0.1:5173``, ``http://[::1]:8000``,
  http or https), which is what a developer running ``make run`` beside an app
  needs, and never a page from elsewhere, which could otherwise make a
  visitor's browser emit into a broker on their machine.

Requests without an ``Origin`` header (curl, servers, same-origin GETs) are not
affected: CORS is the browser's rule, and these headers only relax it.
"""

from __future__ import annotations

import urllib.parse

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: Request headers a page may send to the API (the preflight's allow-list).
_ALLOWED_HEADERS = frozenset({"content-type", "authorization"})
#: How long a browser may cache a preflight's answer, in seconds.
_PREFLIGHT_MAX_AGE = "600"


def origin_allowed(origin: str, allowed: tuple[str, ...] = ()) -> bool:
    """Whether a page from ``origin`` may use the API: one of ``allowed`` (``*``: any), or while
    that is empty, a loopback origin on any port."""
    if len(origin) > 200:
        return False
    if allowed:
        return "*" in allowed or origin.lower() in allowed
    try:
        parts = urllib.parse.urlsplit(origin)
        port_ok = parts.port is None or parts.port > 0  # .port raises on a bad or out-of-range port
    except ValueError:
        return False
    return (port_ok and parts.scheme in ("http", "https") and parts.hostname in _LOOPBACK_HOSTS
            and not parts.path and not parts.query and not parts.fragment
            and parts.username is None and parts.password is None)


def same_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` is the broker's own (the page was served by it, e.g. the demo chat)."""
    if host is None:
        return False
    try:
        parts = urllib.parse.urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


def response_headers(origin: str | None, *, public: bool,
                     allowed: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    """The CORS headers for an answer to a request from ``origin`` (None: no Origin header).

    ``public`` resources (the client's files) go to anyone; the rest to allowed origins.
    """
    if public:
        return (("Access-Control-Allow-Origin", "*"),)
    if origin is not None and origin_allowed(origin, allowed):
        return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
    return ()


class PreflightRefused(ValueError):
    """A preflight asks for something the broker does not allow; the message says what."""


def preflight_headers(origin: str | None, method: str | None, headers: str | None,
                      allowed_methods: tuple[str, ...], *, public: bool,
                      allowed: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    """The headers of a ``204`` answer to a preflight, or :class:`PreflightRefused` naming the problem.

    Args:
        origin, method, headers: the request's ``Origin``, ``Access-Control-Request-Method``
            and ``Access-Control-Request-Headers``.
        allowed_methods: what the path accepts.
    """
    if origin is None or method is None:
        raise PreflightRefused("a preflight OPTIONS request needs Origin and Access-Control-Request-Method")
    if not public and not origin_allowed(origin, allowed):
        listed = ", ".join(allowed) if allowed else "loopback origins such as http://localhost:3000"
        raise PreflightRefused(f"origin {origin[:200]!r} may not use this broker's API "
                               f"(allowed: {listed[:300]}; see allowed_origins)")
    if method not in allowed_methods:
        raise PreflightRefused(f"this path accepts {', '.join(allowed_methods)}, not {method[:40]!r}")
    asked = {name.strip().lower() for name in (headers or "").split(",") if name.strip()}
    refused = asked - _ALLOWED_HEADERS
    if refused:
        raise PreflightRefused(f"request header(s) {', '.join(sorted(refused))[:200]} are not allowed; "
                               f"allowed: {', '.join(sorted(_ALLOWED_HEADERS))}")
    return (*response_headers(origin, public=public, allowed=allowed),
            ("Access-Control-Allow-Methods", ", ".join(allowed_methods)),
            ("Access-Control-Allow-Headers", ", ".join(sorted(_ALLOWED_HEADERS))),
            ("Access-Control-Max-Age", _PREFLIGHT_MAX_AGE))
