"""Queries the demo sends to a freshly deployed endpoint, through the official openai client."""

from __future__ import annotations

from dataclasses import dataclass

REPETITION_PENALTY = 1.3


@dataclass
class DemoAnswer:
    kind: str
    prompt: str
    text: str


def query_endpoint(
    base_url: str,
    model_id: str,
    prompts: list[str],
    max_tokens: int,
    api_key: str | None = None,
    ca_file: str | None = None,
) -> list[DemoAnswer]:
    import ssl

    import httpx
    import openai

    # Without configured keys the endpoint ignores the key, but the client requires a non-empty one.
    client = openai.OpenAI(
        base_url=base_url,
        api_key=api_key or "unused",
        timeout=120,
        max_retries=2,
        http_client=httpx.Client(verify=ssl.create_default_context(cafile=ca_file)) if ca_file else None,
    )
    # Greedy decoding from a tiny model loops on its likeliest token; vLLM's repetition penalty (an
    # extension of the OpenAI API) keeps the samples deterministic and readable.
    penalty = {"repetition_penalty": REPETITION_PENALTY}
    answers = []
    for prompt in prompts:
        completion = client.completions.create(
            model=model_id, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=penalty
        )
        answers.append(DemoAnswer("completion", prompt, completion.choices[0].text))
    chat_prompt = prompts[0] if prompts else "Hello"
    chat = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": chat_prompt}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=penalty,
    )
    answers.append(DemoAnswer("chat", chat_prompt, chat.choices[0].message.content or ""))
    return answers
