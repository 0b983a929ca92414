"""The ingress's checks, without HTTP: API keys, per-key rate limits, request limits and the prompt guard.

Every check raises ``Rejection`` with the HTTP status, a reason code (the ``reason`` label of the
rejects metric) and a message naming the limit, so the HTTP layer only maps it to a response.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.config import JwtConfig, ProtectionConfig

log = logging.getLogger(__name__)


class Rejection(Exception):
    """A request refused before it reaches a model."""

    def __init__(self, status: int, reason: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A key and its own rate limit (unset: the configured defaults)."""

    key: str = field(repr=False)
    requests_per_minute: float | None = None
    burst: int | None = None


def _parse_key_line(line: str, path: Path, number: int) -> ApiKey:
    """``KEY [REQUESTS_PER_MINUTE [BURST]]``"""
    key, *limits = line.split()
    try:
        per_minute = float(limits[0]) if limits else None
        burst = int(limits[1]) if len(limits) > 1 else None
    except ValueError:
        raise RuntimeError(f"{path}:{number}: expected 'KEY [REQUESTS_PER_MINUTE [BURST]]'") from None
    if len(limits) > 2 or (per_minute is not None and per_minute <= 0) or (burst is not None and burst < 1):
        raise RuntimeError(f"{path}:{number}: expected 'KEY [REQUESTS_PER_MINUTE [BURST]]' with positive limits")
    return ApiKey(key, per_minute, burst)


