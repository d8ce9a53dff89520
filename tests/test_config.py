from __future__ import annotations

import pytest

from statecast import Config, ConfigError, Server


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("port", 70000, "port must be"),
        ("store", "postgres", "unknown store"),
        ("retain", -1, "retain must be"),
        ("max_pending", 1000, "max_pending must be at least"),
        ("max_line", 10, "max_line must be at least"),
        ("heartbeat", 0, "heartbeat must be > 0"),
        ("flush_interval", 5, "flush_interval must be"),
        ("shutdown_grace", -1, "shutdown_grace must be"),
    ],
)
def test_invalid_settings_name_the_field(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Config(**{field: value})  # type: ignore[arg-type]


def test_defaults_match_the_documented_ones() -> None:
    c = Config()
    assert (c.host, c.port, c.http_port, c.store) == ("127.0.0.1", 8989, 8990, "sqlite")
    assert c.retain == 1_000_000
    assert (c.max_pending, c.max_line) == (8 * 1024 * 1024, 1024 * 1024)
    assert (c.heartbeat, c.shutdown_grace, c.flush_interval) == (10.0, 5.0, 0.0)


def test_server_keywords_override_the_config() -> None:
    s = Server(Config(retain=5), store="memory", http_port=None, port=0, max_line=4096)
    assert (s.config.retain, s.config.port, s.config.max_line) == (5, 0, 4096)
    with pytest.raises(ConfigError):
        Server(port=-1)
