"""Who may do what: user tokens (JWTs), API keys, and the grants they carry.

Theory of operation
-------------------
An *app* (the operator's server) holds an API key and may do everything the
HTTP API offers. A *user* (a browser, a watcher) holds a **user token**: a JWT
signed by the app with the broker's ``jwt_secret`` (HS256) or the private half
of ``jwt_public_key`` (RS256, ES256, EdDSA). Its claims:

- ``sub`` (required): the user id; ``exp`` (required): when it stops working;
- ``channels``: glob patterns of channels the user may subscribe to and read
  the history of;
- ``publish``: glob patterns of channels the user may ``pub`` to (the
  channel's ``client_events`` still decide which events; ``ai:cancel`` counts);
- ``ai``: glob patterns of session ids the user may start answers in and
  cancel (``/ai/chat``, ``/ai/cancel``).

Patterns are :mod:`fnmatch` globs matched case-sensitively: ``*`` matches any
run of characters, ``/`` included (``ai-chat/*``), ``?`` one, ``[...]`` a set.

Tokens are verified with PyJWT, against the algorithms the configured keys
allow and never ``none``; ``aud`` and ``iss`` are checked when configured.
Verification costs tens of microseconds (HS256) to a few hundred (RSA, EC),
once per token: connections authenticate once and refresh rarely. Each
claim's patterns compile to one regular expression, cached by pattern list, so
checking a grant is one match. A token may carry at most
:data:`MAX_PATTERNS` patterns per claim of :data:`MAX_PATTERN_LENGTH`
characters each (:data:`MAX_CLAIM_LENGTH` in all), and be at most
:data:`MAX_TOKEN_LENGTH` characters long.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import hmac
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker.config import AuthConfig, ConfigError

MAX_TOKEN_LENGTH = 8192
MAX_PATTERNS = 64
MAX_PATTERN_LENGTH = 256
#: Characters of all of one claim's patterns: compiling them runs on the event loop.
MAX_CLAIM_LENGTH = 2048
#: Seconds of clock skew allowed when checking ``exp`` and ``nbf``.
LEEWAY = 5.0
#: Longest lifetime ``tokenfan token`` and the demo mint (the broker accepts whatever ``exp`` says).
MAX_MINT_TTL = 30 * 24 * 3600


class AuthError(Exception):
    """A credential is missing or does not verify; ``reason`` says why, for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@functools.lru_cache(maxsize=256)
def _compile(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns))


@dataclass(frozen=True, slots=True)
class Patterns:
    """Glob patterns (one claim of a token) matched as one regular expression."""

    patterns: tuple[str, ...] = ()

    def allow(self, name: str) -> bool:
        """Whether ``name`` matches one of the patterns."""
        compiled = _compile(self.patterns)
        return compiled is not None and compiled.match(name) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Grants:
    """What one credential allows. :data:`APP` (an API key) allows everything."""

    user: str | None  #: the token's ``sub``; None for an API key
    exp: float = float("inf")  #: when the credential stops working (Unix time)
    channels: Patterns = Patterns()
    publish: Patterns = Patterns()
    ai: Patterns = Patterns()
    app: bool = False

    def may_subscribe(self, channel: str) -> bool:
        return self.app or self.channels.allow(channel)

    def may_publish(self, channel: str) -> bool:
        return self.app or self.publish.allow(channel)

    def may_use_ai(self, session_id: str) -> bool:
        return self.app or self.ai.allow(session_id)


#: What an API key allows, and everyone on a broker without ``[auth]``: everything.
APP = Grants(user=None, app=True)


def _claim_patterns(claims: dict[str, Any], name: str) -> Patterns:
    raw = claims.get(name, [])
    if isinstance(raw, str):
        raw = [raw]
    if (not isinstance(raw, list) or len(raw) > MAX_PATTERNS
            or not all(isinstance(item, str) and 0 < len(item) <= MAX_PATTERN_LENGTH for item in raw)
            or sum(len(item) for item in raw) > MAX_CLAIM_LENGTH):
        raise AuthError(f"claim {name!r} must be a list of at most {MAX_PATTERNS} glob patterns "
                        f"of 1 to {MAX_PATTERN_LENGTH} characters, {MAX_CLAIM_LENGTH} in all")
    return Patterns(tuple(raw))


def _public_key_algorithm(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError(f"jwt_public_key: an EC key must be on P-256 (ES256), not {key.curve.name}")
        return "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ConfigError(f"jwt_public_key: {type(key).__name__} keys are not supported "
                      "(use RSA for RS256, EC P-256 for ES256, or Ed25519 for EdDSA)")


