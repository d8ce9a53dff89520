"""Bearer tokens (JWT): verifying them into a :class:`~statecast.core.policy.Grant`,
and minting them for ``statecast token``.

Not in :mod:`statecast.core` because PyJWT imports ``urllib`` and ``socket``.

What :meth:`TokenVerifier.verify` checks, in order; every failure is
:class:`~statecast.errors.Unauthorized` with a message that names what is wrong and
never contains the token or the key:

1. the token is a non-empty string of at most :data:`MAX_TOKEN_LENGTH` characters,
   made of three dot-separated parts;
2. its header's ``alg`` is one the configured key allows (below) - checked before
   anything else is trusted;
3. the signature, with that key and only that key;
4. ``aud`` / ``iss`` when the verifier was given an audience / issuer (a token that
   carries an ``aud`` is refused by a verifier that has none, as RFC 7519 §4.1.3 asks);
5. the claims have their shapes: ``sub`` and ``exp`` (required, see below), ``read``,
   ``publish`` and ``where`` as :meth:`Grant.from_claims` says, ``nbf`` and ``iat``
   numbers, and ``where`` a valid filter;
6. the clock: the token has not expired and is not used before its ``nbf``, both with
   ``leeway`` seconds of clock skew allowed (``iat`` in the future is not an error: it
   carries no validity).

An expired token *presented* in an ``auth`` op is ``unauthorized`` like any other bad
token; :class:`~statecast.errors.TokenExpired` is for the session to raise when the clock
passes the ``exp`` of a connection's grant (:meth:`Grant.expired`).

Algorithms come from the key, never from the token:

* a **secret** (``--auth-secret``) allows HMAC: ``HS256``, plus ``HS384``/``HS512``
  when the secret is long enough for them. RFC 7518 §3.2 asks for a key at least as long
  as the hash, so a secret shorter than 32 bytes is a :class:`ConfigError`, and a secret
  that is a PEM key is refused too (it belongs in ``--auth-public-key``).
* a **public key** (``--auth-public-key``, PEM) allows only its own family: RSA (at
  least 2048 bits) → ``RS256``/``RS384``/``RS512``; EC → the one of ``ES256``/``ES384``/
  ``ES512`` that matches its curve (P-256/P-384/P-521). Other key types are refused.

``none`` is never allowed, and neither is ``HS*`` with a public key: that is the
classic *algorithm-confusion* attack, where an attacker signs an ``HS256`` token with
the (public!) key PEM as the HMAC secret and a verifier that lets the token choose the
algorithm accepts it. Here the key is held as a parsed key object, never as PEM text,
and the allowed list is fixed at construction.

Why ``exp`` is required: a token without one is valid forever, and a bearer token
leaks - into logs, browser storage, a screenshot. Every token statecast accepts
expires; mint long-lived ones with a long ``--ttl`` if you must, on purpose.

HMAC tokens are checked by hand first (:class:`_HmacFastPath`): PyJWT spends about
70 µs on a token it has not seen (a Python-level base64url check per character, the
header decoded twice), more than a whole connection costs without auth, and a server
that many users connect to sees mostly tokens it has not seen. The fast path accepts a
token only when PyJWT would accept it with the same claims; for anything else (a bad
signature, padding, an unusual header, an ``aud`` it does not expect...) it steps
aside and PyJWT decides, with PyJWT's messages. ``tests/test_tokens_fast.py`` holds
the two side by side on valid and mutated tokens. Public keys always go through PyJWT.

Key files: ``--auth-public-key`` takes a PEM public key, an X.509 certificate (its
public key is used), or an unencrypted PEM private key (its public key is derived and
used for verifying, and :meth:`TokenVerifier.mint` can then sign with it, so
``statecast token`` works from the same settings as the server).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import math
import os
import re
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import jwt
import msgspec
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from statecast.core.filters import share_where
from statecast.core.policy import (
    ALL,
    COLLECTION_RE,
    MAX_SUB_LENGTH,
    NONE,
    ClaimParts,
    Grant,
    RequestId,
    Scope,
    check_subject,
    claim_parts,
)
from statecast.errors import BadRequest, ConfigError, Unauthorized

__all__ = [
    "MAX_KEY_FILE_SIZE",
    "MAX_TOKEN_LENGTH",
    "MIN_RSA_BITS",
    "MIN_SECRET_BYTES",
    "TokenVerifier",
    "mint",
    "parse_scope",
    "parse_ttl",
    "parse_where_arg",
]

MAX_TOKEN_LENGTH: Final = 8192
# Tokens verified already, kept to skip the signature check when presented again (the
# oldest go first); their times are still checked every time.
_VERIFIED_CACHE: Final = 10_000
MIN_SECRET_BYTES: Final = 32
MIN_RSA_BITS: Final = 2048
MAX_KEY_FILE_SIZE: Final = 1 << 20

_HMAC: Final = (("HS256", 32), ("HS384", 48), ("HS512", 64))
_RSA: Final = ("RS256", "RS384", "RS512")
_EC_BY_CURVE: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

_PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
_PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# ---------------------------------------------------------------------------
# Keys


@dataclass(frozen=True, slots=True)
class _Key:
    """A key as PyJWT wants it, with the algorithms it allows (the first is the
    default for signing)."""

    verify_key: bytes | _PublicKey
    sign_key: bytes | _PrivateKey | None
    algorithms: tuple[str, ...]


def _secret_key(secret: str, setting: str) -> _Key:
    if not isinstance(secret, str):
        raise ConfigError(f"{setting} must be a string")
    if secret.lstrip().startswith("-----BEGIN"):
        raise ConfigError(
            f"{setting} is a PEM key, not a shared secret (give a public key file instead)"
        )
    try:
        raw = secret.encode()
    except UnicodeEncodeError:  # bytes that were not UTF-8 (an argument, a variable)
        raise ConfigError(
            f"{setting} is not valid text (it holds bytes that are not UTF-8)"
        ) from None
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{setting} must be at least {MIN_SECRET_BYTES} bytes for HS256 "
            f"(RFC 7518 §3.2), not {len(raw)}"
        )
    algorithms = tuple(alg for alg, size in _HMAC if len(raw) >= size)
    return _Key(verify_key=raw, sign_key=raw, algorithms=algorithms)


def _algorithms_for(key: object, setting: str) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                f"{setting}: the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} "
                "are required"
            )
        return _RSA
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        alg = _EC_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise ConfigError(
                f"{setting}: unsupported EC curve {key.curve.name} (use P-256, P-384 or P-521)"
            )
        return (alg,)
    raise ConfigError(
        f"{setting}: unsupported key type {type(key).__name__} (use an RSA or EC key)"
    )


def _pem_key(pem: str | bytes, setting: str, *, private: bool = False) -> _Key:
    """A key from PEM text: public key, certificate or unencrypted private key
    (``private=True``: a private key only, for signing)."""
    data = pem.encode() if isinstance(pem, str) else pem
    if not isinstance(data, bytes) or b"-----BEGIN" not in data:
        raise ConfigError(f"{setting}: not a PEM key (no '-----BEGIN' line)")
    if not private:
        if b"-----BEGIN CERTIFICATE" in data:
            try:
                public: object = x509.load_pem_x509_certificate(data).public_key()
            except ValueError:
                raise ConfigError(f"{setting}: not a valid PEM certificate") from None
            algorithms = _algorithms_for(public, setting)
            assert isinstance(public, _PublicKey)
            return _Key(verify_key=public, sign_key=None, algorithms=algorithms)
        if b"PRIVATE KEY-----" not in data:
            try:
                public = serialization.load_pem_public_key(data)
            except (ValueError, UnsupportedAlgorithm):
                raise ConfigError(f"{setting}: not a valid PEM public key") from None
            algorithms = _algorithms_for(public, setting)
            assert isinstance(public, _PublicKey)
            return _Key(verify_key=public, sign_key=None, algorithms=algorithms)
    elif b"PRIVATE KEY-----" not in data:
        raise ConfigError(f"{setting}: not a PEM private key (a public key cannot sign)")
    try:
        secret_key: object = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{setting}: the private key is encrypted (give an unencrypted key)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{setting}: not a valid PEM private key") from None
    algorithms = _algorithms_for(secret_key, setting)
    assert isinstance(secret_key, _PrivateKey)
    return _Key(verify_key=secret_key.public_key(), sign_key=secret_key, algorithms=algorithms)


def _read_key_file(path: str | os.PathLike[str], setting: str) -> bytes:
    where = f"{setting} {os.fspath(path)}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_SIZE:
        raise ConfigError(f"{where}: larger than {MAX_KEY_FILE_SIZE} bytes, not a PEM key")
    if not data.strip():
        raise ConfigError(f"{where}: the file is empty")
    return data


def _one_key(
    secret: str | None,
    pem: str | bytes | None,
    secret_setting: str,
    pem_setting: str,
    *,
    private: bool,
) -> _Key:
    if (secret is None) == (pem is None):
        raise ConfigError(f"give exactly one of {secret_setting} and {pem_setting}")
    if secret is not None:
        return _secret_key(secret, secret_setting)
    assert pem is not None
    return _pem_key(pem, pem_setting, private=private)


# ---------------------------------------------------------------------------
# Verifying


def _unauthorized(message: str, rid: RequestId) -> Unauthorized:
    return Unauthorized(message, request_id=rid)


def _pyjwt_message(exc: jwt.PyJWTError) -> str:
    """A fixed message for a PyJWT error (theirs may quote parts of the token)."""
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad token signature (forged, or signed with another key)"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        if exc.claim == "exp":
            return "the token has no 'exp' claim (tokens must expire)"
        return f"the token has no {exc.claim!r} claim"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "the token is not meant for this server (wrong or unexpected 'aud')"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "the token is from another issuer ('iss')"
    if isinstance(exc, InvalidSubjectError):
        return "the token's 'sub' claim must be a non-empty string"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "the token's algorithm is not accepted"
    if isinstance(exc, InvalidJTIError):
        return "the token's 'jti' claim must be a string"
    if isinstance(exc, jwt.DecodeError):
        return "malformed token (not a valid JWT)"
    return "invalid token"


def _time_value(value: object, name: str, rid: RequestId) -> float | None:
    """The ``nbf`` or ``iat`` claim's value as a time (``None``: missing)."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:  # an int too large for a float is no time either (isfinite overflows)
            if math.isfinite(value):
                return float(value)
        except OverflowError:
            pass
    raise _unauthorized(
        f"the token's {name!r} claim must be a number (seconds since the epoch)", rid
    )


