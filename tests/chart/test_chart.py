"""Helm chart: strict lint and offline rendering with a real helm binary, values schema, CRD copy,
dashboards freshness, and every dashboard/alert expression naming metrics the server exports."""
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "longserve"
HELM = ROOT / ".tools" / "bin" / "helm"


@pytest.fixture(scope="module")
def helm():
    subprocess.run(["bash", str(ROOT / "tools" / "fetch_helm.sh")], check=True, capture_output=True, timeout=300)
    return str(HELM)


def _template(helm, *args):
    run = subprocess.run([helm, "template", "t", str(CHART), "--namespace", "ls", *args],
                         capture_output=True, text=True, timeout=60)
    return run


def test_lint_and_render(helm):
    lint = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    out = _template(helm, "--include-crds")
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ClusterRole", "ClusterRoleBinding", "ServiceAccount",
            "Service", "ConfigMap", "Job", "Pod"} <= kinds
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert "--all-namespaces" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_namespaced_mode_uses_a_role(helm):
    out = _template(helm, "--set", "watchNamespace=models")
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["metadata"]["namespace"] == "models"
    assert not any(d["kind"] == "ClusterRole" and d["metadata"]["name"] == "t-longserve" for d in docs)


@pytest.mark.parametrize("setting", ["operator.replicas=6", "image.pullPolicy=Sometimes",
                                     "watchNamespace=Bad_Name", "monitoring.serviceMonitor.interval=often",
                                     "surprise=1"])
def test_values_schema_rejects_bad_values(helm, setting):
    out = _template(helm, "--set", setting)
    assert out.returncode != 0 and "schema" in (out.stderr + out.stdout).lower()


def _pod_security():
    spec = importlib.util.spec_from_file_location("longserve_tests_pod_security", ROOT / "tests" / "pod_security.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_chart_pod_is_restricted(helm):
    """The operator, the CRD upgrade hook and the helm test pod pass the restricted profile."""
    checker = _pod_security()
    out = _template(helm, "--set", "tests.model=qwen")
    assert out.returncode == 0, out.stderr
    pods = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] in ("Deployment", "Job", "Pod")]
    assert {(d["kind"], d["metadata"]["name"]) for d in pods} == {
        ("Deployment", "t-longserve"), ("Job", "t-longserve-crd-upgrade"), ("Pod", "t-longserve-test")}
    for obj in pods:
        assert checker.violations(obj) == [], obj["metadata"]["name"]
    operator = next(d for d in pods if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert operator["securityContext"]["runAsUser"] == 10001          # the image's user
    assert operator["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert "automountServiceAccountToken" not in operator               # the operator needs its token


def test_chart_crd_is_the_manifests_crd():
    chart_crd = CHART / "crds" / "longcontextmodels.longserve.io.yaml"
    manifests_crd = ROOT / "manifests" / "crd" / "longcontextmodels.longserve.io.yaml"
    assert chart_crd.read_text() == manifests_crd.read_text()


def test_chart_rbac_matches_the_plain_install(helm):
    install = [d for d in yaml.safe_load_all((ROOT / "manifests" / "install" / "operator.yaml").read_text()) if d]
    chart = [d for d in yaml.safe_load_all(_template(helm).stdout) if d]
    plain_rules = next(d["rules"] for d in install if d["kind"] == "ClusterRole")
    chart_rules = next(d["rules"] for d in chart
                       if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "t-longserve")
    assert chart_rules == plain_rules


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_dashboards", ROOT / "tools" / "gen_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboards_are_fresh():
    for name, text in _load_generator().render().items():
        assert (CHART / "dashboards" / name).read_text() == text, f"run python tools/gen_dashboards.py ({name})"


METRIC = re.compile(r"\b((?:longserve|vllm)[:_][a-zA-Z0-9_:]+)")
SUFFIXES = ("_bucket", "_sum", "_count")


def _expressions(helm):
    exprs = []
    for path in (CHART / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [t["expr"] for t in panel["targets"]]
    out = _template(helm, "--set", "monitoring.prometheusRule.enabled=true")
    for doc in yaml.safe_load_all(out.stdout):
        if doc and doc["kind"] == "PrometheusRule":
            exprs += [r["expr"] for g in doc["spec"]["groups"] for r in g["rules"]]
    return exprs


def _scraped_sample() -> str:
    """A /metrics exposition after a small known workload through the server's metrics registry."""
    from longserve.server.api.engine_client import LoadStats, RequestFinished, RequestTimings
    from longserve.server.api.metrics import Metrics
    from longserve.server.config import EngineConfig

    cfg = EngineConfig(schema_version=1, runtime="native", model_path="/m", served_model_name="demo",
                       tensor_parallel_size=1, max_model_len=4096, max_num_seqs=4, max_output_tokens=256,
                       prefill_chunk_tokens=512, gpu_memory_utilization=0.9)
    metrics = Metrics(cfg)
    metrics.bind_engine(lambda: LoadStats(1, 1, 100, 64, 8, 16), kv_capacity_tokens=1024)
    metrics.observe_admitted(prompt_tokens=700, max_tokens=16, n=1)
    metrics.observe_prompt_bytes(2800, "http")
    metrics.observe_first_token(0.5)
    metrics.observe_itl(0.02)
    timings = RequestTimings(arrival=0.0, queued_seconds=0.1, first_token_seconds=0.5,
                             prefill_chunk_seconds=(0.2, 0.2), prefill_chunk_tokens=(512, 188),
                             decode_seconds=0.3, finished=0.8)
    metrics.observe_finished(RequestFinished("r1", 700, 16, ("stop",), timings), [16])
    for outcome in ("stop", "error"):
        metrics.observe_outcome(outcome)
    return metrics.render().decode()


def test_every_expression_uses_exported_metric_names(helm):
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name for fam in text_string_to_metric_families(_scraped_sample()) for s in fam.samples}
    exprs = _expressions(helm)
    assert len(exprs) >= 15
    for expr in exprs:
        for name in METRIC.findall(expr):
            assert name in samples or any(name == s.removesuffix(x) for s in samples for x in SUFFIXES), \
                f"{name} in {expr!r} is not exported"
