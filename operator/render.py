"""Pure rendering: a parsed `LongContextModel` and its plan -> the Kubernetes objects it owns.

`desired(body, ...)` is the whole offline pipeline (parse -> size -> render) shared by the
operator's reconcile and `longserve render`. Output is deterministic: the same resource gives
byte-identical YAML, and every object carries `longserve.io/spec-hash`, a hash of its own content,
which `diff.py` compares with the live object.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from longserve.operator import autoscaling, render_lws, rollout, runtimes, security
from longserve.operator.catalog import GiB, GpuSpec, ModelEntry, lookup_gpu, lookup_model
from longserve.operator.memory import valid_tensor_parallel_sizes
from longserve.operator.options import SecretKey
from longserve.operator.planner import Plan, SizingRequest, engine_config_for, plan
from longserve.operator.podtemplate import apply_to_template, merged_resources
from longserve.operator.types import (
    API_VERSION,
    AUTO,
    KIND,
    LongContextModel,
    SpecError,
    gib_quantity,
    parse,
    parse_quantity,
)
from longserve.server.config import EngineConfig

DEFAULT_IMAGE = "ghcr.io/longserve/longserve:0.1.0"
MANAGED_BY = "longserve-operator"
HASH_LABEL = "longserve.io/spec-hash"
RETAIN_LABEL = "longserve.io/retain"       # a child that outlives the resource (no owner reference)
CONFIG_HASH_ANNOTATION = "longserve.io/config-hash"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
MODEL_REVISION_ANNOTATION = "longserve.io/model-revision"
MODEL_DIR = "/models"
DOWNLOAD_BYTES_PER_SECOND = 50e6     # pessimistic hub throughput for the download deadline
DOWNLOAD_FLOOR_SECONDS = 3600
# `longserve download` exit codes that a retry cannot fix: usage, unauthorized/gated, not found, no space.
DOWNLOAD_PERMANENT_EXIT_CODES = [2, 3, 4, 5]
RUNBOOKS = "https://longserve.io/runbooks"


def content_hash(obj) -> str:
    """Short, stable hash of JSON-serialisable content."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Desired:
    """Outcome of parse -> size -> render for one resource."""
    resource: LongContextModel
    model: ModelEntry
    plan: Plan
    spec_hash: str
    objects: list = field(default_factory=list)
    startup_probe_seconds: int = 0
    shm_size: str = "1Gi"


def gpu_for(lcm: LongContextModel) -> GpuSpec | None:
    if lcm.gpu_product is None:
        return None
    try:
        return lookup_gpu(lcm.gpu_product)
    except ValueError as exc:
        if lcm.memory_per_gpu_bytes is None:
            raise SpecError("UnknownGPU", f"{exc}") from None
        return None


def size(lcm: LongContextModel) -> tuple[ModelEntry, Plan]:
    """The catalog model and the planner's verdict; SpecError for what the planner cannot judge."""
    try:
        model = lookup_model(lcm.model.catalog_key)
    except ValueError as exc:
        raise SpecError("UnknownModel", f"{exc}; v1alpha1 plans built-in models only") from None
    gpu = gpu_for(lcm)
    valid = valid_tensor_parallel_sizes(model, 8)
    if lcm.tensor_parallel_size is not None and lcm.tensor_parallel_size not in valid:
        f = model.facts
        raise SpecError("InvalidTP", f"tensorParallelSize {lcm.tensor_parallel_size} must divide the "
                                     f"{f.num_heads} attention heads and {f.num_kv_heads} KV heads of "
                                     f"{model.short_name}; valid: {', '.join(map(str, valid))}")
    request = SizingRequest(
        max_model_len=lcm.max_model_len or model.facts.max_position_embeddings, max_num_seqs=lcm.max_num_seqs,
        objective=lcm.objective, mode=lcm.mode, tensor_parallel_size=lcm.tensor_parallel_size,
        prefill_chunk_tokens=lcm.prefill_chunk_tokens, gpu_memory_utilization=lcm.gpu_memory_utilization,
        safety_margin_percent=lcm.safety_margin_percent, gpus_per_node=lcm.gpus_per_node, runtime=lcm.runtime,
        memory_per_gpu_bytes=lcm.memory_per_gpu_bytes, nodes=lcm.nodes)
    result = plan(model, gpu, request)
    if result.reason == "InvalidSpec":
        raise SpecError("InvalidSpec", result.explanation)
    return model, result


