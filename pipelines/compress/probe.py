"""``python -m pipelines.compress.probe REQUEST ANSWER``: vLLM's perplexity and speed for one model
directory, written as JSON (``measure.measure_vllm`` runs it in a child process)."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time


def main(request_path: str, answer_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(open(request_path).read())
    rows, load = request["rows"], request["load"]
    llm = LLM(model=request["model"], max_model_len=max(len(row) for row in rows) + 1, enforce_eager=True, seed=0)
    # Perplexity: the engine's log-probability of every held-out token given the ones before it.
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
    greedy = SamplingParams(
        max_tokens=load["new_tokens"], min_tokens=load["new_tokens"], temperature=0, ignore_eos=True
    )
    prompts = [
        TokensPrompt(prompt_token_ids=rows[i % len(rows)][: load["prompt_tokens"]]) for i in range(load["requests"])
    ]
    llm.generate(prompts[:1], greedy, use_tqdm=False)  # warm-up
    latencies = []
    for prompt in prompts:  # one request at a time: the fixed small load
        start = time.perf_counter()
        llm.generate([prompt], greedy, use_tqdm=False)
        latencies.append(time.perf_counter() - start)
    answer = {
        "perplexity": math.exp(min(total / count, 50.0)),
        "tokens_per_s": load["new_tokens"] * len(latencies) / sum(latencies),
        "p50_latency_ms": statistics.median(latencies) * 1000,
    }
    with open(answer_path, "w") as out:
        json.dump(answer, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
