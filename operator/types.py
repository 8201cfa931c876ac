"""The `LongContextModel` resource as typed, defaulted values: `parse(body) -> LongContextModel`.

Pure (standard library only). Defaults live here once; `crd.py` writes the same values into the
CRD's OpenAPI schema, so an object defaulted by the API server and one parsed here agree.
`parse` re-checks what the schema's CEL rules check (a cluster without the CRD's validation, or
`longserve render` offline, must not get further) and raises `SpecError` with a condition reason.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from longserve.operator import options
from longserve.operator.autoscaling import AutoscalingOptions, autoscaling_options
from longserve.operator.errors import SpecError
from longserve.operator.options import DownloadOptions, NetworkPolicyOptions, PodOptions, SecretKey
from longserve.operator.rollout import RolloutOptions, rollout_options
from longserve.operator.sizing_rules import MODES, OBJECTIVES, manual_sizing_errors
from longserve.server.config import RUNTIMES

GROUP = "longserve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LongContextModel"
PLURAL = "longcontextmodels"
SINGULAR = "longcontextmodel"
SHORT_NAMES = ("lcm",)
MAX_NAME_LENGTH = 40

MAX_NODES = 8
AUTO = "auto"

# Defaults shared with the CRD schema (crd.py) — change them here only.
DEFAULTS = {
    "revision": "main",
    "runtime": "native",
    "maxNumSeqs": 1,
    "maxOutputTokens": 8192,
    "mode": "Auto",
    "objective": "MinGPUs",
    "gpuMemoryUtilization": 0.90,
    "safetyMarginPercent": 10,
    "gpusPerNode": 8,
    "nodes": 1,
    "resourceName": "nvidia.com/gpu",
    "cacheEnabled": True,
    "replicas": 1,
    "httpPort": 8000,
    "grpcPort": 50051,
    "serviceMonitorEnabled": True,
    "serviceMonitorInterval": "15s",
    "prometheusRuleEnabled": True,
    "downloadBackoffLimit": options.DEFAULT_BACKOFF_LIMIT,
}

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
_FACTORS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def parse_quantity(value, what: str) -> int:
    """Bytes of a Kubernetes quantity such as `139Gi`, `80G` or `1073741824`."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise SpecError("InvalidSpec", f"{what}: {value!r} is not a quantity such as 139Gi or 80G")
    amount = float(match.group(1)) * _FACTORS[match.group(2)]
    if amount <= 0:
        raise SpecError("InvalidSpec", f"{what} must be positive")
    return int(amount)


def gib_quantity(nbytes: float) -> str:
    """A whole-GiB quantity, rounded up (stable, canonical strings for rendering and diffing)."""
    return f"{max(1, -(-int(nbytes) // 2**30))}Gi"


