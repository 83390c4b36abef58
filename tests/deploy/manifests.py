"""deploy/k8s objects and their schemas (Kubernetes' own, the CRDs'); compose and CLI parsing."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from tests.deploy.deploy_helpers import REPO

K8S = REPO / "deploy" / "k8s"
# YAML under deploy/k8s that is not a Kubernetes object: Helm values.
HELM_VALUES = {K8S / "autoscaling" / "prometheus-adapter-values.yaml"}
# The oldest Kubernetes the manifests claim (LeaderWorkerSet's minimum is 1.26; HPA behavior and
# seccompProfile are GA well before) and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29", "1.37")
DEFS = "https://kubernetes.io/api/_definitions.json"
# What the LeaderWorkerSet controller injects into every container of a group.
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


@functools.cache
def manifests() -> tuple[tuple[Path, dict], ...]:
    """(file, object) for every Kubernetes object under deploy/k8s."""
    out = []
    for path in sorted(K8S.rglob("*.y*ml")):
        if path in HELM_VALUES:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert {"apiVersion", "kind"} <= set(doc), f"{path}: not a Kubernetes object"
                out.append((path, doc))
    return tuple(out)


def manifest(kind: str, name: str) -> dict:
    found = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}s named {name} under deploy/k8s"
    return found[0]


# --- schemas --------------------------------------------------------------------------------


@functools.cache
def _k8s_registry(version: str) -> Registry:
    """Kubernetes' strict JSON schemas (unknown fields rejected), shipped by kubernetes-validate."""
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = json.loads((root / f"v{version}.0-local-strict" / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry()


def _ref(name: str) -> dict:
    return {"$ref": f"{DEFS}#/$defs/{name}"}


def _obj(required: tuple[str, ...] = (), **properties: dict) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(required),
        "properties": properties,
    }


POD_TEMPLATE = _ref("io.k8s.api.core.v1.PodTemplateSpec")
INT = {"type": "integer", "minimum": 0}
STR = {"type": "string"}
INT_OR_STRING = {"type": ["integer", "string"]}


def _crd(api_version: str, kind: str, spec: dict) -> dict:
    return _obj(
        ("apiVersion", "kind", "metadata", "spec"),
        apiVersion={"const": api_version},
        kind={"const": kind},
        metadata=_ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
        spec=spec,
    )


# leaderworkerset.x-k8s.io/v1, from the LWS API types (api/leaderworkerset/v1): the pod
# templates are core PodTemplateSpecs, checked by Kubernetes' own schema.
LWS_SCHEMA = _crd(
    "leaderworkerset.x-k8s.io/v1",
    "LeaderWorkerSet",
    _obj(
        ("leaderWorkerTemplate",),
        replicas=INT,
        startupPolicy={"enum": ["LeaderCreated", "LeaderReady"]},
        rolloutStrategy=_obj(
            ("type",),
            type={"enum": ["RollingUpdate"]},
            rollingUpdateConfiguration=_obj(
                partition=INT, maxUnavailable=INT_OR_STRING, maxSurge=INT_OR_STRING
            ),
        ),
        networkConfig=_obj(subdomainPolicy={"enum": ["Shared", "UniquePerReplica"]}),
        leaderWorkerTemplate=_obj(
            ("workerTemplate",),
            leaderTemplate=POD_TEMPLATE,
            workerTemplate=POD_TEMPLATE,
            size={"type": "integer", "minimum": 1},
            restartPolicy={
                "enum": ["RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None", "Default"]
            },
            subGroupPolicy=_obj(
                subGroupPolicyType={"enum": ["LeaderWorker", "LeaderExcluded"]},
                subGroupSize={"type": "integer", "minimum": 1},
            ),
            volumeClaimTemplates={
                "type": "array",
                "items": _ref("io.k8s.api.core.v1.PersistentVolumeClaim"),
            },
            persistentVolumeClaimRetentionPolicy=_ref(
                "io.k8s.api.apps.v1.StatefulSetPersistentVolumeClaimRetentionPolicy"
            ),
        ),
    ),
)

# The prometheus scaler's metadata keys (keda.sh/docs/scalers/prometheus); KEDA types trigger
# metadata as map[string]string, so a bare number (threshold: 4) is rejected by the API server.
KEDA_PROMETHEUS_METADATA = {
    "type": "object",
    "required": ["serverAddress", "query", "threshold"],
    "additionalProperties": False,
    "properties": dict.fromkeys(
        (
            "serverAddress", "query", "threshold", "activationThreshold", "namespace",
            "customHeaders", "ignoreNullValues", "unsafeSsl", "queryParameters", "timeout",
            "authModes",
        ),
        STR,
    ),
}  # fmt: skip
KEDA_TRIGGER = _obj(
    ("type", "metadata"),
    type=STR,
    name=STR,
    metadata={"type": "object", "additionalProperties": STR},
    authenticationRef=_obj(("name",), name=STR, kind={"enum": ["TriggerAuthentication",
                                                              "ClusterTriggerAuthentication"]}),
    metricType={"enum": ["AverageValue", "Value", "Utilization"]},
    useCachedMetrics={"type": "boolean"},
)  # fmt: skip
KEDA_TRIGGER["if"] = {"properties": {"type": {"const": "prometheus"}}}
KEDA_TRIGGER["then"] = {"properties": {"metadata": KEDA_PROMETHEUS_METADATA}}
# keda.sh/v1alpha1 ScaledObject (keda.sh/docs/concepts/scaling-deployments).
KEDA_SCHEMA = _crd(
    "keda.sh/v1alpha1",
    "ScaledObject",
    _obj(
        ("scaleTargetRef", "triggers"),
        scaleTargetRef=_obj(
            ("name",), apiVersion=STR, kind=STR, name=STR, envSourceContainerName=STR
        ),
        pollingInterval=INT,
        cooldownPeriod=INT,
        initialCooldownPeriod=INT,
        idleReplicaCount=INT,
        minReplicaCount=INT,
        maxReplicaCount=INT,
        fallback=_obj(("failureThreshold", "replicas"), failureThreshold=INT, replicas=INT,
                      behavior=STR),
        advanced=_obj(
            restoreToOriginalReplicaCount={"type": "boolean"},
            horizontalPodAutoscalerConfig=_obj(
                name=STR, behavior=_ref("io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior")
            ),
            scalingModifiers={"type": "object"},
        ),
        triggers={"type": "array", "minItems": 1, "items": KEDA_TRIGGER},
    ),
)  # fmt: skip

_ENDPOINT_FIELDS = (
    "port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "honorLabels",
    "honorTimestamps", "trackTimestampsStaleness", "relabelings", "metricRelabelings",
    "bearerTokenSecret", "authorization", "basicAuth", "oauth2", "tlsConfig", "followRedirects",
    "enableHttp2", "filterRunning", "proxyUrl",
)  # fmt: skip
# monitoring.coreos.com/v1 (the Prometheus Operator's API reference), the fields we may use.
SERVICE_MONITOR_SCHEMA = _crd(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    _obj(
        ("selector", "endpoints"),
        selector=_ref("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"),
        namespaceSelector=_obj(any={"type": "boolean"}, matchNames={"type": "array"}),
        jobLabel=STR,
        targetLabels={"type": "array"},
        podTargetLabels={"type": "array"},
        sampleLimit=INT,
        endpoints={
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {k: {} for k in _ENDPOINT_FIELDS},
            },
        },
    ),
)
PROMETHEUS_RULE_SCHEMA = _crd(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    _obj(
        ("groups",),
        groups={
            "type": "array",
            "items": _obj(
                ("name", "rules"),
                name=STR,
                interval=STR,
                rules={
                    "type": "array",
                    "items": {
                        **_obj(("expr",), record=STR, alert=STR, expr=STR, labels={},
                               annotations={}, **{"for": STR}),
                        "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                    },
                },
            ),
        },
    ),
)  # fmt: skip
KUSTOMIZATION_SCHEMA = _obj(
    ("apiVersion", "kind", "resources"),
    apiVersion={"const": "kustomize.config.k8s.io/v1beta1"},
    kind={"const": "Kustomization"},
    resources={"type": "array", "minItems": 1, "items": STR},
    patches={"type": "array"},
    namespace=STR,
    labels={"type": "array"},
    images={"type": "array"},
)
CRD_SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): LWS_SCHEMA,
    ("keda.sh/v1alpha1", "ScaledObject"): KEDA_SCHEMA,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA,
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): KUSTOMIZATION_SCHEMA,
}