def load_api_keys(config: ProtectionConfig, environ: Mapping[str, str] | None = None) -> list[ApiKey]:
    """Keys from the environment variable and the secrets file; an unreadable file is an error, not 'no keys'.

    The file holds one key per line, optionally followed by that key's own requests per minute and burst.
    """
    environ = os.environ if environ is None else environ
    keys: list[ApiKey] = []
    if config.api_keys_env:
        keys += [ApiKey(key.strip()) for key in environ.get(config.api_keys_env, "").split(",") if key.strip()]
    if config.api_keys_file:
        path = Path(config.api_keys_file).expanduser()
        try:
            text = path.read_text()
        except OSError as err:
            raise RuntimeError(f"serve.protection.api_keys_file {path}: cannot read it ({err.strerror})") from err
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                keys.append(_parse_key_line(line, path, number))
    return keys


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key's digest prefix (never the key) or a token's subject, and its limits."""

    id: str
    requests_per_minute: float
    burst: int
    models: frozenset[str] | None = None  # the models it may use (None: all)


class TokenVerifier:
    """Bearer JWTs (PyJWT): signature, issuer, audience, expiry; the claims say who and what."""

    def __init__(self, config: JwtConfig, requests_per_minute: float, burst: int, environ: Mapping[str, str]):
        self.config = config
        self.requests_per_minute, self.burst = requests_per_minute, burst
        self.keys: dict[str, Any] = {}
        if "HS256" in config.algorithms:
            secret = environ.get(config.secret_env or "", "")
            if not secret:
                raise RuntimeError(
                    f"serve.protection.jwt: HS256 needs a secret in ${config.secret_env}, which is empty"
                )
            self.keys["HS256"] = secret
        if "RS256" in config.algorithms:
            path = Path(config.public_key_file or "").expanduser()
            try:
                self.keys["RS256"] = path.read_text()
            except OSError as err:
                raise RuntimeError(
                    f"serve.protection.jwt.public_key_file {path}: cannot read it ({err.strerror})"
                ) from err

    def caller(self, token: str) -> Caller:
        import jwt

        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if algorithm not in self.keys:
                raise jwt.InvalidAlgorithmError(f"algorithm {algorithm!r} is not accepted")
            claims = jwt.decode(
                token,
                self.keys[algorithm],
                algorithms=[algorithm],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Rejection(401, "expired-token", "the bearer token has expired") from None
        except jwt.InvalidAudienceError:
            raise Rejection(
                401, "invalid-token", f"the bearer token is not for audience {self.config.audience!r}"
            ) from None
        except jwt.InvalidIssuerError:
            raise Rejection(
                401, "invalid-token", f"the bearer token was not issued by {self.config.issuer!r}"
            ) from None
        except jwt.InvalidTokenError as err:
            # PyJWT's messages name the claim or check that failed, never the token or the key.
            raise Rejection(401, "invalid-token", f"invalid bearer token: {err}") from None
        models = claims.get(self.config.models_claim)
        if isinstance(models, str):
            models = models.split()
        rate = claims.get(self.config.rate_claim)
        per_minute = float(rate) if isinstance(rate, int | float) and not isinstance(rate, bool) and rate > 0 else None
        return Caller(
            id=f"sub:{claims['sub']}"[:128],
            requests_per_minute=per_minute or self.requests_per_minute,
            burst=self.burst,
            models=frozenset(map(str, models)) if isinstance(models, list) else None,
        )


class KeyRing:
    """Bearer check: static API keys (only their SHA-256 digests are kept, so a key never sits in memory
    dumps or logs) and, when configured, JWTs."""

    def __init__(self, keys: list[ApiKey], requests_per_minute: float, burst: int, tokens: TokenVerifier | None = None):
        self._callers = {
            _digest(k.key): Caller(_digest(k.key)[:12], k.requests_per_minute or requests_per_minute, k.burst or burst)
            for k in keys
        }
        self._anonymous = Caller("anonymous", requests_per_minute, burst)
        self._tokens = tokens

    @property
    def enabled(self) -> bool:
        return bool(self._callers) or self._tokens is not None

    def identify(self, authorization: str | None) -> Caller:
        """The caller behind a valid ``Authorization: Bearer KEY-or-JWT`` header; anyone when no keys are set."""
        if not self.enabled:
            return self._anonymous
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Rejection(401, "missing-key", "missing API key: send 'Authorization: Bearer <key>'")
        digest = _digest(token)
        # Constant-time comparison against every digest: no timing hint about how much matched.
        found = [caller for known, caller in self._callers.items() if hmac.compare_digest(digest, known)]
        if found:
            return found[0]
        if self._tokens is not None and token.count(".") == 2:
            return self._tokens.caller(token)
        raise Rejection(401, "invalid-key", "invalid API key")


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """Token bucket per caller (per ingress replica: with N ingress replicas a key gets up to N x its rate)."""

    clock: Any = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, caller: Caller) -> None:
        now = self.clock()
        bucket = self._buckets.setdefault(caller.id, _Bucket(tokens=float(caller.burst), updated=now))
        rate = caller.requests_per_minute / 60.0
        bucket.tokens = min(float(caller.burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / rate
            raise Rejection(
                429,
                "rate-limit",
                f"rate limit of {caller.requests_per_minute:g} requests/minute (burst {caller.burst}) exceeded; "
                f"retry in {wait:.1f} s",
                retry_after_s=wait,
            )
        bucket.tokens -= 1.0


def prompt_text(payload: Mapping[str, Any]) -> str:
    """All prompt text of a completions or chat payload (token-id prompts contribute nothing)."""
    parts: list[str] = []
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts += [item for item in prompt if isinstance(item, str)]
    messages = payload.get("messages")
    for message in messages if isinstance(messages, list) else []:  # any other shape: the request model's 400
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p.get("text", "") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
    return "\n".join(parts)


def _whole_number(payload: Mapping[str, Any], name: str) -> int | None:
    """An optional integer field; anything else (a float, a string, true) is refused naming the field."""
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Rejection(400, name, f"{name} must be an integer, got {value!r}"[:200])
    return value


def requested_tokens(payload: Mapping[str, Any]) -> Any:
    """The output-token bound a payload asks for (chat's max_completion_tokens wins over max_tokens)."""
    if payload.get("max_completion_tokens") is not None:
        return payload["max_completion_tokens"]
    return payload.get("max_tokens")


class Protection:
    """The ingress's checks, in the order a request meets them."""

    def __init__(self, config: ProtectionConfig, keys: list[ApiKey], environ: Mapping[str, str] | None = None):
        self.config = config
        tokens = (
            TokenVerifier(
                config.jwt, config.requests_per_minute, config.burst, environ if environ is not None else os.environ
            )
            if config.jwt is not None
            else None
        )
        self.keys = KeyRing(keys, config.requests_per_minute, config.burst, tokens)
        self.limiter = RateLimiter()
        self._in_flight: dict[str, int] = {}
        self._patterns = (
            {
                reason: re.compile(pattern, re.IGNORECASE | re.DOTALL)
                for reason, pattern in config.guard.patterns.items()
            }
            if config.guard.enabled
            else {}
        )

    def admit(self, authorization: str | None, content_length: str | None) -> Caller:
        """Key, rate and declared size, before the body is read."""
        caller = self.identify(authorization)
        self.limit(caller, content_length)
        return caller

    def identify(self, authorization: str | None) -> Caller:
        return self.keys.identify(authorization)

    def limit(self, caller: Caller, content_length: str | None) -> None:
        """The caller's rate, and the size the request declares."""
        self.limiter.take(caller)
        if content_length is not None and content_length.isdigit():
            self.check_size(int(content_length))

    def hold(self, caller: Caller) -> None:
        """Count a request as in progress for its caller; refused past the per-key concurrency limit.
        Every ``hold`` that returns is matched by one ``release`` when the answer is finished."""
        held = self._in_flight.get(caller.id, 0)
        if held >= self.config.max_concurrent_per_key:
            raise Rejection(
                429,
                "concurrency",
                f"{held} requests of this key are in progress, the limit is {self.config.max_concurrent_per_key}; "
                "retry when one finishes",
                retry_after_s=1.0,
            )
        self._in_flight[caller.id] = held + 1

    def release(self, caller: Caller) -> None:
        held = self._in_flight.get(caller.id, 0) - 1
        if held > 0:
            self._in_flight[caller.id] = held
        else:
            self._in_flight.pop(caller.id, None)

    def check_model(self, caller: Caller, model: str) -> None:
        """A token scoped to some models may use only those."""
        if caller.models is not None and model not in caller.models:
            raise Rejection(403, "model-not-allowed", f"this token may not use model {model!r}")

    def check_size(self, size: int) -> None:
        if size > self.config.max_body_bytes:
            raise Rejection(
                413, "body-too-large", f"request body of {size} bytes exceeds the limit of {self.config.max_body_bytes}"
            )

    def _check_amplification(self, payload: Mapping[str, Any], max_tokens: int | None) -> None:
        """Fields that multiply one request's work: each bounded, each refusal naming its field."""
        config = self.config
        choices = 1
        for name in ("n", "best_of"):
            value = _whole_number(payload, name)
            if value is not None and not 1 <= value <= config.max_choices:
                raise Rejection(400, name, f"{name} must be between 1 and {config.max_choices}, got {value}")
            choices = max(choices, value or 1)
        total = choices * (max_tokens if max_tokens is not None else config.max_tokens)
        if total > config.max_total_tokens:
            raise Rejection(
                400,
                "total-tokens",
                f"max(n, best_of) x max_tokens = {total} exceeds this endpoint's limit of {config.max_total_tokens} "
                "tokens per request",
            )
        for name in ("logprobs", "top_logprobs"):
            if isinstance(payload.get(name), bool):
                continue  # chat's logprobs is a switch; its count is top_logprobs
            value = _whole_number(payload, name)
            if value is not None and not 0 <= value <= config.max_logprobs:
                raise Rejection(400, name, f"{name} must be between 0 and {config.max_logprobs}, got {value}")
        stop = payload.get("stop")
        if isinstance(stop, list) and len(stop) > config.max_stop_sequences:
            raise Rejection(
                400, "stop", f"{len(stop)} stop sequences exceed this endpoint's limit of {config.max_stop_sequences}"
            )
        messages = payload.get("messages")
        if isinstance(messages, list) and len(messages) > config.max_messages:
            raise Rejection(
                400, "messages", f"{len(messages)} messages exceed this endpoint's limit of {config.max_messages}"
            )

    def check_payload(self, payload: Any) -> None:
        """Limits and guard on a decoded JSON body."""
        if not isinstance(payload, Mapping):
            raise Rejection(400, "malformed", "request body must be a JSON object")
        max_tokens = requested_tokens(payload)
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
                raise Rejection(400, "max-tokens", f"max_tokens must be an integer, got {max_tokens!r}")
            if max_tokens < 1:
                raise Rejection(400, "max-tokens", f"max_tokens must be at least 1, got {max_tokens}")
            if max_tokens > self.config.max_tokens:
                raise Rejection(
                    400,
                    "max-tokens",
                    f"max_tokens {max_tokens} exceeds this endpoint's limit of {self.config.max_tokens}",
                )
        self._check_amplification(payload, max_tokens)
        text = prompt_text(payload)
        if len(text) > self.config.max_prompt_chars:
            raise Rejection(
                400,
                "prompt-too-long",
                f"prompt of {len(text)} characters exceeds the limit of {self.config.max_prompt_chars}",
            )
        for reason, pattern in self._patterns.items():
            if pattern.search(text):
                raise Rejection(400, f"guard:{reason}", f"prompt rejected by the input guard ({reason})")