@dataclass(frozen=True, slots=True)
class ModelSource:
    uri: str
    revision: str
    served_model_name: str
    auth_secret_name: str | None = None
    auth_secret_key: str | None = None

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @property
    def hf_id(self) -> str | None:
        return self.uri.removeprefix("hf://") if self.scheme == "hf" else None

    @property
    def pvc_claim(self) -> str | None:
        return self.uri.removeprefix("pvc://").split("/", 1)[0] if self.scheme == "pvc" else None

    @property
    def pvc_path(self) -> str:
        rest = self.uri.removeprefix("pvc://").split("/", 1)
        return rest[1] if len(rest) > 1 else ""

    @property
    def catalog_key(self) -> str:
        """What the model catalog is searched for: the hub id, or the last path part on a PVC."""
        return self.hf_id if self.hf_id else self.pvc_path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class LongContextModel:
    """A parsed, defaulted resource. Quantities stay strings ("auto" or a quantity) until render."""
    name: str
    namespace: str
    uid: str
    generation: int
    model: ModelSource
    runtime: str
    image: str
    extra_args: tuple = ()
    env: tuple = ()
    max_model_len: int | None = None
    max_num_seqs: int = 1
    max_output_tokens: int = 8192
    mode: str = "Auto"
    objective: str = "MinGPUs"
    tensor_parallel_size: int | None = None
    prefill_chunk_tokens: int | None = None
    gpu_memory_utilization: float = 0.90
    safety_margin_percent: float = 10
    gpu_product: str | None = None
    memory_per_gpu_bytes: int | None = None
    gpus_per_node: int = 8
    nodes: int = 1                      # nodes one replica may span (a LeaderWorkerSet when it does)
    resource_name: str = "nvidia.com/gpu"
    node_selector: dict = field(default_factory=dict)
    tolerations: tuple = ()
    cpu: str = AUTO
    memory: str = AUTO
    shm_size: str = AUTO
    ephemeral_storage: str = AUTO
    cache_enabled: bool = True
    storage_class_name: str = ""
    cache_size: str = AUTO
    existing_claim: str = ""
    cache_retain: bool = False          # spec.cache.retain: the PVC outlives the resource (render._pvc)
    replicas: int = 1
    http_port: int = 8000
    grpc_port: int = 50051
    service_monitor: bool = True
    service_monitor_interval: str = "15s"
    service_monitor_labels: dict = field(default_factory=dict)
    prometheus_rule: bool = True
    api_key: SecretKey | None = None
    network_policy: NetworkPolicyOptions = field(default_factory=NetworkPolicyOptions)
    pod: PodOptions = field(default_factory=PodOptions)
    download: DownloadOptions = field(default_factory=DownloadOptions)
    resource_requests: dict = field(default_factory=dict)     # spec.resources.requests (win over auto)
    resource_limits: dict = field(default_factory=dict)
    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    autoscaling: AutoscalingOptions | None = None      # spec.autoscaling: the autoscaler owns spec.replicas

    @property
    def cpu_mode(self) -> bool:
        """No device resource is requested: the engine runs on the pod's CPUs (local demo clusters)."""
        return not self.resource_name

    @property
    def downloads(self) -> bool:
        """Weights come from the hub into a cache PVC filled by a Job."""
        return self.model.scheme == "hf" and self.cache_enabled


def _obj(parent: dict, key: str, where: str) -> dict:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError("InvalidSpec", f"{where}.{key} must be an object")
    return value