class Authenticator:
    """Verifies API keys and user tokens against one ``[auth]`` configuration."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        # Keys are compared as SHA-256 digests: equal lengths, so compare_digest leaks nothing.
        self._api_keys = [hashlib.sha256(key.encode()).digest() for key in config.api_keys]
        self._public_key: Any = None
        self._public_algorithm = ""
        if config.jwt_public_key:
            try:
                pem = Path(config.jwt_public_key).read_bytes()
            except OSError as exc:
                raise ConfigError(f"jwt_public_key: cannot read {config.jwt_public_key}: "
                                  f"{exc.strerror}") from None
            try:
                self._public_key = load_pem_public_key(pem)
            except ValueError as exc:
                raise ConfigError(f"jwt_public_key: {config.jwt_public_key} is not a PEM public key "
                                  f"({exc})") from None
            self._public_algorithm = _public_key_algorithm(self._public_key)

    @property
    def users(self) -> bool:
        """Whether user tokens can be verified (a JWT key is configured)."""
        return bool(self.config.jwt_secret or self._public_key is not None)

    @property
    def required(self) -> bool:
        """Whether the HTTP API needs a credential (any key is configured)."""
        return self.users or bool(self._api_keys)

    def api_key(self, credential: str) -> bool:
        """Whether ``credential`` is one of the API keys (in constant time, whichever it is)."""
        digest = hashlib.sha256(credential.encode("utf-8", "surrogateescape")).digest()
        found = False
        for key in self._api_keys:
            found |= hmac.compare_digest(digest, key)
        return found

    def bearer(self, credential: str, *, now: float | None = None) -> Grants:
        """The grants of a credential (``Authorization: Bearer``, or a WebSocket ``token``): an
        API key or a user token."""
        if self.api_key(credential):
            return APP
        if not self.users:
            raise AuthError("not a valid API key")
        return self.verify(credential, now=now)

    def verify(self, token: str, *, now: float | None = None) -> Grants:
        """Verify a user token; return its grants.

        Raises:
            AuthError: the token is malformed, unsigned, wrongly signed, expired, not yet
                valid, for another audience or issuer, or its claims are malformed.
        """
        if not self.users:
            raise AuthError("this broker has no jwt_secret or jwt_public_key to verify tokens with")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError(f"token longer than {MAX_TOKEN_LENGTH} characters")
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.DecodeError as exc:
            raise AuthError(f"not a JWT: {exc}") from None
        if algorithm == "HS256" and self.config.jwt_secret:
            keys: Sequence[Any] = self.config.jwt_secret
        elif algorithm == self._public_algorithm and self._public_key is not None:
            keys = [self._public_key]
        else:
            allowed = [name for name, on in (("HS256", bool(self.config.jwt_secret)),
                                             (self._public_algorithm, self._public_key is not None)) if on]
            shown = ascii(algorithm)[:40]  # the client's own string: never more than ASCII back
            raise AuthError(f"token signed with {shown}; this broker accepts {' or '.join(allowed)}")
        config = self.config
        options: Any = {"require": ["sub", "exp"], "verify_aud": bool(config.jwt_audience),
                        "verify_iss": bool(config.jwt_issuer)}
        claims: dict[str, Any] | None = None
        for key in keys:
            try:
                claims = jwt.decode(token, key, algorithms=[algorithm], options=options, leeway=LEEWAY,
                                    audience=config.jwt_audience or None, issuer=config.jwt_issuer or None)
                break
            except jwt.InvalidSignatureError:
                continue  # another secret (during a rotation) may have signed it
            except jwt.ExpiredSignatureError:
                raise AuthError("token expired") from None
            except jwt.ImmatureSignatureError:
                raise AuthError("token not valid yet (nbf or iat in the future)") from None
            except jwt.InvalidAudienceError:
                raise AuthError(f"token is for another audience (this broker is {config.jwt_audience!r})") \
                    from None
            except jwt.InvalidIssuerError:
                raise AuthError(f"token from another issuer (this broker trusts {config.jwt_issuer!r})") \
                    from None
            except jwt.MissingRequiredClaimError as exc:
                raise AuthError(f"token lacks the {exc.claim!r} claim") from None
            except jwt.InvalidTokenError as exc:
                raise AuthError(f"invalid token: {exc}") from None
        if claims is None:
            raise AuthError("bad signature")
        user, exp = claims["sub"], claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not -2**53 < exp < 2**53:
            raise AuthError("claim 'exp' must be a number of seconds since 1970")
        if not isinstance(user, str) or not 0 < len(user) <= MAX_PATTERN_LENGTH:
            raise AuthError(f"claim 'sub' must be a string of 1 to {MAX_PATTERN_LENGTH} characters")
        if now is not None and exp <= now:
            # Within PyJWT's leeway, but a connection would end at once: refuse it now instead
            # (TOKEN_EXPIRED would make a client with a stale token reconnect in a loop).
            raise AuthError("token expired")
        return Grants(user=user, exp=float(exp), channels=_claim_patterns(claims, "channels"),
                      publish=_claim_patterns(claims, "publish"), ai=_claim_patterns(claims, "ai"))

    def mint(self, *, user: str, ttl: float, channels: Sequence[str] = (), publish: Sequence[str] = (),
             ai: Sequence[str] = (), now: float | None = None) -> tuple[str, int]:
        """A user token signed with the first ``jwt_secret`` (HS256); return it and its ``exp``.

        Raises:
            ConfigError: no ``jwt_secret`` is configured (a public key cannot sign).
        """
        if not self.config.jwt_secret:
            raise ConfigError("minting tokens needs jwt_secret (the broker cannot sign with a public key)")
        if not 0 < ttl <= MAX_MINT_TTL:
            raise ConfigError(f"ttl: must be above 0 and at most {MAX_MINT_TTL} seconds, got {ttl}")
        issued = int(time.time() if now is None else now)
        exp = issued + max(1, round(ttl))
        claims: dict[str, Any] = {"sub": user, "iat": issued, "exp": exp, "channels": list(channels),
                                  "publish": list(publish), "ai": list(ai)}
        if self.config.jwt_audience:
            claims["aud"] = self.config.jwt_audience
        if self.config.jwt_issuer:
            claims["iss"] = self.config.jwt_issuer
        return jwt.encode(claims, self.config.jwt_secret[0], algorithm="HS256"), exp


def bearer_credential(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <credential>`` header, or None."""
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()
