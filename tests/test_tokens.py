"""Bearer tokens: verify, mint, the algorithm-confusion guard, key files (tokens.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from pathlib import Path

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from statecast.core.policy import ALL, NONE, Grant
from statecast.errors import ConfigError, TokenExpired, Unauthorized
from statecast.tokens import (
    MAX_TOKEN_LENGTH,
    TokenVerifier,
    mint,
    parse_scope,
    parse_ttl,
    parse_where_arg,
)

NOW = 1_700_000_000.0
SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"  # 35 bytes: HS256 only
OTHER_SECRET = "another-secret-another-secret-another"


# -- keys ---------------------------------------------------------------------------


def private_pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "sub": "alice",
        "read": ["orders", "positions"],
        "publish": ["orders"],
        "where": {"account": "ACC-1"},
        "exp": int(NOW) + 600,
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not ...}


def hs256(payload: dict[str, object], secret: str | bytes = SECRET) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return jwt.encode(payload, key, algorithm="HS256")


def refused(
    verifier: TokenVerifier, token: object, match: str, *, secrets: tuple[str | bytes, ...] = ()
) -> Unauthorized:
    """Verify ``token`` expecting plain Unauthorized whose message matches ``match`` and
    quotes neither the token nor any of ``secrets``."""
    with pytest.raises(Unauthorized, match=match) as info:
        verifier.verify(token, now=NOW, rid=4)
    exc = info.value
    assert type(exc) is Unauthorized  # never TokenExpired at auth time
    assert exc.code == "unauthorized"
    assert exc.request_id == 4
    message = str(exc)
    if isinstance(token, str) and token:
        assert token not in message
        for part in token.split("."):
            if len(part) > 8:
                assert part not in message
    for secret in (SECRET, *secrets):
        text = secret.decode() if isinstance(secret, bytes) else secret
        assert text not in message
    return exc


# -- roundtrips ---------------------------------------------------------------------


def test_hs256_roundtrip() -> None:
    verifier = TokenVerifier(secret=SECRET)
    assert verifier.algorithms == ("HS256",)
    token = mint(
        secret=SECRET,
        sub="alice",
        read=["orders", "positions"],
        publish="none",
        where={"account": "ACC-1"},
        ttl=8 * 3600,
        now=NOW,
    )
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    g = verifier.verify(token, now=NOW)
    assert g == Grant(
        sub="alice",
        read=frozenset({"orders", "positions"}),
        publish=NONE,
        where={"account": "ACC-1"},
        exp=NOW + 8 * 3600,
    )
    assert g.to_frame() == {
        "sub": "alice",
        "read": ["orders", "positions"],
        "where": {"account": "ACC-1"},
        "publish": [],
        "exp": int(NOW) + 8 * 3600,
    }


def test_hs256_star_scopes_and_verifier_mint() -> None:
    verifier = TokenVerifier(secret=SECRET)
    assert verifier.can_mint
    token = verifier.mint(sub="svc", read="*", publish=None, ttl=60, now=NOW)
    g = verifier.verify(token, now=NOW + 59)
    assert g.read is ALL
    assert g.publish is ALL
    assert g.where is None


def test_long_secret_also_allows_hs384_and_hs512() -> None:
    secret = "x" * 64
    verifier = TokenVerifier(secret=secret)
    assert verifier.algorithms == ("HS256", "HS384", "HS512")
    for alg in verifier.algorithms:
        token = mint(secret=secret, sub="a", read="*", publish=(), ttl=60, now=NOW, algorithm=alg)
        assert verifier.verify(token, now=NOW).sub == "a"
    # HS512 is not allowed with a 35-byte secret.
    token = jwt.encode(claims(), SECRET.encode().ljust(64, b"!"), algorithm="HS512")
    refused(TokenVerifier(secret=SECRET), token, r"algorithm 'HS512' is not accepted")


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512"])
def test_rsa_roundtrip(rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    verifier = TokenVerifier(public_key=public_pem(rsa_key))
    assert verifier.algorithms == ("RS256", "RS384", "RS512")
    assert not verifier.can_mint
    token = mint(
        private_key=private_pem(rsa_key),
        sub="alice",
        read=["orders"],
        publish=["orders"],
        ttl=60,
        now=NOW,
        algorithm=None if alg == "RS256" else alg,
    )
    assert jwt.get_unverified_header(token)["alg"] == alg
    g = verifier.verify(token, now=NOW)
    assert g.sub == "alice"
    assert g.read == frozenset({"orders"})
    assert g.publish == g.read


@pytest.mark.parametrize(
    ("curve", "alg"),
    [(ec.SECP256R1(), "ES256"), (ec.SECP384R1(), "ES384"), (ec.SECP521R1(), "ES512")],
)
def test_ec_roundtrip_algorithm_follows_the_curve(curve: ec.EllipticCurve, alg: str) -> None:
    key = ec.generate_private_key(curve)
    verifier = TokenVerifier(public_key=public_pem(key).decode())  # str PEM works too
    assert verifier.algorithms == (alg,)
    token = mint(private_key=private_pem(key), sub="bob", read="*", publish="*", ttl=60, now=NOW)
    assert jwt.get_unverified_header(token)["alg"] == alg
    assert verifier.verify(token, now=NOW).sub == "bob"


def test_es256_token_refused_by_p384_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier(public_key=public_pem(ec.generate_private_key(ec.SECP384R1())))
    token = mint(private_key=private_pem(ec_key), sub="a", read="*", publish="*", ttl=60, now=NOW)
    refused(verifier, token, r"algorithm 'ES256' is not accepted here \(expected ES384\)")


# -- forged, expired, other keys ----------------------------------------------------


def test_altered_signature_is_refused() -> None:
    token = hs256(claims())
    head, body, sig = token.split(".")
    forged = f"{head}.{body}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
    refused(TokenVerifier(secret=SECRET), forged, "bad token signature")


def test_altered_payload_is_refused() -> None:
    token = hs256(claims())
    head, _, sig = token.split(".")
    body = b64(json.dumps(claims(sub="root", read="*", publish="*")).encode())
    refused(TokenVerifier(secret=SECRET), f"{head}.{body}.{sig}", "bad token signature")


def test_token_signed_with_another_secret_is_refused() -> None:
    refused(
        TokenVerifier(secret=SECRET),
        hs256(claims(), OTHER_SECRET),
        "bad token signature",
        secrets=(OTHER_SECRET,),
    )


def test_token_signed_with_another_rsa_key_is_refused(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    token = mint(
        private_key=private_pem(other_rsa_key), sub="a", read="*", publish="*", ttl=60, now=NOW
    )
    refused(TokenVerifier(public_key=public_pem(rsa_key)), token, "bad token signature")


def test_expired_token_is_unauthorized_not_token_expired() -> None:
    verifier = TokenVerifier(secret=SECRET)
    token = hs256(claims(exp=int(NOW) - 30))
    exc = refused(verifier, token, r"the token has expired \(30 s ago\)")
    assert not isinstance(exc, TokenExpired)
    # exp == now is already expired (RFC 7519: now must be before exp).
    refused(verifier, hs256(claims(exp=int(NOW))), "expired")


def test_leeway_allows_clock_skew() -> None:
    verifier = TokenVerifier(secret=SECRET, leeway=60)
    assert verifier.verify(hs256(claims(exp=int(NOW) - 30)), now=NOW).sub == "alice"
    assert verifier.verify(hs256(claims(nbf=int(NOW) + 30)), now=NOW).sub == "alice"
    refused(verifier, hs256(claims(exp=int(NOW) - 61)), "expired")


def test_not_yet_valid_token_is_refused() -> None:
    verifier = TokenVerifier(secret=SECRET)
    refused(verifier, hs256(claims(nbf=int(NOW) + 120)), r"not valid yet .*120 s from now")
    assert verifier.verify(hs256(claims(nbf=int(NOW))), now=NOW).sub == "alice"


def test_iat_in_the_future_is_not_an_error() -> None:
    assert TokenVerifier(secret=SECRET).verify(hs256(claims(iat=int(NOW) + 999)), now=NOW)


def test_verify_uses_the_clock_by_default() -> None:
    verifier = TokenVerifier(secret=SECRET)
    token = mint(secret=SECRET, sub="a", read="*", publish="none", ttl=60)
    assert verifier.verify(token).sub == "a"
    with pytest.raises(Unauthorized, match="expired"):
        verifier.verify(hs256(claims(exp=int(NOW))))


# -- algorithm confusion ------------------------------------------------------------


def test_alg_none_is_refused() -> None:
    token = jwt.encode(claims(), "", algorithm="none")
    assert token.endswith(".")
    refused(TokenVerifier(secret=SECRET), token, r"algorithm 'none' is not accepted")


def test_alg_none_is_refused_by_a_public_key_verifier(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), "", algorithm="none")
    refused(TokenVerifier(public_key=public_pem(rsa_key)), token, "'none' is not accepted")


def hs256_with_raw_key(payload: dict[str, object], key: bytes) -> str:
    """An HS256 token signed with any bytes (PyJWT refuses PEM keys as secrets)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_hs256_signed_with_the_public_key_pem_is_refused(
    kind: str, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """The classic algorithm-confusion attack: the public key is public, so anyone can
    HMAC a token with its PEM text; a verifier must never treat it as a secret."""
    pem = public_pem(rsa_key if kind == "rsa" else ec_key)
    verifier = TokenVerifier(public_key=pem)
    for key in (pem, pem.strip(), pem.replace(b"\n", b"\r\n")):
        token = hs256_with_raw_key(claims(sub="root", read="*", publish="*"), key)
        refused(verifier, token, r"algorithm 'HS256' is not accepted here \(expected (RS|ES)")


def test_rs256_token_is_refused_by_a_secret_verifier(rsa_key: rsa.RSAPrivateKey) -> None:
    token = mint(private_key=private_pem(rsa_key), sub="a", read="*", publish="*", ttl=60, now=NOW)
    refused(TokenVerifier(secret=SECRET), token, r"algorithm 'RS256' is not accepted here")


def test_missing_or_odd_alg_header_is_refused() -> None:
    verifier = TokenVerifier(secret=SECRET)
    body = b64(json.dumps(claims()).encode())
    for header in ({"typ": "JWT"}, {"alg": 256}, {"alg": "HS256 " * 20}):
        token = f"{b64(json.dumps(header).encode())}.{body}.c2ln"
        refused(verifier, token, "algorithm .* is not accepted")


def test_unknown_critical_header_is_refused() -> None:
    token = jwt.encode(
        claims(), SECRET.encode(), algorithm="HS256", headers={"crit": ["exp2"], "exp2": 1}
    )
    refused(TokenVerifier(secret=SECRET), token, r"invalid token header \(unsupported 'crit'")


def test_kid_that_is_not_a_string_is_refused() -> None:
    token = jwt.encode(claims(), SECRET.encode(), algorithm="HS256", headers={"kid": "k1"})
    head, body, sig = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=="))
    header["kid"] = 7
    refused(
        TokenVerifier(secret=SECRET),
        f"{b64(json.dumps(header).encode())}.{body}.{sig}",
        "invalid token header",
    )


# -- garbage ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "match"),
    [
        (None, "must be a string, not NoneType"),
        (123, "must be a string, not int"),
        (b"a.b.c", "must be a string, not bytes"),
        (["a.b.c"], "must be a string, not list"),
        ("", "the token is empty"),
        ("   ", "the token is empty"),
        ("x" * (MAX_TOKEN_LENGTH + 1), f"longer than {MAX_TOKEN_LENGTH} characters"),
        ("not-a-jwt-at-all", "malformed token"),
        ("a.b", "malformed token"),
        ("a.b.c.d", "malformed token"),
        ("é.é.é", "malformed token"),
        ("a.b.c", "malformed token"),
        ("!!!!.????.****", "malformed token"),
        (f"{b64(b'[1,2]')}.e30.c2ln", "malformed token"),
        (f"{b64(b'not json')}.e30.c2ln", "malformed token"),
    ],
)
def test_garbage_is_refused(token: object, match: str) -> None:
    refused(TokenVerifier(secret=SECRET), token, match)