# The three segments of a compact JWS, unpadded base64url (RFC 7515 §7.1). PyJWT also
# takes '=' padding; such tokens are left to it.
_COMPACT: Final = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
_HMAC_DIGEST: Final = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
# More brackets than this and PyJWT's ``json.loads`` may hit the recursion limit (how
# deep depends on the caller's stack): such payloads are left to PyJWT.
_MAX_BRACKETS: Final = 64
_HEADERS_KEPT: Final = 16
_PARTS_KEPT: Final = 1024


class _Header(msgspec.Struct, forbid_unknown_fields=True):
    """A plain JWS header. Any other member (``kid``, ``crit``, ``b64``, ...) fails to
    decode, and the token goes to PyJWT, which knows what each means."""

    alg: str
    typ: str = "JWT"


_NULL: Final = msgspec.Raw(b"null")


class _Claims(msgspec.Struct, gc=False):
    """The claims the fast path reads, typed so that msgspec checks each in C. Claims
    of another type (an ``exp`` that is a string, a ``jti`` that is not a string...)
    fail to decode, and PyJWT and :meth:`Grant.from_claims` then decide with their own
    messages. Other claims are skipped unread; :meth:`_HmacFastPath.claims` checks the
    whole text for what ``json.loads`` would refuse in them. ``UNSET`` where PyJWT
    tells a missing claim from a null one (``jti``, ``aud``, ``iss``).

    ``read``, ``publish`` and ``where`` stay raw JSON: most tokens share them, and
    :meth:`_HmacFastPath.parts` decodes and checks each distinct spelling once."""

    sub: str
    exp: int | float
    read: msgspec.Raw = _NULL
    publish: msgspec.Raw = _NULL
    where: msgspec.Raw = _NULL
    nbf: int | float | None = None
    iat: int | float | None = None
    aud: str | list[str] | msgspec.UnsetType | None = msgspec.UNSET
    iss: Any = msgspec.UNSET
    jti: str | msgspec.UnsetType = msgspec.UNSET


