"""The Serve application builder's translation of the serve section (no Ray cluster)."""

from __future__ import annotations

import yaml

from pipelines.config import load_config
from serve.app import ServeAppArgs, llm_config
from serve.stage import serve_deploy_config
from tests.conftest import TINY


def test_cpu_llm_config():
    serve = load_config(TINY, ["serve.max_replicas=3"]).serve
    config = llm_config(serve, "/models/m")
    assert config.model_loading_config.model_id == "loom-tiny"
    assert config.model_loading_config.model_source == "/models/m"
    assert config.engine_kwargs["max_model_len"] == serve.max_model_len
    assert config.placement_group_config == {"bundles": [{"CPU": 1}]}
    assert config.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    scaling = config.deployment_config["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (1, 1, 3)


def test_gpu_llm_config_uses_gpu_bundles():
    serve = load_config(TINY.parent / "gpu-125m.yaml").serve
    config = llm_config(serve, "/models/m")
    assert config.placement_group_config["bundles"] == [{"CPU": 1, "GPU": 1}]
    assert config.engine_kwargs["gpu_memory_utilization"] == 0.85


def test_serve_deploy_yaml_round_trips_through_the_builder_args():
    serve = load_config(TINY).serve
    args = ServeAppArgs(serve_config=serve, model_source="/models/m")
    text = yaml.safe_dump(serve_deploy_config(args, serve))
    app = yaml.safe_load(text)["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    assert ServeAppArgs.model_validate(app["args"]) == args