def test_payload_that_is_not_json_is_refused() -> None:
    head = b64(json.dumps({"alg": "HS256"}).encode())
    for body in (b64(b"not json"), b64(b"[1]"), "!!!"):
        signing_input = f"{head}.{body}".encode()
        sig = b64(hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest())
        refused(TokenVerifier(secret=SECRET), f"{head}.{body}.{sig}", "malformed token")


def test_oversized_but_validly_signed_token_is_refused() -> None:
    token = hs256(claims(pad="x" * MAX_TOKEN_LENGTH))
    refused(TokenVerifier(secret=SECRET), token, "longer than")


# -- claims -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (claims(sub=...), "no 'sub' claim"),
        (claims(exp=...), r"no 'exp' claim \(tokens must expire\)"),
        (claims(sub=5), "'sub' claim must be a non-empty string"),
        (claims(sub=""), "'sub' claim must be a non-empty string"),
        (claims(exp="tomorrow"), "'exp' claim must be a number"),
        (claims(exp=True), "'exp' claim must be a number"),
        (claims(nbf="now"), "'nbf' claim must be a number"),
        (claims(iat=[1]), "'iat' claim must be a number"),
        (claims(read="orders"), r"'read' claim must be \"\*\" or a list"),
        (claims(read=[1, 2]), "'read' claim has an invalid collection name 1"),
        (claims(read=["no spaces"]), "'read' claim has an invalid collection name 'no spaces'"),
        (claims(publish={"orders": True}), "'publish' claim must be"),
        (claims(publish=["x" * 129]), "'publish' claim has an invalid collection name"),
        (claims(where=["account"]), "'where' claim must be a JSON object"),
        (claims(where="account=ACC-1"), "'where' claim must be a JSON object"),
        (claims(where={"qty": math.inf}), "NaN or Infinity"),
        (claims(jti=5), "'jti' claim must be a string"),
    ],
)
def test_bad_claims_are_refused(payload: dict[str, object], match: str) -> None:
    refused(TokenVerifier(secret=SECRET), hs256(payload), match)


