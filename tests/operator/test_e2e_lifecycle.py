"""End to end, lifecycle: server-side apply that prunes, hashed-config rollouts, autoscaling through
the scale subresource, capacity verification — the real kopf operator against the KMock emulator."""
import time

import pytest

from longserve.operator.apply import FIELD_MANAGER, owned_by

pytestmark = pytest.mark.timeout(60)

DEPLOYMENTS, CONFIGMAPS = "apps/v1/deployments", "v1/configmaps"
SERVICE_MONITORS = "monitoring.coreos.com/v1/servicemonitors"


def resource(name="qwen", **spec) -> dict:
    base = {"model": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M"}, "context": {"maxModelLen": 1010000},
            "accelerator": {"gpuProduct": "NVIDIA-H200"}, "cache": {"enabled": False}}
    base.update(spec)
    return {"apiVersion": "longserve.io/v1alpha1", "kind": "LongContextModel",
            "metadata": {"name": name, "namespace": "default"}, "spec": base}


def status_of(cluster, name="qwen") -> dict:
    return (cluster.get(name) or {}).get("status") or {}


def conditions(cluster, name="qwen") -> dict:
    return {c["type"]: c for c in status_of(cluster, name).get("conditions", [])}


def pod_spec(cluster, name="qwen") -> dict:
    return cluster.children(DEPLOYMENTS)[name]["spec"]["template"]["spec"]


