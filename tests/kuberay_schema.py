"""The part of KubeRay's RayJob and RayService schemas that Loom's manifests use, as JSON Schema.

Source: the CRDs of KubeRay v1.7.0 (github.com/ray-project/kuberay, ray-operator/config/crd/bases/
ray.io_rayjobs.yaml and ray.io_rayservices.yaml, ``ray.io/v1``): the field names, types, enums and
required lists below are theirs. Written out here rather than vendored (the two files are 2.4 MB, almost
all Kubernetes' pod template). Unlike the CRDs, every object here refuses unknown fields, as
``kubectl apply --validate=strict`` does, so a misspelt key fails the test instead of being pruned.
"""

from __future__ import annotations

from typing import Any

STRING = {"type": "string"}
INT32 = {"type": "integer", "format": "int32"}
#: Kubernetes' resource quantity (x-kubernetes-int-or-string with the CRD's pattern).
QUANTITY = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
}


def strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


ENV_VAR = strict(
    {
        "name": STRING,
        "value": STRING,
        "valueFrom": strict(
            {"secretKeyRef": strict({"key": STRING, "name": STRING, "optional": {"type": "boolean"}}, ("key",))}
        ),
    },
    ("name",),
)
CONTAINER = strict(
    {
        "name": STRING,
        "image": STRING,
        "workingDir": STRING,
        "command": array(STRING),
        "args": array(STRING),
        "env": array(ENV_VAR),
        "ports": array(strict({"containerPort": INT32, "name": STRING, "protocol": STRING}, ("containerPort",))),
        "resources": strict(
            {
                "limits": {"type": "object", "additionalProperties": QUANTITY},
                "requests": {"type": "object", "additionalProperties": QUANTITY},
            }
        ),
        "volumeMounts": array(
            strict({"name": STRING, "mountPath": STRING, "readOnly": {"type": "boolean"}}, ("mountPath", "name"))
        ),  # fmt: skip
    },
    ("name",),
)
POD_TEMPLATE = strict(
    {
        "metadata": strict({"labels": {"type": "object", "additionalProperties": STRING}}),
        "spec": strict(
            {
                "containers": array(CONTAINER),
                "volumes": array(
                    strict(
                        {
                            "name": STRING,
                            "persistentVolumeClaim": strict(
                                {"claimName": STRING, "readOnly": {"type": "boolean"}}, ("claimName",)
                            ),
                        },
                        ("name",),
                    )
                ),
            },
            ("containers",),
        ),
    }
)
START_PARAMS = {"type": "object", "additionalProperties": STRING}
RAY_CLUSTER_SPEC = strict(
    {
        "rayVersion": STRING,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": strict(
            {
                "mode": {"type": "string", "enum": ["disabled", "token"]},
                "secretName": STRING,
                "enableK8sTokenAuth": {"type": "boolean"},
            }  # fmt: skip
        ),
        "headGroupSpec": strict(
            {"rayStartParams": START_PARAMS, "serviceType": STRING, "template": POD_TEMPLATE}, ("template",)
        ),
        "workerGroupSpecs": array(
            strict(
                {
                    "groupName": STRING,
                    "replicas": INT32,
                    "minReplicas": INT32,
                    "maxReplicas": INT32,
                    "idleTimeoutSeconds": INT32,
                    "rayStartParams": START_PARAMS,
                    "template": POD_TEMPLATE,
                },
                ("groupName", "maxReplicas", "minReplicas", "template"),
            )
        ),
    },
    ("headGroupSpec",),
)
METADATA = strict({"name": STRING, "namespace": STRING, "labels": {"type": "object", "additionalProperties": STRING}})


def resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return strict(
        {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
        ("apiVersion", "kind", "metadata", "spec"),
    )


RAY_JOB = resource(
    "RayJob",
    strict(
        {
            "entrypoint": STRING,
            "runtimeEnvYAML": STRING,
            "shutdownAfterJobFinishes": {"type": "boolean"},
            "ttlSecondsAfterFinished": INT32,
            "submissionMode": STRING,
            "rayClusterSpec": RAY_CLUSTER_SPEC,
        }
    ),
)
RAY_SERVICE = resource(
    "RayService",
    strict({"serveConfigV2": STRING, "rayClusterConfig": RAY_CLUSTER_SPEC}, ("rayClusterConfig",)),
)