def test_missing_read_and_publish_mean_none() -> None:
    g = TokenVerifier(secret=SECRET).verify(
        hs256(claims(read=..., publish=..., where=None)), now=NOW
    )
    assert g.read == NONE
    assert g.publish == NONE
    assert g.where is None


def test_unknown_claims_are_ignored() -> None:
    g = TokenVerifier(secret=SECRET).verify(hs256(claims(role="admin", jti="j1")), now=NOW)
    assert g.sub == "alice"


def test_audience_and_issuer() -> None:
    verifier = TokenVerifier(secret=SECRET, audience="statecast", issuer="idp")
    good = hs256(claims(aud="statecast", iss="idp"))
    assert verifier.verify(good, now=NOW).sub == "alice"
    refused(verifier, hs256(claims(aud="other", iss="idp")), "not meant for this server")
    refused(verifier, hs256(claims(iss="idp")), "no 'aud' claim")
    refused(verifier, hs256(claims(aud="statecast", iss="evil")), "another issuer")
    # A token meant for some audience is refused by a verifier that has none.
    refused(TokenVerifier(secret=SECRET), good, "not meant for this server")
    # mint sets them from the verifier.
    minted = verifier.mint(sub="a", read="*", publish="none", ttl=60, now=NOW)
    assert verifier.verify(minted, now=NOW).sub == "a"