def _labels(lcm: LongContextModel) -> dict:
    return {"app.kubernetes.io/name": "longserve", "app.kubernetes.io/instance": lcm.name,
            "app.kubernetes.io/managed-by": MANAGED_BY}


def selector(lcm: LongContextModel) -> dict:
    """The Deployment's selector (immutable once created, so it stays as it was first rendered)."""
    return {"app.kubernetes.io/name": "longserve", "app.kubernetes.io/instance": lcm.name}


def engine_selector(lcm: LongContextModel) -> dict:
    """Engine pods only: the Service and PDB must not match the download Job's pods."""
    return {**selector(lcm), "app.kubernetes.io/component": "engine"}


def _meta(lcm: LongContextModel, name: str, component: str) -> dict:
    meta = {"name": name, "namespace": lcm.namespace,
            "labels": {**_labels(lcm), "app.kubernetes.io/component": component}}
    if lcm.uid:
        meta["ownerReferences"] = [{"apiVersion": API_VERSION, "kind": KIND, "name": lcm.name, "uid": lcm.uid,
                                    "controller": True, "blockOwnerDeletion": True}]
    return meta


def _stamp(obj: dict) -> dict:
    obj["metadata"]["labels"][HASH_LABEL] = content_hash(obj)
    return obj


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def revision_slug(revision: str) -> str:
    """A path component for a hub revision: the revision itself when it is a safe name, else a
    sanitised form with a hash of the revision (so `refs/pr/1` and `refs-pr-1` stay apart)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", revision).strip("-.") or "rev"
    return revision if slug == revision else f"{slug[:100]}-{_short_hash(revision)}"


def model_path(lcm: LongContextModel) -> str:
    """Where the engine reads the weights. Cached hub weights are revision-scoped
    (`/models/ORG--NAME/REVISION`): a new revision downloads beside the files running pods use."""
    if lcm.model.scheme == "pvc":
        return f"{MODEL_DIR}/{lcm.model.pvc_path}".rstrip("/")
    if lcm.cache_enabled:
        return f"{MODEL_DIR}/{lcm.model.hf_id.replace('/', '--')}/{revision_slug(lcm.model.revision)}"
    return lcm.model.hf_id


def download_job_name(lcm: LongContextModel) -> str:
    """One Job name per revision (at most 12 characters of it; a hash where the name had to change)."""
    rev = lcm.model.revision
    slug = re.sub(r"[^a-z0-9]+", "-", rev.lower()).strip("-")
    if slug != rev or len(slug) > 12:
        slug = f"{slug[:5].strip('-')}-{_short_hash(rev)}".strip("-")
    return f"{lcm.name}-download-{slug}"


def download_deadline_seconds(lcm: LongContextModel, weight_bytes: int) -> int:
    """spec.cache.download.activeDeadlineSeconds, else max(1 h, 2·W / 50 MB/s + 15 min)."""
    if lcm.download.active_deadline_seconds is not None:
        return lcm.download.active_deadline_seconds
    return max(DOWNLOAD_FLOOR_SECONDS, math.ceil(2 * weight_bytes / DOWNLOAD_BYTES_PER_SECOND) + 900)


def cache_claim(lcm: LongContextModel) -> str | None:
    if lcm.model.scheme == "pvc":
        return lcm.model.pvc_claim
    if lcm.cache_enabled:
        return lcm.existing_claim or f"{lcm.name}-weights"
    return None


def shm_bytes(lcm: LongContextModel, gpus: int) -> int:
    """/dev/shm of an engine pod with `gpus` GPUs: 1 GiB for one GPU (tokenizer and process
    start-up); 16 GiB when several GPU processes share the pod: NCCL's intra-node shared-memory
    transport keeps buffers for every pair of local ranks there, and the ranks exchange each
    step's metadata through it."""
    if lcm.shm_size != AUTO:
        return parse_quantity(lcm.shm_size, "spec.resources.shmSize")
    return GiB if gpus == 1 else 16 * GiB


