"""Ray Serve LLM's direct streaming (the LLMServer replica serves HTTP itself behind HAProxy, picked by an
LLMRouter), deployed for the serving-paths benchmark: ``python -m tests.benchmarks.direct_streaming MODEL PORT``.

Its own process: Ray reads ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING`` when ``ray.serve.llm`` is imported and
``RAY_SERVE_ENABLE_HA_PROXY`` in the Serve controller, so both are set before this process imports Ray or starts
its embedded cluster (which inherits them). Prints ``ready`` once the endpoint answers, then serves until its
standard input closes. Ray's stock path: none of Loom's checks (this mode refuses a custom ingress)."""

from __future__ import annotations

import os
import sys

os.environ["RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"] = "1"
os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"


def main(model_dir: str, port: int, max_model_len: int, max_num_seqs: int) -> None:
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    from serve.app import llm_config
    from serve.config import ModelConfig

    ray.init(num_cpus=2 * (os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        model = ModelConfig.model_validate(
            {
                "source": model_dir,
                "cpus_per_replica": os.cpu_count(),
                "engine": {"dtype": "float32", "max_model_len": max_model_len, "max_num_seqs": max_num_seqs},
            }
        )
        stock = llm_config("bench", model, model_dir).model_copy(update={"server_cls": None})
        serve.run(build_openai_app({"llm_configs": [stock]}), name="bench", route_prefix="/")
        print("ready", flush=True)
        sys.stdin.read()  # until the benchmark closes it
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
