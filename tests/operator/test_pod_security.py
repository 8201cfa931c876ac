"""Every pod the operator renders passes the restricted Pod Security Standard (tests/pod_security.py,
the published baseline + restricted rules field by field); the checker itself fails on pods that
break each rule, starting with an engine pod stripped of its securityContext."""
import copy
import importlib.util
from pathlib import Path

import pytest
import yaml

from longserve.operator.render import desired

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
_spec = importlib.util.spec_from_file_location("longserve_tests_pod_security", ROOT / "tests" / "pod_security.py")
pod_security = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pod_security)

POD_KINDS = {"Deployment", "Job", "Pod", "StatefulSet", "DaemonSet", "LeaderWorkerSet"}


def example(path: Path) -> dict:
    body = yaml.safe_load(path.read_text())
    body["metadata"].update(namespace="models", uid="6f1e8a52-0000-4000-8000-000000000001")
    return body


def pods(body: dict) -> list[dict]:
    """Objects with pod templates; a LeaderWorkerSet counts as its leader and worker pods."""
    out = []
    for o in desired(body).objects:
        if o["kind"] == "LeaderWorkerSet":
            group = o["spec"]["leaderWorkerTemplate"]
            out += [{"kind": "Pod", "metadata": {**group[role]["metadata"], "name": f"{o['metadata']['name']}-{role}"},
                     "spec": group[role]["spec"]} for role in ("leaderTemplate", "workerTemplate")]
        elif o["kind"] in POD_KINDS:
            out.append(o)
    return out


def pod_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def variants() -> list[tuple[str, dict]]:
    """Each example, plus the options that add volumes, secrets or a different runtime."""
    out = [(p.stem, example(p)) for p in EXAMPLES]
    base = example(ROOT / "manifests/examples/qwen25-7b-1m-h200.yaml")
    knobs = copy.deepcopy(base)
    knobs["spec"].update(
        model={"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M", "authSecretRef": {"name": "hf", "key": "token"}},
        auth={"apiKeySecretRef": {"name": "api", "key": "key"}},
        pod={"volumes": [{"name": "extra", "configMap": {"name": "x"}}],
             "volumeMounts": [{"name": "extra", "mountPath": "/extra"}], "serviceAccountName": "engine",
             "imagePullSecrets": [{"name": "registry"}]})
    uncached = copy.deepcopy(base)
    uncached["spec"]["cache"] = {"enabled": False}
    on_pvc = copy.deepcopy(base)
    on_pvc["spec"]["model"] = {"uri": "pvc://weights/Qwen2.5-7B-Instruct-1M"}
    return out + [("all-options", knobs), ("uncached", uncached), ("pvc", on_pvc)]


@pytest.mark.parametrize("name,body", variants(), ids=[n for n, _ in variants()])
def test_every_rendered_pod_is_restricted(name, body):
    rendered = pods(body)
    assert {o["kind"] for o in rendered} & {"Deployment", "Pod"}
    for obj in rendered:
        assert pod_security.violations(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsUser"] == spec["securityContext"]["runAsGroup"] == 10001
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            paths = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/var/cache/longserve"} <= paths
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["TRITON_CACHE_DIR"].startswith("/var/cache/longserve/")
            assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/var/cache/longserve/")


def test_download_job_writes_the_pvc_as_the_fs_group():
    job = next(o for o in pods(example(EXAMPLES[0])) if o["kind"] == "Job")
    spec = job["spec"]["template"]["spec"]
    assert spec["securityContext"]["fsGroup"] == 10001
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert not mount.get("readOnly")


def engine_pod() -> dict:
    return next(o for o in pods(example(ROOT / "manifests/examples/qwen25-7b-1m-h200.yaml"))
                if o["kind"] == "Deployment")


def test_the_checker_fails_a_pod_without_a_security_context():
    deployment = engine_pod()
    spec = deployment["spec"]["template"]["spec"]
    del spec["securityContext"]
    for container in spec["containers"]:
        del container["securityContext"]
    found = pod_security.violations(deployment)
    for rule in ("privilege escalation", "non-root", "seccomp", "capabilities"):
        assert any(v.startswith(rule + ":") for v in found), (rule, found)


def _set(path: str, value):
    def mutate(pod_spec, meta):
        node = pod_spec
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[keys[-1]] = value
    return mutate


MUTATIONS = {
    "hostProcess": _set("securityContext.windowsOptions", {"hostProcess": True}),
    "host namespaces": _set("hostNetwork", True),
    "privileged": _set("containers.0.securityContext.privileged", True),
    "capabilities": _set("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
    "hostPath": lambda spec, meta: spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
    "host ports": _set("containers.0.ports.0.hostPort", 8000),
    "AppArmor": _set("securityContext.appArmorProfile", {"type": "Unconfined"}),
    "SELinux": _set("securityContext.seLinuxOptions", {"type": "spc_t"}),
    "procMount": _set("containers.0.securityContext.procMount", "Unmasked"),
    "sysctls": _set("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
    "volume types": lambda spec, meta: spec["volumes"].append({"name": "nfs", "nfs": {"server": "x", "path": "/"}}),
    "non-root user": _set("containers.0.securityContext.runAsUser", 0),
    "root group": _set("securityContext.fsGroup", 0),
    "AppArmor annotation": lambda spec, meta: meta.setdefault("annotations", {}).update(
        {"container.apparmor.security.beta.kubernetes.io/engine": "unconfined"}),
}


@pytest.mark.parametrize("rule", sorted(MUTATIONS))
def test_the_checker_catches_each_rule(rule):
    deployment = engine_pod()
    template = deployment["spec"]["template"]
    assert pod_security.violations(deployment) == []
    MUTATIONS[rule](template["spec"], template["metadata"])
    found = pod_security.violations(deployment)
    assert any(v.startswith(rule.split()[0]) for v in found), (rule, found)


def test_a_container_may_not_override_the_pods_non_root():
    deployment = engine_pod()
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] = False
    assert any(v.startswith("non-root:") for v in pod_security.violations(deployment))


def test_example_namespace_enforces_restricted():
    namespace = yaml.safe_load((ROOT / "manifests/examples/namespace/models.yaml").read_text())
    assert namespace["kind"] == "Namespace"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_plain_install_operator_pod_is_restricted():
    install = [d for d in yaml.safe_load_all((ROOT / "manifests/install/operator.yaml").read_text()) if d]
    deployment = next(d for d in install if d["kind"] == "Deployment")
    assert pod_security.violations(deployment) == []
