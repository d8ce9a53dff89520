"""The ``statecast`` command, run as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import CMD, TIMEOUT, LineClient, ServeProcess, frames_of


def statecast(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a ``statecast`` command to its end, in ``cwd``."""
    return subprocess.run(
        [*CMD, *args],
        capture_output=True,
        check=False,
        cwd=cwd,
        text=True,
        timeout=TIMEOUT * 3,
        env=env,
    )


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[ServeProcess]:
    p = ServeProcess(tmp_path, "--shutdown-grace", "2")
    yield p
    if p.p.stdout is not None and not p.p.stdout.closed:
        p.stop(signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_gracefully(proc: ServeProcess, sig: int) -> None:
    with LineClient(proc.port) as c:
        c.send(b'{"op":"publish","changes":[{"collection":"c","key":"k","value":1}]}\n')
        assert c.read()["type"] == "ack"
        c.send(b"watch\n")
        assert c.read_until("snapshot_end")[-1]["seq"] == 1
        code, output = proc.stop(sig)
        assert frames_of(c.read_all()) == [{"type": "bye", "reason": "shutdown"}]
    assert code == 0
    assert "shutting down" in output
    assert "stopped at seq 1" in output
    assert "Traceback" not in output


def test_demo_desk_publishes_atomic_fills(tmp_path: Path) -> None:
    p = ServeProcess(tmp_path, "--demo", "--shutdown-grace", "1")
    try:
        with LineClient(p.port) as c:
            c.send({"op": "sync", "live": True})
            c.read_until("snapshot_end")
            fills = 0
            collections: set[str] = set()
            pending: list[dict[str, object]] = []
            while fills < 3:
                f = c.read()
                if f["type"] != "change":
                    continue
                collections.add(str(f["collection"]))
                if pending:
                    pending.append(f)
                    if len(pending) == 3:
                        # A fill is one batch: execution, order, position, back to back.
                        e = pending[0]
                        assert [x["collection"] for x in pending] == [
                            "executions",
                            "orders",
                            "positions",
                        ]
                        assert [x["seq"] for x in pending] == [e["seq"], e["seq"] + 1, e["seq"] + 2]  # type: ignore[operator]
                        ev, ov, pv = (x["value"] for x in pending)
                        assert ev["order_id"] == ov["order_id"]  # type: ignore[index]
                        assert pv["account"] == ev["account"]  # type: ignore[index]
                        assert ov["status"] in ("filled", "partially_filled")  # type: ignore[index]
                        fills += 1
                        pending = []
                elif f["collection"] == "executions" and not f.get("deleted"):
                    pending.append(f)
            assert {"quotes", "orders", "executions", "positions"} <= collections
    finally:
        code, output = p.stop(signal.SIGTERM)
    assert code == 0, output


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    r = statecast(tmp_path, "serve", "--max-pending", "10")
    assert r.returncode == 2
    assert "max_pending must be at least 65536" in r.stderr
    r = statecast(tmp_path, "serve", "--store", "postgres")
    assert r.returncode == 2
    assert "unknown store 'postgres'" in r.stderr


DEEP = "[" * 2000 + "]" * 2000


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["serve", "--max-pending", "inf"], "'INF' is not a size"),
        (["serve", "--max-line", "1e400"], "is not a size"),
        (["serve", "--heartbeat", "nan"], "not a finite number or 'off'"),
        (["serve", "--shutdown-grace", "nan"], "shutdown_grace must be a finite number"),
        (["serve", "--sqlite-busy-timeout", "inf"], "sqlite_busy_timeout must be a finite"),
        (["serve", "--sqlite-busy-timeout", "-1"], "sqlite_busy_timeout must be >= 0"),
        (["stats", "--interval", "nan"], "not a number of seconds above 0"),
        (["stats", "--interval", "1e30"], "at most 3600"),
        (["publish", "c", "k", DEEP], "nested too deeply"),
        (["token", "--sub", "a", "--auth-secret", "s" * 40, "--where", DEEP], "nested too deeply"),
        (["serve", "--auth-secret", "\udcff" + "s" * 40], "is not valid text"),
        (["stats", "--token", "t\udcff", "--url", "tcp://127.0.0.1:9"], "--token is not valid"),
        (["sync", "--collections", "a\udcff", "--url", "tcp://127.0.0.1:9"], "--collections is"),
        (["publish", "c", "k", '"\udcff"'], "the JSON argument: not UTF-8 text"),
        (
            ["publish", "c", "k", '{"v":"\\ud800"}'],
            "the JSON argument: \\ud800 is a lone surrogate escape: not valid Unicode text",
        ),
        (["publish", "c", "k", "-5"], "to publish a negative number, put -- before"),
        (["publish", "c", "k", ""], "the JSON argument: empty: no JSON value"),
    ],
    ids=[
        "size-inf",
        "size-1e400",
        "heartbeat-nan",
        "grace-nan",
        "busy-inf",
        "busy-negative",
        "interval-nan",
        "interval-huge",
        "publish-deep",
        "token-where-deep",
        "secret-not-utf8",
        "token-not-utf8",
        "collections-not-utf8",
        "publish-json-not-utf8",
        "publish-json-lone-surrogate",
        "publish-negative-number",
        "publish-empty-json",
    ],
)
def test_odd_numbers_and_values_are_one_line_errors(
    tmp_path: Path, args: list[str], said: str
) -> None:
    """Found by an adversarial run: each of these was a traceback (OverflowError,
    ValueError, RecursionError, UnicodeEncodeError) or a limit silently off."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:surrogateescape"}
    r = subprocess.run(
        [*CMD, *[a.encode("utf-8", "surrogateescape") for a in args]],
        capture_output=True,
        check=False,
        cwd=tmp_path,
        timeout=TIMEOUT * 3,
        env=env,
    )
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode != 0, err
    assert "Traceback" not in err, err
    assert said in err, err


def test_ndjson_that_is_not_utf8_or_too_deep_is_refused_by_line(
    proc: ServeProcess, tmp_path: Path
) -> None:
    lone = "is a lone surrogate escape: not valid Unicode text"
    ok = b'{"collection":"c","key":"k","value":"\\ud83d\\ude00"}\n'  # a pair: text
    for line, said in (
        (b'{"collection":"c","key":"k","value":"\xff"}\n', "line 1: not UTF-8 text"),
        (b'{"collection":"c","key":"k","value":' + DEEP.encode() + b"}\n", "line 1: nested"),
        # Found by an adversarial run: "not a JSON object: Input data was truncated".
        (b'{"collection":"c","key":"k","value":"\\ud800"}\n', f"line 1: \\ud800 {lone}"),
        (ok + b'{"collection":"c","key":"\\udc00x","value":1}\n', f"line 2: \\udc00 {lone}"),
        (
            ok * 2 + b'{"collection":"c","key":"k","value":{"\\ud800\\u0041":1}}\n',
            f"line 3: \\ud800 {lone}",
        ),
        (b'{"collection":"c","key":"k","value":1e400}\n', "line 1: Number out of range"),
    ):
        r = subprocess.run(
            [*CMD, "publish", "--ndjson", "--url", f"tcp://127.0.0.1:{proc.port}"],
            input=line,
            capture_output=True,
            check=False,
            cwd=tmp_path,
            timeout=TIMEOUT * 3,
        )
        err = r.stderr.decode("utf-8", "replace")
        assert r.returncode != 0, err
        assert "Traceback" not in err, err
        assert said in err, err
        assert err.count("\n") == 1, err


def test_lone_surrogate_escapes_are_found() -> None:
    from statecast.cli.jsoninput import lone_surrogate  # noqa: PLC0415

    assert lone_surrogate(rb'"\ud800"') == "\\ud800"
    assert lone_surrogate(rb'"\uDBFFx"') == "\\uDBFF"
    assert lone_surrogate(rb'"\ud800\u0041"') == "\\ud800"
    assert lone_surrogate(rb'"\ud800\ud800\udc00"') == "\\ud800"
    assert lone_surrogate(rb'"a\udc00"') == "\\udc00"
    assert lone_surrogate(rb'"\ud800" "\udc00"') == "\\ud800"  # not adjacent: two halves
    assert lone_surrogate(rb'"\ud83d\ude00 \u00e9 \n"') is None  # a pair, and others
    assert lone_surrogate(rb'"\\ud800"') is None  # a backslash, then text


@pytest.mark.parametrize("path", ["/nonexistent/dir/f", "/etc/passwd/x", ""])
def test_sync_to_a_file_it_cannot_open_says_so(tmp_path: Path, path: str) -> None:
    r = statecast(tmp_path, "sync", "-o", path, "--url", "tcp://127.0.0.1:9")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert "Could not open file" in r.stderr, r.stderr


def test_environment_variables_map_to_options(tmp_path: Path) -> None:
    env = {**os.environ, "STATECAST_MAX_PENDING": "3"}
    r = statecast(tmp_path, "serve", "--port", "0", env=env)
    assert r.returncode == 2
    assert "max_pending must be at least 65536 bytes, not 3" in r.stderr


def test_port_in_use_is_a_clear_error(proc: ServeProcess, tmp_path: Path) -> None:
    r = statecast(tmp_path, "serve", "--port", str(proc.port), "--store", "memory")
    assert r.returncode == 1
    assert "cannot start" in r.stderr
    assert "Traceback" not in r.stderr


def test_version(tmp_path: Path) -> None:
    r = statecast(tmp_path, "--version")
    assert r.returncode == 0
    assert r.stdout.startswith("statecast, version ")


def test_every_config_field_is_a_serve_option_with_the_same_default() -> None:
    """``statecast serve`` and ``Config`` map one to one (config.py)."""
    import dataclasses  # noqa: PLC0415

    import click  # noqa: PLC0415

    from statecast.cli.main import serve  # noqa: PLC0415
    from statecast.config import Config  # noqa: PLC0415

    options = {p.name: p for p in serve.params if isinstance(p, click.Option)}
    ctx = click.Context(serve)
    for field in dataclasses.fields(Config):
        assert field.name in options, f"Config.{field.name} has no serve option"
        opt = options.pop(field.name)
        default = opt.get_default(ctx, call=True)
        parsed = opt.type_cast_value(ctx, default) if default is not None else None
        assert parsed == getattr(Config(), field.name), field.name
        assert f"--{field.name.replace('_', '-')}" in opt.opts, opt.opts
        assert opt.envvar == f"STATECAST_{field.name.upper()}", opt.envvar
    assert not options, f"serve options with no Config field: {sorted(options)}"


def test_off_values(tmp_path: Path) -> None:
    from statecast.cli.main import OffType  # noqa: PLC0415

    port = OffType(int, zero_is_off=False)
    assert port.convert("off", None, None) is None
    assert port.convert("0", None, None) == 0
    beat = OffType(float, zero_is_off=True)
    assert beat.convert("0", None, None) is None
    assert beat.convert("2.5", None, None) == 2.5
    result = statecast(tmp_path, "serve", "--heartbeat", "soon")
    assert result.returncode == 2
    assert "not a number or 'off'" in result.stderr
