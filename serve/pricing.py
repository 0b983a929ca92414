"""What a request costs, in tokens, before it is admitted.

One price per request, completions and chat alike, streamed or not:

    cost = sum over its prompts of choices x (the prompt's tokens + max_tokens)

with ``choices = max(n, best_of)``. Prompts are counted with the served model's own tokenizer (text, token
ids, or chat messages through the model's chat template), so what is charged is what the engine will be
given. A request without ``max_tokens`` is priced (and capped) at the endpoint's ``max_tokens``, or what is
left of the model's context, whichever is smaller: no request buys more work than it is charged for.

Counting with the tokenizer is how the engine itself counts (vLLM tokenizes the same way); an estimate
from characters would under-charge token-id prompts and over-charge everything else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serve.protection import Rejection, requested_tokens


@dataclass(frozen=True)
class Price:
    """A request's priced work."""

    prompts: int
    choices: int
    prompt_tokens: list[int]  # per prompt
    max_tokens: int  # output tokens each choice may generate
    total: int

    def describe(self) -> str:
        """The formula with this request's figures, for a refusal."""
        lengths = ", ".join(map(str, self.prompt_tokens[:8])) + (", ..." if len(self.prompt_tokens) > 8 else "")
        return (
            f"{self.prompts} prompt(s) of [{lengths}] tokens, each x {self.choices} choice(s) x (its tokens + "
            f"max_tokens {self.max_tokens}) = {self.total} tokens"
        )


@dataclass(frozen=True)
class ModelPricing:
    """What pricing needs of a served model: its tokenizer's directory, its context length, and whether its engine
    schedules by the priority the ingress gives (``engine.scheduling: fair``)."""

    tokenizer: str
    context: int
    fair: bool = False


def _choices(payload: Mapping[str, Any]) -> int:
    return max(int(payload.get("n") or 1), int(payload.get("best_of") or 1))


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class Pricer:
    """Prices requests for the models an ingress serves; tokenizers are loaded once per model."""

    def __init__(self, models: Mapping[str, ModelPricing], default_max_tokens: int, max_prompts: int):
        self.models = dict(models)
        self.default_max_tokens = default_max_tokens
        self.max_prompts = max_prompts
        self._tokenizers: dict[str, Any] = {}

    def tokenizer(self, model: str):
        if model not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[model] = AutoTokenizer.from_pretrained(self.models[model].tokenizer)
        return self._tokenizers[model]

    def prompt_lengths(self, model: str, payload: Mapping[str, Any], chat: bool) -> list[int]:
        """Tokens of each prompt the request carries, as the engine will see them: a chat request's messages, a
        completions request's prompt (each route's engine reads only its own field)."""
        tokenizer = self.tokenizer(model)
        if chat:
            messages = [_text_message(m) for m in payload.get("messages") or []]
            try:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as err:  # a template that cannot render these messages: the request's fault
                raise Rejection(
                    400, "messages", f"messages cannot be put in {model}'s chat template: {err}"[:300]
                ) from err
            if isinstance(ids, Mapping):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
            return [len(ids)]
        prompt = payload.get("prompt")
        prompts: Sequence[Any]
        if isinstance(prompt, str) or _is_ids(prompt):
            prompts = [prompt]
        elif isinstance(prompt, list):
            prompts = prompt
        else:
            prompts = []
        if len(prompts) > self.max_prompts:
            raise Rejection(
                400,
                "prompts",
                f"{len(prompts)} prompts in one request exceed this endpoint's limit of {self.max_prompts}",
            )
        lengths = []
        for item in prompts:
            if _is_ids(item):
                lengths.append(len(item))
            elif isinstance(item, str):
                lengths.append(len(tokenizer(item)["input_ids"]))
            else:
                raise Rejection(400, "prompt", "each prompt must be a string or a list of token ids")
        return lengths

    def price(self, model: str, payload: Mapping[str, Any], chat: bool) -> Price:
        """The request's cost (``chat``: the chat route's, else completions'); a prompt that leaves no room in the
        model's context is refused here. The caller holds the engine to ``Price.max_tokens``."""
        context = self.models[model].context
        lengths = self.prompt_lengths(model, payload, chat)
        longest = max(lengths, default=0)
        asked = requested_tokens(payload, chat)
        if longest >= context:
            raise Rejection(
                400,
                "context",
                f"a prompt of {longest} tokens leaves no room to generate in {model}'s context of {context} tokens",
            )
        max_tokens = asked if asked is not None else min(self.default_max_tokens, context - longest)
        if longest + max_tokens > context:
            raise Rejection(
                400,
                "context",
                f"a prompt of {longest} tokens + max_tokens {max_tokens} exceeds {model}'s context of {context} tokens",
            )
        choices = _choices(payload)
        total = sum(choices * (length + max_tokens) for length in lengths)
        return Price(len(lengths), choices, lengths, max_tokens, total)


def _text_message(message: Any) -> dict[str, Any]:
    """A chat message with its content as text (content parts joined), as chat templates take it."""
    if not isinstance(message, Mapping):
        return {"role": "user", "content": ""}
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        )
    return {**message, "content": content if isinstance(content, str) else ""}
