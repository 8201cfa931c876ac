"""Deployment options: NetworkPolicy, pod template knobs, resource overrides, the download Job and
revision-scoped weights; each rendered, checked with kubernetes-validate --strict, and each bad
input rejected by the parser with a message naming the field."""
import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from longserve.operator.render import (
    DOWNLOAD_PERMANENT_EXIT_CODES,
    MODEL_REVISION_ANNOTATION,
    desired,
    download_job_name,
    model_path,
    revision_slug,
)
from longserve.operator.types import SpecError, parse

ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSIONS = ["1.30.0", "1.34.0"]


def body(**spec) -> dict:
    base = yaml.safe_load((ROOT / "manifests/examples/qwen25-7b-1m-h200.yaml").read_text())
    base["metadata"].update(namespace="models", uid="6f1e8a52-0000-4000-8000-000000000001")
    base["spec"].update(copy.deepcopy(spec))
    return base


def by_kind(b: dict, **kw) -> dict:
    return {o["kind"]: o for o in desired(b, **kw).objects}


KNOBS = {
    "labels": {"team": "research", "example.com/tier": "gold"},
    "annotations": {"example.com/owner": "ml-platform"},
    "imagePullSecrets": [{"name": "registry"}],
    "serviceAccountName": "engine-sa",
    "priorityClassName": "inference-high",
    "runtimeClassName": "nvidia",
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "x"}}}],
    "volumes": [{"name": "adapters", "persistentVolumeClaim": {"claimName": "adapters", "readOnly": True}}],
    "volumeMounts": [{"name": "adapters", "mountPath": "/adapters", "readOnly": True}],
}


