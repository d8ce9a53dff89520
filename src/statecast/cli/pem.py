"""A look at ``serve --tls-cert`` and ``--tls-key`` before OpenSSL loads them.

OpenSSL's own errors for the wrong file are ``[SSL] PEM lib (_ssl.c:3926)``, and for an
encrypted (passphrase-protected) key it first asks for the passphrase on the terminal,
waiting there, then fails with ``[Errno 22] Invalid argument``. statecast takes no
passphrase (it would have to live in a file or the environment beside the key, which
protects nothing the file's permissions do not), so an encrypted key is a usage error
that says so and how to decrypt it.

Only regular files are looked at: a pipe (``--tls-key <(vault read ...)``) can be read
once, by OpenSSL.
"""

from __future__ import annotations

import os
import stat

__all__ = ["problem_with_cert", "problem_with_key"]

_MOST = 1 << 20  # larger files are left to OpenSSL: more than any key or chain

_ENCRYPTED = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


def _head(path: str) -> bytes | None:
    """A regular file's bytes; ``None`` for anything else, one that cannot be read
    (OpenSSL then says why), or one too large to be sure of."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            data = f.read(_MOST + 1)
    except OSError:
        return None
    return data if len(data) <= _MOST else None


def problem_with_key(path: str) -> str | None:
    """What is wrong with ``path`` as ``--tls-key``, or ``None`` if nothing is seen."""
    data = _head(path)
    if data is None:
        return None
    if any(marker in data for marker in _ENCRYPTED):
        return (
            f"{path} holds an encrypted (passphrase-protected) private key; statecast "
            f"needs it unencrypted: 'openssl pkey -in {path} -out key.pem' writes it so "
            "(make key.pem readable by the server's user only)"
        )
    if b"PRIVATE KEY-----" not in data:
        return f"{path} holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
    return None


def problem_with_cert(path: str) -> str | None:
    """What is wrong with ``path`` as ``--tls-cert``, or ``None`` if nothing is seen."""
    data = _head(path)
    if data is None or b"CERTIFICATE-----" in data:
        return None
    return f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