def test_removed_spec_fields_are_removed_from_the_children(cluster):
    """nodeSelector entry, ServiceMonitor label and GPU resource key: gone at the next generation."""
    cluster.create(resource(accelerator={"gpuProduct": "NVIDIA-H200", "nodeSelector": {"pool": "a"}},
                            monitoring={"serviceMonitor": {"labels": {"team": "x"}}},
                            resources={"limits": {"example.com/rdma": "1"}}))
    cluster.wait(lambda: cluster.children(SERVICE_MONITORS).get("qwen"), "the ServiceMonitor")
    cluster.wait(lambda: status_of(cluster).get("observedGeneration") == 1, "generation 1 handled")
    assert pod_spec(cluster)["nodeSelector"]["pool"] == "a"
    assert pod_spec(cluster)["containers"][0]["resources"]["limits"]["example.com/rdma"] == "1"
    assert cluster.children(SERVICE_MONITORS)["qwen"]["metadata"]["labels"]["team"] == "x"
    assert owned_by(cluster.children(DEPLOYMENTS)["qwen"], FIELD_MANAGER)[0]["operation"] == "Apply"
    # a field someone else added by hand is theirs: the operator's applies leave it alone
    cluster.apps.patch_namespaced_deployment("qwen", "default", {"metadata": {"annotations": {"team/owner": "ops"}}})

    cluster.patch_spec("qwen", {"accelerator": {"nodeSelector": None, "resourceName": "example.com/gpu"},
                                "monitoring": {"serviceMonitor": {"labels": None}}, "resources": None})
    cluster.wait(lambda: status_of(cluster).get("observedGeneration") == 2, "generation 2 handled")
    spec = pod_spec(cluster)
    assert "pool" not in spec.get("nodeSelector", {})
    limits = spec["containers"][0]["resources"]["limits"]
    assert "example.com/rdma" not in limits and "nvidia.com/gpu" not in limits and limits["example.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["requests"]
    assert "team" not in cluster.children(SERVICE_MONITORS)["qwen"]["metadata"]["labels"]
    assert cluster.children(DEPLOYMENTS)["qwen"]["metadata"]["annotations"]["team/owner"] == "ops"


def test_a_hand_edit_is_taken_back_with_force_and_reported(cluster):
    cluster.create(resource())
    cluster.wait(lambda: cluster.children(DEPLOYMENTS).get("qwen"), "the Deployment")
    cluster.apps.patch_namespaced_deployment("qwen", "default", {"spec": {"revisionHistoryLimit": 9}},
                                             field_manager="kubectl-edit")
    live = cluster.wait(lambda: (d := cluster.children(DEPLOYMENTS)["qwen"])["spec"]["revisionHistoryLimit"] == 3
                        and d, "the field taken back")
    managers = {e["manager"] for e in live["metadata"]["managedFields"]}
    assert FIELD_MANAGER in managers
    conflicts = [r for r in list(cluster.emulator.emulator) if r.params.get("force") == "true"]
    assert conflicts, "the apply was forced after a conflict"


def engine_config_map_name(cluster, name="qwen") -> str:
    volumes = pod_spec(cluster, name)["volumes"]
    return next(v for v in volumes if v["name"] == "engine-config")["configMap"]["name"]


def test_config_change_rolls_a_new_hashed_config_map_and_cleans_the_old_after_ready(cluster):
    from longserve.operator.render import CONFIG_HASH_ANNOTATION

    cluster.create(resource())
    cluster.wait(lambda: cluster.children(DEPLOYMENTS).get("qwen"), "the Deployment")
    first = engine_config_map_name(cluster)
    template = cluster.children(DEPLOYMENTS)["qwen"]["spec"]["template"]
    assert first.startswith("qwen-engine-") and cluster.children(CONFIGMAPS)[first]["immutable"] is True
    assert template["spec"]["terminationGracePeriodSeconds"] > 600        # a 1M-token request may finish
    command = template["spec"]["containers"][0]["command"]
    assert int(command[command.index("--drain-grace-seconds") + 1]) < template["spec"]["terminationGracePeriodSeconds"]

    cluster.patch_spec("qwen", {"context": {"maxModelLen": 524288}})
    cluster.wait(lambda: engine_config_map_name(cluster) != first, "the Deployment on a new ConfigMap")
    second = engine_config_map_name(cluster)
    rolled = cluster.children(DEPLOYMENTS)["qwen"]["spec"]["template"]
    assert rolled["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] != \
        template["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    assert set(cluster.children(CONFIGMAPS)) == {first, second}
    time.sleep(4 * 0.3)                     # timer passes: the new pods are not ready, the old config stays
    assert first in cluster.children(CONFIGMAPS)

    live = cluster.children(DEPLOYMENTS)["qwen"]
    cluster.patch_status("apps/v1", "deployments", "qwen", {
        "observedGeneration": live["metadata"]["generation"], "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1})
    cluster.wait(lambda: first not in cluster.children(CONFIGMAPS), "the old ConfigMap deleted after the rollout")
    assert set(cluster.children(CONFIGMAPS)) == {second}


SCALED_OBJECTS, HPAS = "keda.sh/v1alpha1/scaledobjects", "autoscaling/v2/horizontalpodautoscalers"


def scale(cluster, name: str, replicas: int, manager: str) -> None:
    """What an autoscaler does: write spec.replicas through the scale subresource."""
    code, data = cluster.api.request(
        "PATCH", f"/apis/longserve.io/v1alpha1/namespaces/default/longcontextmodels/{name}/scale",
        {"spec": {"replicas": replicas}}, content_type="application/merge-patch+json",
        query=[("fieldManager", manager)])
    assert code == 200, data


@pytest.mark.parametrize("provider, path", [("keda", SCALED_OBJECTS), ("hpa", HPAS)])
def test_autoscaler_writes_replicas_and_the_operator_follows(cluster, provider, path):
    cluster.create(resource(autoscaling={"provider": provider, "minReplicas": 1, "maxReplicas": 4,
                                         "metric": "waitingRequests"}))
    autoscaler = cluster.wait(lambda: cluster.children(path).get("qwen"), f"the {provider} autoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "longserve.io/v1alpha1", "kind": "LongContextModel", "name": "qwen"}
    cluster.wait(lambda: cluster.children(DEPLOYMENTS).get("qwen"), "the Deployment")
    cluster.wait(lambda: status_of(cluster).get("selector"), "status.selector for the scale subresource")

    scale(cluster, "qwen", 3, "horizontal-pod-autoscaler")
    cluster.wait(lambda: cluster.children(DEPLOYMENTS)["qwen"]["spec"]["replicas"] == 3, "the Deployment at 3")
    pdb = cluster.wait(lambda: (b := cluster.children("policy/v1/poddisruptionbudgets")["qwen"]["spec"])
                       .get("maxUnavailable") and b, "the PDB for several replicas")
    assert "minAvailable" not in pdb                            # pruned by the apply
    time.sleep(4 * 0.3)                                         # timer passes: nothing reverts the scale
    assert cluster.children(DEPLOYMENTS)["qwen"]["spec"]["replicas"] == 3
    assert cluster.get("qwen")["spec"]["replicas"] == 3
    scale(cluster, "qwen", 2, "horizontal-pod-autoscaler")
    cluster.wait(lambda: cluster.children(DEPLOYMENTS)["qwen"]["spec"]["replicas"] == 2, "the Deployment at 2")


class FakeEngine:
    """An engine's HTTP port that reports a model card (GET /v1/models) with the given numbers."""

    def __init__(self, max_model_len: int, kv_capacity_tokens: int):
        import http.server
        import json
        import threading

        card = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": max_model_len,
                                                        "kv_capacity_tokens": kv_capacity_tokens}]}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                ok = self.path == "/v1/models"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(card if ok else b"{}")

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def ready_engine_pod(cluster, name: str) -> None:
    """What the kubelet would report: a Ready pod of the current template at 127.0.0.1."""
    from longserve.operator.render import CONFIG_HASH_ANNOTATION

    template = cluster.children(DEPLOYMENTS)[name]["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{name}-abc12", "namespace": "default", "labels": template["metadata"]["labels"],
                        "annotations": {CONFIG_HASH_ANNOTATION:
                                        template["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]}},
           "spec": {"containers": [{"name": "engine", "image": "engine"}]},
           "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}
    code, data = cluster.api.request("POST", "/api/v1/namespaces/default/pods", pod)
    assert code in (200, 201), data


@pytest.mark.parametrize("kv, verified, reason", [
    (1_100_000, "True", "EngineReportsCapacity"), (700_000, "False", "InsufficientKVCapacity")])
def test_capacity_verified_against_what_the_engine_reports(cluster, kv, verified, reason):
    with FakeEngine(max_model_len=1010000, kv_capacity_tokens=kv) as engine:
        cluster.create(resource(serving={"httpPort": engine.port}))
        cluster.wait(lambda: cluster.children(DEPLOYMENTS).get("qwen"), "the Deployment")
        assert conditions(cluster).get("CapacityVerified", {}).get("status") in (None, "Unknown")
        ready_engine_pod(cluster, "qwen")
        cond = cluster.wait(lambda: (c := conditions(cluster).get("CapacityVerified")) and c["status"] != "Unknown"
                            and c, "CapacityVerified measured")
    assert (cond["status"], cond["reason"]) == (verified, reason)
    assert f"KV capacity {kv:,} tokens" in cond["message"] and "the plan needs 1,010,000" in cond["message"]
    observed = status_of(cluster)["observed"]
    assert (observed["kvCapacityTokens"], observed["maxModelLen"], observed["source"]) == (kv, 1010000, "/v1/models")
    if verified == "False":
        assert conditions(cluster)["Ready"]["status"] == "False"


def operator_process(emulator, tmp_path, *flags):
    """`longserve operator` as its own process against the emulator (kubeconfig with a token)."""
    import os
    import subprocess
    import sys

    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    return subprocess.Popen(
        [sys.executable, "-m", "longserve.server.cli", "operator", "--all-namespaces", "--kubeconfig", str(kubeconfig),
         "--liveness-port=0", "--metrics-port=0", "--timer-interval=0.3", "--log-format=plain", *flags],
        env={**os.environ, "PYTHONSAFEPATH": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def child_writers(emulator) -> list[str]:
    """User agents of the server-side applies to children, in order (the emulator's request log)."""
    return [r.headers.get("User-Agent", "") for r in list(emulator.emulator)
            if r.method == "PATCH" and r.headers.get("Content-Type", "").startswith("application/apply-patch")]


@pytest.mark.timeout(120)
def test_two_operators_one_leads_the_other_takes_over_when_it_dies(emulator, tmp_path):
    import signal

    import kubernetes

    from longserve.operator import k8s_apply

    lifetime = 3
    api = k8s_apply.Api(kubernetes.client.Configuration(host=emulator.url), timeout=5)
    code, data = api.request("POST", "/apis/kopf.dev/v1/clusterkopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "longserve"}})
    assert code in (200, 201), data

    def peers() -> dict:
        obj = emulator.objects("kopf.dev/v1/clusterkopfpeerings", None).get("longserve") or {}
        return {k: v for k, v in (obj.get("status") or {}).items() if v}

    def wait(predicate, what, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)
        return value

    def deployment():
        return emulator.objects(DEPLOYMENTS, "default").get("qwen")

    leader = operator_process(emulator, tmp_path, f"--peering-lifetime={lifetime}")
    standby = None
    try:
        wait(lambda: len(peers()) == 1, "the first operator in the peering")
        standby = operator_process(emulator, tmp_path, f"--peering-lifetime={lifetime}")
        wait(lambda: len(peers()) == 2, "the second operator in the peering")
        assert len({p["priority"] for p in peers().values()}) == 2       # no tie: the older one leads

        client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=emulator.url))
        custom = kubernetes.client.CustomObjectsApi(client)
        custom.create_namespaced_custom_object("longserve.io", "v1alpha1", "default", "longcontextmodels", resource())
        wait(deployment, "the leader's Deployment")
        time.sleep(5 * 0.3)                                # several timer passes
        writers = set(child_writers(emulator))
        assert writers == {w for w in writers if f"pid {leader.pid})" in w} and writers, writers

        before = len(child_writers(emulator))
        template_before = deployment()["spec"]["template"]
        leader.send_signal(signal.SIGKILL)                 # no goodbye: its peering entry must expire
        leader.wait(10)
        killed = time.monotonic()
        custom.patch_namespaced_custom_object("longserve.io", "v1alpha1", "default", "longcontextmodels", "qwen",
                                              {"spec": {"context": {"maxModelLen": 524288}}})
        wait(lambda: deployment()["spec"]["template"] != template_before, "the standby's reconcile of generation 2")
        took = time.monotonic() - killed
        assert took < lifetime + 10, f"handover took {took:.1f} s"
        after = child_writers(emulator)[before:]
        assert after and all(f"pid {standby.pid})" in w for w in after), after
        # the dead leader's finalizer duty is the new leader's: a deletion does not wait for the dead one
        custom.delete_namespaced_custom_object("longserve.io", "v1alpha1", "default", "longcontextmodels", "qwen")
        wait(lambda: "qwen" not in emulator.objects("longserve.io/v1alpha1/longcontextmodels", "default"),
             "the deletion released by the new leader", timeout=10)
        client.close()
    finally:
        for proc in (leader, standby):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(20)


def test_cache_retain_keeps_the_claim_out_of_garbage_collection(cluster):
    from longserve.operator.render import RETAIN_LABEL

    pvcs = "v1/persistentvolumeclaims"
    cluster.create(resource(cache={"enabled": True, "retain": True}))
    claim = cluster.wait(lambda: cluster.children(pvcs).get("qwen-weights"), "the cache PVC")
    assert "ownerReferences" not in claim["metadata"] and claim["metadata"]["labels"][RETAIN_LABEL] == "true"
    cluster.patch_spec("qwen", {"cache": {"retain": False}})
    owned = cluster.wait(lambda: (c := cluster.children(pvcs)["qwen-weights"])["metadata"].get("ownerReferences")
                         and c, "the claim owned once retain is off")
    assert owned["metadata"]["ownerReferences"][0]["uid"] == cluster.get("qwen")["metadata"]["uid"]
    cluster.patch_spec("qwen", {"cache": {"retain": True}})
    cluster.wait(lambda: not cluster.children(pvcs)["qwen-weights"]["metadata"].get("ownerReferences"),
                 "the owner reference removed again")
    cluster.delete("qwen")
    cluster.wait(lambda: cluster.get("qwen") is None, "the resource deleted")
    kept = cluster.children(pvcs)["qwen-weights"]          # nothing for the garbage collector to follow
    assert not kept["metadata"].get("ownerReferences")
