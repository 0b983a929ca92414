"""Requests priced in tokens before they are admitted, and the per-key token budget with its headers."""

from __future__ import annotations

import pytest

from serve.config import ProtectionConfig
from serve.pricing import ModelPricing, Pricer
from serve.protection import Buckets, Caller, Protection, Rejection

CONTEXT = 256


@pytest.fixture(scope="module")
def pricer(tmp_path_factory):
    from pipelines.model.tokenizer import train_bpe

    texts = [f"def function_{i}(x):\n    return x * {i}  # a line of code\n" for i in range(200)]
    directory = train_bpe(texts, 300, tmp_path_factory.mktemp("tokenizer"))
    return Pricer({"m": ModelPricing(str(directory), CONTEXT)}, default_max_tokens=64, max_prompts=16)


def test_text_prompts_are_counted_with_the_models_tokenizer(pricer):
    tokenizer = pricer.tokenizer("m")
    one = "def function_3(x): return x"
    tokens = len(tokenizer(one)["input_ids"])
    price = pricer.price("m", {"prompt": one, "max_tokens": 10}, chat=False)
    assert (price.prompts, price.choices, price.prompt_tokens, price.total) == (1, 1, [tokens], tokens + 10)


def test_a_prompt_list_is_every_prompt_times_the_choices(pricer):
    prompts = ["def function_1(x):", "return x * 2", "a line"]
    price = pricer.price("m", {"prompt": prompts, "max_tokens": 8, "n": 2, "best_of": 3}, chat=False)
    assert price.prompts == 3 and price.choices == 3
    assert price.total == sum(3 * (length + 8) for length in price.prompt_tokens)
    assert "3 prompt(s)" in price.describe() and f"= {price.total} tokens" in price.describe()


def test_token_id_prompts_are_priced_by_their_length(pricer):
    assert pricer.price("m", {"prompt": [5, 6, 7, 8], "max_tokens": 4}, chat=False).total == 8
    many = pricer.price("m", {"prompt": [[1] * 10, [2] * 20], "max_tokens": 5}, chat=False)
    assert many.prompt_tokens == [10, 20] and many.total == 15 + 25


def test_chat_is_priced_through_the_chat_template(pricer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def function_1(x):"}]
    price = pricer.price("m", {"messages": messages, "max_tokens": 16}, chat=True)
    content = sum(len(pricer.tokenizer("m")(m["content"], add_special_tokens=False)["input_ids"]) for m in messages)
    assert price.prompts == 1 and price.prompt_tokens[0] > content  # the template's role markers count too
    parts = [{"role": "user", "content": [{"type": "text", "text": "def function_1(x):"}]}]
    assert pricer.price("m", {"messages": parts, "max_tokens": 1}, chat=True).total > 1


def test_an_unset_max_tokens_is_priced_at_the_endpoints_bound_or_what_the_context_leaves(pricer):
    assert pricer.price("m", {"prompt": [1] * 10}, chat=False).max_tokens == 64
    assert pricer.price("m", {"prompt": [1] * 220}, chat=False).max_tokens == CONTEXT - 220


def test_what_does_not_fit_the_context_or_the_list_limit_is_refused_in_loom_words(pricer):
    with pytest.raises(Rejection) as caught:
        pricer.price("m", {"prompt": [1] * 200, "max_tokens": 100}, chat=False)
    assert caught.value.status == 400 and caught.value.reason == "context"
    assert "a prompt of 200 tokens + max_tokens 100 exceeds m's context of 256 tokens" in caught.value.message
    with pytest.raises(Rejection, match="leaves no room"):
        pricer.price("m", {"prompt": [1] * CONTEXT}, chat=False)
    with pytest.raises(Rejection, match="17 prompts in one request exceed this endpoint's limit of 16"):
        pricer.price("m", {"prompt": ["x"] * 17, "max_tokens": 1}, chat=False)
    with pytest.raises(Rejection, match="a string or a list of token ids"):
        pricer.price("m", {"prompt": [{"text": "x"}], "max_tokens": 1}, chat=False)


def _charged(protection, caller, total, now=None):
    requests = protection.limit(caller, None)
    return protection.charge(caller, total, f"{total} tokens", requests)


def test_a_request_priced_above_the_limits_is_a_400_naming_its_price(pricer):
    protection = Protection(ProtectionConfig(max_request_tokens=1000, tokens_per_minute=5000), [])
    caller = Caller("a", requests_per_minute=600, burst=60, tokens_per_minute=5000)
    for payload in (
        {"prompt": ["def function_1(x):"] * 16, "max_tokens": 60},  # a prompt list
        {"prompt": [[7] * 101] * 4, "max_tokens": 150},  # token ids
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 230, "n": 4, "best_of": 4},  # chat, choices
    ):
        price = pricer.price("m", payload, chat="messages" in payload)
        assert price.total > 1000
        with pytest.raises(Rejection) as caught:
            protection.charge(caller, price.total, price.describe(), protection.limit(caller, None))
        assert (caught.value.status, caught.value.reason) == (400, "request-tokens")
        assert f"= {price.total} tokens, above this endpoint's limit of 1000 tokens per request" in caught.value.message
        assert caught.value.headers["x-ratelimit-limit-tokens"] == "5000"  # the budgets' state, on a refusal too
    exactly = pricer.price("m", {"prompt": [[7] * 100] * 4, "max_tokens": 150}, chat=False)
    assert exactly.total == 1000 and _charged(protection, caller, exactly.total)  # the limit itself is allowed
    small = Caller("s", requests_per_minute=600, burst=60, tokens_per_minute=500)
    with pytest.raises(Rejection, match="above this key's budget of 500 tokens per minute"):
        _charged(protection, small, 800)


