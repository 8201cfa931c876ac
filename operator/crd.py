"""The `longcontextmodels.longserve.io` CRD, generated from code (one source of truth).

`manifests/crd/longcontextmodels.longserve.io.yaml` is this module's output; a test fails when the
file is stale and `LONGSERVE_REGEN_GOLDENS=1` (`make goldens`) rewrites it. Defaults come from
`types.DEFAULTS`; the CEL rules mirror what `types.parse` re-checks (docs/operator.md#validation).
"""
from __future__ import annotations

from longserve.operator import sizing_rules
from longserve.operator.sizing_rules import MODES, OBJECTIVES, TENSOR_PARALLEL_SIZES
from longserve.operator.types import (
    DEFAULTS,
    GROUP,
    KIND,
    MAX_NAME_LENGTH,
    MAX_NODES,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
)
from longserve.server.config import RUNTIMES

CRD_NAME = f"{PLURAL}.{GROUP}"
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}


def _s(description: str, **extra) -> dict:
    return {"type": "string", "description": description, **extra}


def _i(description: str, **extra) -> dict:
    return {"type": "integer", "description": description, **extra}


def _obj(description: str, properties: dict, **extra) -> dict:
    return {"type": "object", "description": description, "properties": properties, **extra}


def _quantity(description: str, default: str | None = None) -> dict:
    out = {**QUANTITY, "description": description}
    if default is not None:
        out["default"] = default
    return out


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
FREE_LIST = {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
FREE_OBJECT = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
SECRET_KEY_REF = {"name": _s("Secret name (same namespace).", maxLength=253),
                  "key": _s("Key in the Secret.", maxLength=253)}
LABEL_SELECTOR = {"type": "object", "description": "A label selector (metav1.LabelSelector).", "properties": {
    "matchLabels": STRING_MAP,
    "matchExpressions": {"type": "array", "items": {"type": "object", "required": ["key", "operator"], "properties": {
        "key": {"type": "string"}, "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": {"type": "string"}}}}}}}
PEER = {"type": "object", "description": "Pods by namespace and/or pod labels (a NetworkPolicy peer without ipBlock).",
        "properties": {"namespaceSelector": LABEL_SELECTOR, "podSelector": LABEL_SELECTOR}, "minProperties": 1}
VOLUME_MOUNT = {"type": "object", "required": ["name", "mountPath"], "properties": {
    "name": _s("One of spec.pod.volumes."), "mountPath": _s("Absolute path; not under a path the operator mounts."),
    "readOnly": {"type": "boolean"}, "subPath": {"type": "string"}, "subPathExpr": {"type": "string"},
    "mountPropagation": {"type": "string", "enum": ["None", "HostToContainer"]},
    "recursiveReadOnly": {"type": "string", "enum": ["Disabled", "IfPossible", "Enabled"]}}}


def rollout_schema() -> dict:
    surge = {**QUANTITY, "description": "Pods above replicas during a rollout (integer or percentage)."}
    return _obj("How pods are replaced (rollout.py).", {
        "maxSurge": {**surge, "default": 0},
        "maxUnavailable": {**QUANTITY, "default": 1, "description": "Pods below replicas during a rollout."},
        "drainSeconds": _i("How long a terminating engine lets running requests finish (default: the plan's "
                           "longest request, prefill of maxModelLen plus the output cap).", minimum=0, maximum=86400),
        "terminationGracePeriodSeconds": _i("Default: drainSeconds + 30.", minimum=1, maximum=86400),
        "protectSingleReplica": {"type": "boolean", "default": True,
                                 "description": "At one replica the PDB is minAvailable 1 (evictions wait)."},
    }, default={})


