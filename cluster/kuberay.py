"""`loom export kuberay`: the recipe as KubeRay resources, a ``RayJob`` for the chain and a ``RayService``
whose ``serveConfigV2`` is the serve application ``loom serve`` deploys.

Written for KubeRay v1.7.0's CRDs (``ray.io/v1``). Both clusters require Ray's token: ``authOptions.mode:
token`` makes the operator (v1.5.1 and later) create the token's Secret and set it on every Ray container.
The image must hold Loom's repository at ``IMAGE_REPO_DIR`` with its pinned environment installed; the run
storage is a PersistentVolumeClaim mounted at the recipe's ``storage`` on every pod.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from cluster.recipe import LoomConfig
from pipelines.schema import StrictModel

API_VERSION = "ray.io/v1"
RAY_VERSION = "2.60.0"
#: Where the image holds Loom's repository (the job's working_dir and the serve application's import path).
IMAGE_REPO_DIR = "/app"
STORAGE_VOLUME = "loom-storage"


class KubeRayOptions(StrictModel):
    """What the recipe does not say about a Kubernetes deployment."""

    image: str = Field(description="Container image with Loom's repository at /app and its pinned environment.")
    storage_claim: str = Field(
        description="PersistentVolumeClaim (ReadWriteMany) mounted at the recipe's storage on every pod."
    )
    api_keys_secret: str | None = Field(
        default=None,
        description="Secret whose 'keys' entry becomes the endpoint's LOOM_API_KEYS (unset: no keys, so the "
        "endpoint binds the pod's loopback only).",
    )


class KubeRayError(ValueError):
    pass


def resource_name(config: LoomConfig, suffix: str) -> str:
    """A DNS-1123 name from the run's name (Kubernetes refuses anything else)."""
    base = re.sub(r"[^a-z0-9-]+", "-", config.run_name.lower()).strip("-") or "run"
    return f"loom-{base}-{suffix}"[:63].rstrip("-")


def _check_storage(config: LoomConfig) -> None:
    if not Path(config.storage).is_absolute():
        raise KubeRayError(
            f"storage '{config.storage}' is relative: on Kubernetes the run lives on the claimed volume, "
            "mounted at an absolute path every pod shares; give one (e.g. storage=/mnt/shared/loom-runs)"
        )


def _container(config: LoomConfig, options: KubeRayOptions, name: str, limits: dict[str, Any]) -> dict[str, Any]:
    env = [{"name": key, "value": value} for key, value in sorted(config.cluster.ray_env_vars().items())]
    if options.api_keys_secret:
        env.append(
            {
                "name": config.serve.protection.api_keys_env or "LOOM_API_KEYS",
                "valueFrom": {"secretKeyRef": {"name": options.api_keys_secret, "key": "keys"}},
            }
        )
    return {
        "name": name,
        "image": options.image,
        "workingDir": IMAGE_REPO_DIR,
        "env": env,
        "resources": {"limits": limits, "requests": limits},
        "volumeMounts": [{"name": STORAGE_VOLUME, "mountPath": config.storage}],
    }


def _pod(container: dict[str, Any], options: KubeRayOptions) -> dict[str, Any]:
    return {
        "spec": {
            "containers": [container],
            "volumes": [{"name": STORAGE_VOLUME, "persistentVolumeClaim": {"claimName": options.storage_claim}}],
        }
    }


def ray_cluster_spec(config: LoomConfig, options: KubeRayOptions) -> dict[str, Any]:
    """Head plus one worker group sized like the recipe's training workers; token authentication on."""
    train = config.train
    worker_limits: dict[str, Any] = {"cpu": f"{train.cpus_per_worker:g}", "memory": "32Gi"}
    if train.use_gpu:
        worker_limits["nvidia.com/gpu"] = 1
    head = _container(config, options, "ray-head", {"cpu": "4", "memory": "16Gi"})
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": config.serve.port, "name": "serve"},
    ]
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "authOptions": {"mode": "token"},
        "headGroupSpec": {"rayStartParams": {}, "template": _pod(head, options)},
        "workerGroupSpecs": [
            {
                "groupName": "workers",
                "replicas": train.max_workers,
                "minReplicas": train.min_workers,
                "maxReplicas": train.max_workers * 2,
                "rayStartParams": {},
                "template": _pod(_container(config, options, "ray-worker", worker_limits), options),
            }
        ],
    }


def ray_job(config: LoomConfig, recipe: Path, overrides: list[str], options: KubeRayOptions) -> dict[str, Any]:
    """The whole chain (``python -m cluster run``) as a RayJob on its own cluster, deleted when it finishes."""
    from cluster.submit import entrypoint

    _check_storage(config)
    runtime_env = {"working_dir": IMAGE_REPO_DIR, "env_vars": config.cluster.ray_env_vars()}
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": resource_name(config, "chain"), "labels": {"app.kubernetes.io/part-of": "loom"}},
        "spec": {
            "entrypoint": entrypoint("run", recipe, overrides),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": ray_cluster_spec(config, options),
        },
    }


def ray_service(config: LoomConfig, serve_config: dict[str, Any], options: KubeRayOptions) -> dict[str, Any]:
    """The serve application (``serve.stage.serve_deploy_config``'s dict) as a RayService."""
    _check_storage(config)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": {"name": resource_name(config, "serve"), "labels": {"app.kubernetes.io/part-of": "loom"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(config, options),
        },
    }
