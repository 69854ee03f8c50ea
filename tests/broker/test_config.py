"""Configuration from TOML, environment and flags, validated with clear messages."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from broker.config import (
    AuthConfig,
    ChannelOptions,
    Config,
    ConfigError,
    SlowPolicy,
    auth_fields,
    config_fields,
    load_config,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_defaults() -> None:
    config = load_config(env={})
    assert config == Config()
    assert (config.host, config.port, config.outbox_limit) == ("127.0.0.1", 8765, 1024 * 1024)
    assert config.channel_options("ai-chat/42").allows_client_event("ai:cancel")
    assert not config.channel_options("ai-chat/42").allows_client_event("ai:token")
    assert not config.channel_options("news").allows_client_event("ai:cancel")


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "tokenfan.toml"
    path.write_text('port = 9000\nhost = "0.0.0.0"\noutbox_limit = "2MiB"\nidle_timeout = "2m"\n'
                    'batching = false\n[channels."room.*"]\nclient_events = ["*"]\n')
    config = load_config(path, env={"TOKENFAN_PORT": "9100", "TOKENFAN_PING_INTERVAL": "250ms",
                                    "PATH": "/bin"},
                         overrides={"port": 9200, "host": None})
    assert config.port == 9200
    assert config.host == "0.0.0.0"
    assert config.outbox_limit == 2 * 1024 * 1024
    assert config.idle_timeout == 120.0
    assert config.ping_interval == 0.25
    assert config.batching is False
    assert config.channel_options("room.1").allows_client_event("anything")
    assert config.channel_options("ai-chat/1").allows_client_event("ai:cancel")  # default kept


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("port = 70000", {}, "port: must be between 0 and 65535"),
        ("port = \"abc\"", {}, "port (file"),
        ("", {"TOKENFAN_OUTBOX_LIMIT": "5 mibs"}, "unknown size unit 'mibs'"),
        ("", {"TOKENFAN_OUTBOX_LIMIT": "100"}, "outbox_limit: must be at least 4096 bytes"),
        ("", {"TOKENFAN_PROT": "1"}, "unknown environment variable TOKENFAN_PROT"),
        ("colour = 3", {}, "unknown option 'colour'"),
        ("idle_timeout = \"soon\"", {}, "idle_timeout (file"),
        ("ping_interval = 90", {}, "ping_interval (90.0s) must be shorter than idle_timeout"),
        ("batching = \"maybe\"", {}, "expected true or false"),
        ("[channels.\"a*\"]\nclient_events = \"ai:cancel\"", {}, "client_events must be a list"),
        ("[channels.\"a*\"]\nhistory = 3", {}, "unknown option(s) history"),
        ("port = ", {}, "is not valid TOML"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert message in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file /nonexistent\.toml"):
        load_config("/nonexistent.toml", env={})


def test_docs_list_every_option_with_its_default() -> None:
    text = DOC.read_text()
    table = text.split("<!-- options-table")[1].split("<!-- /options-table -->")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", table, re.MULTILINE))
    assert list(rows) == config_fields()
    defaults = Config()
    for name, shown in rows.items():
        parsed = load_config(env={f"TOKENFAN_{name.upper()}": shown})
        assert getattr(parsed, name) == getattr(defaults, name), name


def test_docs_list_every_auth_option_with_its_variable() -> None:
    text = DOC.read_text()
    table = text.split("<!-- auth-options-table")[1].split("<!-- /auth-options-table -->")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", table, re.MULTILINE))
    assert list(rows) == auth_fields()
    assert all(variable == f"TOKENFAN_{name.upper()}" for name, variable in rows.items())


def test_auth_table_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "tokenfan.toml"
    path.write_text('[auth]\njwt_audience = "chat"\nallowed_origins = ["https://App.example.com"]\n')
    secret = "s" * 32
    keys = "k" * 16 + ",q" + "q" * 16
    config = load_config(path, env={"TOKENFAN_JWT_SECRET": secret, "TOKENFAN_API_KEYS": keys})
    assert config.auth == AuthConfig(jwt_secret=(secret,), jwt_audience="chat", api_keys=("k" * 16, "q" * 17),
                                     allowed_origins=("https://app.example.com",))
    assert config.auth.configured and not config.demo_enabled
    assert Config().demo_enabled and not Config().auth.configured


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ('[auth]\njwt_secret = "hunter2"', {}, "auth.jwt_secret (file"),
        ("[auth]\napi_keys = [\"x\"]", {}, "key #1 must be a string of at least 16 bytes"),
        ("[auth]\nallowed_origins = [\"https://a.example.com/path\"]", {}, "is not an origin"),
        ("[auth]\nsecret = 1", {}, "unknown option auth.secret"),
        ("", {"TOKENFAN_JWT_SECRET": "tiny"}, "jwt_secret (environment TOKENFAN_JWT_SECRET)"),
        ("trusted_proxies = [\"10.0.0.0/33\"]", {}, "is not an address or a network"),
        ("demo = true\n[auth]\napi_keys = [\"" + "k" * 16 + "\"]", {}, "the demo page needs jwt_secret"),
    ],
)
def test_bad_auth_options_are_named_and_secrets_never_shown(tmp_path: Path, toml: str, env: dict[str, str],
                                                            message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert message in str(info.value)
    assert "hunter2" not in str(info.value) and "tiny" not in str(info.value)


def test_a_non_loopback_host_without_auth_is_refused_unless_insecure_is_asked_for() -> None:
    problem = Config(host="0.0.0.0").insecure_bind_problem()
    assert problem is not None and "allow_insecure" in problem and "--insecure" in problem
    assert Config(host="0.0.0.0", allow_insecure=True).insecure_bind_problem() is None
    assert Config(host="0.0.0.0", auth=AuthConfig(api_keys=("k" * 16,))).insecure_bind_problem() is None
    assert Config(host="::1").insecure_bind_problem() is None
    assert Config(host="localhost").insecure_bind_problem() is None


def test_docs_list_every_channel_option() -> None:
    text = DOC.read_text()
    table = text.split("<!-- channel-options-table")[1].split("<!-- /channel-options-table -->")[0]
    rows = re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)
    assert rows == [f.name for f in dataclasses.fields(ChannelOptions)]


def test_channel_options_for_history_and_slow_readers(tmp_path: Path) -> None:
    path = tmp_path / "tokenfan.toml"
    path.write_text('[channels."ai-chat/*"]\nhistory_ttl = "10m"\n'
                    '[channels."cursors/*"]\nslow_policy = "drop"\ncoalesce = { "move" = "path" }\n'
                    'history_size = 50\nkeep_events = ["final"]\n')
    config = load_config(path, env={})
    chat = config.channel_options("ai-chat/1")
    assert (chat.history_size, chat.history_ttl, chat.client_events) == (10_000, 600.0, ("ai:cancel",))
    assert chat.persist
    cursors = config.channel_options("cursors/9")
    assert cursors.slow_policy is SlowPolicy.DROP
    assert dict(cursors.coalesce) == {"move": "path"}
    assert (cursors.history_size, cursors.keep_events) == (50, ("final",))
    other = config.channel_options("news")
    assert (other.history_size, other.persist, dict(other.coalesce)) == (0, False, {"ai:token": "token"})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("history_size = -1", "history_size must be between 0 and 1000000"),
        ("history_size = \"lots\"", "history_size: expected an integer"),
        ("history_ttl = 0", "history_ttl must be a positive duration"),
        ("slow_policy = \"ignore\"", "slow_policy must be \"disconnect\" or \"drop\""),
        ("coalesce = [\"ai:token\"]", "coalesce must be a table of event = \"field\""),
        ("coalesce = { \"bad event\" = \"token\" }", "coalesce has an invalid event name"),
        ("keep_events = [1]", "keep_events must be a list of event names"),
    ],
)
def test_bad_channel_options_are_named(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[channels."x/*"]\n{table}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert message in str(info.value)
    assert 'channels."x/*"' in str(info.value)