def gpus_per_pod(p: Plan) -> int:
    return p.gpus_per_pod or p.tensor_parallel_size


def _resources(lcm: LongContextModel, model: ModelEntry, p: Plan) -> dict:
    tp = gpus_per_pod(p)           # the GPUs (and GPU processes) of this pod
    shm = shm_bytes(lcm, tp)
    if lcm.memory != AUTO:
        memory = lcm.memory
    elif lcm.cpu_mode:   # the "device" is host memory: the planner's whole budget lives in the pod
        memory = gib_quantity(shm + p.memory_per_gpu_bytes)
    else:
        memory = gib_quantity(shm + max(32 * GiB, model.weight_bytes))
    cpu = str(4 + 2 * tp) if lcm.cpu == AUTO else lcm.cpu
    uncached = lcm.model.scheme == "hf" and not lcm.cache_enabled
    if lcm.ephemeral_storage != AUTO:
        storage = lcm.ephemeral_storage
    else:
        storage = gib_quantity(model.weight_bytes * 1.2 + 10 * GiB) if uncached else "10Gi"
    resources = merged_resources({"requests": {"cpu": cpu, "memory": memory, "ephemeral-storage": storage},
                                  "limits": {"memory": memory}}, lcm.resource_requests, lcm.resource_limits)
    if not lcm.cpu_mode:
        resources["requests"][lcm.resource_name] = str(tp)
        resources.setdefault("limits", {})[lcm.resource_name] = str(tp)
    return resources


def _hub_token(lcm: LongContextModel) -> SecretKey | None:
    if not lcm.model.auth_secret_name:
        return None
    return SecretKey(lcm.model.auth_secret_name, lcm.model.auth_secret_key)


def _env(lcm: LongContextModel, cfg: EngineConfig, scratch_env: list[dict]) -> list[dict]:
    items = runtimes.env(cfg) + scratch_env
    if lcm.model.scheme == "hf" and not lcm.cache_enabled:      # the engine downloads the weights itself
        items += security.secret_env("HF_TOKEN", _hub_token(lcm))
    if lcm.api_key is not None and lcm.runtime == "vllm":      # vLLM reads its key from the environment
        items += security.secret_env("VLLM_API_KEY", lcm.api_key)
    user = [dict(e) for e in lcm.env]
    named = {e.get("name") for e in user}                     # the user's value replaces ours (no duplicates)
    return [e for e in items if e["name"] not in named] + user


def _config_map(lcm: LongContextModel, cfg: EngineConfig) -> dict:
    """Named by the hash of its content and immutable (rollout.py): a new config is a new object."""
    data = {runtimes.CONFIG_FILE: cfg.to_json()}
    return _stamp({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": _meta(lcm, rollout.config_map_name(lcm.name, content_hash(data)), "config"),
                   "immutable": True, "data": data})


def drain_seconds(lcm: LongContextModel, model: ModelEntry, p: Plan) -> int:
    """How long a terminating engine lets running requests finish: the longest request the plan
    admits (rollout.py), or spec.rollout.drainSeconds."""
    worst = rollout.worst_request_seconds(p.max_model_len, lcm.max_output_tokens, model.weight_bytes,
                                          model.dtype_bytes, p.tensor_parallel_size or 1)
    return rollout.drain_seconds(lcm.rollout, worst)