# -- settings and keys --------------------------------------------------------------


def test_verifier_settings_errors(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError, match="exactly one of --auth-secret and --auth-public-key"):
        TokenVerifier()
    with pytest.raises(ConfigError, match="exactly one"):
        TokenVerifier(secret=SECRET, public_key=public_pem(rsa_key))
    with pytest.raises(ConfigError, match="at least 32 bytes") as info:
        TokenVerifier(secret="short")
    assert "short" not in str(info.value)
    with pytest.raises(ConfigError, match="is a PEM key, not a shared secret"):
        TokenVerifier(secret=public_pem(rsa_key).decode())
    with pytest.raises(ConfigError, match="leeway"):
        TokenVerifier(secret=SECRET, leeway=-1)
    with pytest.raises(ConfigError, match="not a PEM key"):
        TokenVerifier(public_key="hello")
    assert SECRET not in repr(TokenVerifier(secret=SECRET))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_from_files_public_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = write(tmp_path, "pub.pem", public_pem(rsa_key))
    verifier = TokenVerifier.from_files(public_key_file=path, leeway=5)
    assert verifier.leeway == 5
    assert not verifier.can_mint
    with pytest.raises(ConfigError, match="cannot mint tokens with a public key"):
        verifier.mint(sub="a", read="*", publish="*", ttl=60)
    token = mint(private_key=private_pem(rsa_key), sub="a", read="*", publish="*", ttl=60, now=NOW)
    assert verifier.verify(token, now=NOW).sub == "a"