def autoscaling_schema() -> dict:
    return _obj("Autoscale spec.replicas on engine load (autoscaling.py); the autoscaler targets this "
                "resource's scale subresource.", {
        "provider": _s("keda (ScaledObject, Prometheus trigger) or hpa (autoscaling/v2, Pods metric).",
                       enum=["keda", "hpa"], default="keda"),
        "minReplicas": _i("0 (scale to zero) with keda and a query only.", minimum=0, maximum=1000, default=1),
        "maxReplicas": _i("Upper bound.", minimum=1, maximum=1000),
        "metric": _s("The load signal.", enum=["pendingPrefillTokens", "waitingRequests", "kvCacheUsage"],
                     default="pendingPrefillTokens"),
        "target": {**QUANTITY, "description": "Per-replica target (kvCacheUsage: a fraction). Defaults: 524288 "
                                              "tokens, 1 request, 0.8."},
        "prometheusAddress": _s("Prometheus for the KEDA trigger.", maxLength=512),
        "query": _s("PromQL replacing the generated query (keda only; required to scale from zero).",
                    maxLength=2048),
        "cooldownSeconds": _i("KEDA: idle time before scaling to zero.", minimum=0, maximum=86400),
    }, required=["maxReplicas"], **{"x-kubernetes-validations": [
        {"rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
         "message": "minReplicas must not exceed maxReplicas"},
        {"rule": "!has(self.minReplicas) || self.minReplicas > 0 || (self.provider == 'keda' && has(self.query))",
         "message": "scale to zero needs provider keda and a query"}]})


