"""Renderer: goldens per example resource, strict schema validation of every built-in object for
Kubernetes 1.30 and 1.34, structure of the Prometheus Operator kinds, runtime command lines."""
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from longserve.operator import render_cli
from longserve.operator.render import HASH_LABEL, content_hash, desired
from longserve.operator.runtimes import startup_probe_seconds
from longserve.server.cli import main
from longserve.server.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
KUBE_VERSIONS = ["1.30.0", "1.34.0"]
BUILT_IN = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1"}


def example(path: Path, uid: str = "6f1e8a52-0000-4000-8000-000000000001") -> dict:
    body = yaml.safe_load(path.read_text())
    body["metadata"].update(namespace="models", uid=uid)
    return body


def rendered(path: Path, **kw) -> list[dict]:
    return desired(example(path), **kw).objects


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_golden_rendering(path, golden):
    """`make goldens` (LONGSERVE_REGEN_GOLDENS=1) rewrites tests/golden/operator/*.yaml."""
    golden.check_text(f"operator/{path.stem}.yaml", render_cli.dump_yaml(rendered(path)))


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_built_in_objects_pass_strict_validation(path, kube):
    objects = rendered(path) + rendered(path, model_cached=True)
    checked = 0
    for obj in objects:
        if obj["apiVersion"] in BUILT_IN:
            kubernetes_validate.validate(obj, kube, strict=True)
            checked += 1
    assert checked >= 5


def test_every_object_is_owned_labelled_and_hashed():
    for path in EXAMPLES:
        for obj in rendered(path):
            meta = obj["metadata"]
            assert meta["namespace"] == "models"
            assert meta["ownerReferences"][0]["uid"].startswith("6f1e8a52")
            assert meta["ownerReferences"][0]["controller"] is True
            labels = dict(meta["labels"])
            assert labels.pop(HASH_LABEL) == content_hash(obj | {"metadata": meta | {"labels": labels}})
            assert labels["app.kubernetes.io/managed-by"] == "longserve-operator"
            assert len(meta["name"]) <= 63


def by_kind(objects):
    return {o["kind"]: o for o in objects}


