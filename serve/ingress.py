"""HTTP mapping of the endpoint: ``ray.serve.llm``'s OpenAI ingress behind Loom's checks and metrics.

The routes read the raw request, so the key, rate and size checks run before the body is read or
parsed; then the payload limits and guard (``serve.protection``), then the stock ingress logic.
Every refusal is an OpenAI-style error body with a 4xx status and the reason; nothing reaches a
model unchecked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from ray.exceptions import RayActorError
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve.config import ProtectionConfig
from serve.protection import Protection, Rejection, load_api_keys

log = logging.getLogger(__name__)

#: Route of each ingress method; handed to ``make_fastapi_ingress``.
ENDPOINTS = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
}
#: How long a request whose replica died is resent before the client gets a 503.
FAILOVER_S = 60.0
LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


def error_response(status: int, reason: str, message: str, retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
    body = {"error": {"message": message, "type": "invalid_request_error", "code": reason, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class IngressMetrics:
    """Prometheus metrics (through Ray's metrics agent) of every request the ingress answers.

    Token counts and rates come from vLLM's own engine metrics (``log_engine_metrics``), not from here."""

    def __init__(self):
        from ray.util.metrics import Counter, Histogram

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

    def answered(self, model: str, route: str, status: int, started: float) -> None:
        self.requests.inc(tags={"model": model, "route": route, "status": str(status)})
        self.latency.observe(time.monotonic() - started, tags={"model": model, "route": route})


class LoomIngress(OpenAiIngress):
    """``OpenAiIngress`` with API keys, limits, the prompt guard, lineage in ``/v1/models`` and metrics."""

    def __init__(self, llm_deployments, model_cards, *, protection: dict[str, Any], lora_paths=None):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        config = ProtectionConfig.model_validate(protection)
        self.protection = Protection(config, load_api_keys(config))
        if not self.protection.keys.enabled:
            log.warning("NO API KEYS CONFIGURED: the endpoint accepts every request; bind it to loopback only")
        self.metrics = IngressMetrics()

    async def _admit(self, request: Request) -> None:
        self.protection.admit(request.headers.get("authorization"), request.headers.get("content-length"))

    async def _read_json(self, request: Request) -> Any:
        body = bytearray()
        async for chunk in request.stream():  # bounded even without (or with a false) Content-Length
            body += chunk
            self.protection.check_size(len(body))
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise Rejection(400, "malformed", f"request body is not valid JSON: {err}") from err

    def _refused(self, rejection: Rejection, route: str, model: str, started: float) -> JSONResponse:
        self.metrics.rejects.inc(tags={"reason": rejection.reason})
        self.metrics.answered(model, route, rejection.status, started)
        return error_response(rejection.status, rejection.reason, rejection.message, rejection.retry_after_s)

    async def models(self, request: Request) -> Response:
        started = time.monotonic()
        try:
            await self._admit(request)
        except Rejection as rejection:
            return self._refused(rejection, "models", "", started)
        listed = await super().models()
        self.metrics.answered("", "models", 200, started)
        return JSONResponse(listed.model_dump())

    async def model_data(self, model: str, request: Request) -> Response:
        started = time.monotonic()
        try:
            await self._admit(request)
        except Rejection as rejection:
            return self._refused(rejection, "models", "", started)
        try:
            card = await super().model_data(model)
        except Exception as err:  # an unknown model is the stock ingress's 404, raised as an exception
            self.metrics.answered(model, "models", getattr(err, "status_code", 500), started)
            raise
        self.metrics.answered(model, "models", 200, started)
        return JSONResponse(card.model_dump())

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions", CompletionRequest, "completions")

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat", ChatCompletionRequest, "chat")

    async def _generate(self, request: Request, route: str, request_type: type, call_method: str) -> Response:
        started = time.monotonic()
        model = ""
        try:
            await self._admit(request)
            payload = await self._read_json(request)
            self.protection.check_payload(payload)
            model = str(payload.get("model", ""))
            if model not in self._model_cards:
                known = ", ".join(sorted(self._model_cards))
                raise Rejection(404, "unknown-model", f"model {model!r} is not served here (served: {known})")
            try:
                body = request_type.model_validate(payload)
            except ValidationError as err:
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors(include_url=False)
                )
                raise Rejection(400, "invalid-request", problems) from err
        except Rejection as rejection:
            return self._refused(rejection, route, model, started)

        try:
            response = await self._process_with_failover(body, call_method, request)
        except RayActorError:
            self.metrics.answered(model, route, 503, started)
            return error_response(503, "replica-lost", "the model's replica was lost; retry shortly", 1.0)
        except Exception as err:  # the engine's own 4xx (e.g. prompt longer than the context) arrive as exceptions
            status = getattr(err, "status_code", 500)
            self.metrics.answered(model, route, status, started)
            if status < 500:
                self.metrics.rejects.inc(tags={"reason": "engine"})
            raise
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._measured_stream(response.body_iterator, model, route, started)
            return response
        self.metrics.answered(model, route, response.status_code, started)
        return response

    async def _process_with_failover(self, body: Any, call_method: str, request: Request) -> Response:
        """The stock request path, sent again when the replica it went to died before answering.

        Generation has no side effects, so a request that never produced a byte is safe to resend; the
        router stops picking a dead replica within moments, and the queue holds requests meanwhile.
        """
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
        self, chunks: AsyncIterator[Any], model: str, route: str, started: float
    ) -> AsyncIterator[Any]:
        first = True
        async for chunk in chunks:
            if first:
                self.metrics.first_token.observe(time.monotonic() - started, tags={"model": model})
                first = False
            yield chunk
        self.metrics.answered(model, route, 200, started)
