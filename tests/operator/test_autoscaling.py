"""spec.autoscaling (autoscaling.py): ScaledObject and HPA on the resource's scale subresource,
validated against KEDA's CRD schema (kept in tests/operator/schemas) and kubernetes-validate --strict."""
import copy
import functools
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from longserve.operator.render import desired
from longserve.operator.types import SpecError

KEDA_CRD = Path(__file__).with_name("schemas") / "keda.sh_scaledobjects.yaml"
BODY = {"apiVersion": "longserve.io/v1alpha1", "kind": "LongContextModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
        "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M"}, "context": {"maxModelLen": 1010000},
                 "accelerator": {"gpuProduct": "NVIDIA-H200"}, "cache": {"enabled": False}}}
VLLM = {"name": "vllm", "image": "vllm/vllm-openai:v0.8.5"}


def closed(schema):
    """The structural schema with listed properties closed (the API server would prune the rest)."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    return [closed(v) for v in schema] if isinstance(schema, list) else schema


@functools.cache
def keda_validator():
    crd = yaml.safe_load(KEDA_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"]))


def autoscaler(**autoscaling):
    body = copy.deepcopy(BODY)
    runtime = autoscaling.pop("runtime", None)
    if runtime:
        body["spec"]["runtime"] = runtime
    body["spec"]["autoscaling"] = autoscaling
    objs = [o for o in desired(body).objects if o["metadata"]["labels"]["app.kubernetes.io/component"] == "autoscaler"]
    assert len(objs) == 1
    return objs[0]


@pytest.mark.parametrize("metric, query, metric_type", [
    ("pendingPrefillTokens", 'sum(longserve_prefill_tokens_pending{namespace="ns",service="m"})', "AverageValue"),
    ("waitingRequests", 'sum(vllm:num_requests_waiting{namespace="ns",service="m"})', "AverageValue"),
    ("kvCacheUsage", 'avg(vllm:kv_cache_usage_perc{namespace="ns",service="m"})', "Value"),
])
def test_scaled_object_targets_the_resource_and_validates(metric, query, metric_type):
    so = autoscaler(maxReplicas=4, metric=metric)
    keda_validator().validate(so)
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "longserve.io/v1alpha1", "kind": "LongContextModel", "name": "m"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
    trigger = spec["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == metric_type
    assert trigger["metadata"]["query"] == query
    assert so["metadata"]["ownerReferences"][0]["uid"] == "u1"


def test_hpa_on_a_pods_metric_validates_strictly():
    hpa = autoscaler(provider="hpa", minReplicas=2, maxReplicas=6, metric="waitingRequests", target=2)
    kubernetes_validate.validate(hpa, "1.34.0", strict=True)
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LongContextModel"
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "vllm_num_requests_waiting"},
        "target": {"type": "AverageValue", "averageValue": "2"}}}]
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"][0]["value"] == 1


def test_runtimes_scale_on_their_own_series():
    so = autoscaler(maxReplicas=2, metric="waitingRequests",
                    runtime={**VLLM, "name": "sglang", "image": "lmsysorg/sglang:v0.4"})
    assert "sglang:num_queue_reqs" in so["spec"]["triggers"][0]["metadata"]["query"]
    hpa = autoscaler(provider="hpa", maxReplicas=2, metric="kvCacheUsage", runtime=VLLM)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_kv_cache_usage_perc"


def test_scale_to_zero_with_keda_and_a_wake_up_query():
    so = autoscaler(minReplicas=0, maxReplicas=2, query='sum(rate(gateway_requests_total{model="m"}[2m]))')
    keda_validator().validate(so)
    assert so["spec"]["minReplicaCount"] == 0 and so["spec"]["triggers"][0]["metadata"]["activationThreshold"] == "0"


@pytest.mark.parametrize("options, message", [
    ({"maxReplicas": 2, "minReplicas": 3}, "must not exceed"),
    ({"maxReplicas": 2, "minReplicas": 0, "provider": "hpa"}, "needs provider keda"),
    ({"maxReplicas": 2, "minReplicas": 0}, "needs spec.autoscaling.query"),
    ({"maxReplicas": 2, "metric": "queueDepth"}, "metric must be one of"),
    ({"maxReplicas": 2, "metric": "kvCacheUsage", "target": 80}, "at most 1"),
    ({"maxReplicas": 2, "provider": "hpa", "query": "up"}, "provider keda only"),
    ({"maxReplicas": 2, "runtime": VLLM}, "native runtime only"),
    ({"minReplicas": 1}, "maxReplicas must be an integer"),
])
def test_bad_autoscaling_is_rejected(options, message):
    with pytest.raises(SpecError, match=message):
        autoscaler(**options)


def test_replicas_are_not_part_of_the_planned_spec():
    body = copy.deepcopy(BODY)
    first = desired(body).spec_hash
    body["spec"]["replicas"] = 3
    assert desired(body).spec_hash == first