def test_network_policy_admits_clients_on_api_ports_and_the_scraper_on_metrics():
    objs = by_kind(body(networkPolicy={"enabled": True, "allowedNamespaces": ["apps"], "clients": [
        {"namespaceSelector": {"matchLabels": {"team": "search"}}, "podSelector": {"matchLabels": {"role": "rag"}}}]}))
    policy = objs["NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    clients, scraper = policy["spec"]["ingress"]
    assert clients["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}},
        {"namespaceSelector": {"matchLabels": {"team": "search"}}, "podSelector": {"matchLabels": {"role": "rag"}}}]
    assert [p["port"] for p in clients["ports"]] == [8000, 50051]
    assert [p["port"] for p in scraper["ports"]] == [8000]          # /metrics lives on the HTTP port
    assert scraper["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    for kube in KUBE_VERSIONS:
        kubernetes_validate.validate(policy, kube, strict=True)


def test_network_policy_defaults_off_and_to_the_own_namespace():
    plain = body()
    del plain["spec"]["networkPolicy"]           # the examples turn it on; the API default is off
    assert parse(plain).network_policy.enabled is False and "NetworkPolicy" not in by_kind(plain)
    policy = by_kind(body(networkPolicy={"enabled": True, "metricsScraper": {
        "podSelector": {"matchLabels": {"app": "vmagent"}}}}))["NetworkPolicy"]
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]
    assert policy["spec"]["ingress"][1]["from"] == [{"podSelector": {"matchLabels": {"app": "vmagent"}}}]
    vllm = body(networkPolicy={"enabled": True}, runtime={"name": "vllm", "image": "vllm/vllm-openai:v0.10.1.1"})
    assert [p["port"] for p in by_kind(vllm)["NetworkPolicy"]["spec"]["ingress"][0]["ports"]] == [8000]


def test_pod_knobs_are_rendered_without_touching_ours():
    objs = by_kind(body(pod=KNOBS))
    template = objs["Deployment"]["spec"]["template"]
    meta, spec = template["metadata"], template["spec"]
    assert meta["labels"]["team"] == "research" and meta["labels"]["app.kubernetes.io/component"] == "engine"
    assert meta["annotations"]["example.com/owner"] == "ml-platform"
    assert "longserve.io/config-hash" in meta["annotations"]
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert (spec["serviceAccountName"], spec["priorityClassName"], spec["runtimeClassName"]) == \
        ("engine-sa", "inference-high", "nvidia")
    assert spec["affinity"] == KNOBS["affinity"]
    assert spec["topologySpreadConstraints"] == KNOBS["topologySpreadConstraints"]
    assert spec["volumes"][-1]["name"] == "adapters"
    assert spec["containers"][0]["volumeMounts"][-1] == KNOBS["volumeMounts"][0]
    assert spec["automountServiceAccountToken"] is False
    job = objs["Job"]["spec"]["template"]["spec"]
    assert job["imagePullSecrets"] == [{"name": "registry"}] and job["serviceAccountName"] == "engine-sa"
    assert "priorityClassName" not in job and "affinity" not in job
    for kube in KUBE_VERSIONS:
        for kind in ("Deployment", "Job"):
            kubernetes_validate.validate(objs[kind], kube, strict=True)


def test_resource_overrides_win_over_derived_values_but_not_the_gpu_count():
    objs = by_kind(body(resources={"cpu": "8", "requests": {"memory": "64Gi", "rdma/hca_shared_devices_a": "1"},
                                   "limits": {"rdma/hca_shared_devices_a": "1", "cpu": "16"}}))
    resources = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["memory"] == "64Gi" and resources["limits"]["memory"] == "64Gi"
    assert resources["requests"]["cpu"] == "8" and resources["limits"]["cpu"] == "16"
    assert resources["requests"]["rdma/hca_shared_devices_a"] == "1"
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    kubernetes_validate.validate(objs["Deployment"], "1.34.0", strict=True)
    with pytest.raises(SpecError, match="GPU count is the planner's"):
        parse(body(resources={"limits": {"nvidia.com/gpu": "2"}}))


@pytest.mark.parametrize("spec,fragment", [
    ({"pod": {"labels": {"app.kubernetes.io/name": "x"}}}, "set by the operator"),
    ({"pod": {"annotations": {"longserve.io/config-hash": "x"}}}, "set by the operator"),
    ({"pod": {"labels": {"team": "a b"}}}, "not a valid label value"),
    ({"pod": {"volumes": [{"name": "models", "emptyDir": {}}]}}, "the name 'models' is taken"),
    ({"pod": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}}, "hostPath volumes are not allowed"),
    ({"pod": {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}}, "is not one of spec.pod.volumes"),
    ({"pod": {"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/tmp/x"}]}},
     "overlaps a path the operator mounts"),
    ({"pod": {"imagePullSecrets": ["registry"]}}, "imagePullSecrets[0].name"),
    ({"pod": {"affinity": {"nodeSelector": {}}}}, "affinity takes"),
    ({"pod": {"topologySpreadConstraints": [{"maxSkew": 1}]}}, "topologySpreadConstraints[0]"),
    ({"pod": {"serviceAccountName": "Bad_Name"}}, "spec.pod.serviceAccountName"),
    ({"networkPolicy": {"enabled": "yes"}}, "enabled must be true or false"),
    ({"networkPolicy": {"allowedNamespaces": ["Bad_NS"]}}, "allowedNamespaces[0]"),
    ({"networkPolicy": {"clients": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}}, "podSelector and/or namespaceSelector"),
    ({"networkPolicy": {"clients": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]}},
     "In/NotIn need values"),
    ({"auth": {"apiKeySecretRef": {"name": "k"}}}, "needs name and key"),
    ({"cache": {"download": {"activeDeadlineSeconds": 10}}}, "activeDeadlineSeconds must be an integer >= 60"),
    ({"cache": {"download": {"backoffLimit": 50}}}, "backoffLimit must be an integer within [0, 20]"),
    ({"resources": {"requests": {"memory": "lots"}}}, "is not a quantity"),
])
def test_bad_options_are_rejected_with_the_field_named(spec, fragment):
    with pytest.raises(SpecError) as info:
        parse(body(**spec))
    assert fragment in info.value.message and info.value.reason == "InvalidSpec"


def test_options_pass_the_crd_schema():
    import jsonschema

    from longserve.operator import crd
    full = body(pod=KNOBS, auth={"apiKeySecretRef": {"name": "k", "key": "api-key"}},
                networkPolicy={"enabled": True, "allowedNamespaces": ["apps"],
                               "clients": [{"podSelector": {"matchLabels": {"a": "b"}}}]},
                resources={"requests": {"memory": "64Gi"}}, cache={"download": {"backoffLimit": 2}})
    jsonschema.validate(full, crd.openapi_schema())
    bad = body(networkPolicy={"enabled": True, "clients": [{}]})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd.openapi_schema())