def test_h200_deployment_matches_the_plan():
    d = desired(example(ROOT / "manifests/examples/qwen25-7b-1m-h200.yaml"))
    objs = by_kind(d.objects)
    assert list(objs) == ["ConfigMap", "PersistentVolumeClaim", "Job", "Deployment", "Service",
                          "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule"]
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    engine = pod["containers"][0]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert objs["Deployment"]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "1Gi"}
    cfg = EngineConfig.from_json(objs["ConfigMap"]["data"]["engine_config.json"])
    assert (cfg.tensor_parallel_size, cfg.prefill_chunk_tokens, cfg.max_model_len) == (1, 131072, 1010000)
    assert cfg.model_path == "/models/Qwen--Qwen2.5-7B-Instruct-1M/main"
    annotations = objs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["longserve.io/config-hash"] == objs["ConfigMap"]["metadata"]["labels"][HASH_LABEL]
    startup = engine["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= d.startup_probe_seconds == 1800
    assert [p["name"] for p in objs["Service"]["spec"]["ports"]] == ["http", "grpc"]
    assert objs["Service"]["spec"]["ports"][1]["appProtocol"] == "kubernetes.io/h2c"


def test_startup_budget_grows_with_weights():
    assert startup_probe_seconds(15_000_000_000) == 1800
    assert startup_probe_seconds(100_000_000_000) == 2600


def test_tp8_uses_large_shm_and_eight_gpus():
    objs = by_kind(rendered(ROOT / "manifests/examples/qwen25-14b-1m-h100x8.yaml"))
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "16Gi"
    assert objs["ServiceMonitor"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_vllm_runs_the_upstream_command_with_the_planned_fraction():
    objs = by_kind(rendered(ROOT / "manifests/examples/qwen25-7b-1m-vllm.yaml"))
    engine = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    cmd = engine["command"]
    assert cmd[:3] == ["vllm", "serve", "/models/Qwen--Qwen2.5-7B-Instruct-1M/main"]
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.67"
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "131072"
    assert engine["image"] == "vllm/vllm-openai:v0.10.1.1"
    assert {"name": "VLLM_USE_V1", "value": "0"} in engine["env"]
    assert [p["name"] for p in objs["Service"]["spec"]["ports"]] == ["http"]


def test_sglang_command():
    body = example(ROOT / "manifests/examples/qwen25-7b-1m-vllm.yaml")
    body["spec"]["runtime"] = {"name": "sglang", "image": "lmsysorg/sglang:v0.5.0"}
    engine = by_kind(desired(body).objects)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    cmd = engine["command"]
    assert cmd[:3] == ["python3", "-m", "sglang.launch_server"]
    assert cmd[cmd.index("--attention-backend") + 1] == "dual_chunk_flash_attn"
    assert cmd[cmd.index("--mem-fraction-static") + 1] == desired(body).plan.gpu_memory_utilization.__format__(".2f")


def test_cpu_demo_requests_no_device_and_reserves_the_budget():
    d = desired(example(ROOT / "manifests/examples/cpu-demo.yaml"))
    objs = by_kind(d.objects)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert not any("gpu" in k for k in resources["requests"]) and "tolerations" not in pod
    assert "nodeSelector" not in pod
    memory_gib = int(resources["requests"]["memory"].removesuffix("Gi"))
    assert memory_gib * 2**30 >= d.plan.memory_per_gpu_bytes + 2**30
    assert "ServiceMonitor" not in objs and "PrometheusRule" not in objs


def test_cache_lifecycle_dry_run_and_infeasible_render_nothing_extra():
    path = ROOT / "manifests/examples/qwen25-7b-1m-h200.yaml"
    assert "Job" not in by_kind(rendered(path, model_cached=True))
    assert {"ServiceMonitor", "PrometheusRule"}.isdisjoint(by_kind(rendered(path, monitoring=False)))
    body = example(path)
    body["spec"]["sizing"] = {"mode": "DryRun"}
    d = desired(body)
    assert d.plan.feasible and d.objects == []
    body = example(path)
    body["spec"]["model"]["uri"] = "hf://Qwen/Qwen2.5-14B-Instruct-1M"
    body["spec"]["sizing"] = {"mode": "Manual", "tensorParallelSize": 1}
    d = desired(body)
    assert not d.plan.feasible and d.objects == []
    assert "tokens fit" in d.plan.explanation


def test_uncached_and_pvc_models():
    body = example(ROOT / "manifests/examples/qwen25-7b-1m-h200.yaml")
    body["spec"]["cache"] = {"enabled": False}
    objs = by_kind(desired(body).objects)
    assert "PersistentVolumeClaim" not in objs and "Job" not in objs
    engine = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert engine["resources"]["requests"]["ephemeral-storage"] == "28Gi"
    body["spec"]["model"]["uri"] = "pvc://weights/Qwen2.5-7B-Instruct-1M"
    objs = by_kind(desired(body).objects)
    cfg = EngineConfig.from_json(objs["ConfigMap"]["data"]["engine_config.json"])
    assert cfg.model_path == "/models/Qwen2.5-7B-Instruct-1M"
    volume = next(v for v in objs["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}


def test_monitoring_objects_have_the_prometheus_operator_shape():
    objs = by_kind(rendered(ROOT / "manifests/examples/qwen25-7b-1m-h200.yaml"))
    sm, rule = objs["ServiceMonitor"], objs["PrometheusRule"]
    assert sm["apiVersion"] == rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"] == objs["Service"]["spec"]["selector"]
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    groups = rule["spec"]["groups"]
    assert len(groups) == 1 and groups[0]["name"] == "longserve-qwen25-7b-1m"
    for r in groups[0]["rules"]:
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["runbook_url"].startswith("https://")
        assert r["expr"].count("(") == r["expr"].count(")") and r["expr"].count("{") == r["expr"].count("}")
        assert r["for"][-1] in "smh"


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["render", *argv])
    return rc, out.getvalue(), err.getvalue()


def test_render_cli_prints_the_operator_objects(tmp_path):
    path = ROOT / "manifests/examples/qwen25-7b-1m-h200.yaml"
    rc, out, _ = run_cli("-f", str(path))
    assert rc == 0
    body = yaml.safe_load(path.read_text())
    assert [o for o in yaml.safe_load_all(out) if o] == desired(body).objects
    rc, out, _ = run_cli("-f", str(path), "-o", "json")
    assert rc == 0 and '"kind": "List"' in out


@pytest.mark.parametrize("name,message", [("invalid/tp8-for-7b.yaml", "InvalidTP"),
                                          ("invalid/missing-model.yaml", "spec.model.uri is required"),
                                          ("invalid/negative-replicas.yaml", "spec.replicas must be >= 0")])
def test_render_cli_rejects_invalid_examples(name, message):
    rc, out, err = run_cli("-f", str(ROOT / "manifests/examples" / name))
    assert rc == 2 and out == "" and message in err


def test_render_cli_bad_input(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("kind: ConfigMap\n")
    assert run_cli("-f", str(bad))[0] == 2
    assert "no such file" in run_cli("-f", str(tmp_path / "missing.yaml"))[2].lower()
