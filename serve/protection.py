"""The ingress's checks, without HTTP: API keys, per-key rate limits, request limits and the prompt guard.

Every check raises ``Rejection`` with the HTTP status, a reason code (the ``reason`` label of the
rejects metric) and a message naming the limit, so the HTTP layer only maps it to a response.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.config import JwtConfig, ProtectionConfig

log = logging.getLogger(__name__)

#: Tokens in flight per step of engine priority (fair scheduling), and the largest priority given.
FAIR_STEP_TOKENS = 64
MAX_PRIORITY = 1_000_000


class Rejection(Exception):
    """A request refused before it reaches a model."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A key and its own limits (unset: the configured defaults)."""

    key: str = field(repr=False)
    requests_per_minute: float | None = None
    burst: int | None = None
    tokens_per_minute: float | None = None


KEY_LINE = "'KEY [REQUESTS_PER_MINUTE [BURST [TOKENS_PER_MINUTE]]]'"


def _parse_key_line(line: str, path: Path, number: int) -> ApiKey:
    """``KEY [REQUESTS_PER_MINUTE [BURST [TOKENS_PER_MINUTE]]]``"""
    key, *limits = line.split()
    try:
        per_minute = float(limits[0]) if limits else None
        burst = int(limits[1]) if len(limits) > 1 else None
        tokens = float(limits[2]) if len(limits) > 2 else None
    except ValueError:
        raise RuntimeError(f"{path}:{number}: expected {KEY_LINE}") from None
    positive = all(v is None or 0 < v < math.inf for v in (per_minute, tokens)) and (burst is None or burst >= 1)
    if len(limits) > 3 or not positive:
        raise RuntimeError(f"{path}:{number}: expected {KEY_LINE} with positive limits")
    return ApiKey(key, per_minute, burst, tokens)


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
    tokens_per_minute: float = float("inf")
    models: frozenset[str] | None = None  # the models it may use (None: all)


class TokenVerifier:
    """Bearer JWTs (PyJWT): signature, issuer, audience, expiry; the claims say who and what."""

    def __init__(self, config: JwtConfig, defaults: ProtectionConfig, environ: Mapping[str, str]):
        self.config = config
        self.defaults = defaults
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
        return Caller(
            id=f"sub:{claims['sub']}"[:128],
            requests_per_minute=_positive(claims.get(self.config.rate_claim)) or self.defaults.requests_per_minute,
            burst=self.defaults.burst,
            tokens_per_minute=_positive(claims.get(self.config.tokens_claim)) or self.defaults.tokens_per_minute,
            models=frozenset(map(str, models)) if isinstance(models, list) else None,
        )


def _positive(value: Any) -> float | None:
    """A claim's limit: a finite positive number, else None (the configured default)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    number = float(value) if abs(value) < 1e300 else math.inf
    return number if 0 < number < math.inf else None


class KeyRing:
    """Bearer check: static API keys (only their SHA-256 digests are kept, so a key never sits in memory
    dumps or logs) and, when configured, JWTs."""

    def __init__(self, keys: list[ApiKey], defaults: ProtectionConfig, tokens: TokenVerifier | None = None):
        self._callers = {
            _digest(k.key): Caller(
                _digest(k.key)[:12],
                k.requests_per_minute or defaults.requests_per_minute,
                k.burst or defaults.burst,
                k.tokens_per_minute or defaults.tokens_per_minute,
            )
            for k in keys
        }
        self._anonymous = Caller("anonymous", defaults.requests_per_minute, defaults.burst, defaults.tokens_per_minute)
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
    level: float
    updated: float


@dataclass(frozen=True)
class Allowance:
    """One bucket's state after a charge: what OpenAI's ``x-ratelimit-*`` headers report."""

    limit: float  # per minute
    remaining: float
    reset_s: float  # until the bucket is full again


@dataclass
class Buckets:
    """A token bucket per caller (per ingress replica: with N ingress replicas a caller gets up to N x its limit).
    ``charge`` takes ``cost`` from the caller's bucket, which holds at most ``capacity`` and refills at ``per_minute``."""

    clock: Any = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def _level(self, caller: str, capacity: float, per_minute: float) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.setdefault(caller, _Bucket(level=capacity, updated=now))
        bucket.level = min(capacity, bucket.level + (now - bucket.updated) * per_minute / 60.0)
        bucket.updated = now
        return bucket

    def charge(self, caller: str, cost: float, capacity: float, per_minute: float) -> Allowance | float:
        """The allowance left after taking ``cost``, or the seconds until it could be taken (nothing taken)."""
        bucket = self._level(caller, capacity, per_minute)
        if bucket.level < cost:
            return (cost - bucket.level) * 60.0 / per_minute
        bucket.level -= cost
        return Allowance(per_minute, bucket.level, (capacity - bucket.level) * 60.0 / per_minute)

    def peek(self, caller: str, capacity: float, per_minute: float) -> Allowance:
        bucket = self._level(caller, capacity, per_minute)
        return Allowance(per_minute, bucket.level, (capacity - bucket.level) * 60.0 / per_minute)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``120ms``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def ratelimit_headers(requests: Allowance, tokens: Allowance | None) -> dict[str, str]:
    """OpenAI-style ``x-ratelimit-*`` headers for the request and (once priced) token buckets."""
    headers = {
        "x-ratelimit-limit-requests": f"{requests.limit:g}",
        "x-ratelimit-remaining-requests": str(int(requests.remaining)),
        "x-ratelimit-reset-requests": _duration(requests.reset_s),
    }
    if tokens is not None:
        headers |= {
            "x-ratelimit-limit-tokens": f"{tokens.limit:g}",
            "x-ratelimit-remaining-tokens": str(int(tokens.remaining)),
            "x-ratelimit-reset-tokens": _duration(tokens.reset_s),
        }
    return headers


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


