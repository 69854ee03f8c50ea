"""The ``tokenfan`` command: ``serve``, ``token``, ``emit``, ``tail`` and ``chat``.

Every failure is reported on stderr as one line starting with ``tokenfan:``,
never as a traceback (argparse's own errors add the command's usage line).
Exit codes: 0 success, 1 runtime failure (broker unreachable, request refused,
stream ended), 2 usage or configuration error, 130 interrupted (Ctrl-C).

``tail`` waits for a broker that is not up yet: with reconnection on (the
default) a failed first connection is retried with backoff, with a notice
on stderr, instead of ending the command.
"""

from __future__ import annotations

import argparse
import gc
import http
import http.client
import importlib.metadata
import json
import logging
import os
import random
import signal
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import trio
import trio_websocket
import wsproto.utilities

from broker.admission import raise_descriptor_limit
from broker.ai.sessions import CHANNEL_PREFIX
from broker.auth import Authenticator
from broker.client import (
    Client,
    ClientError,
    CommandError,
    Event,
    ServerClosed,
    State,
    StreamLost,
    Subscribed,
    connect,
)
from broker.config import ConfigError, load_config, parse_duration
from broker.groups import first_leaf
from broker.server import Broker
from protocol import Position, channel_problem, event_problem

DEFAULT_HTTP_URL = "http://127.0.0.1:8765"
DEFAULT_WS_URL = "ws://127.0.0.1:8765/ws"
#: The broker ``emit``, ``tail`` and ``chat`` talk to when ``--url`` is not given (either form).
URL_ENV = "TOKENFAN_URL"
#: The credential client commands send to a broker with ``[auth]``: an API key or a user token.
TOKEN_ENV = "TOKENFAN_TOKEN"


def _with_token(ws_url: str, token: str | None) -> str:
    """``ws_url`` carrying ``token`` as ``?token=`` (how a WebSocket client authenticates at once)."""
    if not token:
        return ws_url
    separator = "&" if "?" in ws_url else "?"
    return f"{ws_url}{separator}{urllib.parse.urlencode({'token': token})}"


def _auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}

EXIT_OK = 0
EXIT_FAILED = 1  #: a runtime failure: unreachable, refused, the stream ended
EXIT_USAGE = 2  #: bad arguments or configuration (argparse uses 2 as well)
EXIT_INTERRUPTED = 130  #: Ctrl-C, as shells report SIGINT

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    runtime failure: broker unreachable, request refused, stream ended
  2    usage or configuration error (an invalid channel or event name included)
  130  interrupted (Ctrl-C)"""

#: Backoff between connection attempts (first wait, longest wait), as the client's reconnects.
BACKOFF = (0.1, 5.0)


class UsageError(Exception):
    """An argument argparse let through is unusable; the message says which (exit code 2)."""


class Failed(Exception):
    """The command cannot go on; the message is the line to print (exit code 1)."""


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _version() -> str:
    try:
        return importlib.metadata.version("tokenfan")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def _http_base(url: str) -> str:
    """Accept ``http://host:port``, ``ws://host:port/ws`` and friends; return the HTTP base URL.

    Raises:
        UsageError: ``url`` is not an http(s) or ws(s) URL with a host.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--url must look like {DEFAULT_HTTP_URL}, got {url!r}")
    return f"{scheme}://{parts.netloc}"


def _ws_url(url: str) -> str:
    """Accept ``ws://host:port/ws`` or ``http://host:port``; return the WebSocket URL.

    Raises:
        UsageError: ``url`` is not an http or ws URL with a host (the client speaks no TLS).
    """
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme == "wss":
        raise UsageError(f"--url {url!r}: TLS (wss://, https://) is not supported; "
                         "reach the broker with ws:// or http://")
    if scheme != "ws" or not parts.netloc:
        raise UsageError(f"--url must look like {DEFAULT_WS_URL}, got {url!r}")
    return f"{scheme}://{parts.netloc}{parts.path if parts.path not in ('', '/') else '/ws'}"


# -- saying what went wrong ---------------------------------------------------------


def _status(code: int) -> str:
    try:
        return f"{code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def _refusal(url: str, code: int, body: bytes | None) -> str:
    """An HTTP error answer in one line: the broker's ``error`` text, or that ``url`` is no broker."""
    try:
        answer = json.loads(body or b"")
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return f"{_status(code)}: {answer['error']}"
    return f"{url} is not a tokenfan broker (it answered {_status(code)})"


