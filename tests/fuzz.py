"""Hypothesis strategies for request bodies, shared by the ingress's unit fuzz and the live endpoint's."""

from __future__ import annotations


def json_values():
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(10**30), max_value=10**30)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=40)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
        max_leaves=12,
    )


def request_bodies(model: str = "loom-tiny"):
    """Bodies as clients could send them: raw bytes, any JSON, and requests with fields of any value."""
    import json

    from hypothesis import strategies as st

    fields = ["model", "prompt", "messages", "max_tokens", "n", "best_of", "logprobs", "top_logprobs", "stop",
              "temperature", "top_p", "stream", "seed", "logit_bias", "stream_options", "max_completion_tokens",
              "response_format", "tools", "echo", "suffix", "user"]  # fmt: skip
    valid = {"model": model, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    mutated = st.dictionaries(st.sampled_from(fields), json_values(), max_size=6).map(lambda d: {**valid, **d})
    as_json = (mutated | json_values()).map(lambda v: json.dumps(v, ensure_ascii=False).encode())
    edge_numbers = st.sampled_from(
        [
            b'{"model": "loom-tiny", "prompt": "x", "max_tokens": 1e308}',
            b'{"n": -0, "model": "loom-tiny"}',
            b'{"model": "loom-tiny", "prompt": "\\ud800"}',
            b'{"model": "loom-tiny", "prompt": "x", "n": 1.0}',
            b'{"model": "loom-tiny", "temperature": -Infinity}',
        ]  # fmt: skip
    )
    return as_json | st.binary(max_size=200) | edge_numbers
