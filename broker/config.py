"""Broker configuration: defaults, a TOML file, ``TOKENFAN_*`` environment variables, CLI flags.

Later sources override earlier ones in that order. Every value is validated
when the :class:`Config` is built; a bad one raises :class:`ConfigError` whose
message names the option, the source it came from and what is wrong.
``docs/configuration.md`` lists every option; a test checks the two agree.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.redis.resp import RedisAddress
from protocol.limits import NAME_PATTERN


class ConfigError(ValueError):
    """A configuration value is missing, ill-typed or out of range."""


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(value: object, name: str) -> int:
    """Parse a byte size: an integer, or a string such as ``"64KiB"`` or ``"1 MiB"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*",
                                                           value)):
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ConfigError(f"{name}: expected a size such as 1048576 or \"1MiB\", got {value!r}")
    if unit not in _SIZE_UNITS:
        raise ConfigError(f"{name}: unknown size unit {unit!r} (use B, KiB, MiB, GiB, KB, MB, GB)")
    return int(number * _SIZE_UNITS[unit])


def parse_duration(value: object, name: str) -> float:
    """Parse a duration in seconds: a number, or a string such as ``"250ms"``, ``"10s"``, ``"1h"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*",
                                                         value)):
        unit = match.group(2).lower()
        if unit in _DURATION_UNITS:
            return float(match.group(1)) * _DURATION_UNITS[unit]
    raise ConfigError(f"{name}: expected a duration such as 10, \"250ms\", \"30s\" or \"1h\", "
                      f"got {value!r}")


def _parse_bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _parse_int(value: object, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ConfigError(f"{name}: expected an integer, got {value!r}")


def _parse_float(value: object, name: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{name}: expected a number, got {value!r}")


def _parse_str(value: object, name: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{name}: expected a string, got {value!r}")


def _list_items(value: object, name: str, what: str) -> list[object]:
    """The items of a list option: a TOML list, or a comma-separated string (for the environment)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list):
        return value
    raise ConfigError(f"{name}: expected a list of {what}, got a {type(value).__name__}")


def _parse_host_list(value: object, name: str) -> tuple[str, ...]:
    """A list of host names."""
    items = _list_items(value, name, "host names")
    hosts = []
    for item in items:
        if not isinstance(item, str) or not _HOST_NAME.fullmatch(item):
            raise ConfigError(f"{name}: {item!r} is not a host name (e.g. \"chat.example.com\", "
                              "\"10.0.0.5\", \"[::1]\", \"*.example.com\" or \"*\")")
        hosts.append(item.lower())
    return tuple(hosts)


_HOST_NAME = re.compile(r"\*|(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]")


class SlowPolicy(enum.Enum):
    """What happens to a subscriber whose send buffer stays full after coalescing."""

    DISCONNECT = "disconnect"  #: ``bye`` SLOW_CONSUMER (reconnect: true); the client recovers from history
    DROP = "drop"  #: skip its queued publications of the channel and send a ``gap`` naming them


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelOptions:
    """Options for the channels whose names match a pattern (``[channels."ai-chat/*"]``).

    Attributes:
        client_events: events clients may publish with ``pub`` on these channels;
            ``("*",)`` allows any event, ``()`` none.
        history_size: publications kept for recovery (0: no history).
        history_ttl: seconds a publication stays in history.
        coalesce: event -> string field of its data that a slow reader's queued
            publications may be joined on (lossless coalescing).
        keep_events: events never dropped, even under the ``drop`` policy.
        slow_policy: what to do when coalescing does not make a reader's backlog fit.
    """

    client_events: tuple[str, ...] = ()
    history_size: int = 0
    history_ttl: float = 3600.0
    coalesce: Mapping[str, str] = field(default_factory=lambda: {"ai:token": "token"})
    keep_events: tuple[str, ...] = ("ai:start", "ai:done", "ai:error")
    slow_policy: SlowPolicy = SlowPolicy.DISCONNECT

    def allows_client_event(self, event: str) -> bool:
        return any(fnmatch.fnmatchcase(event, allowed) for allowed in self.client_events)

    @property
    def persist(self) -> bool:
        """Whether publications are kept in history unless an emit says otherwise."""
        return self.history_size > 0


_NO_OPTIONS = ChannelOptions()

#: Largest ``history_size`` of a channel.
MAX_HISTORY_SIZE = 1_000_000