def test_from_files_secret() -> None:
    assert TokenVerifier.from_files(secret=SECRET).algorithms == ("HS256",)
    with pytest.raises(ConfigError, match="exactly one"):
        TokenVerifier.from_files()
    with pytest.raises(ConfigError, match="exactly one"):
        TokenVerifier.from_files(secret=SECRET, public_key_file="x.pem")


def test_from_files_private_key_derives_the_public_key_and_can_mint(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """``statecast token`` mints from the same settings as the server."""
    path = write(tmp_path, "key.pem", private_pem(ec_key))
    verifier = TokenVerifier.from_files(public_key_file=str(path))
    assert verifier.can_mint
    assert verifier.algorithms == ("ES256",)
    token = verifier.mint(sub="a", read="orders,positions", publish="none", ttl=60, now=NOW)
    g = TokenVerifier(public_key=public_pem(ec_key)).verify(token, now=NOW)
    assert g.read == frozenset({"orders", "positions"})
    assert g.publish == NONE


def test_from_files_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    path = write(tmp_path, "cert.pem", ca.cert_pem.bytes())
    verifier = TokenVerifier.from_files(public_key_file=path)
    assert verifier.algorithms == ("ES256",)
    token = mint(
        private_key=ca.private_key_pem.bytes(), sub="a", read="*", publish="*", ttl=60, now=NOW
    )
    assert verifier.verify(token, now=NOW).sub == "a"


def key_file_error(tmp_path: Path, data: bytes | None, match: str) -> None:
    path = tmp_path / "key.pem"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(ConfigError, match=match) as info:
        TokenVerifier.from_files(public_key_file=path)
    assert str(path) in str(info.value)
    assert str(info.value).startswith("--auth-public-key ")


def test_key_file_missing(tmp_path: Path) -> None:
    key_file_error(tmp_path, None, "cannot read it: No such file")


def test_key_file_empty(tmp_path: Path) -> None:
    key_file_error(tmp_path, b"  \n", "the file is empty")


def test_key_file_not_pem(tmp_path: Path) -> None:
    key_file_error(
        tmp_path, b"ssh-rsa AAAAB3Nza... me@host\n", r"not a PEM key \(no '-----BEGIN' line\)"
    )


def test_key_file_bad_pem(tmp_path: Path) -> None:
    bad = b"-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"
    key_file_error(tmp_path, bad, "not a valid PEM public key")
    bad_cert = b"-----BEGIN CERTIFICATE-----\nbm90IGEga2V5\n-----END CERTIFICATE-----\n"
    key_file_error(tmp_path, bad_cert, "not a valid PEM certificate")
    bad_private = b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    key_file_error(tmp_path, bad_private, "not a valid PEM private key")


def test_key_file_too_large(tmp_path: Path) -> None:
    key_file_error(tmp_path, b"-----BEGIN" + b"x" * (1 << 20), "larger than")


def test_key_file_encrypted_private_key(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    data = ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    key_file_error(tmp_path, data, "the private key is encrypted")


def test_key_file_small_rsa_key(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    key_file_error(tmp_path, public_pem(small), "1024 bits; at least 2048")


def test_key_file_unsupported_key_types(tmp_path: Path) -> None:
    key_file_error(
        tmp_path, public_pem(ed25519.Ed25519PrivateKey.generate()), "unsupported key type"
    )
    key_file_error(
        tmp_path,
        public_pem(ec.generate_private_key(ec.SECP256K1())),
        "unsupported EC curve secp256k1",
    )


# -- mint ---------------------------------------------------------------------------


def test_mint_errors(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError, match="exactly one of secret and private_key"):
        mint(sub="a", read="*", publish="*", ttl=60)
    with pytest.raises(ConfigError, match="a public key cannot sign"):
        mint(private_key=public_pem(rsa_key), sub="a", read="*", publish="*", ttl=60)
    with pytest.raises(ConfigError, match=r"algorithm 'HS256' does not fit the key"):
        mint(
            private_key=private_pem(rsa_key),
            sub="a",
            read="*",
            publish="*",
            ttl=60,
            algorithm="HS256",
        )
    with pytest.raises(ConfigError, match=r"algorithm 'none' does not fit"):
        mint(secret=SECRET, sub="a", read="*", publish="*", ttl=60, algorithm="none")
    for ttl in (0, -5, math.inf, math.nan):
        with pytest.raises(ConfigError, match="--ttl"):
            mint(secret=SECRET, sub="a", read="*", publish="*", ttl=ttl)
    with pytest.raises(ConfigError, match="--read: invalid collection name 'bad name'"):
        mint(secret=SECRET, sub="a", read=["bad name"], publish="*", ttl=60)
    with pytest.raises(ConfigError, match="--publish: invalid collection name"):
        mint(secret=SECRET, sub="a", read="*", publish="a,b c", ttl=60)
    with pytest.raises(ConfigError, match="--sub"):
        mint(secret=SECRET, sub="", read="*", publish="*", ttl=60)
    with pytest.raises(ConfigError, match="where"):
        mint(secret=SECRET, sub="a", read="*", publish="*", where={"x": math.nan}, ttl=60)


def test_mint_string_scope_is_never_split_into_characters() -> None:
    token = mint(secret=SECRET, sub="a", read="orders", publish=[], ttl=60, now=NOW)
    g = TokenVerifier(secret=SECRET).verify(token, now=NOW)
    assert g.read == frozenset({"orders"})
    assert g.publish == NONE


def test_minted_claims() -> None:
    token = mint(secret=SECRET, sub="a", read=["b", "a"], publish="*", ttl=90.5, now=NOW + 0.25)
    payload = jwt.decode(
        token, SECRET.encode(), algorithms=["HS256"], options={"verify_exp": False}
    )
    assert payload == {
        "sub": "a",
        "read": ["a", "b"],
        "publish": "*",
        "iat": int(NOW),
        "exp": int(NOW) + 91,
    }


# -- command-line values ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("30m", 1800),
        ("8h", 28800),
        ("2d", 172800),
        ("1w", 604800),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("3600", 3600),
        (" 8H ", 28800),
        ("0.5", 0.5),
    ],
)
def test_parse_ttl(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "h", "8x", "-5", "0", "0s", "8 h", "1e3", "inf", "nan", "11000d", "8h 30m"]
)
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--ttl: "):
        parse_ttl(text)


def test_parse_ttl_names_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"^--token-ttl: invalid duration 'soon'"):
        parse_ttl("soon", "--token-ttl")


def test_parse_scope() -> None:
    assert parse_scope("*", "--read") is ALL
    assert parse_scope("none", "--read") == NONE
    assert parse_scope("NONE", "--publish") == NONE
    assert parse_scope("orders, positions,", "--read") == frozenset({"orders", "positions"})
    with pytest.raises(ConfigError, match=r"^--read: give"):
        parse_scope(" , ", "--read")
    with pytest.raises(ConfigError, match=r"^--read: invalid collection name '\*x'"):
        parse_scope("orders,*x", "--read")


def test_parse_where_arg() -> None:
    assert parse_where_arg('{"account":"ACC-1"}') == {"account": "ACC-1"}
    assert parse_where_arg(None) is None
    assert parse_where_arg("  ") is None
    with pytest.raises(ConfigError, match=r"^--where: not valid JSON"):
        parse_where_arg("{account: 1}")
    with pytest.raises(ConfigError, match=r"^--where: must be a JSON object"):
        parse_where_arg("[1]")
