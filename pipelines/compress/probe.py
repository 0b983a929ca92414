"""``python -m pipelines.compress.probe REQUEST ANSWER``: vLLM's perplexity and speed for one model
directory, or its speed and acceptance rate with a draft model, written as JSON
(``measure.measure_vllm`` and ``measure.measure_speculative`` run it in a child process)."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time


def perplexity(llm, rows: list[list[int]]) -> float:
    """The engine's log-probability of every held-out token given the ones before it, as perplexity."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    scored = llm.generate(
        [TokensPrompt(prompt_token_ids=row) for row in rows],
        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
        use_tqdm=False,
    )
    total, count = 0.0, 0
    for row, output in zip(rows, scored, strict=True):
        for token, logprobs in zip(row[1:], output.prompt_logprobs[1:], strict=True):
            total -= logprobs[token].logprob
            count += 1
    return math.exp(min(total / count, 50.0))


def speed(llm, rows: list[list[int]], load: dict[str, int]) -> dict[str, float]:
    """Tokens/s and p50 latency of greedy requests sent one at a time: the fixed small load."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    greedy = SamplingParams(
        max_tokens=load["new_tokens"], min_tokens=load["new_tokens"], temperature=0, ignore_eos=True
    )
    prompts = [
        TokensPrompt(prompt_token_ids=rows[i % len(rows)][: load["prompt_tokens"]]) for i in range(load["requests"])
    ]
    llm.generate(prompts[:1], greedy, use_tqdm=False)  # warm-up
    latencies = []
    for prompt in prompts:
        start = time.perf_counter()
        llm.generate([prompt], greedy, use_tqdm=False)
        latencies.append(time.perf_counter() - start)
    return {
        "tokens_per_s": load["new_tokens"] * len(latencies) / sum(latencies),
        "p50_latency_ms": statistics.median(latencies) * 1000,
    }


def acceptance(llm) -> dict[str, float]:
    """The draft's record from the engine's own counters (vLLM's spec_decode metrics, warm-up included)."""
    counters = {metric.name: getattr(metric, "value", None) for metric in llm.get_metrics()}
    drafts = counters.get("vllm:spec_decode_num_drafts") or 0
    proposed = counters.get("vllm:spec_decode_num_draft_tokens") or 0
    accepted = counters.get("vllm:spec_decode_num_accepted_tokens") or 0
    if not proposed:
        raise RuntimeError("vLLM proposed no draft tokens: speculative decoding did not run")
    return {
        "acceptance_rate": accepted / proposed,
        "mean_accepted_tokens": accepted / drafts,
        "draft_tokens": int(proposed),
    }


def main(request_path: str, answer_path: str) -> None:
    from vllm import LLM

    request = json.loads(open(request_path).read())
    rows, load = request["rows"], request["load"]
    options = {"max_model_len": max(len(row) for row in rows) + 1, "enforce_eager": True, "seed": 0}
    if request.get("draft"):
        draft = {
            "method": "draft_model",
            "model": request["draft"],
            "num_speculative_tokens": request["num_speculative_tokens"],
        }
        # Stats on: the acceptance counters are part of them. The target's perplexity is the target's own.
        llm = LLM(model=request["model"], speculative_config=draft, disable_log_stats=False, **options)
        answer = {**speed(llm, rows, load), **acceptance(llm)}
    else:
        llm = LLM(model=request["model"], **options)
        answer = {"perplexity": perplexity(llm, rows), **speed(llm, rows, load)}
    with open(answer_path, "w") as out:
        json.dump(answer, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