def spec_schema() -> dict:
    d = DEFAULTS
    model = _obj("Which weights to serve.", {
        "uri": _s("hf://org/name or pvc://claim/path", maxLength=512,
                  pattern=r"^(hf://[^/\s]+/[^/\s]+|pvc://[a-z0-9][-a-z0-9.]*(/\S*)?)$"),
        "revision": _s("Hub revision; pin a commit for reproducible caches.", default=d["revision"], maxLength=128),
        "servedModelName": _s("Name in the OpenAI API (default: metadata.name).", maxLength=128),
        "authSecretRef": _obj("Secret holding a hub token, for gated models; given to the download Job "
                              "(and to the engine when it downloads itself) as HF_TOKEN from the Secret.",
                              SECRET_KEY_REF, required=["name", "key"]),
    }, required=["uri"])
    runtime = _obj("Serving runtime.", {
        "name": _s("native | vllm | sglang", enum=list(RUNTIMES), default=d["runtime"]),
        "image": _s("Required for vllm/sglang; native defaults to the operator's engine image.",
                    default="", maxLength=512),
        "extraArgs": {"type": "array", "items": {"type": "string"}, "maxItems": 64,
                      "description": "Appended to the rendered command."},
        "env": {**FREE_LIST, "description": "Extra container environment (EnvVar objects)."},
    }, default={})
    context = _obj("Context window and concurrency.", {
        "maxModelLen": _i("Tokens per sequence (default: the model's maximum).", minimum=16),
        "maxNumSeqs": _i("Concurrent sequences at full length.", minimum=1, default=d["maxNumSeqs"]),
        "maxOutputTokens": _i("Default and cap for max_tokens.", minimum=1, default=d["maxOutputTokens"]),
    }, default={})
    sizing = _obj("How tensor parallelism and prefill chunk are chosen.", {
        "mode": _s("Auto | Manual | DryRun (plan into status, deploy nothing)", enum=list(MODES), default=d["mode"]),
        "objective": _s("MinGPUs | MaxPrefillThroughput", enum=list(OBJECTIVES), default=d["objective"]),
        "tensorParallelSize": _i("Manual only, required there.", minimum=1, maximum=max(TENSOR_PARALLEL_SIZES)),
        "prefillChunkTokens": _i("Manual only, optional (else the largest chunk that fits).",
                                 minimum=sizing_rules.CHUNK_MULTIPLE),
        "gpuMemoryUtilization": {"type": "number", "minimum": 0.5, "maximum": 0.98,
                                 "default": d["gpuMemoryUtilization"], "description": "Upper bound for the planner."},
        "safetyMarginPercent": {"type": "number", "minimum": 0, "maximum": 50, "default": d["safetyMarginPercent"],
                                "description": "Headroom kept under the budget."},
    }, default={})
    accelerator = _obj("GPU product and placement.", {
        "gpuProduct": _s("Value of node label nvidia.com/gpu.product, or a catalog name.", maxLength=128),
        "memoryPerGpu": _quantity("Usable memory per device; overrides the catalog (CPU mode: host memory "
                                  "given to the engine)."),
        "gpusPerNode": _i("GPUs of one node: TP stays within one node (one pod) where a TP that fits allows.",
                          minimum=1, maximum=8, default=d["gpusPerNode"]),
        "nodes": _i("Nodes one replica may span. TP crosses nodes only when no TP within one node fits; the "
                    "replica is then a LeaderWorkerSet group of one pod per node.", minimum=1,
                    maximum=MAX_NODES, default=d["nodes"]),
        "resourceName": _s("Extended resource requested per GPU; empty runs on CPUs (local demo clusters).",
                           default=d["resourceName"], maxLength=253),
        "nodeSelector": STRING_MAP,
        "tolerations": {**FREE_LIST, "description": "Added to the GPU toleration."},
    })
    resources = _obj("Pod resources; auto derives them from the plan.", {
        "cpu": _quantity("auto: 4 + 2 per GPU", "auto"),
        "memory": _quantity("auto: shm + max(32Gi, weights)", "auto"),
        "shmSize": _quantity("auto: 1Gi at TP 1, 16Gi above", "auto"),
        "ephemeralStorage": _quantity("auto: 10Gi with cache; weights x 1.2 + 10Gi without", "auto"),
        "requests": {"type": "object", "additionalProperties": QUANTITY,
                     "description": "Container requests by resource name; win over the values above. The GPU "
                                    "resource is the planner's and cannot be set."},
        "limits": {"type": "object", "additionalProperties": QUANTITY,
                   "description": "Container limits by resource name; win over the derived memory limit. "
                                  "The GPU resource is the planner's and cannot be set."},
    }, default={})
    cache = _obj("Model cache PVC filled once by a Job.", {
        "enabled": {"type": "boolean", "default": d["cacheEnabled"], "description": "Cache hf:// weights in a PVC."},
        "storageClassName": _s("RWX/ROX class recommended for replicas > 1.", default=""),
        "size": _quantity("auto: weights x 1.2 + 1Gi", "auto"),
        "existingClaim": _s("Use this PVC instead of creating one.", default=""),
        "retain": {"type": "boolean", "default": False,
                   "description": "Keep the cache PVC when the resource is deleted (it is not owned by the resource; "
                                  "a resource of the same name adopts it again)."},
        "download": _obj("The Job that runs `longserve download` into /models/ORG--NAME/REVISION.", {
            "activeDeadlineSeconds": _i("Deadline of the whole Job (default: max(3600, 2 x weights / 50 MB/s "
                                        "+ 900)).", minimum=60),
            "backoffLimit": _i("Retries of a failed download pod (permanent errors fail at once).",
                               minimum=0, maximum=20, default=d["downloadBackoffLimit"]),
        }, default={}),
    }, default={})
    serving = _obj("Ports.", {
        "httpPort": _i("OpenAI API, /health, /metrics.", minimum=1, maximum=65535, default=d["httpPort"]),
        "grpcPort": _i("native only.", minimum=1, maximum=65535, default=d["grpcPort"]),
    }, default={}, **{"x-kubernetes-validations": [
        {"rule": "self.httpPort != self.grpcPort", "message": "httpPort and grpcPort must differ"}]})
    monitoring = _obj("Prometheus Operator objects (rendered when its CRDs exist).", {
        "serviceMonitor": _obj("ServiceMonitor scraping /metrics.", {
            "enabled": {"type": "boolean", "default": d["serviceMonitorEnabled"]},
            "interval": _s("Scrape interval.", default=d["serviceMonitorInterval"], pattern=r"^[0-9]+(ms|s|m|h)$"),
            "labels": STRING_MAP}, default={}),
        "prometheusRule": _obj("Per-model alerts.", {
            "enabled": {"type": "boolean", "default": d["prometheusRuleEnabled"]}}, default={}),
    }, default={})
    auth = _obj("Client authentication of the OpenAI API and gRPC (/health and /metrics stay open).", {
        "apiKeySecretRef": _obj("Secret key holding the API key clients send as a bearer token; mounted "
                                "read-only as a file (native: --api-key-file; vllm: VLLM_API_KEY).",
                                SECRET_KEY_REF, required=["name", "key"]),
    })
    network_policy = _obj("A NetworkPolicy for the engine pods (off by default: it needs a CNI that enforces "
                          "NetworkPolicy and knowledge of who the clients are).", {
        "enabled": {"type": "boolean", "default": False, "description": "Render the NetworkPolicy."},
        "allowedNamespaces": {"type": "array", "items": {"type": "string", "maxLength": 63}, "maxItems": 64,
                              "description": "Namespaces whose pods may call the API ports."},
        "clients": {"type": "array", "items": PEER, "maxItems": 64,
                    "description": "Further peers admitted to the API ports. With neither list, pods of the "
                                   "resource's namespace."},
        "metricsScraper": {**PEER, "description": "Who may scrape /metrics (on the HTTP port only); default: "
                                                  "pods labelled app.kubernetes.io/name=prometheus in namespace "
                                                  "monitoring."},
    }, default={})
    pod = _obj("Engine pod template options. The operator's labels, volumes, mounts and security context "
               "cannot be overridden; the download Job gets imagePullSecrets and serviceAccountName.", {
        "labels": {**STRING_MAP, "description": "Extra pod labels (not app.kubernetes.io/name, instance, "
                                                "managed-by, component or longserve.io/*)."},
        "annotations": {**STRING_MAP, "description": "Extra pod annotations (not longserve.io/*)."},
        "imagePullSecrets": {"type": "array", "maxItems": 16, "description": "Secrets for pulling the image.",
                             "items": {"type": "object", "required": ["name"], "properties": {"name": _s("Secret.")}}},
        "serviceAccountName": _s("Service account of the pods (its token is not mounted).", maxLength=253),
        "priorityClassName": _s("PriorityClass of the engine pods.", maxLength=253),
        "runtimeClassName": _s("RuntimeClass (e.g. nvidia) of the engine pods.", maxLength=253),
        "affinity": {**FREE_OBJECT, "description": "core/v1 Affinity (nodeAffinity, podAffinity, "
                                                   "podAntiAffinity), passed through; the schema is kept open "
                                                   "because the upstream type is large."},
        "topologySpreadConstraints": {**FREE_LIST, "maxItems": 16,
                                      "description": "core/v1 TopologySpreadConstraint list, passed through."},
        "volumes": {**FREE_LIST, "maxItems": 32, "description": "Extra core/v1 Volumes (names other than the "
                                                                "operator's; no hostPath)."},
        "volumeMounts": {"type": "array", "items": VOLUME_MOUNT, "maxItems": 32,
                         "description": "Mounts of spec.pod.volumes into the engine container."},
    }, default={})
    return _obj("Desired state of a long-context model endpoint.", {
        "model": model, "runtime": runtime, "context": context, "sizing": sizing, "accelerator": accelerator,
        "resources": resources, "cache": cache,
        "replicas": _i("Engine replicas.", minimum=0, default=d["replicas"]),
        "rollout": rollout_schema(), "autoscaling": autoscaling_schema(),
        "serving": serving, "monitoring": monitoring, "auth": auth, "networkPolicy": network_policy, "pod": pod,
    }, required=["model", "accelerator"], **{"x-kubernetes-validations": CEL_RULES})