def _reason(exc: BaseException) -> str:
    """Why a connection attempt failed, in a few words (``Connection refused``, ``timed out``)."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, (trio.TooSlowError, TimeoutError, httpx.TimeoutException)):
        return "timed out"
    if isinstance(exc, OSError) and isinstance(exc.__cause__, BaseExceptionGroup):
        # trio.open_tcp_stream says "all attempts to connect to h:p failed", from the real errors.
        exc = first_leaf(exc.__cause__)
    if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


#: What a broken connection or exchange raises inside ``tail`` and ``chat``.
_FAILURES: tuple[type[Exception], ...] = (
    Failed, ClientError, trio_websocket.HandshakeError, wsproto.utilities.LocalProtocolError,
    OSError, trio.TooSlowError, trio.BrokenResourceError, httpx.HTTPError,
)


def _describe(exc: BaseException, url: str) -> str:
    """One of :data:`_FAILURES` as the line to print after ``tokenfan: ``."""
    if isinstance(exc, (Failed, ClientError)):
        return str(exc)
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return _refusal(url, exc.status_code, exc.body)
    if isinstance(exc, (trio_websocket.HandshakeError, wsproto.utilities.LocalProtocolError)):
        return f"{url} is not a tokenfan broker (no valid WebSocket handshake: {type(exc).__name__})"
    return f"cannot reach {url}: {_reason(exc)}"


def _run(async_fn: Callable[..., Awaitable[int]], *args: object, url: str) -> int:
    """``trio.run(async_fn, *args)``; report a failure in one line and return the exit code.

    The nurseries inside wrap failures in exception groups; any of them is
    reported by its first leaf (the exit code is the same whichever it is).
    Exceptions that are not :data:`_FAILURES` are bugs and keep their traceback.
    """
    code = EXIT_FAILED
    failure: str | None = None
    try:
        code = trio.run(async_fn, *args)
    except* KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except* _FAILURES as group:
        failure = _describe(first_leaf(group), url)
    if failure is not None and code != EXIT_INTERRUPTED:
        _note(f"tokenfan: {failure}")
    return code


# -- serve -----------------------------------------------------------------------


#: CPython's collector thresholds for ``tokenfan serve``: the youngest generation collected every
#: 10,000 allocations instead of 700, and a full collection a tenth as often (see _tune_gc).
GC_THRESHOLDS = (10_000, 10, 100)


def _tune_gc() -> None:
    """Make full collections rare, and skip what was loaded at start.

    A full collection walks every tracked object: with a thousand connections it took 91 ms,
    during which no token went anywhere (the honest p99 under a publication flood went from
    30 to 280 ms on one such pause). The broker makes little cyclic garbage, so collecting it
    less often costs little memory; what start-up loaded (modules, the demo corpus) is moved
    out of the collector's sight for good (``gc.freeze``).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _serve(broker: Broker) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve)
            _tune_gc()
            print(f"tokenfan listening on http://{broker.config.host}:{broker.port}", flush=True)
            async for _ in signals:
                print("tokenfan shutting down", file=sys.stderr, flush=True)
                broker.shutdown()
                break


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, overrides={"host": args.host, "port": args.port,
                                                     "engine": args.engine,
                                                     "allow_insecure": True if args.insecure else None})
        problem = config.insecure_bind_problem()
        if problem is not None:
            raise ConfigError(problem)
        Authenticator(config.auth)  # a key file that cannot be read or parsed is named now
    except ConfigError as exc:
        _note(f"tokenfan: configuration error: {exc}")
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    before, after = raise_descriptor_limit()
    if after != before:
        logging.getLogger("tokenfan").info("open files limit raised from %d to %d (the hard limit)",
                                           before, after)
    failure: OSError | None = None
    unreachable: ConfigError | None = None
    try:
        trio.run(_serve, Broker(config))
    except* OSError as group:  # raised by the listener inside the broker's nursery
        failure = first_leaf(group)
    except* ConfigError as group:  # the engine's Redis cannot be reached
        unreachable = first_leaf(group)
    if unreachable is not None:
        _note(f"tokenfan: {unreachable}")
        return EXIT_FAILED
    if failure is not None:
        _note(f"tokenfan: cannot listen on {config.host}:{config.port}: {failure.strerror or failure}")
        return EXIT_FAILED
    return EXIT_OK