def _int(value, where: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError("InvalidSpec", f"{where} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError("InvalidSpec", f"{where} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SpecError("InvalidSpec", f"{where} must be <= {maximum}, got {value}")
    return value


def _number(value, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SpecError("InvalidSpec", f"{where} must be a number within [{low}, {high}], got {value!r}")
    return float(value)


def _choice(value, where: str, choices: tuple) -> str:
    if value not in choices:
        raise SpecError("InvalidSpec", f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _quantity_or_auto(value, where: str) -> str:
    text = str(value if value is not None else AUTO)
    if text != AUTO:
        parse_quantity(text, where)
    return text


def _model(spec: dict, name: str) -> ModelSource:
    model = spec.get("model")
    if not isinstance(model, dict) or not model.get("uri"):
        raise SpecError("InvalidSpec", "spec.model.uri is required (hf://org/name or pvc://claim/path)")
    uri = str(model["uri"])
    if not re.match(r"^(hf://[^/\s]+/[^/\s]+|pvc://[a-z0-9][-a-z0-9.]*(/\S*)?)$", uri):
        raise SpecError("InvalidSpec", f"spec.model.uri {uri!r} must be hf://org/name or pvc://claim/path")
    auth = _obj(model, "authSecretRef", "spec.model")
    if auth and not (auth.get("name") and auth.get("key")):
        raise SpecError("InvalidSpec", "spec.model.authSecretRef needs name and key")
    return ModelSource(uri=uri, revision=str(model.get("revision") or DEFAULTS["revision"]),
                       served_model_name=str(model.get("servedModelName") or name),
                       auth_secret_name=auth.get("name"), auth_secret_key=auth.get("key"))


def parse(body: dict) -> LongContextModel:
    """Typed, defaulted view of a LongContextModel object; raises SpecError on invalid input."""
    if not isinstance(body, dict):
        raise SpecError("InvalidSpec", "the resource must be an object")
    meta = body.get("metadata") or {}
    name = str(meta.get("name") or "")
    if not _DNS_LABEL.match(name) or len(name) > MAX_NAME_LENGTH:
        raise SpecError("InvalidSpec", f"metadata.name {name!r} must be a DNS label of at most {MAX_NAME_LENGTH} "
                                       "characters (name too long for derived object names)")
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise SpecError("InvalidSpec", "spec is required")
    model = _model(spec, name)
    runtime = _obj(spec, "runtime", "spec")
    context = _obj(spec, "context", "spec")
    sizing = _obj(spec, "sizing", "spec")
    accel = _obj(spec, "accelerator", "spec")
    resources = _obj(spec, "resources", "spec")
    cache = _obj(spec, "cache", "spec")
    serving = _obj(spec, "serving", "spec")
    monitoring = _obj(spec, "monitoring", "spec")
    service_monitor = _obj(monitoring, "serviceMonitor", "spec.monitoring")
    rule = _obj(monitoring, "prometheusRule", "spec.monitoring")

    runtime_name = _choice(runtime.get("name", DEFAULTS["runtime"]), "spec.runtime.name", RUNTIMES)
    image = str(runtime.get("image") or "")
    if runtime_name != "native" and not image:
        raise SpecError("InvalidSpec", f"spec.runtime.image is required for runtime {runtime_name} "
                                       "(vllm/sglang need an image)")
    max_model_len = context.get("maxModelLen")
    if max_model_len is not None:
        max_model_len = _int(max_model_len, "spec.context.maxModelLen", minimum=16)
    max_output = _int(context.get("maxOutputTokens", DEFAULTS["maxOutputTokens"]), "spec.context.maxOutputTokens", 1)
    if max_model_len is not None and max_output >= max_model_len:
        raise SpecError("InvalidSpec", "spec.context.maxOutputTokens must be below maxModelLen "
                                       "(output cap below the context)")

    mode = _choice(sizing.get("mode", DEFAULTS["mode"]), "spec.sizing.mode", MODES)
    tp = sizing.get("tensorParallelSize")
    tp = None if tp is None else _int(tp, "spec.sizing.tensorParallelSize")
    chunk = sizing.get("prefillChunkTokens")
    chunk = None if chunk is None else _int(chunk, "spec.sizing.prefillChunkTokens")
    for rule, message in manual_sizing_errors(mode, tp, chunk, max_model_len):
        raise SpecError(rule.reason, f"spec.sizing: {message}")

    gpu_product = accel.get("gpuProduct") or None
    memory_per_gpu = accel.get("memoryPerGpu")
    if gpu_product is None and memory_per_gpu is None:
        raise SpecError("InvalidSpec", "spec.accelerator needs gpuProduct or memoryPerGpu "
                                       "(the planner needs GPU memory)")
    node_selector = _obj(accel, "nodeSelector", "spec.accelerator")
    tolerations = accel.get("tolerations") or []
    if not isinstance(tolerations, list):
        raise SpecError("InvalidSpec", "spec.accelerator.tolerations must be a list")

    http_port = _int(serving.get("httpPort", DEFAULTS["httpPort"]), "spec.serving.httpPort", 1, 65535)
    grpc_port = _int(serving.get("grpcPort", DEFAULTS["grpcPort"]), "spec.serving.grpcPort", 1, 65535)
    if http_port == grpc_port:
        raise SpecError("InvalidSpec", "spec.serving.httpPort and grpcPort must differ")
    resource_name = str(accel.get("resourceName", DEFAULTS["resourceName"]) or "")
    api_key = options.secret_key(_obj(spec, "auth", "spec"), "apiKeySecretRef", "spec.auth")
    if api_key is not None and runtime_name == "sglang":
        raise SpecError("InvalidSpec", "spec.auth.apiKeySecretRef is not supported for runtime sglang "
                                       "(it takes the key only as a command-line argument)")
    requests, limits = options.resource_overrides(resources, resource_name)
    return LongContextModel(
        name=name, namespace=str(meta.get("namespace") or "default"), uid=str(meta.get("uid") or ""),
        generation=int(meta.get("generation") or 0), model=model,
        runtime=runtime_name, image=image,
        extra_args=tuple(str(a) for a in runtime.get("extraArgs") or ()),
        env=tuple(runtime.get("env") or ()),
        max_model_len=max_model_len,
        max_num_seqs=_int(context.get("maxNumSeqs", DEFAULTS["maxNumSeqs"]), "spec.context.maxNumSeqs", 1),
        max_output_tokens=max_output, mode=mode,
        objective=_choice(sizing.get("objective", DEFAULTS["objective"]), "spec.sizing.objective", OBJECTIVES),
        tensor_parallel_size=tp, prefill_chunk_tokens=chunk,
        gpu_memory_utilization=_number(sizing.get("gpuMemoryUtilization", DEFAULTS["gpuMemoryUtilization"]),
                                       "spec.sizing.gpuMemoryUtilization", 0.5, 0.98),
        safety_margin_percent=_number(sizing.get("safetyMarginPercent", DEFAULTS["safetyMarginPercent"]),
                                      "spec.sizing.safetyMarginPercent", 0, 50),
        gpu_product=gpu_product,
        memory_per_gpu_bytes=(parse_quantity(memory_per_gpu, "spec.accelerator.memoryPerGpu")
                              if memory_per_gpu is not None else None),
        gpus_per_node=_int(accel.get("gpusPerNode", DEFAULTS["gpusPerNode"]), "spec.accelerator.gpusPerNode", 1, 8),
        nodes=_int(accel.get("nodes", DEFAULTS["nodes"]), "spec.accelerator.nodes", 1, MAX_NODES),
        resource_name=resource_name,
        node_selector={str(k): str(v) for k, v in node_selector.items()},
        tolerations=tuple(tolerations),
        cpu=_cpu(resources.get("cpu")),
        memory=_quantity_or_auto(resources.get("memory"), "spec.resources.memory"),
        shm_size=_quantity_or_auto(resources.get("shmSize"), "spec.resources.shmSize"),
        ephemeral_storage=_quantity_or_auto(resources.get("ephemeralStorage"), "spec.resources.ephemeralStorage"),
        cache_enabled=bool(cache.get("enabled", DEFAULTS["cacheEnabled"])),
        storage_class_name=str(cache.get("storageClassName") or ""),
        cache_size=_quantity_or_auto(cache.get("size"), "spec.cache.size"),
        existing_claim=str(cache.get("existingClaim") or ""),
        cache_retain=_bool(cache.get("retain", False), "spec.cache.retain"),
        replicas=_int(spec.get("replicas", DEFAULTS["replicas"]), "spec.replicas", 0),
        http_port=http_port, grpc_port=grpc_port,
        service_monitor=bool(service_monitor.get("enabled", DEFAULTS["serviceMonitorEnabled"])),
        service_monitor_interval=str(service_monitor.get("interval") or DEFAULTS["serviceMonitorInterval"]),
        service_monitor_labels={str(k): str(v) for k, v in (service_monitor.get("labels") or {}).items()},
        prometheus_rule=bool(rule.get("enabled", DEFAULTS["prometheusRuleEnabled"])),
        api_key=api_key,
        network_policy=options.network_policy(spec), pod=options.pod_options(spec),
        download=options.download_options(cache), resource_requests=requests, resource_limits=limits,
        rollout=rollout_options(spec), autoscaling=autoscaling_options(spec, runtime_name),
    )


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError("InvalidSpec", f"{where} must be a boolean, got {value!r}")
    return value


def _cpu(value) -> str:
    text = AUTO if value is None else str(value).strip()
    if text == AUTO:
        return text
    if not re.match(r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$", text):
        raise SpecError("InvalidSpec",
                        f"spec.resources.cpu: {value!r} is not 'auto' or a CPU quantity such as 8 or 500m")
    return text