def _event_list(raw: object, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(e, str) for e in raw):
        raise ConfigError(f"{where}: {key} must be a list of event names")
    for event in raw:
        if event != "*" and NAME_PATTERN.fullmatch(event.replace("*", "x")) is None:
            raise ConfigError(f"{where}: {key} has an invalid event name {event!r}")
    return tuple(raw)


def _parse_channel_options(pattern: str, raw: object, source: str, base: ChannelOptions) -> ChannelOptions:
    """Options for ``pattern`` from a TOML table; options not given keep ``base``'s values."""
    where = f'channels."{pattern}" ({source})'
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table of options")
    known = {f.name for f in dataclasses.fields(ChannelOptions)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(known))}")
    changes: dict[str, Any] = {}
    for key in ("client_events", "keep_events"):
        if key in raw:
            changes[key] = _event_list(raw[key], key, where)
    if "history_size" in raw:
        size = _parse_int(raw["history_size"], f"{where}: history_size")
        if not 0 <= size <= MAX_HISTORY_SIZE:
            raise ConfigError(f"{where}: history_size must be between 0 and {MAX_HISTORY_SIZE}, got {size}")
        changes["history_size"] = size
    if "history_ttl" in raw:
        ttl = parse_duration(raw["history_ttl"], f"{where}: history_ttl")
        if not ttl > 0:
            raise ConfigError(f"{where}: history_ttl must be a positive duration, got {ttl}")
        changes["history_ttl"] = ttl
    if "coalesce" in raw:
        table = raw["coalesce"]
        if not isinstance(table, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in table.items()):
            raise ConfigError(f'{where}: coalesce must be a table of event = "field", '
                              'e.g. { "ai:token" = "token" }')
        _event_list(list(table), "coalesce", where)
        changes["coalesce"] = dict(table)
    if "slow_policy" in raw:
        try:
            changes["slow_policy"] = SlowPolicy(raw["slow_policy"])
        except ValueError:
            raise ConfigError(f"{where}: slow_policy must be \"disconnect\" or \"drop\", "
                              f"got {raw['slow_policy']!r}") from None
    return dataclasses.replace(base, **changes)


#: Channel options of the embedded default: watchers of an AI chat may ask to
#: cancel it, and its stream is kept for an hour so late and reconnecting
#: watchers miss nothing.
DEFAULT_CHANNELS: Mapping[str, ChannelOptions] = {
    "ai-chat/*": ChannelOptions(client_events=("ai:cancel",), history_size=10_000, history_ttl=3600.0),
}


def _parse_secret_list(value: object, name: str, *, min_length: int, what: str) -> tuple[str, ...]:
    """A list of secrets (one alone may be a string)."""
    items = _list_items(value, name, f"{what}s")
    for index, item in enumerate(items):
        if not isinstance(item, str) or len(item.encode()) < min_length or "," in item:
            # Never echo a secret: say which one and what is wrong with it.
            raise ConfigError(f"{name}: {what} #{index + 1} must be a string of at least {min_length} "
                              "bytes without commas (e.g. from `python -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))'`)")
    return tuple(str(item) for item in items)


def _parse_jwt_secrets(value: object, name: str) -> tuple[str, ...]:
    return _parse_secret_list(value, name, min_length=32, what="secret")


def _parse_api_keys(value: object, name: str) -> tuple[str, ...]:
    return _parse_secret_list(value, name, min_length=16, what="key")


_ORIGIN = re.compile(r"\*|https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


def _parse_origins(value: object, name: str) -> tuple[str, ...]:
    """Origins (``https://app.example.com``, ``http://127.0.0.1:3000``) or ``*``."""
    items = _list_items(value, name, "origins")
    for item in items:
        if not isinstance(item, str) or not _ORIGIN.fullmatch(item):
            raise ConfigError(f"{name}: {item!r} is not an origin (scheme://host[:port], no path, "
                              "e.g. \"https://app.example.com\"), or \"*\"")
    return tuple(str(item).lower() for item in items)


def _parse_networks(value: object, name: str) -> tuple[str, ...]:
    """CIDRs (``10.0.0.0/8``, ``::1/128``) or single addresses."""
    items = _list_items(value, name, "networks")
    for item in items:
        try:
            ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an address or a network "
                              "(e.g. \"10.0.0.0/8\", \"127.0.0.1\", \"::1/128\")") from None
    return tuple(str(ipaddress.ip_network(str(item), strict=False)) for item in items)