def validate(doc: dict, version: str) -> None:
    """Raise jsonschema.ValidationError unless `doc` is a valid object of its kind in `version`."""
    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        jsonschema.Draft202012Validator(crd, registry=_k8s_registry(version)).validate(doc)
        return
    # Kubernetes' own kinds; SchemaNotFoundError names a kind neither list knows.
    kubernetes_validate.validate(doc, version, strict=True)


def pod_templates() -> list[tuple[str, dict]]:
    """(which, pod template) for every pod a manifest creates."""
    out = []
    for path, doc in manifests():
        where = f"{path.relative_to(REPO)}:{doc['kind']}"
        if doc["kind"] == "Deployment":
            out.append((where, doc["spec"]["template"]))
        elif doc["kind"] == "LeaderWorkerSet":
            lwt = doc["spec"]["leaderWorkerTemplate"]
            out.append((where + " leader", lwt.get("leaderTemplate", lwt["workerTemplate"])))
            out.append((where + " worker", lwt["workerTemplate"]))
    return out


# --- the tokenmill CLI -----------------------------------------------------------------------


@functools.cache
def _parser() -> argparse.ArgumentParser:
    from server.cli import make_parser

    return make_parser()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def cli_has(command: str, *flags: str) -> bool:
    """Whether `tokenmill COMMAND` exists and takes every one of `flags`."""
    sub = _subparsers().get(command)
    return sub is not None and all(f in sub._option_string_actions for f in flags)


