"""security.py: the server's TLS context from its config."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from statecast.config import Config
from statecast.errors import ConfigError
from statecast.security import server_ssl_context


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(tmp_path: Path) -> None:
    """Embedding ``Server`` with an encrypted key: OpenSSL would ask on the terminal (and
    wait there); the password callback makes it a ConfigError that says why."""
    leaf = trustme.CA().issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    config = Config(tls_cert=str(cert_file), tls_key=str(key_file))
    with pytest.raises(ConfigError, match="is encrypted \\(passphrase-protected\\)"):
        server_ssl_context(config)
    leaf.private_key_pem.write_to_path(str(key_file))  # the same key, unencrypted
    assert server_ssl_context(config) is not None