def _deployment(lcm: LongContextModel, model: ModelEntry, p: Plan, cfg: EngineConfig, config_map: dict,
                image: str) -> dict:
    gpus = gpus_per_pod(p)
    claim = cache_claim(lcm)
    uncached_hub = lcm.model.scheme == "hf" and not lcm.cache_enabled
    scratch_volumes, scratch_mounts, scratch_env = security.scratch(
        {"HF_HOME": f"{MODEL_DIR}/hf-home"} if uncached_hub else None)
    mounts = [{"name": "engine-config", "mountPath": runtimes.CONFIG_DIR, "readOnly": True},
              {"name": "dshm", "mountPath": "/dev/shm"},
              {"name": "models", "mountPath": MODEL_DIR, "readOnly": claim is not None}, *scratch_mounts]
    volumes = [{"name": "engine-config", "configMap": {"name": config_map["metadata"]["name"]}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": gib_quantity(shm_bytes(lcm, gpus))}},
               {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
               if claim else {"name": "models", "emptyDir": {}}, *scratch_volumes]
    command = runtimes.command(cfg, lcm.extra_args)
    if lcm.api_key is not None and lcm.runtime == "native":
        key_volume, key_mount, key_args = security.api_key_volume(lcm.api_key)
        volumes.append(key_volume)
        mounts.append(key_mount)
        command = runtimes.command(cfg) + key_args + [str(a) for a in lcm.extra_args]
    drain = drain_seconds(lcm, model, p)
    command = rollout.with_drain(command, lcm.runtime, drain, len(lcm.extra_args))
    resources = _resources(lcm, model, p)
    rank_env = runtimes.rank_env(resources["requests"].get("cpu"), gpus, runtime=lcm.runtime,
                                 tensor_parallel_size=p.tensor_parallel_size,
                                 startup_seconds=runtimes.startup_probe_seconds(model.weight_bytes))
    container = {
        "name": "engine", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": command, "env": _env(lcm, cfg, scratch_env + rank_env), "ports": runtimes.ports(cfg),
        "resources": resources, "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError", **runtimes.probes(model.weight_bytes),
        "securityContext": security.container_security_context()}
    node_selector = dict(lcm.node_selector)
    tolerations = [dict(t) for t in lcm.tolerations]
    if not lcm.cpu_mode:
        gpu = gpu_for(lcm)
        if lcm.gpu_product:
            node_selector.setdefault(GPU_PRODUCT_LABEL, gpu.product_label if gpu else lcm.gpu_product)
        tolerations.append({"key": lcm.resource_name, "operator": "Exists", "effect": "NoSchedule"})
    pod_spec = {"containers": [container], "volumes": volumes, "enableServiceLinks": False,
                "automountServiceAccountToken": False, "securityContext": security.pod_security_context(),
                "terminationGracePeriodSeconds": rollout.grace_seconds(lcm.rollout, drain)}
    if node_selector:
        pod_spec["nodeSelector"] = dict(sorted(node_selector.items()))
    if tolerations:
        pod_spec["tolerations"] = tolerations
    meta = _meta(lcm, lcm.name, "engine")
    annotations = {CONFIG_HASH_ANNOTATION: config_map["metadata"]["labels"][HASH_LABEL]}
    if lcm.model.scheme == "hf":
        annotations[MODEL_REVISION_ANNOTATION] = lcm.model.revision
    template = {"metadata": {"labels": engine_pod_labels(lcm), "annotations": annotations}, "spec": pod_spec}
    apply_to_template(template, lcm.pod, engine=True)
    return _stamp({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {"replicas": lcm.replicas, "revisionHistoryLimit": 3,
                 "selector": {"matchLabels": selector(lcm)},
                 "strategy": rollout.strategy(lcm.rollout),
                 "template": template}})


def engine_pod_labels(lcm: LongContextModel) -> dict:
    return {**_labels(lcm), "app.kubernetes.io/component": "engine"}


def _network_policy(lcm: LongContextModel) -> dict:
    api_ports = [lcm.http_port] + ([lcm.grpc_port] if lcm.runtime == "native" else [])
    opts = lcm.network_policy
    pod_labels = {**selector(lcm), "app.kubernetes.io/component": "engine"}
    # /metrics is served on the HTTP port: the scraper's rule admits that port only (not gRPC)
    return _stamp(security.network_policy(_meta(lcm, lcm.name, "engine"), pod_labels, opts.clients, opts.scraper,
                                          api_ports, lcm.http_port))


def _service(lcm: LongContextModel) -> dict:
    ports = [{"name": "http", "port": lcm.http_port, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]
    if lcm.runtime == "native":
        ports.append({"name": "grpc", "port": lcm.grpc_port, "targetPort": "grpc", "protocol": "TCP",
                      "appProtocol": "kubernetes.io/h2c"})
    return _stamp({"apiVersion": "v1", "kind": "Service", "metadata": _meta(lcm, lcm.name, "engine"),
                   "spec": {"type": "ClusterIP", "selector": engine_selector(lcm), "ports": ports}})


def _pdb(lcm: LongContextModel, pods_per_replica: int = 1) -> dict:
    return _stamp({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(lcm, lcm.name, "engine"),
                   "spec": rollout.pdb_spec(lcm.rollout, lcm.replicas, engine_selector(lcm), pods_per_replica)})


def _pvc(lcm: LongContextModel, model: ModelEntry) -> dict:
    # room for two revisions side by side: a revision change downloads beside the files in use
    size = lcm.cache_size if lcm.cache_size != AUTO else gib_quantity(model.weight_bytes * 2.2 + GiB)
    # ReadWriteOnce: the claim is created once and access modes are immutable; replicas spread over
    # nodes need an RWX/ROX volume given as cache.existingClaim.
    spec = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if lcm.storage_class_name:
        spec["storageClassName"] = lcm.storage_class_name
    meta = _meta(lcm, f"{lcm.name}-weights", "cache")
    if lcm.cache_retain:      # not garbage-collected with the resource; adopted by a namesake later
        meta.pop("ownerReferences", None)
        meta["labels"][RETAIN_LABEL] = "true"
    return _stamp({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec})


def _download_job(lcm: LongContextModel, model: ModelEntry, image: str) -> dict:
    """`longserve download` in the engine image into the revision's directory on the cache PVC.

    The hub token comes from the Secret through the environment. Exit codes that a retry cannot fix
    fail the Job at once (podFailurePolicy); others are retried up to backoffLimit within the deadline.
    """
    volumes, mounts, env = security.scratch()
    command = ["longserve", "download", "--model", lcm.model.uri, "--revision", lcm.model.revision,
               "--dest", model_path(lcm)]
    container = {"name": "download", "image": image, "imagePullPolicy": "IfNotPresent", "command": command,
                 "env": [{"name": "PYTHONSAFEPATH", "value": "1"}, *env,
                         *security.secret_env("HF_TOKEN", _hub_token(lcm))],
                 "volumeMounts": [{"name": "models", "mountPath": MODEL_DIR}, *mounts],
                 "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
                 "terminationMessagePolicy": "FallbackToLogsOnError",
                 "securityContext": security.container_security_context()}
    template = {"metadata": {"labels": {**_labels(lcm), "app.kubernetes.io/component": "download"}},
                "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                         "securityContext": security.pod_security_context(), "containers": [container],
                         "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": cache_claim(lcm)}},
                                     *volumes]}}
    apply_to_template(template, lcm.pod, engine=False)
    failure_policy = {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": "download", "operator": "In", "values": DOWNLOAD_PERMANENT_EXIT_CODES}}]}
    return _stamp({"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(lcm, download_job_name(lcm), "download"),
                   "spec": {"backoffLimit": lcm.download.backoff_limit,
                            "activeDeadlineSeconds": download_deadline_seconds(lcm, model.weight_bytes),
                            "podFailurePolicy": failure_policy, "template": template}})


def _service_monitor(lcm: LongContextModel) -> dict:
    meta = _meta(lcm, lcm.name, "engine")
    meta["labels"] = {**lcm.service_monitor_labels, **meta["labels"]}   # ours win: they identify the child
    return _stamp({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta,
                   "spec": {"selector": {"matchLabels": engine_selector(lcm)},
                            "namespaceSelector": {"matchNames": [lcm.namespace]},
                            "endpoints": [{"port": "http", "path": "/metrics",
                                           "interval": lcm.service_monitor_interval}]}})


# Per-runtime series for the per-model alerts (vLLM exports no longserve_* series; SGLang its own).
ALERT_SERIES = {
    "native": {"ttft": "longserve_time_to_first_token_seconds", "kv": "vllm:kv_cache_usage_perc",
               "preemptions": "vllm:num_preemptions_total"},
    "vllm": {"ttft": "vllm:time_to_first_token_seconds", "kv": "vllm:kv_cache_usage_perc",
             "preemptions": "vllm:num_preemptions_total"},
    "sglang": {"ttft": "sglang:time_to_first_token_seconds", "kv": "sglang:token_usage"},
}


def _prometheus_rule(lcm: LongContextModel, startup_seconds: int) -> dict:
    sel = f'namespace="{lcm.namespace}",service="{lcm.name}"'
    deploy = f'namespace="{lcm.namespace}",deployment="{lcm.name}"'

    def rule(alert, expr, duration, severity, summary):
        return {"alert": alert, "expr": expr, "for": duration, "labels": {"severity": severity},
                "annotations": {"summary": summary, "runbook_url": f"{RUNBOOKS}/{alert.lower()}"}}
    series = ALERT_SERIES[lcm.runtime]          # each runtime's own metric names
    rules = [
        rule("LongServeTTFTHigh", f"histogram_quantile(0.99, sum by (le) (rate("
             f"{series['ttft']}_bucket{{{sel}}}[15m]))) > 900", "15m", "warning",
             f"{lcm.name}: p99 time to first token above 900 s"),
        rule("LongServeKVCacheFull", f"max({series['kv']}{{{sel}}}) > 0.95", "5m", "warning",
             f"{lcm.name}: KV cache above 95% for 5 minutes"),
    ]
    if series.get("preemptions"):
        rules.append(rule("LongServePreemptions", f"sum(rate({series['preemptions']}{{{sel}}}[5m])) > 0", "5m",
                          "warning",
                          f"{lcm.name}: requests are preempted (mis-sized for maxNumSeqs {lcm.max_num_seqs})"))
    rules += [
        rule("LongServeReplicasNotReady", f"kube_deployment_status_replicas_available{{{deploy}}} < "
             f"kube_deployment_spec_replicas{{{deploy}}}", f"{max(1, startup_seconds // 60)}m", "critical",
             f"{lcm.name}: replicas unavailable beyond the {startup_seconds} s start-up budget"),
    ]
    if lcm.downloads:
        rules.append(rule("LongServeDownloadFailed", f'kube_job_status_failed{{namespace="{lcm.namespace}",'
                          f'job_name="{download_job_name(lcm)}"}} > 0', "0m", "critical",
                          f"{lcm.name}: model download Job failed"))
    return _stamp({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                   "metadata": _meta(lcm, lcm.name, "alerts"),
                   "spec": {"groups": [{"name": f"longserve-{lcm.name}", "rules": rules}]}})


def _autoscaler(lcm: LongContextModel) -> dict:
    """A KEDA ScaledObject or an HPA on the resource's own scale subresource (autoscaling.py)."""
    target = {"api_version": API_VERSION, "kind": KIND, "name": lcm.name}
    return _stamp(autoscaling.autoscaler(lcm.autoscaling, _meta(lcm, lcm.name, "autoscaler"), target, lcm.runtime))


def engine_config(lcm: LongContextModel, p: Plan) -> EngineConfig:
    return engine_config_for(p, model_path=model_path(lcm), served_model_name=lcm.model.served_model_name,
                             max_output_tokens=lcm.max_output_tokens, http_port=lcm.http_port,
                             grpc_port=lcm.grpc_port)


def render(lcm: LongContextModel, model: ModelEntry, p: Plan, *, image: str = DEFAULT_IMAGE,
           model_cached: bool = False, monitoring: bool = True) -> list[dict]:
    """Objects for a feasible, deployable plan (DryRun and infeasible plans deploy nothing).

    `model_cached`: the download Job finished for this revision, so it is no longer wanted.
    `monitoring`: the monitoring.coreos.com kinds exist in the cluster.
    """
    if not p.feasible or lcm.mode == "DryRun":
        return []
    cfg = engine_config(lcm, p)
    config_map = _config_map(lcm, cfg)
    objects = [config_map]
    if lcm.downloads and not lcm.existing_claim:
        objects.append(_pvc(lcm, model))
    if lcm.downloads and not model_cached:
        objects.append(_download_job(lcm, model, image))     # the operator's image: it has `longserve download`
    engine_image = lcm.image or image
    deployment, service = _deployment(lcm, model, p, cfg, config_map, engine_image), _service(lcm)
    policy = _network_policy(lcm) if lcm.network_policy.enabled else None
    if p.multi_node:
        # the group's pods sit on different nodes: an operator-made cache claim must be shareable
        objects = [_restamped(render_lws.shared_claim(o)) if o["kind"] == "PersistentVolumeClaim" else o
                   for o in objects]
        objects += _group_objects(lcm, model, p, deployment, service, policy)
    else:
        objects += [deployment, service, _pdb(lcm)] + ([policy] if policy else [])
    if lcm.autoscaling is not None:
        objects.append(_autoscaler(lcm))
    if monitoring and lcm.service_monitor:
        objects.append(_service_monitor(lcm))
    if monitoring and lcm.prometheus_rule:
        rule = _prometheus_rule(lcm, runtimes.startup_probe_seconds(model.weight_bytes))
        if p.multi_node:
            rule = _restamped(render_lws.group_alerts(rule, lcm.namespace, render_lws.group_name(lcm.name)))
        objects.append(rule)
    return objects


def _restamped(obj: dict) -> dict:
    obj["metadata"]["labels"].pop(HASH_LABEL, None)
    return _stamp(obj)


def _group_objects(lcm: LongContextModel, model: ModelEntry, p: Plan, deployment: dict, service: dict,
                   policy: dict | None) -> list[dict]:
    """A replica over several pods: a LeaderWorkerSet (from the Deployment's pod) and its headless
    Service in place of the Deployment; the client Service selects the leaders (render_lws.py)."""
    name = render_lws.group_name(lcm.name)
    pods = {**selector(lcm), "app.kubernetes.io/component": "engine"}
    lws = render_lws.leader_worker_set(
        _meta(lcm, name, "engine"), deployment, p, lcm.runtime, lcm.replicas,
        runtimes.startup_probe_seconds(model.weight_bytes), {e.get("name") for e in lcm.env})
    # spec.rollout applies to the groups as to Deployment pods (a surge group needs a spare node set)
    lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] = {
        "maxUnavailable": lcm.rollout.max_unavailable, "maxSurge": lcm.rollout.max_surge}
    out = [_restamped(lws), _stamp(render_lws.headless_service(_meta(lcm, name, "engine"), pods)),
           _restamped(render_lws.leader_only(service)), _pdb(lcm, p.pods_per_replica or 1)]
    if policy:
        out.append(_restamped(render_lws.with_group_traffic(policy, pods)))
    return out


def desired(body: dict, *, image: str = DEFAULT_IMAGE, model_cached: bool = False,
            monitoring: bool = True) -> Desired:
    """parse -> size -> render. Raises SpecError for invalid specs; infeasible plans give no objects."""
    lcm = parse(body)
    model, p = size(lcm)
    objects = render(lcm, model, p, image=image, model_cached=model_cached, monitoring=monitoring)
    # replicas are the autoscaler's to change: not part of what was planned (no re-sizing event per scale)
    planned = {k: v for k, v in (body.get("spec") or {}).items() if k != "replicas"}
    spec_hash = content_hash({"spec": planned, "plan": p.to_dict(), "image": image})[:8]
    shm = gib_quantity(shm_bytes(lcm, gpus_per_pod(p))) if p.feasible else ""
    return Desired(resource=lcm, model=model, plan=p, spec_hash=spec_hash, objects=objects,
                   startup_probe_seconds=runtimes.startup_probe_seconds(model.weight_bytes), shm_size=shm)
