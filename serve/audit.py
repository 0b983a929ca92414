"""The endpoint's audit trail: one JSON line per request, answered or refused, saying who asked for what.

Who is the key's digest prefix (``Caller.id``), never the key; the prompt only when the recipe asks for
it. Lines go to a size-rotated file (the standard library's ``RotatingFileHandler``) on the node of each
ingress replica, and optionally to Ray Serve's replica log as well.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serve.config import AuditConfig

#: The outcome fields a response's body or stream carries (OpenAI's ``usage``).
USAGE_FIELDS = ("prompt_tokens", "completion_tokens")


@dataclass
class AuditRecord:
    """One request as the audit log keeps it."""

    time: str
    caller: str | None  # the key's digest prefix, "anonymous" without keys, None before a key was checked
    client: str | None
    route: str
    model: str
    status: int
    reason: str | None  # the refusal's reason code (None when answered)
    latency_ms: float
    priced_tokens: int | None = None  # what the request was charged when admitted (serve.pricing)
    prompt_tokens: int | None = None  # and what was served, from the answer's usage
    completion_tokens: int | None = None
    prompt: Any = None  # only with audit.include_prompts


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def usage_of(body: bytes | str) -> dict[str, int]:
    """Token counts from a JSON answer's ``usage``, or from the last server-sent event that carries one."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    if '"usage"' not in text:
        return {}
    events = [part.strip() for part in text.split("data:")] if text.lstrip().startswith("data:") else [text]
    for event in reversed(events):
        try:
            usage = json.loads(event).get("usage")
        except (ValueError, AttributeError):
            continue
        if isinstance(usage, dict):
            return {name: usage[name] for name in USAGE_FIELDS if isinstance(usage.get(name), int)}
    return {}


class AuditLog:
    """Writes ``AuditRecord`` lines; a logger of its own, so the lines go where the audit config says only."""

    def __init__(self, config: AuditConfig, path: str | None, replica_log: logging.Logger | None = None):
        self.config = config
        self.logger = logging.getLogger(f"loom.audit.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.path = Path(path).expanduser() if config.enabled and path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                self.path, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8"
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(handler)
        self.replica_log = replica_log if config.enabled and config.to_serve_log else None

    def write(self, record: AuditRecord) -> None:
        if not self.config.enabled:
            return
        if not self.config.include_prompts:
            record.prompt = None
        line = json.dumps(asdict(record), ensure_ascii=False, default=str)
        self.logger.info(line)
        if self.replica_log is not None:
            self.replica_log.info("audit %s", line)

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