_header_decoder: Final = msgspec.json.Decoder(_Header)
_any_decoder: Final = msgspec.json.Decoder()
_claims_decoder: Final = msgspec.json.Decoder(_Claims)


_URL_TO_STD: Final = bytes.maketrans(b"-_", b"+/")
_STD_TO_URL: Final = bytes.maketrans(b"+/", b"-_")


def _b64encode(data: bytes) -> bytes:
    """Unpadded base64url, PyJWT's ``base64url_encode``."""
    return binascii.b2a_base64(data, newline=False).translate(_STD_TO_URL).rstrip(b"=")


_B64URL: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# The last character of a canonical segment, by its length mod 4: its bits past the
# data are zero (4 spare bits after 2 characters' worth, 2 after 3).
_CANONICAL_LAST: Final = {
    0: frozenset(_B64URL),
    2: frozenset(c for i, c in enumerate(_B64URL) if i % 16 == 0),
    3: frozenset(c for i, c in enumerate(_B64URL) if i % 4 == 0),
}


def _b64decode(segment: str) -> bytes | None:
    """An unpadded base64url segment (already known to be of the alphabet), decoded
    as PyJWT does; ``None`` where PyJWT refuses it (a length of 4n+1, or unused bits
    that are not zero, i.e. not the one canonical spelling)."""
    last = _CANONICAL_LAST.get(len(segment) % 4)
    if last is None or segment[-1] not in last:
        return None
    raw = segment.encode("ascii")
    return binascii.a2b_base64(raw.translate(_URL_TO_STD) + b"=" * (-len(raw) % 4))