def test_download_job_runs_our_command_with_deadline_and_failure_policy():
    job = by_kind(body(model={"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M", "revision": "v1.0"}))["Job"]
    spec = job["spec"]
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == ["longserve", "download", "--model", "hf://Qwen/Qwen2.5-7B-Instruct-1M",
                                    "--revision", "v1.0", "--dest", "/models/Qwen--Qwen2.5-7B-Instruct-1M/v1.0"]
    assert container["image"] == "ghcr.io/longserve/longserve:0.1.0"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["backoffLimit"] == 4 and spec["activeDeadlineSeconds"] == 3600     # 15 GB: the one-hour floor
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == DOWNLOAD_PERMANENT_EXIT_CODES
    big = by_kind(body(model={"uri": "hf://Qwen/Qwen2.5-14B-Instruct-1M"}, context={}, sizing={"objective": "MinGPUs"},
                       accelerator={"gpuProduct": "NVIDIA-H200", "gpusPerNode": 8}))["Job"]
    assert big["spec"]["activeDeadlineSeconds"] == 3600
    tuned = by_kind(body(cache={"download": {"activeDeadlineSeconds": 7200, "backoffLimit": 1}}))["Job"]["spec"]
    assert (tuned["activeDeadlineSeconds"], tuned["backoffLimit"]) == (7200, 1)
    # a vLLM resource still downloads with our image (vLLM's has no `longserve download`)
    vllm = by_kind(body(runtime={"name": "vllm", "image": "vllm/vllm-openai:v0.10.1.1"}))
    assert vllm["Job"]["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/longserve/longserve:0.1.0"
    for kube in KUBE_VERSIONS:
        kubernetes_validate.validate(job, kube, strict=True)


def test_deadline_grows_with_the_weights():
    from longserve.operator.render import download_deadline_seconds
    lcm = parse(body())
    assert download_deadline_seconds(lcm, 15_000_000_000) == 3600
    assert download_deadline_seconds(lcm, 140_000_000_000) == 2 * 2800 + 900


def test_weights_are_revision_scoped():
    def lcm(revision):
        return parse(body(model={"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M", "revision": revision}))
    assert model_path(lcm("main")) == "/models/Qwen--Qwen2.5-7B-Instruct-1M/main"
    sha = "a" * 40
    assert model_path(lcm(sha)).endswith(f"/{sha}")
    assert revision_slug("refs/pr/1") != revision_slug("refs-pr-1")
    assert "/" not in revision_slug("refs/pr/1")
    names = {download_job_name(lcm(r)) for r in ("main", "v2", sha, "b" * 40, "refs/pr/1", "refs-pr-1")}
    assert len(names) == 6 and all(len(n) <= 63 for n in names)
    assert download_job_name(lcm("main")) == "qwen25-7b-1m-download-main"
    a, b = by_kind(body(), model_cached=True), by_kind(body(model={"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M",
                                                                    "revision": "v2"}), model_cached=True)
    ta, tb = a["Deployment"]["spec"]["template"], b["Deployment"]["spec"]["template"]
    assert ta["metadata"]["annotations"][MODEL_REVISION_ANNOTATION] == "main"
    assert tb["metadata"]["annotations"][MODEL_REVISION_ANNOTATION] == "v2"
    assert ta["metadata"]["annotations"]["longserve.io/config-hash"] != \
        tb["metadata"]["annotations"]["longserve.io/config-hash"]


def test_user_environment_replaces_ours_without_duplicates():
    engine = by_kind(body(runtime={"env": [{"name": "HOME", "value": "/home/x"}, {"name": "EXTRA", "value": "1"}]}))[
        "Deployment"]["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in engine["env"]]
    assert len(names) == len(set(names))
    assert {"name": "HOME", "value": "/home/x"} in engine["env"] and "TRITON_CACHE_DIR" in names
