"""HTTP mapping of the endpoint: ``ray.serve.llm``'s OpenAI ingress behind Loom's checks and metrics.

``serve.app`` hands ``LoomIngress`` to Ray's public ``build_openai_app`` (``ingress_cls_config``),
which routes every OpenAI path to the method of the same name. Each route only admits (key, rate
and size checks before the body is read; then the payload limits and guard of ``serve.protection``)
and delegates to the stock ingress. ``answered`` is the one place where a route's outcome becomes
metrics and an audit line, and any exception becomes a response: a ``Rejection`` its 4xx, the engine's own 4xx itself,
a lost replica a 503, anything else a 500 without internal text. ``error_response`` is the one
error constructor, its OpenAI ``type`` derived from the status.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from ray.exceptions import RayActorError
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from vllm.exceptions import VLLMClientError

from pipelines.gauges import held_gauges
from serve.admission import EngineSlots
from serve.audit import AuditLog, AuditRecord, now, usage_of
from serve.canary import Releases
from serve.config import CANARY, AuditConfig, ProtectionConfig
from serve.pricing import ModelPricing, Pricer
from serve.protection import Protection, Rejection, load_api_keys, ratelimit_headers

log = logging.getLogger(__name__)

#: How long a request whose replica died is resent before the client gets a 503.
FAILOVER_S = 60.0
LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
#: OpenAI's error ``type`` for each status (its API reference, "Error codes").
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: What the endpoint serves; the stock ingress's other routes answer 404 (after the key check).
SERVED_ROUTES = "/v1/models, /v1/completions and /v1/chat/completions"
#: The documentation routes FastAPI adds to every app, outside the ingress's methods and so outside ``_admit``.
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return ERROR_TYPES.get(status, "invalid_request_error")


def error_response(
    status: int,
    reason: str,
    message: str,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one error constructor: an OpenAI-style error body (with Retry-After and any x-ratelimit-* headers)."""
    headers = dict(headers or {})
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))  # never sooner than the bucket allows
    body = {"error": {"message": message, "type": error_type(status), "code": reason, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers or None)


#: vLLM's refusals can name its environment variables and classes; a client gets Loom's words instead.
ENGINE_INTERNALS = re.compile(r"\bVLLM_[A-Z0-9_]+\b|\b[A-Za-z_]+(Error|Exception)\b|\bvllm\b|\bvLLM\b")


def engine_refusal(status: int, message: str) -> Rejection:
    """An engine's 4xx in Loom's words: its text when it names no internals, else what the status says."""
    if ENGINE_INTERNALS.search(message):
        log.info("engine refusal reworded for the client: %s", message[:500])
        message = {
            404: "the model or route asked for is not served here",
            413: "the request is too large for the model",
        }.get(status, "the model cannot take this request as sent (check its prompt length and sampling fields)")
    return Rejection(status, "engine", message[:2000])


def as_rejection(err: Exception) -> Rejection:
    """Any exception a route raised, as the refusal the client gets (no internal exception text)."""
    if isinstance(err, Rejection):
        return err
    if isinstance(err, RayActorError):
        return Rejection(503, "replica-lost", "the model's replica was lost; retry shortly", 1.0)
    status = getattr(err, "status_code", None)
    if isinstance(status, int) and 400 <= status < 500:
        # The stock ingress's and the engine's own refusals (unknown model, prompt over the context).
        message = getattr(err, "message", None)
        return engine_refusal(status, message if isinstance(message, str) else str(err))
    log.error("request failed", exc_info=err)
    return Rejection(500, "internal", "the server could not answer this request; it has been logged")


class IngressMetrics:
    """Prometheus metrics (through Ray's metrics agent) of every request the ingress answers.

    Token counts and rates come from vLLM's own engine metrics (``log_engine_metrics``), not from here."""

    def __init__(self, max_replicas: dict[str, int]):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "loom_serve_requests", "Requests answered, by model, route and HTTP status.", ("model", "route", "status")
        )
        self.rejects = Counter("loom_serve_rejects", "Requests refused by the ingress, by reason.", ("reason",))
        self.latency = Histogram(
            "loom_serve_request_latency_s",
            "Seconds from request to last byte.",
            LATENCY_BOUNDARIES,
            ("model", "route"),
        )
        self.first_token = Histogram(
            "loom_serve_time_to_first_token_s",
            "Seconds from request to the first streamed chunk.",
            LATENCY_BOUNDARIES,
            ("model",),
        )
        self._canary_weight = Gauge(
            "loom_serve_canary_weight", "Percent of a model's callers its canary (MODEL@canary) answers.", ("model",)
        )
        # The autoscaler's ceiling, for the "replicas pinned at max" alert (Ray exports only the target);
        # held, since Ray drops a gauge that is not set again.
        ceiling = Gauge("loom_serve_max_replicas", "max_replicas of each model's autoscaling.", ("model",))
        for model, replicas in max_replicas.items():
            held_gauges().set(ceiling, replicas, {"model": model})

    def canary_weight(self, model: str, weight: float) -> None:
        held_gauges().set(self._canary_weight, weight, {"model": model})

    def answered(self, model: str, route: str, status: int, started: float) -> None:
        self.requests.inc(tags={"model": model, "route": route, "status": str(status)})
        self.latency.observe(time.monotonic() - started, tags={"model": model, "route": route})


