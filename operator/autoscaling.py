"""`spec.autoscaling`: a KEDA ScaledObject or an autoscaling/v2 HPA aimed at the LongContextModel.

Pure (standard library only). The autoscaler targets the resource's scale subresource
(`spec.replicas`, selector from `status.selector`), never the Deployment: the operator renders the
Deployment's replicas from `spec.replicas`, so what the autoscaler writes flows through the normal
reconcile and drift repair has nothing to undo.

Signals, per runtime (the names each runtime exports):
- `pendingPrefillTokens`: prompt tokens admitted and not yet computed (native only) — the queue of
  prefill work, the signal that matches long prompts: one waiting 1M-token request is a lot of work.
- `waitingRequests`: requests waiting for a slot.
- `kvCacheUsage`: fraction of the KV cache in use (averaged over pods; a utilization target).

KEDA queries Prometheus (series as the ServiceMonitor scrapes them: `namespace` and `service`
labels); the HPA reads Pods metrics from a custom metrics adapter under the names in HPA_METRICS
(Prometheus names with `:` made `_`, as adapter rules must expose them). Scale to zero is KEDA only
(an HPA needs minReplicas >= 1); at zero replicas the engine exports nothing, so waking needs a
signal from outside the engine: `spec.autoscaling.query`.
"""
from __future__ import annotations

from dataclasses import dataclass

from longserve.operator.errors import SpecError

PROVIDERS = ("keda", "hpa")
METRICS = ("pendingPrefillTokens", "waitingRequests", "kvCacheUsage")
# metric -> runtime -> exported series
SERIES = {
    "pendingPrefillTokens": {"native": "longserve_prefill_tokens_pending"},
    "waitingRequests": {"native": "vllm:num_requests_waiting", "vllm": "vllm:num_requests_waiting",
                        "sglang": "sglang:num_queue_reqs"},
    "kvCacheUsage": {"native": "vllm:kv_cache_usage_perc", "vllm": "vllm:kv_cache_usage_perc",
                     "sglang": "sglang:token_usage"},
}
DEFAULT_TARGETS = {"pendingPrefillTokens": "524288", "waitingRequests": "1", "kvCacheUsage": "0.8"}
DEFAULT_PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
SCALE_DOWN_WINDOW_SECONDS = 600      # long requests: wait before removing capacity
SCALE_DOWN_PERIOD_SECONDS = 300      # and remove one replica at a time
KEDA_API_VERSION = "keda.sh/v1alpha1"


@dataclass(frozen=True, slots=True)
class AutoscalingOptions:
    provider: str
    min_replicas: int
    max_replicas: int
    metric: str
    target: str
    prometheus: str = DEFAULT_PROMETHEUS
    query: str = ""
    cooldown_seconds: int = 300


def hpa_metric_name(series: str) -> str:
    return series.replace(":", "_")


