"""``statecast serve --tls-cert/--tls-key`` with files OpenSSL cannot use: a usage
error that says what is wrong (cli/pem.py), not ``[SSL] PEM lib`` or a passphrase
prompt."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from tests.helpers import CMD, TIMEOUT, ServeProcess


@pytest.fixture(scope="module")
def cert() -> trustme.LeafCert:
    return trustme.CA().issue_cert("127.0.0.1")


def serve(tmp_path: Path, cert_file: Path, key_file: Path) -> subprocess.CompletedProcess[str]:
    # A session of its own: no terminal for OpenSSL to ask a passphrase on.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATECAST_")}
    tls = ["--tls-cert", str(cert_file), "--tls-key", str(key_file)]
    return subprocess.run(
        [*CMD, "serve", "--port", "0", "--http-port", "off", "--store", "memory", *tls],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=tmp_path,
        env=env,
        timeout=TIMEOUT * 3,
        check=False,
    )


@pytest.mark.parametrize(
    "key_format",
    [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL],
    ids=["pkcs8", "traditional"],
)
def test_an_encrypted_key_is_a_usage_error_that_says_so(
    tmp_path: Path, cert: trustme.LeafCert, key_format: serialization.PrivateFormat
) -> None:
    """Found by an adversarial run: OpenSSL asked for a passphrase on the terminal,
    then statecast said "cannot load ...: [Errno 22] Invalid argument"."""
    cert_file = tmp_path / "cert.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            key_format,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    r = serve(tmp_path, cert_file, key_file)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "pass phrase" not in r.stderr + r.stdout
    assert (
        f"Invalid value for '--tls-key': {key_file} holds an encrypted "
        "(passphrase-protected) private key; statecast needs it unencrypted: "
        f"'openssl pkey -in {key_file} -out key.pem' writes it so"
    ) in r.stderr, r.stderr


def test_files_of_the_wrong_kind_are_usage_errors(tmp_path: Path, cert: trustme.LeafCert) -> None:
    cert_file = tmp_path / "cert.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    key_file = tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    r = serve(tmp_path, cert_file, cert_file)  # the certificate given as the key
    assert r.returncode == 2, r.stderr
    assert f"Invalid value for '--tls-key': {cert_file} holds no PEM private key" in r.stderr
    r = serve(tmp_path, key_file, key_file)  # the key given as the certificate
    assert r.returncode == 2, r.stderr
    assert f"Invalid value for '--tls-cert': {key_file} holds no PEM certificate" in r.stderr


def test_an_unencrypted_key_still_serves(tmp_path: Path, cert: trustme.LeafCert) -> None:
    cert_file = tmp_path / "cert.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    key_file = tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    srv = ServeProcess(
        tmp_path, "--store", "memory", "--tls-cert", str(cert_file), "--tls-key", str(key_file)
    )
    code, out = srv.stop()
    assert code == 0, out
    assert "listening on tls://" in out
