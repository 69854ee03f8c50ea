"""The ``tokenfan`` command: ``serve``, ``emit`` and ``tail``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import trio

from broker.client import ClientError, Event, ServerClosed, State, StreamLost, Subscribed, connect
from broker.config import ConfigError, load_config
from broker.groups import first_leaf
from broker.server import Broker
from protocol import Position

DEFAULT_HTTP_URL = "http://127.0.0.1:8765"
DEFAULT_WS_URL = "ws://127.0.0.1:8765/ws"


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def _http_base(url: str) -> str:
    """Accept ``http://host:port``, ``ws://host:port/ws`` and friends; return the HTTP base URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise SystemExit(f"tokenfan: --url must look like {DEFAULT_HTTP_URL}, got {url!r}")
    return f"{scheme}://{parts.netloc}"


def _ws_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise SystemExit(f"tokenfan: --url must look like {DEFAULT_WS_URL}, got {url!r}")
    return f"{scheme}://{parts.netloc}{parts.path if parts.path not in ('', '/') else '/ws'}"


# -- serve -----------------------------------------------------------------------


async def _serve(broker: Broker) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve)
            print(f"tokenfan listening on http://{broker.config.host}:{broker.port}", flush=True)
            async for _ in signals:
                print("tokenfan shutting down", file=sys.stderr, flush=True)
                broker.shutdown()
                break


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, overrides={"host": args.host, "port": args.port})
    except ConfigError as exc:
        print(f"tokenfan: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    failure: OSError | None = None
    try:
        trio.run(_serve, Broker(config))
    except* OSError as group:  # raised by the listener inside the broker's nursery
        failure = first_leaf(group)
    if failure is not None:
        print(f"tokenfan: cannot listen on {config.host}:{config.port}: {failure.strerror or failure}",
              file=sys.stderr)
        return 1
    return 0


# -- emit ------------------------------------------------------------------------


def cmd_emit(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        print(f"tokenfan: DATA is not valid JSON: {exc}", file=sys.stderr)
        return 2
    body = json.dumps({"channel": args.channel, "event": args.event, "data": data}).encode()
    request = urllib.request.Request(f"{_http_base(args.url)}/api/emit", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            print(response.read().decode())
    except urllib.error.HTTPError as exc:
        print(f"tokenfan: {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"tokenfan: cannot reach {args.url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    return 0


# -- tail ------------------------------------------------------------------------


def _print_event(event: Event, as_json: bool) -> None:
    if as_json:
        frame: dict[str, Any] = {"t": "ev", "ch": event.channel, "ev": event.event, "d": event.data,
                                 "o": event.offset}
        if event.first_offset != event.offset:
            frame["o0"] = event.first_offset
        print(json.dumps(frame, ensure_ascii=False, default=_json_default), flush=True)
    elif event.event == "ai:token" and isinstance(event.data, dict) \
            and isinstance(event.data.get("token"), str):
        sys.stdout.write(event.data["token"])
        sys.stdout.flush()
    elif event.event in ("ai:done", "ai:error"):
        print(f"\n[{event.event}] {json.dumps(event.data, default=_json_default)}", flush=True)
    else:
        print(f"[{event.event}] {json.dumps(event.data, ensure_ascii=False, default=_json_default)}",
              flush=True)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _on_state(state: State, why: ServerClosed | None) -> None:
    if state == "reconnecting":
        _note(f"tokenfan: {why}; reconnecting")


def _on_subscribed(status: Subscribed) -> None:
    verb = "resubscribed" if status.resubscribed else "subscribed"
    recovery = ""
    if status.resubscribed or status.recovered:
        recovery = (", everything missed follows" if status.recovered
                    else ", NOT recovered: events were missed")
    _note(f"{verb} to {status.channel} after offset {status.offset} (epoch {status.epoch}){recovery}")


async def _tail(url: str, channel: str, as_json: bool, since: Position | None, reconnect: bool) -> None:
    async with connect(url, reconnect=reconnect, on_state=_on_state) as client:
        sub = client.channel(channel).on_subscribed(_on_subscribed)
        await sub.subscribe(since=since)
        while True:
            try:
                async for event in sub:
                    _print_event(event, as_json)
                return
            except StreamLost as lost:
                _note(f"tokenfan: {lost}")


def cmd_tail(args: argparse.Namespace) -> int:
    if args.epoch is not None and args.since is None:
        print("tokenfan: --epoch needs --since", file=sys.stderr)
        return 2
    since = None if args.since is None else Position(o=args.since, ep=args.epoch)
    try:
        trio.run(_tail, _ws_url(args.url), args.channel, args.json, since, not args.no_reconnect)
    except KeyboardInterrupt:
        return 130
    except ClientError as exc:
        print(f"\ntokenfan: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tokenfan: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _offset(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"an offset is a whole number ≥ 0, not {text!r}")
    return int(text)


# -- chat ------------------------------------------------------------------------


class ChatFailed(Exception):
    """The answer ended in ai:error, or the broker refused the request."""


async def _chat(base: str, message: str, session: str, provider: str | None, model: str | None) -> str:
    """Watch ``ai-chat/{session}``, ask, print the answer as it streams; return ai:done's reason.

    Ctrl-C asks the broker to cancel the answer (``POST /ai/cancel``); the
    stream then ends with ``ai:done`` reason ``cancelled``.
    """
    channel = f"ai-chat/{session}"
    payload = {"message": message, "sessionId": session, "wait": False,
               **({"provider": provider} if provider else {}), **({"model": model} if model else {})}
    async with connect(_ws_url(base)) as client, httpx.AsyncClient(base_url=base, timeout=10) as http:
        sub = await client.subscribe(channel)  # listening before asking: no token is missed
        reply = await http.post("/ai/chat", json=payload)
        if reply.status_code != 202:
            raise ChatFailed(f"{reply.status_code}: {reply.json().get('error', reply.text)}")
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
                        return str(event.data.get("reason"))
                    elif event.event == "ai:error":
                        print(flush=True)
                        raise ChatFailed(f"{event.data.get('code')}: {event.data.get('message')}")
    raise ChatFailed("the connection ended before the answer did")


def cmd_chat(args: argparse.Namespace) -> int:
    session = args.session or uuid.uuid4().hex[:12]
    _note(f"session {session}: also watch it with  tokenfan tail --since 0 ai-chat/{session}")
    failure: Exception | None = None
    reason = ""
    try:
        reason = trio.run(_chat, _http_base(args.url), args.message, session, args.provider, args.model)
    except* ChatFailed as group:
        failure = first_leaf(group)
    except* (ClientError, httpx.HTTPError, OSError) as errors:
        failure = ConnectionError(f"cannot chat through {args.url}: {first_leaf(errors)}")
    if failure is not None:
        _note(f"tokenfan: {failure}")
        return 1
    if reason == "cancelled":
        _note("tokenfan: cancelled")
        return 130
    if reason != "stop":
        _note(f"tokenfan: the answer ended: {reason}")
    return 0


# -- entry point -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfan", description="Stream LLM tokens to many watchers.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on; 0 picks a free one (default 8765)")
    serve.add_argument("--config", help="TOML configuration file")
    serve.set_defaults(func=cmd_serve)

    emit = commands.add_parser("emit", help="publish one event through the HTTP API")
    emit.add_argument("--url", default=DEFAULT_HTTP_URL, help=f"broker URL (default {DEFAULT_HTTP_URL})")
    emit.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    emit.add_argument("channel")
    emit.add_argument("event")
    emit.add_argument("data", help="event data as JSON, e.g. '{\"token\": \"hi\"}'")
    emit.set_defaults(func=cmd_emit)

    tail = commands.add_parser("tail", help="print a channel's events as they arrive")
    tail.add_argument("--url", default=DEFAULT_WS_URL, help=f"broker URL (default {DEFAULT_WS_URL})")
    tail.add_argument("--json", action="store_true", help="print one JSON frame per line")
    tail.add_argument("--since", type=_offset, metavar="O",
                      help="start after offset O: with --epoch, recover exactly from there; "
                           "without, whatever history holds after O (0: the stream so far)")
    tail.add_argument("--epoch", metavar="E", help="the epoch --since refers to")
    tail.add_argument("--no-reconnect", action="store_true",
                      help="exit when the connection ends instead of reconnecting and recovering")
    tail.add_argument("channel")
    tail.set_defaults(func=cmd_tail)

    chat = commands.add_parser("chat", help="ask the broker's AI path and print the answer as it streams")
    chat.add_argument("--url", default=DEFAULT_HTTP_URL, help=f"broker URL (default {DEFAULT_HTTP_URL})")
    chat.add_argument("--session", help="session id: the answer streams to ai-chat/SESSION (default: new)")
    chat.add_argument("--provider", help="token source (default: the broker's ai_provider)")
    chat.add_argument("--model", help="model (default: the provider's)")
    chat.add_argument("message")
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
