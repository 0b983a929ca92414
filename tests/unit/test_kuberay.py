"""`loom export kuberay`: a RayJob and a RayService that KubeRay v1.7.0's schemas accept (tests/kuberay_schema.py),
with a serveConfigV2 that Ray's own Serve schema accepts."""

from __future__ import annotations

import copy
import subprocess
import sys

import jsonschema
import pytest
import yaml

from cluster.kuberay import KubeRayError, KubeRayOptions, ray_job, ray_service
from cluster.recipe import load_config
from cluster.submit import entrypoint
from serve.app import ServeAppArgs
from serve.stage import http_options, serve_deploy_config
from tests.conftest import REPO_ROOT, TINY
from tests.kuberay_schema import RAY_JOB, RAY_SERVICE

GPU_RECIPE = REPO_ROOT / "pipelines" / "recipes" / "gpu-125m.yaml"
OPTIONS = KubeRayOptions(image="registry.example/loom:1", storage_claim="loom-runs", api_keys_secret="loom-keys")


def test_the_chain_as_a_rayjob_on_a_token_authenticated_cluster():
    config = load_config(GPU_RECIPE)
    job = ray_job(config, GPU_RECIPE, ["train.lr=3e-4"], OPTIONS)
    jsonschema.validate(job, RAY_JOB)
    spec = job["spec"]
    assert spec["entrypoint"] == entrypoint("run", GPU_RECIPE, ["train.lr=3e-4"])
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/app"
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"} and cluster["rayVersion"] == "2.60.0"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == config.train.num_workers
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["volumeMounts"] == [{"name": "loom-storage", "mountPath": config.storage}]
    keys = [env for env in container["env"] if "valueFrom" in env]
    assert keys == [{"name": "LOOM_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "loom-keys", "key": "keys"}}}]


def test_the_serve_application_as_a_rayservice_whose_config_rays_serve_schema_accepts():
    from ray.serve.schema import ServeDeploySchema

    config = load_config(GPU_RECIPE)
    args = ServeAppArgs(serve_config=config.serve, model_sources={"loom-125m": "/mnt/shared/loom-runs/m"})
    service = ray_service(config, serve_deploy_config(args, http_options(config.serve, "0.0.0.0")), OPTIONS)
    jsonschema.validate(service, RAY_SERVICE)
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serve.app:build_app" and ServeAppArgs.model_validate(app["args"]) == args


def test_a_misspelt_field_fails_the_schema_and_a_relative_storage_is_refused():
    job = ray_job(load_config(GPU_RECIPE), GPU_RECIPE, [], OPTIONS)
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(typo, RAY_JOB)
    with pytest.raises(KubeRayError, match="storage 'runs' is relative"):
        ray_job(load_config(TINY), TINY, [], OPTIONS)


def test_export_writes_the_rayjob_and_says_why_there_is_no_rayservice_before_a_run(tmp_path):
    storage = tmp_path / "runs"
    command = [sys.executable, "-m", "cluster", "export", "kuberay", str(GPU_RECIPE), f"storage={storage}",
               "--image", "loom:1", "--storage-claim", "runs", "--out", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    jsonschema.validate(yaml.safe_load((tmp_path / "out" / "rayjob.yaml").read_text()), RAY_JOB)
    assert "no RayService yet" in result.stdout and not (tmp_path / "out" / "rayservice.yaml").exists()
    outside = tmp_path / "recipe.yaml"
    outside.write_text(GPU_RECIPE.read_text())
    command[command.index(str(GPU_RECIPE))] = str(outside)
    refused = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "outside the working directory" in refused.stderr, refused.stderr[-2000:]
