"""The private parts of Ray and DeepSpeed that Loom leans on still exist in the pinned versions.

Each is guarded where it is used (a warning or a clear error); this test makes an upgrade that
removes one fail in `make test`, not at deploy time.
"""

from __future__ import annotations

import inspect


def test_llm_server_still_routes_streams_through_the_batcher_hooks():
    from ray.serve.llm.deployment import LLMServer

    from serve.engine import BATCHER_HOOKS, LoomLLMServer

    for hook in BATCHER_HOOKS:
        assert callable(getattr(LLMServer, hook, None)), hook
    assert list(inspect.signature(LLMServer._batch_output_stream).parameters) == ["self", "generator"]
    assert LoomLLMServer._batch_output_stream is not LLMServer._batch_output_stream


def test_ray_serve_llm_still_skips_node_initialization_through_its_callback_context():
    from ray.llm._internal.common.callbacks.base import CallbackBase, CallbackCtx
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    from serve.engine import CALLBACK_HOOKS

    switch, hook = CALLBACK_HOOKS
    assert CallbackCtx().__dict__[switch] is True and callable(getattr(CallbackBase, hook))
    # The engine's start reads the switch after running the hook.
    source = inspect.getsource(VLLMEngine.start)
    assert source.index(f'"{hook}"') < source.index(f"ctx.{switch}"), source


def test_every_route_the_stock_builder_maps_is_a_loom_route():
    # build_openai_app routes each of these paths to the ingress method of that name: a method Loom did
    # not write would answer without the key check.
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS

    from serve.ingress import LoomIngress

    for name in DEFAULT_ENDPOINTS:
        assert getattr(LoomIngress, name).__qualname__.startswith("LoomIngress."), name


def test_deepspeed_still_gathers_zero3_parameters():
    from deepspeed.runtime.engine import DeepSpeedEngine

    from pipelines.train.loop import ZERO3_GATHER

    assert callable(getattr(DeepSpeedEngine, ZERO3_GATHER, None))


def test_ray_data_start_up_limit_refresh_is_still_an_attribute():
    from ray.data._internal.execution.resource_manager import ResourceManager

    assert isinstance(ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S, (int, float))


def test_serve_still_hands_an_ingress_replica_its_app_through_set_asgi_app():
    # LoomIngress gates FastAPI's documentation routes in this hook (serve.ingress.gate_docs).
    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    from serve.ingress import LoomIngress

    assert "self._set_asgi_app(" in inspect.getsource(ASGIAppReplicaWrapper.__init__)
    assert LoomIngress._set_asgi_app is not ASGIAppReplicaWrapper._set_asgi_app


def test_training_workers_still_build_llama_without_scikit_learn_or_scipy():
    # loop._lean_transformers patches the availability flags transformers reads as its modules load; a fresh
    # process, like a training worker, shows whether transformers still reads them there.
    import json
    import subprocess
    import sys

    code = """
import json, sys
from pipelines.train.loop import _lean_transformers
_lean_transformers()
import torch
from transformers import LlamaForCausalLM
from pipelines.model.config import ModelConfig
from pipelines.model.llama import llama_config
config = llama_config(ModelConfig(), vocab_size=64, eos_token_id=0, pad_token_id=0)
ids = torch.randint(0, 64, (2, 8))
loss = LlamaForCausalLM(config)(input_ids=ids, labels=ids).loss
loss.backward()
print(json.dumps({"loaded": sorted(set(sys.modules) & {"sklearn", "scipy"}), "loss": float(loss)}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], result
    assert result["loss"] > 0