def _no_constant(name: str) -> float:
    # Python's json reads NaN and Infinity, which JSON does not have and no sampling parameter means.
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_json(body: bytes) -> Any:
    """A request body as JSON, or a 400 saying why not (never the parser's own exception)."""
    try:
        payload = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError as err:
        raise Rejection(400, "malformed", "request body is nested too deeply") from err
    except ValueError as err:  # also invalid UTF-8, and integers longer than Python converts (4,300 digits)
        raise Rejection(400, "malformed", f"request body is not valid JSON: {str(err)[:200]}") from err
    # JSON's \uD800-\uDFFF escapes can leave a lone surrogate, which no tokenizer takes (a TypeError deep in
    # the engine). Valid UTF-8 cannot carry one, so only a body with such an escape needs the full check.
    if SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(payload, ensure_ascii=False).encode()
        except UnicodeEncodeError as err:
            raise Rejection(400, "malformed", "request body holds a lone UTF-16 surrogate (\\uD800-\\uDFFF)") from err
    return payload


def checked_request(
    payload: Any, request_type: type, *, protection: Protection, caller: Any, served: Collection[str], state: Any
) -> Any:
    """A decoded body through the limits, the guard, the model check and the OpenAI request model: the
    parsed request, or a 4xx naming the problem. The model goes to ``state.model`` once known."""
    protection.check_payload(payload)
    model = str(payload.get("model", ""))
    if model not in served:
        known = ", ".join(sorted(served))
        raise Rejection(404, "unknown-model", f"model {model!r} is not served here (served: {known})")
    state.model = model
    protection.check_model(caller, model)
    try:
        return request_type.model_validate(payload)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"[:300] for e in err.errors(include_url=False)
        )
        raise Rejection(400, "invalid-request", problems[:2000]) from err
    except VLLMClientError as err:  # vLLM's own request checks, e.g. top_logprobs without logprobs
        raise Rejection(400, "invalid-request", str(err)[:2000]) from err
    except Exception as err:
        # A validator tripping over a shape it did not expect (e.g. a system message whose content is null):
        # still the request's fault, so a 400; the exception's own text stays in the log.
        log.warning("request validation raised %s", type(err).__name__, exc_info=err)
        raise Rejection(400, "invalid-request", "the request's fields do not form a valid request") from err


def gate_docs(app: Any, mode: str, protection: Protection) -> None:
    """FastAPI's documentation routes off (removed: a 404 like any unknown path) or behind the API's key."""
    if mode == "off":
        app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) not in DOC_PATHS]
        return
    for route in app.router.routes:
        if getattr(route, "path", None) in DOC_PATHS:
            route.app = _keyed(route.app, protection)