def _count(value, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > 1000:
        raise SpecError("InvalidSpec", f"{where} must be an integer within [{low}, 1000], got {value!r}")
    return value


def autoscaling_options(spec: dict, runtime: str) -> AutoscalingOptions | None:
    """`spec.autoscaling`, validated against the runtime's metrics; None when absent."""
    value = spec.get("autoscaling")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SpecError("InvalidSpec", "spec.autoscaling must be an object")
    provider = value.get("provider", "keda")
    if provider not in PROVIDERS:
        raise SpecError("InvalidSpec",
                        f"spec.autoscaling.provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    low = _count(value.get("minReplicas", 1), "spec.autoscaling.minReplicas", 0)
    high = _count(value.get("maxReplicas"), "spec.autoscaling.maxReplicas", 1)
    if low > high:
        raise SpecError("InvalidSpec", "spec.autoscaling.minReplicas must not exceed maxReplicas")
    if low == 0 and provider != "keda":
        raise SpecError("InvalidSpec", "spec.autoscaling.minReplicas 0 (scale to zero) needs provider keda")
    metric = value.get("metric", "pendingPrefillTokens")
    if metric not in METRICS:
        raise SpecError("InvalidSpec", f"spec.autoscaling.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if runtime not in SERIES[metric]:
        raise SpecError("InvalidSpec", f"spec.autoscaling.metric {metric} is exported by the native runtime only; "
                                       f"use waitingRequests or kvCacheUsage with {runtime}")
    target = str(value.get("target", DEFAULT_TARGETS[metric])).strip()
    try:
        ok = float(target) > 0 and (metric != "kvCacheUsage" or float(target) <= 1)
    except ValueError:
        ok = False
    if not ok:
        raise SpecError("InvalidSpec", f"spec.autoscaling.target {target!r} must be a positive number"
                                       + (" at most 1 (a fraction)" if metric == "kvCacheUsage" else ""))
    query = str(value.get("query") or "")
    if query and provider != "keda":
        raise SpecError("InvalidSpec", "spec.autoscaling.query is a Prometheus query: provider keda only")
    if low == 0 and not query:
        raise SpecError("InvalidSpec", "scale to zero needs spec.autoscaling.query: at zero replicas the engine "
                                       "exports no metrics, so the wake-up signal must come from elsewhere "
                                       "(e.g. the gateway's request rate)")
    cooldown = value.get("cooldownSeconds", 300)
    if isinstance(cooldown, bool) or not isinstance(cooldown, int) or not 0 <= cooldown <= 86400:
        raise SpecError("InvalidSpec", f"spec.autoscaling.cooldownSeconds must be an integer within [0, 86400], "
                                       f"got {cooldown!r}")
    return AutoscalingOptions(provider, low, high, metric, target,
                              str(value.get("prometheusAddress") or DEFAULT_PROMETHEUS), query, cooldown)


def default_query(opts: AutoscalingOptions, runtime: str, namespace: str, service: str) -> str:
    series = SERIES[opts.metric][runtime]
    agg = "avg" if opts.metric == "kvCacheUsage" else "sum"
    return f'{agg}({series}{{namespace="{namespace}",service="{service}"}})'


def _scale_down() -> dict:
    return {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_SECONDS,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": SCALE_DOWN_PERIOD_SECONDS}]}


def _target_ref(api_version: str, kind: str, name: str) -> dict:
    return {"apiVersion": api_version, "kind": kind, "name": name}


def scaled_object(opts: AutoscalingOptions, meta: dict, target: dict, runtime: str) -> dict:
    """KEDA ScaledObject with one Prometheus trigger: sums are per-replica targets (AverageValue),
    KV usage a utilization (Value)."""
    query = opts.query or default_query(opts, runtime, meta["namespace"], target["name"])
    trigger = {"type": "prometheus", "metricType": "Value" if opts.metric == "kvCacheUsage" else "AverageValue",
               "metadata": {"serverAddress": opts.prometheus, "query": query, "threshold": opts.target}}
    if opts.min_replicas == 0:
        trigger["metadata"]["activationThreshold"] = "0"
    return {"apiVersion": KEDA_API_VERSION, "kind": "ScaledObject", "metadata": meta, "spec": {
        "scaleTargetRef": _target_ref(**target), "minReplicaCount": opts.min_replicas,
        "maxReplicaCount": opts.max_replicas, "cooldownPeriod": opts.cooldown_seconds,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": _scale_down()}}},
        "triggers": [trigger]}}


def horizontal_pod_autoscaler(opts: AutoscalingOptions, meta: dict, target: dict, runtime: str) -> dict:
    """autoscaling/v2 HPA on a Pods metric from the custom metrics API."""
    name = hpa_metric_name(SERIES[opts.metric][runtime])
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta, "spec": {
        "scaleTargetRef": _target_ref(**target), "minReplicas": opts.min_replicas, "maxReplicas": opts.max_replicas,
        "metrics": [{"type": "Pods", "pods": {"metric": {"name": name},
                                              "target": {"type": "AverageValue", "averageValue": opts.target}}}],
        "behavior": {"scaleDown": _scale_down()}}}


def autoscaler(opts: AutoscalingOptions, meta: dict, target: dict, runtime: str) -> dict:
    build = scaled_object if opts.provider == "keda" else horizontal_pod_autoscaler
    return build(opts, meta, target, runtime)