MULTIHOST_FLAGS = ("--nnodes", "--node-rank", "--master-addr", "--master-port")


def parse_cli(args: list[str]) -> argparse.Namespace:
    """`tokenmill ARGS` through tokenmill's own parser; fails the test with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`tokenmill {' '.join(args)}` does not parse: {err.getvalue().strip()}")


def drain_s() -> float:
    """How long `tokenmill serve` may take to stop on SIGTERM: the drain plus uvicorn's margin."""
    args = _parser().parse_args(["serve"])
    return args.shutdown_timeout + 2 + 10  # + uvicorn's 2 s + up to 10 s stopping the engine


def expand_k8s(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in container args; an unknown variable fails the test."""

    def sub(m: re.Match) -> str:
        if m.group(1) not in env:
            pytest.fail(f"$({m.group(1)}) in {arg!r} is not in the container's environment")
        return env[m.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def expand_compose(arg: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default} interpolation."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if name in env and (env[name] or op != ":-"):
            return env[name]
        if op is None:
            pytest.fail(f"${{{name}}} in {arg!r} has no default")
        return default

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", sub, arg)


def flag(args: list[str], *names: str) -> str:
    """The value after the one flag of `names` in `args` (no parser: for a CLI not merged yet)."""
    found = [args[i + 1] for i, a in enumerate(args[:-1]) if a in names]
    assert len(found) == 1, f"{names} given {len(found)} times in {args}"
    return found[0]


def shared_flags(args: list[str]) -> tuple[str, ...]:
    """What every host of one model must agree on (tokenmill checks it at start-up)."""
    return (
        args[1],  # MODEL
        flag(args, "-tp", "--tensor-parallel-size"),
        flag(args, "--nnodes"),
        flag(args, "--master-addr"),
        flag(args, "--master-port"),
    )