# -- token -----------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    """Mint a user token with the configured ``jwt_secret`` and print it."""
    try:
        config = load_config(args.config)
        token, _exp = Authenticator(config.auth).mint(
            user=args.sub, ttl=parse_duration(args.ttl, "--ttl"), channels=args.channels or [],
            publish=args.publish or [], ai=args.ai or [])
    except ConfigError as exc:
        _note(f"tokenfan: {exc}")
        return EXIT_USAGE
    print(token)
    return EXIT_OK


# -- emit ------------------------------------------------------------------------


def cmd_emit(args: argparse.Namespace) -> int:
    problem = channel_problem(args.channel) or event_problem(args.event)
    if problem is not None:
        raise UsageError(problem)
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise UsageError(f"DATA is not valid JSON: {exc}") from None
    base = _http_base(args.url)
    body = json.dumps({"channel": args.channel, "event": args.event, "data": data}).encode()
    request = urllib.request.Request(f"{base}/api/emit", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **_auth_headers(args.token)})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            print(response.read().decode())
    except urllib.error.HTTPError as exc:
        _note(f"tokenfan: {_refusal(base, exc.code, exc.read())}")
        return EXIT_FAILED
    except http.client.HTTPException as exc:
        _note(f"tokenfan: {base} is not a tokenfan broker (no valid HTTP answer: {type(exc).__name__})")
        return EXIT_FAILED
    except (urllib.error.URLError, OSError) as exc:
        _note(f"tokenfan: cannot reach {base}: {_reason(exc)}")
        return EXIT_FAILED
    return EXIT_OK


# -- tail ------------------------------------------------------------------------