def _parse_auto_bool(value: object, name: str) -> bool | None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return _parse_bool(value, name)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """The ``[auth]`` table: keys that verify user tokens and API keys. See ``docs/security.md``."""

    jwt_secret: tuple[str, ...] = ()
    jwt_public_key: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    @property
    def configured(self) -> bool:
        """Whether any key is configured: then the HTTP API needs a credential."""
        return bool(self.jwt_secret or self.jwt_public_key or self.api_keys)


_AUTH_PARSERS: dict[str, Any] = {
    "jwt_secret": _parse_jwt_secrets, "jwt_public_key": _parse_str, "jwt_audience": _parse_str,
    "jwt_issuer": _parse_str, "api_keys": _parse_api_keys, "allowed_origins": _parse_origins,
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything the broker can be told. See ``docs/configuration.md``."""

    host: str = "127.0.0.1"
    port: int = 8765
    max_connections: int = 50_000
    max_http_connections: int = 8192
    max_http_connections_per_ip: int = 1024
    max_subscriptions: int = 256
    outbox_limit: int = 1024 * 1024
    max_frame_size: int = 64 * 1024
    max_body_size: int = 1024 * 1024
    max_batch_events: int = 1000
    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    ping_interval: float = 20.0
    shutdown_timeout: float = 5.0
    batching: bool = True
    engine: str = "memory"
    redis_prefix: str = "tokenfan"
    history_max_bytes: int = 256 * 1024 * 1024
    memory_limit: int = 0
    allowed_hosts: tuple[str, ...] = ()
    max_client_data: int = 4096
    client_publish_rate: float = 10.0
    replay_rate: int = 16 * 1024 * 1024
    history_read_rate: int = 16 * 1024 * 1024
    client_input_rate: int = 64 * 1024
    heavy_input_rate: int = 4 * 1024 * 1024
    client_frame_rate: float = 100.0
    client_frame_burst: int = 200
    max_connections_per_ip: int = 1024
    upgrade_rate_per_ip: float = 20.0
    ai_request_rate: float = 1.0
    ai_request_burst: int = 10
    trusted_proxies: tuple[str, ...] = ()
    allow_insecure: bool = False
    demo: bool | None = None
    ai_provider: str = "demo"
    ai_max_generations: int = 100
    ai_time_limit: float = 120.0
    ai_max_tokens: int = 4000
    ai_demo_tokens_per_second: float = 30.0
    ai_rollup: float = 0.0
    ai_timestamps: bool = False
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str = ""
    openai_model: str = "gpt-4o-mini"
    ai_upstream_timeout: float = 30.0
    channels: Mapping[str, ChannelOptions] = field(default_factory=lambda: dict(DEFAULT_CHANNELS))
    auth: AuthConfig = AuthConfig()

    @property
    def demo_enabled(self) -> bool:
        """Whether ``/`` serves the demo page (``demo``; by default, while no ``[auth]`` is set)."""
        return not self.auth.configured if self.demo is None else self.demo

    def insecure_bind_problem(self) -> str | None:
        """Why serving on ``host`` would be unsafe as configured, or None."""
        if self.auth.configured or self.allow_insecure or is_loopback(self.host):
            return None
        return (f"host {self.host} is not a loopback address and no [auth] is configured: anyone who "
                "can reach it could emit to any channel, watch any session and spend your LLM budget. "
                "Configure [auth] (docs/security.md), or serve an open broker on purpose with "
                "allow_insecure = true (tokenfan serve --insecure)")

    @property
    def redis_url(self) -> str | None:
        """The Redis URL of ``engine``, or None for the memory engine."""
        return None if self.engine == "memory" else self.engine

    def __post_init__(self) -> None:
        if self.engine != "memory":
            try:
                RedisAddress.parse(self.engine)
            except ValueError as exc:
                raise ConfigError(f"engine: must be memory or a redis:// URL: {exc}") from None
        if not self.redis_prefix or any(c in self.redis_prefix for c in "{} \t\r\n"):
            raise ConfigError("redis_prefix: must be a non-empty name without braces or spaces, "
                              f"got {self.redis_prefix!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be between 0 and 65535, got {self.port}")
        if not self.host:
            raise ConfigError("host: must not be empty")
        for name in ("max_connections", "max_subscriptions", "max_batch_events", "max_http_connections",
                     "max_http_connections_per_ip"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name, low in (("outbox_limit", 4096), ("max_frame_size", 256), ("max_body_size", 256)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: must be at least {low} bytes, got {getattr(self, name)}")
        for name in ("ai_max_generations", "ai_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not self.openai_base_url.startswith(("http://", "https://")):
            raise ConfigError("openai_base_url: must start with http:// or https://, "
                              f"got {self.openai_base_url!r}")
        if not self.ai_upstream_timeout > 0:
            raise ConfigError("ai_upstream_timeout: must be a positive duration, "
                              f"got {self.ai_upstream_timeout}")
        if not 0 <= self.ai_rollup <= 10:
            raise ConfigError(f"ai_rollup: must be between 0 and 10 seconds, got {self.ai_rollup}")
        if not self.ai_time_limit > 0:
            raise ConfigError(f"ai_time_limit: must be a positive duration, got {self.ai_time_limit}")
        if not 0 < self.ai_demo_tokens_per_second <= 100_000:
            raise ConfigError("ai_demo_tokens_per_second: must be above 0 and at most 100000, "
                              f"got {self.ai_demo_tokens_per_second}")
        if self.max_client_data < 0:
            raise ConfigError(f"max_client_data: must not be negative, got {self.max_client_data}")
        if not 0 < self.client_publish_rate <= 100_000:
            raise ConfigError("client_publish_rate: must be above 0 and at most 100000 per second, "
                              f"got {self.client_publish_rate}")
        if self.client_input_rate < 4096:
            raise ConfigError("client_input_rate: must be at least 4KiB (a second), "
                              f"got {self.client_input_rate}")
        for name in ("client_frame_rate", "upgrade_rate_per_ip", "ai_request_rate"):
            if not 0 < getattr(self, name) <= 1_000_000:
                raise ConfigError(f"{name}: must be above 0 and at most 1000000 per second, "
                                  f"got {getattr(self, name)}")
        for name in ("client_frame_burst", "max_connections_per_ip", "ai_request_burst"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.demo and self.auth.configured and not self.auth.jwt_secret:
            raise ConfigError("demo: with [auth] the demo page needs jwt_secret, to mint its short-lived "
                              "tokens; set [auth] jwt_secret or demo = false")
        for name in ("replay_rate", "history_read_rate", "heavy_input_rate"):
            if getattr(self, name) < 64 * 1024:
                raise ConfigError(f"{name}: must be at least 64KiB (a second), got {getattr(self, name)}")
        if self.memory_limit < 0:
            raise ConfigError(f"memory_limit: must not be negative, got {self.memory_limit}")
        if self.history_max_bytes < 0:
            raise ConfigError(f"history_max_bytes: must not be negative, got {self.history_max_bytes}")
        for name in ("handshake_timeout", "idle_timeout", "ping_interval", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be a positive duration, got {getattr(self, name)}")
        if self.ping_interval >= self.idle_timeout:
            raise ConfigError(f"ping_interval ({self.ping_interval}s) must be shorter than "
                              f"idle_timeout ({self.idle_timeout}s)")

    def channel_options(self, channel: str) -> ChannelOptions:
        """The options of the first pattern that matches ``channel``, or the defaults."""
        for pattern, options in self.channels.items():
            if fnmatch.fnmatchcase(channel, pattern):
                return options
        return _NO_OPTIONS


_PARSERS: dict[str, Any] = {
    "host": _parse_str, "port": _parse_int, "max_connections": _parse_int,
    "max_http_connections": _parse_int, "max_http_connections_per_ip": _parse_int,
    "max_subscriptions": _parse_int, "outbox_limit": parse_size, "max_frame_size": parse_size,
    "max_body_size": parse_size, "max_batch_events": _parse_int,
    "handshake_timeout": parse_duration, "idle_timeout": parse_duration,
    "ping_interval": parse_duration, "shutdown_timeout": parse_duration, "batching": _parse_bool,
    "engine": _parse_str, "redis_prefix": _parse_str,
    "history_max_bytes": parse_size, "memory_limit": parse_size, "allowed_hosts": _parse_host_list,
    "max_client_data": parse_size,
    "client_publish_rate": _parse_float, "replay_rate": parse_size,
    "history_read_rate": parse_size,
    "client_input_rate": parse_size, "heavy_input_rate": parse_size,
    "client_frame_rate": _parse_float, "client_frame_burst": _parse_int,
    "max_connections_per_ip": _parse_int, "upgrade_rate_per_ip": _parse_float,
    "ai_request_rate": _parse_float, "ai_request_burst": _parse_int,
    "trusted_proxies": _parse_networks, "allow_insecure": _parse_bool, "demo": _parse_auto_bool,
    "ai_provider": _parse_str, "ai_max_generations": _parse_int, "ai_time_limit": parse_duration,
    "ai_max_tokens": _parse_int, "ai_demo_tokens_per_second": _parse_float, "ai_rollup": parse_duration,
    "ai_timestamps": _parse_bool,
    "openai_base_url": _parse_str, "openai_api_key": _parse_str, "openai_model": _parse_str,
    "ai_upstream_timeout": parse_duration,
}
#: The conventional variables of OpenAI's own tools, read when the options are not set.
CONVENTIONAL_ENV = {"OPENAI_BASE_URL": "openai_base_url", "OPENAI_API_KEY": "openai_api_key"}
ENV_PREFIX = "TOKENFAN_"
#: ``TOKENFAN_*`` variables of the client commands (``tokenfan tail`` etc.), not options of the broker.
CLIENT_ENV = frozenset({"TOKENFAN_URL", "TOKENFAN_TOKEN"})


def _apply(values: dict[str, Any], raw: Mapping[str, object], source: str) -> None:
    for key, value in raw.items():
        if key == "channels":
            if not isinstance(value, Mapping):
                raise ConfigError(f"channels ({source}): expected a table of channel patterns")
            channels = dict(values.get("channels", DEFAULT_CHANNELS))
            for pattern, options in value.items():
                channels[pattern] = _parse_channel_options(pattern, options, source,
                                                           channels.get(pattern, ChannelOptions()))
            values["channels"] = channels
        elif key == "auth":
            if not isinstance(value, Mapping):
                raise ConfigError(f"auth ({source}): expected a table of options")
            for auth_key, auth_value in value.items():
                _apply_auth(values, auth_key, auth_value, f"auth.{auth_key} ({source})")
        elif key in _PARSERS:
            values[key] = _PARSERS[key](value, f"{key} ({source})")
        elif key in _AUTH_PARSERS and source.startswith("environment"):
            _apply_auth(values, key, value, f"{key} ({source})")
        else:
            raise ConfigError(f"unknown option {key!r} ({source}); "
                              f"known: {', '.join(sorted([*_PARSERS, 'channels', 'auth']))}")


def _apply_auth(values: dict[str, Any], key: str, value: object, where: str) -> None:
    if key not in _AUTH_PARSERS:
        raise ConfigError(f"unknown option {where}; known in [auth]: {', '.join(sorted(_AUTH_PARSERS))}")
    values["auth"] = dataclasses.replace(values.get("auth", AuthConfig()),
                                         **{key: _AUTH_PARSERS[key](value, where)})


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build a :class:`Config` from a TOML file, then ``TOKENFAN_*`` variables, then ``overrides``.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        _apply(values, raw, f"file {path}")
    environ = os.environ if env is None else env
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name not in CLIENT_ENV:
            key = name[len(ENV_PREFIX):].lower()
            if key not in _PARSERS and key not in _AUTH_PARSERS:
                known = ", ".join(ENV_PREFIX + k.upper() for k in [*_PARSERS, *_AUTH_PARSERS])
                raise ConfigError(f"unknown environment variable {name}; known: {known}")
            _apply(values, {key: value}, f"environment {name}")
    for name, key in CONVENTIONAL_ENV.items():
        if key not in values and environ.get(name):
            _apply(values, {key: environ[name]}, f"environment {name}")
    _apply(values, {k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    try:
        return Config(**values)
    except ConfigError:
        raise
    except TypeError as exc:  # pragma: no cover - guarded by _apply
        raise ConfigError(str(exc)) from None


def config_fields() -> list[str]:
    """Names of every scalar option, in declaration order (for docs and tests)."""
    return [f.name for f in dataclasses.fields(Config) if f.name not in ("channels", "auth")]


def auth_fields() -> list[str]:
    """Names of every option of the ``[auth]`` table, in declaration order."""
    return [f.name for f in dataclasses.fields(AuthConfig)]