def _keyed(inner: Callable[..., Awaitable[None]], protection: Protection) -> Callable[..., Awaitable[None]]:
    async def gate(scope: dict, receive: Callable, send: Callable) -> None:
        try:
            protection.identify(Request(scope).headers.get("authorization"))
        except Rejection as refusal:
            await error_response(refusal.status, refusal.reason, refusal.message)(scope, receive, send)
            return
        await inner(scope, receive, send)

    return gate


def answered(route: str):
    """Route decorator: times the route, records its outcome, and turns an exception into its response.

    The model is what the route put in ``request.state.model`` (or the ``model`` path parameter);
    a streamed answer is recorded when its last chunk has gone, its first chunk as time to first token.
    """

    def decorate(method: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        @functools.wraps(method)  # FastAPI reads the route's parameters through __wrapped__
        async def route_method(self: LoomIngress, *args: Any, **kwargs: Any) -> Response:
            request: Request = kwargs["request"]
            started = time.monotonic()
            try:
                response = await method(self, *args, **kwargs)
            except asyncio.CancelledError:  # the client went away while the engine worked: its hold ends here
                self._release(request)
                raise
            except Exception as err:
                self._release(request)
                refusal = as_rejection(err)
                model = getattr(request.state, "model", kwargs.get("model", ""))
                if refusal.status < 500:
                    self.metrics.rejects.inc(tags={"reason": refusal.reason})
                self._finished(request, model, route, refusal.status, started, refusal.reason)
                self._audit(request, route, model, refusal.status, started, reason=refusal.reason)
                headers = refusal.headers or getattr(request.state, "ratelimit", None)
                return error_response(refusal.status, refusal.reason, refusal.message, refusal.retry_after_s, headers)
            model = getattr(request.state, "model", kwargs.get("model", ""))
            response.headers.update(getattr(request.state, "ratelimit", None) or {})
            if isinstance(response, StreamingResponse):
                response.body_iterator = self._measured_stream(response.body_iterator, request, model, route, started)
                # Released however the stream ends, also when it is cancelled before its first chunk (then the
                # iterator's own cleanup never runs); releasing twice is a no-op.
                response.__class__ = ReleasingStream
                response.release = functools.partial(self._release, request)
            else:
                self._release(request)
                self._finished(request, model, route, response.status_code, started)
                self._audit(request, route, model, response.status_code, started, body=response.body)
            return response

        return route_method

    return decorate


class ReleasingStream(StreamingResponse):
    """A streamed answer that releases its request's hold (concurrency and work in flight) when sending ends,
    however it ends."""

    release: Callable[[], None]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


class LoomIngress(OpenAiIngress):
    """``OpenAiIngress`` with API keys, limits, the prompt guard, lineage in ``/v1/models`` and metrics."""

    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        protection: dict[str, Any],
        lineage: dict[str, dict[str, Any]] | None = None,
        audit: dict[str, Any] | None = None,
        audit_path: str | None = None,
        max_replicas: dict[str, int] | None = None,
        pricing: dict[str, dict[str, Any]] | None = None,
        engine_slots: dict[str, int] | None = None,
        canaries: dict[str, float] | None = None,
        canary_controller: Any = None,
        lora_paths=None,
    ):
        for model_id, card in model_cards.items():
            if lineage and model_id in lineage:
                card.metadata["lineage"] = lineage[model_id]
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        config = ProtectionConfig.model_validate(protection)
        self.protection = Protection(config, load_api_keys(config))
        self.pricer = Pricer(
            {model_id: ModelPricing(**found) for model_id, found in (pricing or {}).items()},
            default_max_tokens=config.max_tokens,
            max_prompts=config.max_prompts,
        )
        unpriced = sorted(set(model_cards) - set(self.pricer.models))
        if unpriced:  # a Serve config written without pricing: refuse to start rather than serve unpriced
            raise ValueError(f"LoomIngress: no pricing (tokenizer, context) for model(s) {', '.join(unpriced)}")
        for model_id in self.pricer.models:  # load the tokenizers now, not on a model's first request
            self.pricer.tokenizer(model_id)
        if not self.protection.keys.enabled:
            log.warning("NO API KEYS OR JWT CONFIGURED: the endpoint accepts every request; bind it to loopback only")
        self.slots = {
            model_id: EngineSlots(slots, config.reserved_engine_slots)
            for model_id, slots in (engine_slots or {}).items()
        }
        self.metrics = IngressMetrics(max_replicas or {})
        self.releases = Releases(canaries or {}, canary_controller, self.metrics.canary_weight)
        for model_id in model_cards:  # a model without a canary sends none of its callers to one
            if model_id not in self.releases.weights and CANARY not in model_id:
                self.metrics.canary_weight(model_id, 0.0)
        self.audit = AuditLog(AuditConfig.model_validate(audit or {}), audit_path, logging.getLogger("ray.serve"))

    def _set_asgi_app(self, app: Any) -> None:
        # Serve's ingress wrapper hands this replica its FastAPI app here, after __init__ (the app is built by
        # ray.llm's builder, which has no option for FastAPI's docs routes): the one place to gate them.
        gate_docs(app, self.protection.config.docs, self.protection)
        super()._set_asgi_app(app)

    def _audit(
        self,
        request: Request,
        route: str,
        model: str,
        status: int,
        started: float,
        reason: str | None = None,
        body: bytes | str = b"",
    ) -> None:
        caller = getattr(request.state, "caller", None)
        self.audit.write(
            AuditRecord(
                time=now(),
                caller=caller.id if caller is not None else None,
                client=request.client.host if request.client else None,
                route=route,
                model=model,
                status=status,
                reason=reason,
                latency_ms=round((time.monotonic() - started) * 1000, 1),
                prompt=getattr(request.state, "prompt", None),
                priced_tokens=getattr(request.state, "priced", None),
                **usage_of(body),
            )
        )

    async def _admit(self, request: Request) -> None:
        """Key, rate and declared size; then the request counts toward its key's concurrency until
        ``answered`` (or, for a stream, its last chunk) releases it."""
        caller = self.protection.identify(request.headers.get("authorization"))
        request.state.caller = caller  # known from here on, so a refusal below is audited under its caller
        request.state.requests = self.protection.limit(caller, request.headers.get("content-length"))
        request.state.ratelimit = ratelimit_headers(request.state.requests, None)  # the token budget's once priced
        self.protection.hold(caller)
        request.state.held = caller

    def _release(self, request: Request) -> None:
        held = getattr(request.state, "held", None)
        if held is not None:
            request.state.held = None
            self.protection.release(held)
            work = getattr(request.state, "work", None)
            if work:
                request.state.work = None
                self.protection.end_work(held, work)
            slots = getattr(request.state, "slots", None)
            if slots is not None:
                request.state.slots = None
                slots.leave(held.id)

    async def _read_body(self, request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():  # bounded even without (or with a false) Content-Length
            body += chunk
            self.protection.check_size(len(body))
        return bytes(body)

    async def _request_body(self, request: Request, request_type: type) -> Any:
        """The admitted, checked and parsed body; its model is noted for the metrics."""
        await self._admit(request)
        payload = parse_json(await self._read_body(request))
        if self.audit.config.include_prompts and isinstance(payload, dict):
            request.state.prompt = payload.get("messages", payload.get("prompt"))
        body = checked_request(
            payload,
            request_type,
            protection=self.protection,
            caller=request.state.caller,
            served=self._model_cards,
            state=request.state,
        )
        if self.releases.weights:
            self.releases.start(self._audit_event)
            body.model = request.state.model = self.releases.route(request.state.model, request.state)
        self._charge(request, payload, body)
        return body

    def _finished(
        self, request: Request, model: str, route: str, status: int, started: float, reason: str | None = None
    ) -> None:
        """A request's outcome: its metrics, and the canary gate's window if a canary answered for its model."""
        self.metrics.answered(model, route, status, started)
        self.releases.outcome(request.state, status, reason, time.monotonic() - started)

    def _audit_event(self, event: dict[str, Any]) -> None:
        """A canary's weight changed (by its gate or an operator): one audit line."""
        self.audit.write(
            AuditRecord(
                time=now(),
                caller=event["by"],
                client=None,
                route="canary",
                model=event["model"],
                status=200,
                reason=f"{event['decision']} to weight {event['weight']:g}: {event['reason']}"[:2000],
                latency_ms=0.0,
            )
        )

    def _charge(self, request: Request, payload: dict[str, Any], body: Any) -> None:
        """Price the request, take the price from its caller's token budget, and hold the engine to the
        max_tokens it was priced at (an unset one is set)."""
        model = request.state.model
        if payload.get("priority") not in (None, 0):
            raise Rejection(
                400,
                "priority",
                f"priority is set by this endpoint (fair between callers), not by a request; got {payload['priority']!r}"[
                    :200
                ],
            )
        chat = isinstance(body, ChatCompletionRequest)
        price = self.pricer.price(model, payload, chat)
        request.state.ratelimit = self.protection.charge(
            request.state.caller, price.total, price.describe(), request.state.requests
        )
        request.state.priced = price.total
        # Held to what was priced, whichever bound the request set (or none): the engine cannot generate more.
        body.max_tokens = price.max_tokens
        if chat:
            body.max_completion_tokens = price.max_tokens
        if self.pricer.models[model].fair:
            body.priority = self.protection.start_work(request.state.caller, price.total)
            request.state.work = price.total

    @answered("models")
    async def models(self, request: Request) -> Response:
        await self._admit(request)
        return JSONResponse((await super().models()).model_dump())

    @answered("models")
    async def model_data(self, model: str, request: Request) -> Response:
        await self._admit(request)
        if model not in self._model_cards:
            known = ", ".join(sorted(self._model_cards))
            raise Rejection(404, "unknown-model", f"model {model!r} is not served here (served: {known})")
        self.protection.check_model(request.state.caller, model)
        return JSONResponse((await super().model_data(model)).model_dump())

    @answered("completions")
    async def completions(self, request: Request) -> Response:
        return await self._process_with_failover(
            await self._request_body(request, CompletionRequest), "completions", request
        )

    @answered("chat")
    async def chat(self, request: Request) -> Response:
        return await self._process_with_failover(
            await self._request_body(request, ChatCompletionRequest), "chat", request
        )

    async def _not_served(self, request: Request) -> Response:
        await self._admit(request)
        raise Rejection(
            404, "not-served", f"{request.url.path} is not served here; this endpoint serves {SERVED_ROUTES}"
        )

    # The stock ingress's other routes (build_openai_app maps all of them): behind the key, then a 404.
    embeddings = answered("other")(_not_served)
    transcriptions = answered("other")(_not_served)
    score = answered("other")(_not_served)
    tokenize = answered("other")(_not_served)
    detokenize = answered("other")(_not_served)

    async def _process_with_failover(self, body: Any, call_method: str, request: Request) -> Response:
        """The stock request path, sent again when the replica it went to died before answering.

        Generation has no side effects, so a request that never produced a byte is safe to resend; the
        router stops picking a dead replica within moments, and the queue holds requests meanwhile.
        """
        slots = self.slots.get(request.state.model)
        if slots is not None:  # fair between callers: wait for this caller's turn at the engines
            await slots.enter(request.state.caller.id)
            request.state.slots = slots
        deadline = time.monotonic() + FAILOVER_S
        while True:
            try:
                return await self._process_llm_request(body, call_method=call_method, raw_request=request)
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                log.warning("replica lost during a request; sending it again")
                await asyncio.sleep(0.5)

    async def _measured_stream(
        self, chunks: AsyncIterator[Any], request: Request, model: str, route: str, started: float
    ) -> AsyncIterator[Any]:
        first = True
        usage: bytes | str = b""  # the last chunk that carries token counts (stream_options.include_usage)
        try:
            async for chunk in chunks:
                if first:
                    self.metrics.first_token.observe(time.monotonic() - started, tags={"model": model})
                    first = False
                if isinstance(chunk, str | bytes) and ("usage" if isinstance(chunk, str) else b"usage") in chunk:
                    usage = chunk
                yield chunk
        finally:  # also when the client goes away mid-stream
            self._release(request)
        self._finished(request, model, route, 200, started)
        self._audit(request, route, model, 200, started, body=usage)