#: The fields that bound a request's output tokens: completions read max_tokens, chat max_completion_tokens first.
OUTPUT_BOUNDS = ("max_tokens", "max_completion_tokens")


def requested_tokens(payload: Mapping[str, Any], chat: bool = True) -> Any:
    """The output-token bound the engine would apply: chat's max_completion_tokens wins over max_tokens;
    completions know only max_tokens (a max_completion_tokens there is ignored by the engine)."""
    if chat and payload.get("max_completion_tokens") is not None:
        return payload["max_completion_tokens"]
    return payload.get("max_tokens")


class Protection:
    """The ingress's checks, in the order a request meets them."""

    def __init__(self, config: ProtectionConfig, keys: list[ApiKey], environ: Mapping[str, str] | None = None):
        self.config = config
        tokens = (
            TokenVerifier(config.jwt, config, environ if environ is not None else os.environ)
            if config.jwt is not None
            else None
        )
        self.keys = KeyRing(keys, config, tokens)
        self.requests = Buckets()
        self.tokens = Buckets()
        self._in_flight: dict[str, int] = {}
        self._work: dict[str, int] = {}  # priced tokens of each caller's requests in progress
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

    def limit(self, caller: Caller, content_length: str | None) -> Allowance:
        """The caller's request rate, and the size the request declares; the request allowance left."""
        taken = self.requests.charge(caller.id, 1.0, caller.burst, caller.requests_per_minute)
        if not isinstance(taken, Allowance):
            raise Rejection(
                429,
                "rate-limit",
                f"rate limit of {caller.requests_per_minute:g} requests/minute (burst {caller.burst}) exceeded; "
                f"retry in {taken:.1f} s",
                retry_after_s=taken,
                headers=ratelimit_headers(
                    self.requests.peek(caller.id, caller.burst, caller.requests_per_minute), None
                ),
            )
        if content_length is not None and content_length.isdigit():
            self.check_size(int(content_length))
        return taken

    def charge(self, caller: Caller, total: int, described: str, requests: Allowance) -> dict[str, str]:
        """Take a request's price (``total`` tokens, ``described`` as its formula) from the caller's token budget;
        the ``x-ratelimit-*`` headers to answer with.

        Charged in full when admitted (as OpenAI's limits count max_tokens), so a caller cannot have more work
        in flight than its budget allows; what is not generated is not refunded."""
        budget = caller.tokens_per_minute
        headers = ratelimit_headers(requests, self.tokens.peek(caller.id, budget, budget))
        if total > self.config.max_request_tokens:
            raise Rejection(
                400,
                "request-tokens",
                f"this request is priced at {described}, above this endpoint's limit of "
                f"{self.config.max_request_tokens} tokens per request",
                headers=headers,
            )
        if total > budget:
            raise Rejection(
                400,
                "request-tokens",
                f"this request is priced at {described}, above this key's budget of {budget:g} tokens per minute",
                headers=headers,
            )
        taken = self.tokens.charge(caller.id, total, budget, budget)
        if not isinstance(taken, Allowance):
            left = self.tokens.peek(caller.id, budget, budget)
            raise Rejection(
                429,
                "token-budget",
                f"this request is priced at {total} tokens; this key has {int(left.remaining)} of its "
                f"{budget:g} tokens per minute left; retry in {taken:.1f} s",
                retry_after_s=taken,
                headers=ratelimit_headers(requests, left),
            )
        return ratelimit_headers(requests, taken)

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

    def start_work(self, caller: Caller, tokens: int) -> int:
        """Count a priced request as in progress; its engine priority: the tokens its caller already had in progress,
        in steps of ``FAIR_STEP_TOKENS`` (vLLM serves lower numbers first, ties in arrival order). A caller with
        nothing waiting gets 0, whatever another caller has queued: fair queuing by work in flight."""
        before = self._work.get(caller.id, 0)
        self._work[caller.id] = before + tokens
        return min(before // FAIR_STEP_TOKENS, MAX_PRIORITY)

    def end_work(self, caller: Caller, tokens: int) -> None:
        left = self._work.get(caller.id, 0) - tokens
        if left > 0:
            self._work[caller.id] = left
        else:
            self._work.pop(caller.id, None)

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
        bounds = [payload.get(name) for name in OUTPUT_BOUNDS if payload.get(name) is not None]
        for name in OUTPUT_BOUNDS:  # each bound on its own: the route decides which one the engine reads
            value = payload.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise Rejection(400, "max-tokens", f"{name} must be an integer, got {value!r}"[:200])
            if value < 1:
                raise Rejection(400, "max-tokens", f"{name} must be at least 1, got {value}")
            if value > self.config.max_tokens:
                raise Rejection(
                    400, "max-tokens", f"{name} {value} exceeds this endpoint's limit of {self.config.max_tokens}"
                )
        self._check_amplification(payload, max(bounds) if bounds else None)
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