def test_the_token_budget_refuses_with_429_retry_after_and_ratelimit_headers():
    now = [0.0]
    protection = Protection(ProtectionConfig(max_request_tokens=600, tokens_per_minute=6000), [])
    protection.requests, protection.tokens = Buckets(clock=lambda: now[0]), Buckets(clock=lambda: now[0])
    a = Caller("a", requests_per_minute=600, burst=60, tokens_per_minute=1200)
    headers = _charged(protection, a, 500)
    assert headers["x-ratelimit-limit-tokens"] == "1200" and headers["x-ratelimit-remaining-tokens"] == "700"
    assert headers["x-ratelimit-reset-tokens"] == "25s" and headers["x-ratelimit-remaining-requests"] == "59"
    _charged(protection, a, 500)
    with pytest.raises(Rejection) as caught:
        _charged(protection, a, 500)  # 200 left: 300 more take 15 s at 1,200 a minute
    refusal = caught.value
    assert (refusal.status, refusal.reason) == (429, "token-budget")
    assert refusal.retry_after_s == pytest.approx(15.0)
    assert "priced at 500 tokens; this key has 200 of its 1200 tokens per minute left" in refusal.message
    assert refusal.headers["x-ratelimit-remaining-tokens"] == "200"
    assert refusal.headers["x-ratelimit-limit-requests"] == "600"
    b = Caller("b", requests_per_minute=600, burst=60, tokens_per_minute=1200)
    _charged(protection, b, 500)  # another key has its own budget
    now[0] = 15.0
    assert _charged(protection, a, 500)["x-ratelimit-remaining-tokens"] == "0"


def test_engine_refusals_never_reach_the_client_with_engine_internals():
    from serve.ingress import engine_refusal, error_response

    plain = engine_refusal(400, "This model's maximum context length is 256 tokens.")
    assert plain.message == "This model's maximum context length is 256 tokens."
    for leaked in (
        "The decoder prompt has 1100 prompts; set VLLM_MAX_PROMPTS to allow more",
        "ValueError: max_tokens must be at least 1",
        "vllm rejected the request",
    ):
        refusal = engine_refusal(400, leaked)
        assert refusal.status == 400 and "VLLM" not in refusal.message and "Error" not in refusal.message
        assert "vllm" not in refusal.message.lower()
    response = error_response(429, "token-budget", "slow down", 14.2, {"x-ratelimit-remaining-tokens": "0"})
    assert response.headers["Retry-After"] == "15" and response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_fair_priority_puts_a_caller_with_less_work_in_flight_first():
    protection = Protection(ProtectionConfig(), [])
    heavy = Caller("heavy", requests_per_minute=600, burst=60, tokens_per_minute=10**6)
    light = Caller("light", requests_per_minute=600, burst=60, tokens_per_minute=10**6)
    flood = [protection.start_work(heavy, 500) for _ in range(4)]
    assert flood == [0, 7, 15, 23]  # tokens already in flight, in steps of 64: later numbers are served later
    assert protection.start_work(light, 20) == 0  # nothing of its own waiting: ahead of the flood's queue
    for _ in range(4):
        protection.end_work(heavy, 500)
    assert protection.start_work(heavy, 500) == 0  # its work done, it is back at the front


def test_the_app_asks_vllm_for_priority_scheduling_only_when_fair():
    from serve.app import llm_config
    from serve.config import ModelConfig

    fair = llm_config("m", ModelConfig(), "/models/m")
    assert fair.engine_kwargs["scheduling_policy"] == "priority"
    fcfs = llm_config("m", ModelConfig.model_validate({"engine": {"scheduling": "fcfs"}}), "/models/m")
    assert fcfs.engine_kwargs["scheduling_policy"] == "fcfs"


def test_each_route_is_priced_by_the_field_its_engine_reads(pricer):
    """A completions body carrying chat messages (or a max_completion_tokens) is priced by what the completions
    engine reads: its prompt list and max_tokens; a chat body by its messages and max_completion_tokens."""
    smuggled = {"prompt": [[7] * 20] * 12, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10}
    assert pricer.price("m", smuggled, chat=False).total == 12 * (20 + 10)
    bounds = {"prompt": [1] * 10, "max_tokens": 30, "max_completion_tokens": 1}
    assert pricer.price("m", bounds, chat=False).max_tokens == 30  # completions ignore max_completion_tokens
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 30, "max_completion_tokens": 2}
    assert pricer.price("m", chat, chat=True).max_tokens == 2


def test_both_output_bounds_are_checked_whichever_the_route_reads():
    protection = Protection(ProtectionConfig(max_tokens=64), [])
    with pytest.raises(Rejection, match="max_tokens 100000 exceeds this endpoint's limit of 64"):
        protection.check_payload({"model": "m", "prompt": "x", "max_tokens": 100_000, "max_completion_tokens": 1})
    with pytest.raises(Rejection, match="max_completion_tokens must be at least 1"):
        protection.check_payload({"model": "m", "prompt": "x", "max_tokens": 8, "max_completion_tokens": 0})


def test_a_stream_releases_its_hold_however_it_ends_even_cancelled_before_its_first_chunk():
    import asyncio

    from starlette.responses import StreamingResponse

    from serve.ingress import ReleasingStream

    async def chunks():
        await asyncio.sleep(60)  # the engine has not produced anything yet
        yield b"never"

    async def answer_then_cancel() -> list[int]:
        released: list[int] = []
        response = StreamingResponse(chunks())
        response.__class__ = ReleasingStream
        response.release = lambda: released.append(1)

        async def send(message):
            pass

        async def receive():
            await asyncio.sleep(60)
            return {"type": "http.disconnect"}

        task = asyncio.create_task(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        return released

    assert asyncio.run(answer_then_cancel()) == [1]