class _TailOutput:
    """What ``tail`` prints: events on stdout, notices on stderr; repeated notices only once."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._midline = False  # stdout ends with tokens and no newline
        self._last_notice: str | None = None

    def event(self, event: Event) -> None:
        if self.as_json:
            frame: dict[str, Any] = {"t": "ev", "ch": event.channel, "ev": event.event, "d": event.data,
                                     "o": event.offset}
            if event.first_offset != event.offset:
                frame["o0"] = event.first_offset
            print(json.dumps(frame, ensure_ascii=False, default=_json_default), flush=True)
        elif event.event == "ai:token" and isinstance(event.data, dict) \
                and isinstance(event.data.get("token"), str):
            sys.stdout.write(event.data["token"])
            sys.stdout.flush()
            self._midline = True
        else:
            self.end_line()
            print(f"[{event.event}] {json.dumps(event.data, ensure_ascii=False, default=_json_default)}",
                  flush=True)

    def end_line(self) -> None:
        """End a line of tokens, so that what follows starts a line of its own."""
        if self._midline:
            print(flush=True)
            self._midline = False

    def notice(self, message: str) -> None:
        """Print ``message`` to stderr unless it is the same as the last notice."""
        if message != self._last_notice:
            _note(message)
        self._last_notice = message

    def on_state(self, state: State, why: ServerClosed | None) -> None:
        if state == "reconnecting":
            self.notice(f"tokenfan: {why}; reconnecting")
        elif state == "open":
            self._last_notice = None

    def on_subscribed(self, status: Subscribed) -> None:
        verb = "resubscribed" if status.resubscribed else "subscribed"
        recovery = ""
        if status.resubscribed or status.recovered:
            recovery = (", everything missed follows" if status.recovered
                        else ", NOT recovered: events were missed")
        self.notice(f"{verb} to {status.channel} after offset {status.offset} (epoch {status.epoch})"
                    f"{recovery}")


def _retry_delay(attempt: int) -> float:
    low, high = BACKOFF
    return min(high, low * 2.0 ** attempt) * random.uniform(0.5, 1.0)


async def _follow(client: Client, channel: str, since: Position | None, out: _TailOutput) -> int:
    """Subscribe to ``channel`` and print its events until the client stops for good.

    Raises:
        Failed: the broker refused the subscription.
        ServerClosed: the connection ended and will not be reopened.
    """
    sub = client.channel(channel).on_subscribed(out.on_subscribed)
    try:
        await sub.subscribe(since=since)
    except CommandError as exc:
        raise Failed(f"cannot subscribe to {channel}: {exc}") from None
    while True:
        try:
            async for event in sub:
                out.event(event)
            return EXIT_OK
        except StreamLost as lost:
            out.end_line()
            out.notice(f"tokenfan: {lost}")


async def _tail(url: str, channel: str, since: Position | None, reconnect: bool, out: _TailOutput) -> int:
    """Print ``channel``'s events until the stream ends for good; return the exit code.

    With ``reconnect``, a broker that cannot be reached yet is waited for:
    connection attempts repeat with backoff (stderr says so, once per
    distinct reason) until one succeeds; after that the client reconnects by
    itself. A server that answers but is not a broker ends the tail at once.

    Raises:
        Failed, ServerClosed, OSError, trio.TooSlowError, trio_websocket.HandshakeError:
            as for :func:`_follow` and :func:`broker.client.connect` (for
            ``connect``, only without ``reconnect``).
    """
    attempt = 0
    try:
        while True:
            connected = False
            unreachable: BaseException | None = None
            try:
                async with connect(url, reconnect=reconnect, backoff=BACKOFF,
                                   on_state=out.on_state) as client:
                    connected = True
                    return await _follow(client, channel, since, out)
            except* (OSError, trio.TooSlowError) as group:
                if connected or not reconnect:
                    raise
                unreachable = first_leaf(group)
            assert unreachable is not None  # the body returned, or the except* clause raised
            out.notice(f"tokenfan: cannot reach {url}: {_reason(unreachable)}; "
                       "waiting for the broker (retrying with backoff)")
            await trio.sleep(_retry_delay(attempt))
            attempt += 1
    finally:
        out.end_line()


def cmd_tail(args: argparse.Namespace) -> int:
    if args.epoch is not None and args.since is None:
        raise UsageError("--epoch needs --since")
    problem = channel_problem(args.channel)
    if problem is not None:
        raise UsageError(problem)
    since = None if args.since is None else Position(o=args.since, ep=args.epoch)
    url = _ws_url(args.url)
    return _run(_tail, _with_token(url, args.token), args.channel, since, not args.no_reconnect,
                _TailOutput(args.json), url=url)


def _offset(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"an offset is a whole number ≥ 0, not {text!r}")
    return int(text)


# -- chat ------------------------------------------------------------------------


async def _chat(base: str, ws_url: str, message: str, session: str, provider: str | None,
                model: str | None, token: str | None) -> int:
    """Watch ``ai-chat/{session}``, ask, print the answer as it streams; return the exit code.

    Ctrl-C asks the broker to cancel the answer (``POST /ai/cancel``); the
    stream then ends with ``ai:done`` reason ``cancelled`` (exit code 130).

    Raises:
        Failed: the broker refused the request, or the answer ended in ``ai:error``.
    """
    channel = f"{CHANNEL_PREFIX}{session}"
    payload = {"message": message, "sessionId": session, "wait": False,
               **({"provider": provider} if provider else {}), **({"model": model} if model else {})}
    async with (connect(_with_token(ws_url, token)) as client,
                httpx.AsyncClient(base_url=base, timeout=10, headers=_auth_headers(token)) as http):
        try:
            sub = await client.subscribe(channel)  # listening before asking: no token is missed
        except CommandError as exc:
            raise Failed(f"cannot subscribe to {channel}: {exc}") from None
        reply = await http.post("/ai/chat", json=payload)
        if reply.status_code != 202:
            raise Failed(_refusal(base, reply.status_code, reply.content))
        _note(f"session {session}: also watch it with tokenfan tail --since 0 {channel}")
        with trio.open_signal_receiver(signal.SIGINT) as interrupts:
            async with trio.open_nursery() as nursery:

                async def cancel_on_interrupt() -> None:
                    async for _ in interrupts:
                        await http.post("/ai/cancel", json={"sessionId": session})
                        return

                nursery.start_soon(cancel_on_interrupt)
                async for event in sub:
                    if event.event == "ai:token":
                        sys.stdout.write(event.data["token"])
                        sys.stdout.flush()
                    elif event.event == "ai:done":
                        print(flush=True)
                        nursery.cancel_scope.cancel()
                        return _chat_ended(str(event.data.get("reason")))
                    elif event.event == "ai:error":
                        print(flush=True)
                        raise Failed(f"{event.data.get('code')}: {event.data.get('message')}")
    raise Failed("the connection ended before the answer did")


def _chat_ended(reason: str) -> int:
    if reason == "cancelled":
        _note("tokenfan: cancelled")
        return EXIT_INTERRUPTED
    if reason != "stop":
        _note(f"tokenfan: the answer ended: {reason}")
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    session = args.session or uuid.uuid4().hex[:12]
    problem = channel_problem(CHANNEL_PREFIX + session)
    if problem is not None:
        raise UsageError(f"--session {session!r} makes a bad channel name: {problem}")
    base = _http_base(args.url)
    return _run(_chat, base, _ws_url(base), args.message, session, args.provider, args.model, args.token,
                url=base)


# -- entry point -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfan", description="Stream LLM tokens to many watchers.",
                                     epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tokenfan {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on; 0 picks a free one (default 8765)")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--engine", metavar="URL",
                       help="where channel streams live: memory (default) or redis://HOST:PORT/DB, "
                            "shared by every broker on it (docs/scaling.md)")
    serve.add_argument("--insecure", action="store_true",
                       help="serve on a non-loopback address without [auth] (allow_insecure = true): "
                            "anyone who reaches the port may do anything")
    serve.set_defaults(func=cmd_serve, parser=serve)

    token = commands.add_parser(
        "token", help="mint a user token (HS256, with jwt_secret from --config or $TOKENFAN_JWT_SECRET)")
    token.add_argument("--sub", required=True, help="the user id")
    token.add_argument("--channels", action="append", metavar="GLOB",
                       help="channels the user may subscribe to and read (repeatable), e.g. 'ai-chat/*'")
    token.add_argument("--publish", action="append", metavar="GLOB",
                       help="channels the user may pub to (repeatable; client_events still apply)")
    token.add_argument("--ai", action="append", metavar="GLOB",
                       help="AI session ids the user may start and cancel answers in (repeatable)")
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 90s, 15m, 1h (default 1h)")
    token.add_argument("--config", help="TOML configuration file holding [auth] jwt_secret")
    token.set_defaults(func=cmd_token, parser=token)

    emit = commands.add_parser("emit", help="publish one event through the HTTP API")
    emit.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                       help=f"API key or user token for a broker with [auth] (default ${TOKEN_ENV})")
    emit.add_argument("--url", default=os.environ.get(URL_ENV) or DEFAULT_HTTP_URL,
                       help=f"broker URL (default ${URL_ENV} or {DEFAULT_HTTP_URL})")
    emit.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    emit.add_argument("channel")
    emit.add_argument("event")
    emit.add_argument("data", help="event data as JSON, e.g. '{\"token\": \"hi\"}'")
    emit.set_defaults(func=cmd_emit, parser=emit)

    tail = commands.add_parser("tail", help="print a channel's events as they arrive")
    tail.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                       help=f"API key or user token for a broker with [auth] (default ${TOKEN_ENV})")
    tail.add_argument("--url", default=os.environ.get(URL_ENV) or DEFAULT_WS_URL,
                       help=f"broker URL (default ${URL_ENV} or {DEFAULT_WS_URL})")
    tail.add_argument("--json", action="store_true", help="print one JSON frame per line")
    tail.add_argument("--since", type=_offset, metavar="O",
                      help="start after offset O: with --epoch, recover exactly from there; "
                           "without, whatever history holds after O (0: the stream so far)")
    tail.add_argument("--epoch", metavar="E", help="the epoch --since refers to")
    tail.add_argument("--no-reconnect", action="store_true",
                      help="exit when the first connection fails or the connection ends, instead of "
                           "waiting for the broker, reconnecting and recovering")
    tail.add_argument("channel")
    tail.set_defaults(func=cmd_tail, parser=tail)

    chat = commands.add_parser("chat", help="ask the broker's AI path and print the answer as it streams")
    chat.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                       help=f"API key or user token for a broker with [auth] (default ${TOKEN_ENV})")
    chat.add_argument("--url", default=os.environ.get(URL_ENV) or DEFAULT_HTTP_URL,
                       help=f"broker URL (default ${URL_ENV} or {DEFAULT_HTTP_URL})")
    chat.add_argument("--session", help="session id: the answer streams to ai-chat/SESSION (default: new)")
    chat.add_argument("--provider", help="token source (default: the broker's ai_provider)")
    chat.add_argument("--model", help="model (default: the provider's)")
    chat.add_argument("message")
    chat.set_defaults(func=cmd_chat, parser=chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``tokenfan`` command; return its exit code (see the module docstring)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(arguments)
    if unknown:
        # argparse hands a command's unrecognised arguments up to the top level, which would
        # show the top level's usage: let the command's own parser report them first.
        command: argparse.ArgumentParser = args.parser
        command.parse_args(arguments[arguments.index(args.command) + 1:])
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        result: int = args.func(args)
    except UsageError as exc:
        _note(f"tokenfan: {exc}")
        return EXIT_USAGE
    return result


if __name__ == "__main__":
    sys.exit(main())
