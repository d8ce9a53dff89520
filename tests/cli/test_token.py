"""``statecast token``, and the client commands with ``--token`` and ``--ca-file``
against ``statecast serve --auth-secret`` (and ``--tls-cert``), as real processes."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import msgspec
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from statecast.tokens import TokenVerifier
from tests.helpers import CMD, TIMEOUT, ServeProcess, frames_of, free_port

SECRET = "correct horse battery staple, 32+ bytes long"


def statecast(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STATECAST_")}
    environ.update(env or {})
    return subprocess.run(
        [*CMD, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        env=environ,
        check=False,
    )


def mint_cli(*args: str, env: dict[str, str] | None = None) -> str:
    r = statecast("token", *args, env={"STATECAST_AUTH_SECRET": SECRET, **(env or {})})
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # the summary is for terminals only
    assert r.stdout.endswith("\n")
    assert r.stdout.count("\n") == 1
    return r.stdout.strip()


def test_mint_and_verify_round_trip() -> None:
    t0 = time.time()
    token = mint_cli(
        "--sub",
        "alice",
        "--read",
        "orders,positions",
        "--where",
        '{"account":"ACC-1"}',
        "--publish",
        "none",
        "--ttl",
        "8h",
    )
    grant = TokenVerifier(secret=SECRET).verify(token)
    assert grant.sub == "alice"
    assert grant.read == frozenset({"orders", "positions"})
    assert grant.publish == frozenset()
    assert grant.where == {"account": "ACC-1"}
    assert grant.exp is not None
    assert t0 + 8 * 3600 - 1 <= grant.exp <= time.time() + 8 * 3600 + 1
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    # Defaults: read everything, publish nothing, no filter, one hour.
    grant = TokenVerifier(secret=SECRET).verify(mint_cli("--sub", "bob"))
    assert (grant.read, grant.publish, grant.where) == (None, frozenset(), None)
    assert grant.exp is not None
    assert grant.exp - time.time() == pytest.approx(3600, abs=5)
    grant = TokenVerifier(secret=SECRET).verify(
        mint_cli("--sub", "feed", "--read", "none", "--publish", "*", "--ttl", "45s")
    )
    assert (grant.read, grant.publish) == (frozenset(), None)
    # The flag beats the environment.
    other = "another secret, also 32 bytes or longer"
    token = mint_cli("--sub", "carol", "--auth-secret", other)
    assert TokenVerifier(secret=other).verify(token).sub == "carol"


@pytest.mark.parametrize(
    ("kind", "alg"), [("rsa", "RS256"), ("ec256", "ES256"), ("ec384", "ES384")]
)
def test_mint_with_a_private_key(tmp_path: Path, kind: str, alg: str) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1() if kind == "ec256" else ec.SECP384R1())
    private = tmp_path / "key.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    r = statecast("token", "--sub", "alice", "--auth-private-key", str(private))
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == alg
    assert TokenVerifier(public_key=public).verify(token).sub == "alice"
    # The environment variable works too; a public key cannot sign.
    r = statecast("token", "--sub", "a", env={"STATECAST_AUTH_PRIVATE_KEY": str(private)})
    assert r.returncode == 0, r.stderr
    (tmp_path / "pub.pem").write_bytes(public)
    r = statecast("token", "--sub", "a", "--auth-private-key", str(tmp_path / "pub.pem"))
    assert r.returncode == 2
    assert "a public key cannot sign" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--read", "*"], "Missing option '--sub'"),
        (["--sub", "a", "--ttl", "soon"], "--ttl: invalid duration 'soon'"),
        (["--sub", "a", "--ttl", "0s"], "--ttl: the duration must be more than 0"),
        (["--sub", "a", "--read", "bad name"], "--read: invalid collection name"),
        (["--sub", "a", "--publish", ","], "--publish: give '*', 'none'"),
        (["--sub", "a", "--where", "{nope"], "--where: not valid JSON"),
        (["--sub", "a", "--where", "[1]"], "--where: must be a JSON object"),
        (["--sub", "a", "--where", '{"a":{"gt":1}}'], "--where.a: unknown operator 'gt'"),
        (["--sub", "", "--ttl", "1m"], "--sub must be 1 to 256 printable characters"),
        (["--sub", "a", "--bogus"], "No such option '--bogus'"),
        (["--sub", "a", "--ttl"], "Option '--ttl' requires an argument"),
        (["--sub", "a", "--auth-secret", "short"], "--auth-secret must be at least 32 bytes"),
        (["--sub", "a", "--auth-private-key", "/no/such/key.pem"], "cannot read it"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args: list[str], message: str) -> None:
    r = statecast("token", *args, env={"STATECAST_AUTH_SECRET": SECRET})
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("statecast token: ")
    assert message in r.stderr
    assert SECRET not in r.stderr


def test_a_key_is_required() -> None:
    r = statecast("token", "--sub", "a")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "give --auth-secret (or STATECAST_AUTH_SECRET) or --auth-private-key" in r.stderr


def test_summary_on_a_terminal() -> None:
    """With standard output on a terminal, what the token grants goes to standard
    error; the token alone to standard output."""
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(
            [*CMD, "token", "--sub", "alice", "--read", "orders", "--ttl", "2d"],
            stdout=slave,
            stderr=subprocess.PIPE,
            env={**os.environ, "STATECAST_AUTH_SECRET": SECRET},
        )
        os.close(slave)
        slave = -1
        # Read the terminal while the command runs: once it has exited, Linux may
        # answer EIO before what it wrote was read.
        out = b""
        while True:
            ready, _, _ = select.select([master], [], [], TIMEOUT * 3)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            out += chunk
        _, err = p.communicate(timeout=TIMEOUT * 3)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert p.returncode == 0, err
    token = out.decode().strip()
    assert TokenVerifier(secret=SECRET).verify(token).sub == "alice"
    summary = err.decode()
    assert re.search(r"^sub +alice$", summary, re.M), summary
    assert re.search(r"^read +orders$", summary, re.M), summary
    assert re.search(r"^publish +none$", summary, re.M), summary
    assert re.search(r"^where +none$", summary, re.M), summary
    assert re.search(
        r"^expires +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in (2d|1d 23h)\)$", summary, re.M
    )
    assert re.search(r"^signed +HS256$", summary, re.M), summary


# -- against statecast serve ------------------------------------------------------------
@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[ServeProcess]:
    srv = ServeProcess(
        tmp_path, "--store", "memory", "--port", str(free_port()), "--auth-secret", SECRET
    )
    yield srv
    if srv.p.poll() is None:
        srv.stop(signal.SIGKILL)


def test_serve_accepts_what_token_mints(auth_server: ServeProcess) -> None:
    url = f"tcp://127.0.0.1:{auth_server.port}"
    writer = mint_cli("--sub", "feed", "--read", "none", "--publish", "orders")
    reader = mint_cli("--sub", "alice", "--read", "orders", "--where", '{"account":"ACC-1"}')
    lines = "".join(
        msgspec.json.encode(
            {"collection": "orders", "key": f"O-{i}", "value": {"account": f"ACC-{i % 2}"}}
        ).decode()
        + "\n"
        for i in range(10)
    )
    r = subprocess.run(
        [*CMD, "publish", "--url", url, "--token", writer, "--ndjson"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        check=False,
    )
    assert (r.returncode, r.stdout) == (0, "10\n"), r.stderr
    r = statecast("sync", "--url", url, "--token", reader)
    assert r.returncode == 0, r.stderr
    keys = sorted(f["key"] for f in frames_of(r.stdout.encode()))
    assert keys == ["O-1", "O-3", "O-5", "O-7", "O-9"]  # ACC-1's only
    # STATECAST_TOKEN works as well as --token.
    r = statecast("sync", "--url", url, env={"STATECAST_TOKEN": reader})
    assert r.returncode == 0, r.stderr
    assert len(frames_of(r.stdout.encode())) == 5
    # The reader may not publish; without a token nothing is served.
    r = statecast("publish", "--url", url, "--token", reader, "orders", "O-1", "1")
    assert r.returncode == 1
    assert r.stderr.startswith("statecast: forbidden:")
    for args in (["sync"], ["stats"], ["publish", "orders", "O-1", "1"], ["watch"]):
        r = statecast(*args, "--url", url)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("statecast: unauthorized:"), r.stderr
    r = statecast("sync", "--url", url, "--token", "garbage")
    assert r.returncode == 1
    assert "statecast: unauthorized: malformed token" in r.stderr
    # A token signed with another secret.
    forged = mint_cli("--sub", "eve", "--auth-secret", "some other secret, 32 bytes or more")
    r = statecast("sync", "--url", url, "--token", forged)
    assert r.returncode == 1
    assert "bad token signature" in r.stderr


def test_client_commands_over_tls_with_a_token(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    srv = ServeProcess(
        tmp_path,
        "--store",
        "memory",
        "--port",
        str(free_port()),
        "--auth-secret",
        SECRET,
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "key.pem"),
    )
    try:
        url = f"tls://127.0.0.1:{srv.port}"
        ca_file = str(tmp_path / "ca.pem")
        admin = mint_cli("--sub", "admin", "--publish", "*")
        r = statecast(
            "publish", "--url", url, "--ca-file", ca_file, "--token", admin, "o", "k", "1"
        )
        assert (r.returncode, r.stdout) == (0, "1\n"), r.stderr
        env = {"STATECAST_URL": url, "STATECAST_CA_FILE": ca_file, "STATECAST_TOKEN": admin}
        r = statecast("sync", env=env)
        assert r.returncode == 0, r.stderr
        assert [f["key"] for f in frames_of(r.stdout.encode())] == ["k"]
        r = statecast("stats", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert msgspec.json.decode(r.stdout)["seq"] == 1
        # Without the CA: the system's CAs do not know this one.
        r = statecast("sync", "--url", url, "--token", admin)
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1
        assert "certificate verification failed" in r.stderr
        # Plain TCP against the TLS port says what to do.
        r = statecast("sync", "--url", f"tcp://127.0.0.1:{srv.port}", "--token", admin)
        assert r.returncode == 1
        assert "tls://" in r.stderr
        # --ca-file with a tcp:// URL, and an HTTP URL, are usage errors.
        r = statecast("sync", "--url", f"tcp://127.0.0.1:{srv.port}", "--ca-file", ca_file)
        assert r.returncode == 2
        assert "did you mean tls://" in r.stderr
        r = statecast("sync", "--url", "wss://127.0.0.1:8990/ws")
        assert r.returncode == 2
        assert "use tcp://HOST:PORT or tls://HOST:PORT" in r.stderr
    finally:
        code, output = srv.stop()
    assert code == 0, output