CEL_RULES = [
    *({"rule": rule.cel, "message": rule.message} for rule in sizing_rules.RULES),
    {"rule": "!has(self.context.maxModelLen) || self.context.maxOutputTokens < self.context.maxModelLen",
     "message": "output cap below the context"},
    {"rule": "self.runtime.name == 'native' || size(self.runtime.image) > 0", "message": "vllm/sglang need an image"},
    {"rule": "has(self.accelerator.gpuProduct) || has(self.accelerator.memoryPerGpu)",
     "message": "the planner needs GPU memory"},
    {"rule": "!self.cache.enabled || self.model.uri == oldSelf.model.uri",
     "message": "a cached model's URI is immutable; create a new resource"},
    {"rule": "!has(self.auth) || !has(self.auth.apiKeySecretRef) || self.runtime.name != 'sglang'",
     "message": "auth.apiKeySecretRef is not supported for runtime sglang"},
]


def status_schema() -> dict:
    condition = _obj("metav1.Condition", {
        "type": _s("SpecValid, Sized, ModelCached, WorkloadAvailable, CapacityVerified, Ready"),
        "status": _s("True, False or Unknown", enum=["True", "False", "Unknown"]),
        "reason": _s("CamelCase reason."), "message": _s("Human-readable detail."),
        "lastTransitionTime": _s("When the status last changed.", format="date-time"),
        "observedGeneration": _i("Generation the condition was computed for."),
    }, required=["type", "status"])
    return _obj("Observed state, written by the operator.", {
        "observedGeneration": _i("Generation last reconciled."),
        "phase": _s("Pending | Sizing | Caching | Starting | Ready | Degraded | Failed | Planned"),
        "conditions": {"type": "array", "items": condition, "x-kubernetes-list-type": "map",
                       "x-kubernetes-list-map-keys": ["type"]},
        "plan": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "description": "The planner's verdict: TP, chunk, per-GPU memory, explanation."},
        "observed": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "description": "Values measured by the engine."},
        "cache": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                  "description": "Which model revision the cache PVC holds."},
        "layout": _obj("How one replica is laid out (from the plan).", {
            "gpusPerReplica": _i("GPUs of one replica (the tensor parallel size)."),
            "gpusPerPod": _i("GPUs of each engine pod."),
            "podsPerReplica": _i("Engine pods of one replica (one per node; above 1 a LeaderWorkerSet group)."),
            "nodesPerReplica": _i("Nodes one replica spans."),
            "workload": _obj("The object that runs the replicas.", {
                "kind": _s("Deployment or LeaderWorkerSet"), "name": _s("Its name.")}),
        }),
        "replicas": _i("Engine replicas (LeaderWorkerSet: groups)."),
        "readyReplicas": _i("Ready engine replicas (LeaderWorkerSet: groups with every pod ready)."),
        "selector": _s("Label selector of the engine pods (scale subresource)."),
        "endpoints": {**STRING_MAP, "description": "OpenAI and gRPC endpoints inside the cluster."},
    })