_IPAD: Final = bytes.maketrans(bytes(range(256)), bytes(b ^ 0x36 for b in range(256)))
_OPAD: Final = bytes.maketrans(bytes(range(256)), bytes(b ^ 0x5C for b in range(256)))


class _Hmac:
    """HMAC (RFC 2104) with one key, equal to ``hmac.digest(key, msg, name)``.

    Why not ``hmac.digest``: with OpenSSL 3 each call sets the MAC up from the key
    again (a fetch by name, a context), about 1.6 µs of an authenticated connection's
    budget. Here the two keyed hash states are made once and copied per message
    (``tests/test_tokens_fast.py`` holds it to ``hmac.digest``): about 0.7 µs.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, name: str) -> None:
        block = hashlib.new(name).block_size
        if len(key) > block:
            key = hashlib.new(name, key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.new(name, key.translate(_IPAD))
        self._outer = hashlib.new(name, key.translate(_OPAD))

    def digest(self, msg: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class _HmacFastPath:
    """PyJWT's verdict on an HMAC token, without PyJWT, for tokens it accepts.

    :meth:`claims` returns the claims of a token that ``jwt.decode`` (as
    :meth:`TokenVerifier.verify` calls it) would accept: a :class:`_Claims` holding
    what ``jwt.decode`` would return for the claims statecast reads (``read``,
    ``publish`` and ``where`` as their JSON text, which :meth:`parts` decodes), or
    ``None`` for anything else, which PyJWT then decides. Never more lenient: each step
    does what PyJWT does or steps aside.

    Why by hand: PyJWT's per-token overhead (about 70 µs, a Python-level check of every
    base64url character and the header decoded twice) dominated the cost of an
    authenticated connection (docs/performance.md). This is a split, a cached header,
    one HMAC, a base64 decode and a msgspec decode: a few microseconds.
    """

    __slots__ = ("_audience", "_headers", "_issuer", "_macs", "_parts")

    def __init__(
        self, key: bytes, algorithms: tuple[str, ...], audience: str | None, issuer: str | None
    ) -> None:
        self._macs = {alg: _Hmac(key, _HMAC_DIGEST[alg]) for alg in algorithms}
        self._audience = audience
        self._issuer = issuer
        # Header segment -> the HMAC of its algorithm. A signer sends the same header
        # every time; only headers that passed every check are kept.
        self._headers: dict[str, _Hmac] = {}
        # (read, publish, where) as sent -> their checked parts, for valid ones.
        self._parts: dict[tuple[bytes, bytes, bytes], ClaimParts] = {}

    @classmethod
    def of(cls, key: _Key, audience: str | None, issuer: str | None) -> _HmacFastPath | None:
        """The fast path for ``key``, or ``None`` when it is not a secret PyJWT takes
        (a public key, or a secret PyJWT refuses as HMAC key: then PyJWT decides)."""
        if not isinstance(key.verify_key, bytes):
            return None
        try:
            jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).prepare_key(
                key.verify_key
            )
        except jwt.PyJWTError:
            return None
        return cls(key.verify_key, key.algorithms, audience, issuer)

    def _mac_of(self, header: str) -> _Hmac | None:
        data = _b64decode(header)
        if data is None:
            return None
        try:
            alg = _header_decoder.decode(data).alg
        except (msgspec.DecodeError, ValueError, RecursionError):  # ValueError: bad UTF-8
            return None
        mac = self._macs.get(alg)
        if mac is None:
            return None
        if len(self._headers) >= _HEADERS_KEPT:
            self._headers.clear()
        self._headers[header] = mac
        return mac

    def parts(self, claims: _Claims, rid: RequestId) -> ClaimParts | None:
        """The :func:`claim_parts` of ``claims``' ``read``, ``publish`` and ``where``
        (``Unauthorized`` if one is not of its shape), or ``None`` if one is JSON that
        ``json.loads`` might read otherwise than msgspec: PyJWT decides then."""
        key = (bytes(claims.read), bytes(claims.publish), bytes(claims.where))
        found = self._parts.get(key)
        if found is not None:
            return found
        try:
            read, publish, where = (_any_decoder.decode(raw) for raw in key)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return None
        parts = claim_parts(read, publish, where, rid)
        if len(self._parts) >= _PARTS_KEPT:
            self._parts.clear()
        self._parts[key] = parts
        return parts

    def claims(self, token: str) -> _Claims | None:
        """The claims, or ``None``: let PyJWT decide (see the class docstring)."""
        m = _COMPACT.fullmatch(token)
        if m is None:
            return None
        header, body, signature = m.groups()
        mac = self._headers.get(header) or self._mac_of(header)
        if mac is None:
            return None
        # The signature first, on the segments as sent (RFC 7515 §5.2); compared in its
        # canonical spelling, so a non-canonical one goes to PyJWT, which refuses it.
        expected = _b64encode(mac.digest(token[: m.end(2)].encode("ascii")))
        if not hmac.compare_digest(expected, signature.encode("ascii")):
            return None
        data = _b64decode(body)
        if data is None or data.count(b"[") + data.count(b"{") > _MAX_BRACKETS:
            return None
        # msgspec skips the claims the struct does not read without looking inside,
        # where json.loads (PyJWT) reads the whole text: what it refuses anywhere goes
        # to PyJWT. Text that is not UTF-8 (raw surrogates it takes, as json.loads
        # does), and an integer of more digits than Python converts (4,300 by default).
        if not data.isascii():
            try:
                data.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                return None
        digits = sys.get_int_max_str_digits()
        if digits and len(data) > digits and re.search(rb"\d{%d}" % (digits + 1), data):
            return None
        try:
            payload = _claims_decoder.decode(data)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return None  # e.g. NaN, or a surrogate in a claim it reads: PyJWT decides
        # PyJWT's claim checks for our options (require sub and exp; iss, aud, sub, jti;
        # the types of sub and jti are the decoder's).
        if self._issuer is not None and payload.iss != self._issuer:
            return None  # missing, not a string or another issuer
        aud = payload.aud
        if self._audience is None:
            if aud:
                return None
        elif not aud:
            return None
        elif isinstance(aud, str):
            if aud != self._audience:
                return None
        elif self._audience not in aud:
            return None
        return payload


class TokenVerifier:
    """Verifies bearer tokens against one key (see the module docstring).

    Give exactly one of ``secret`` (a shared HMAC secret) or ``public_key`` (PEM text
    of a public key, certificate or private key). ``audience`` / ``issuer``, when
    given, must match the token's ``aud`` / ``iss``. Bad settings raise
    :class:`ConfigError`.
    """

    __slots__ = ("_audience", "_fast", "_issuer", "_key", "_verified", "leeway")

    def __init__(
        self,
        secret: str | None = None,
        public_key: str | bytes | None = None,
        *,
        leeway: float = 0,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        key = _one_key(secret, public_key, "--auth-secret", "--auth-public-key", private=False)
        self._setup(key, leeway, audience, issuer)

    def _setup(self, key: _Key, leeway: float, audience: str | None, issuer: str | None) -> None:
        if (
            isinstance(leeway, bool)
            or not isinstance(leeway, int | float)
            or not 0 <= leeway < math.inf
        ):
            raise ConfigError("the token leeway must be a number of seconds >= 0")
        self._key = key
        self.leeway = float(leeway)
        self._verified: dict[str, tuple[Grant, float | None]] = {}
        self._audience = audience
        self._issuer = issuer
        self._fast = _HmacFastPath.of(key, audience, issuer)

    @classmethod
    def from_files(
        cls,
        *,
        secret: str | None = None,
        public_key_file: str | os.PathLike[str] | None = None,
        leeway: float = 0,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> TokenVerifier:
        """The verifier for ``--auth-secret`` or ``--auth-public-key FILE``;
        :class:`ConfigError` naming the file and what is wrong with it."""
        if public_key_file is None:
            return cls(secret, leeway=leeway, audience=audience, issuer=issuer)
        if secret is not None:
            raise ConfigError("give exactly one of --auth-secret and --auth-public-key")
        setting = "--auth-public-key"
        data = _read_key_file(public_key_file, setting)
        try:
            key = _pem_key(data, setting)
        except ConfigError as exc:
            message = str(exc).removeprefix(f"{setting}:").strip()
            raise ConfigError(f"{setting} {os.fspath(public_key_file)}: {message}") from None
        verifier = cls.__new__(cls)
        verifier._setup(key, leeway, audience, issuer)
        return verifier

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The ``alg`` values a token may have (fixed by the key)."""
        return self._key.algorithms

    @property
    def can_mint(self) -> bool:
        """Whether :meth:`mint` works: a secret, or a private key file."""
        return self._key.sign_key is not None

    def __repr__(self) -> str:  # never the key
        return f"TokenVerifier(algorithms={list(self.algorithms)!r})"

    def verify(self, token: object, now: float | None = None, *, rid: RequestId = None) -> Grant:
        """The grant of a valid ``token``; :class:`Unauthorized` otherwise (the checks
        are in the module docstring). ``now`` is unix time (default: the clock)."""
        if not isinstance(token, str):
            raise _unauthorized(f"the token must be a string, not {type(token).__name__}", rid)
        cached = self._verified.get(token)
        if cached is not None:  # signature and claims checked before: only time is left
            grant, nbf = cached
            self._check_time(grant, nbf, time.time() if now is None else now, rid)
            return grant
        if not token.strip():
            raise _unauthorized("the token is empty", rid)
        if len(token) > MAX_TOKEN_LENGTH:
            raise _unauthorized(f"the token is longer than {MAX_TOKEN_LENGTH} characters", rid)
        if not token.isascii() or token.count(".") != 2:
            raise _unauthorized(
                "malformed token (a JWT is three base64url parts joined by '.')", rid
            )
        fast = None if self._fast is None else self._fast.claims(token)
        parts = None
        if fast is not None:
            check_subject(fast.sub, fast.exp, rid)
            assert self._fast is not None
            parts = self._fast.parts(fast, rid)
        if fast is not None and parts is not None:
            grant = Grant.of_parts(fast.sub, fast.exp, parts)
            nbf = _time_value(fast.nbf, "nbf", rid)
            _time_value(fast.iat, "iat", rid)
        else:
            fast = None
            payload = self._pyjwt_claims(token, rid)
            grant = Grant.from_claims(payload, rid)  # exp required and a number
            nbf = _time_value(payload.get("nbf"), "nbf", rid)
            _time_value(payload.get("iat"), "iat", rid)
        try:
            # Every transport refuses a bad filter alike. Connections with the same
            # claim share the parsed filter (the session asks for it again).
            share_where(grant.where, "token.where")
        except BadRequest as exc:
            raise _unauthorized(f"the token's 'where' claim is not a filter: {exc}", rid) from None
        self._check_time(grant, nbf, time.time() if now is None else now, rid)
        if fast is None:
            # Many connections present the same token (one user, several screens; a
            # service's pool): verified once, a signature check costs nothing the next
            # time. Tokens of the HMAC fast path are not kept: checking one again costs
            # less than keeping it.
            if len(self._verified) >= _VERIFIED_CACHE:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = (grant, nbf)
        return grant

    def _pyjwt_claims(self, token: str, rid: RequestId) -> dict[str, Any]:
        """The claims of ``token`` as PyJWT verifies them (the reference); steps 2 to
        5 of the module docstring but the times, which :meth:`verify` checks."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise _unauthorized("malformed token (its header is not base64url JSON)", rid) from None
        except jwt.PyJWTError:  # an unsupported 'crit' extension, a 'kid' not a string
            raise _unauthorized(
                "invalid token header (unsupported 'crit' extension or bad 'kid')", rid
            ) from None
        alg = header.get("alg")
        if alg not in self._key.algorithms:
            shown = repr(alg)[:24] if isinstance(alg, str) else "missing or not a string"
            raise _unauthorized(
                f"the token's algorithm {shown} is not accepted here "
                f"(expected {' or '.join(self._key.algorithms)})",
                rid,
            )
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                self._key.verify_key,
                algorithms=list(self._key.algorithms),
                audience=self._audience,
                issuer=self._issuer,
                options={
                    # Time is checked by verify(), against ``now``.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["sub", "exp"],
                },
            )
        except jwt.PyJWTError as exc:
            raise _unauthorized(_pyjwt_message(exc), rid) from None
        except (ValueError, TypeError):  # defensive: nothing else should get out
            raise _unauthorized("malformed token (not a valid JWT)", rid) from None
        return payload

    def _check_time(self, grant: Grant, nbf: float | None, at: float, rid: RequestId) -> None:
        assert grant.exp is not None
        if grant.expired(at, self.leeway):
            raise _unauthorized(f"the token has expired ({math.ceil(at - grant.exp)} s ago)", rid)
        if nbf is not None and nbf > at + self.leeway:
            raise _unauthorized(
                f"the token is not valid yet (its 'nbf' is {math.ceil(nbf - at)} s from now)",
                rid,
            )

    def mint(
        self,
        *,
        sub: str,
        read: Collection[str] | None,
        publish: Collection[str] | None,
        where: Mapping[str, object] | None = None,
        ttl: float,
        now: float | None = None,
        algorithm: str | None = None,
    ) -> str:
        """A token this verifier accepts (see :func:`mint`); :class:`ConfigError` if it
        only has a public key, or for bad arguments."""
        if self._key.sign_key is None:
            raise ConfigError(
                "cannot mint tokens with a public key: give the private key file "
                "(or a secret) to sign with"
            )
        return _mint(
            self._key,
            sub=sub,
            read=read,
            publish=publish,
            where=where,
            ttl=ttl,
            now=now,
            algorithm=algorithm,
            audience=self._audience,
            issuer=self._issuer,
        )


# ---------------------------------------------------------------------------
# Minting


def _scope_arg(value: Collection[str] | None, setting: str) -> Scope:
    if value is None:
        return ALL
    if isinstance(value, str):
        return parse_scope(value, setting)
    names = frozenset(value)
    for name in names:
        if not isinstance(name, str) or not COLLECTION_RE.fullmatch(name):
            raise ConfigError(f"{setting}: invalid collection name {name!r}")
    return names


def _mint(
    key: _Key,
    *,
    sub: str,
    read: Collection[str] | None,
    publish: Collection[str] | None,
    where: Mapping[str, object] | None,
    ttl: float,
    now: float | None,
    algorithm: str | None,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    assert key.sign_key is not None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
        raise ConfigError("--ttl must be a positive number of seconds")
    alg = key.algorithms[0] if algorithm is None else algorithm
    if alg not in key.algorithms:
        raise ConfigError(
            f"algorithm {alg!r} does not fit the key (use {' or '.join(key.algorithms)})"
        )
    issued = time.time() if now is None else now
    if isinstance(sub, str) and (not sub or len(sub) > MAX_SUB_LENGTH or not sub.isprintable()):
        raise ConfigError(f"--sub must be 1 to {MAX_SUB_LENGTH} printable characters")
    grant = Grant(
        sub=sub,
        read=_scope_arg(read, "--read"),
        publish=_scope_arg(publish, "--publish"),
        where=None if where is None else dict(where),
        exp=issued + ttl,
    )
    claims = grant.to_claims()
    claims["iat"] = math.floor(issued)
    claims["exp"] = math.ceil(issued + ttl)
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, key.sign_key, algorithm=alg)


def mint(
    *,
    secret: str | None = None,
    private_key: str | bytes | None = None,
    sub: str,
    read: Collection[str] | None,
    publish: Collection[str] | None,
    where: Mapping[str, object] | None = None,
    ttl: float,
    now: float | None = None,
    algorithm: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """A signed token for ``sub``, valid for ``ttl`` seconds from ``now``.

    Sign with exactly one of ``secret`` (HS256 by default) or ``private_key`` (PEM;
    RS256 for RSA, ES256/384/512 by the curve for EC); ``algorithm`` picks another one
    the key allows. ``read`` / ``publish``: ``None`` or ``"*"`` = all, an empty
    collection or ``"none"`` = none, else collection names (a string is parsed as a
    comma-separated list, never split into characters). ``where`` is the raw filter
    object. :class:`ConfigError` for bad arguments.
    """
    key = _one_key(secret, private_key, "secret", "private_key", private=True)
    return _mint(
        key,
        sub=sub,
        read=read,
        publish=publish,
        where=where,
        ttl=ttl,
        now=now,
        algorithm=algorithm,
        audience=audience,
        issuer=issuer,
    )


# ---------------------------------------------------------------------------
# Command-line values (``statecast token``)

_NUMBER: Final = re.compile(r"\d+(?:\.\d+)?")
_TTL_PART: Final = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_TTL_FULL: Final = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_TTL: Final = 10 * 366 * 86400.0


def parse_ttl(text: str, setting: str = "--ttl") -> float:
    """Seconds in ``"45s"``, ``"30m"``, ``"8h"``, ``"2d"``, ``"1w"``, ``"1h30m"`` or a
    plain ``"3600"``; positive and at most ten years. :class:`ConfigError` otherwise."""
    hint = "use e.g. 45s, 30m, 8h, 2d, 1h30m or a number of seconds"
    if not isinstance(text, str):
        raise ConfigError(f"{setting}: expected a duration ({hint})")
    s = text.strip().lower()
    if _NUMBER.fullmatch(s):
        seconds = float(s)
    elif _TTL_FULL.fullmatch(s):
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _TTL_PART.findall(s))
    else:
        raise ConfigError(f"{setting}: invalid duration {text[:40]!r} ({hint})")
    if not 0 < seconds <= _MAX_TTL:
        raise ConfigError(f"{setting}: the duration must be more than 0 and at most 10 years")
    return seconds


def parse_scope(text: str, setting: str) -> Scope:
    """``"*"`` → ``None`` (all), ``"none"`` → empty (none), ``"a,b"`` → ``{"a", "b"}``;
    :class:`ConfigError` naming ``setting`` for an invalid name or an empty value."""
    s = text.strip()
    if s == "*":
        return ALL
    if s.lower() == "none":
        return NONE
    names = [part.strip() for part in s.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"{setting}: give '*', 'none' or comma-separated collection names")
    for name in names:
        if not COLLECTION_RE.fullmatch(name):
            raise ConfigError(
                f"{setting}: invalid collection name {name[:140]!r} (1 to 128 of A-Z a-z 0-9 _ . -)"
            )
    return frozenset(names)


def parse_where_arg(text: str | None, setting: str = "--where") -> dict[str, object] | None:
    """The JSON object of ``--where`` (``None``/empty → no filter); :class:`ConfigError`
    if it is not JSON or not an object. The filter's own rules are checked by the
    server's filter parser."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{setting}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{setting}: nested too deeply") from None
    if not isinstance(value, dict):
        raise ConfigError(f'{setting}: must be a JSON object, like \'{{"account": "ACC-1"}}\'')
    return value