def printer_columns() -> list[dict]:
    def col(name, type_, path, **extra):
        return {"name": name, "type": type_, "jsonPath": path, **extra}
    return [
        col("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
        col("Runtime", "string", ".spec.runtime.name"),
        col("TP", "integer", ".status.plan.tensorParallelSize"),
        col("Pods/Replica", "integer", ".status.layout.podsPerReplica", priority=1),
        col("GPUs/Pod", "integer", ".status.layout.gpusPerPod", priority=1),
        col("Chunk", "integer", ".status.plan.prefillChunkTokens"),
        col("MaxLen", "integer", ".status.plan.maxModelLen"),
        col("Replicas", "integer", ".status.readyReplicas"),
        col("Phase", "string", ".status.phase"),
        col("Age", "date", ".metadata.creationTimestamp"),
        col("Endpoint", "string", ".status.endpoints.openai", priority=1),
    ]


def custom_resource_definition() -> dict:
    schema = {"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
        "spec": spec_schema(), "status": status_schema()}, "required": ["spec"],
        "x-kubernetes-validations": [{"rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                                      "message": "name too long for derived object names"}]}
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "longserve",
                                                  "app.kubernetes.io/part-of": "longserve"}},
        "spec": {"group": GROUP, "scope": "Namespaced",
                 "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR, "shortNames": list(SHORT_NAMES),
                           "listKind": f"{KIND}List", "categories": ["longserve"]},
                 "versions": [{"name": VERSION, "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": schema},
                               "subresources": {"status": {}, "scale": {
                                   "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                                   "labelSelectorPath": ".status.selector"}},
                               "additionalPrinterColumns": printer_columns()}]},
    }


def crd_yaml() -> str:
    """The manifest text; a JSON round trip keeps shared sub-schemas from becoming YAML aliases."""
    import json

    import yaml
    header = "# Generated by longserve.operator.crd (make goldens); do not edit by hand.\n"
    data = json.loads(json.dumps(custom_resource_definition()))
    return header + yaml.safe_dump(data, sort_keys=False, width=120)


def openapi_schema() -> dict:
    return custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
