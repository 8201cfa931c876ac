"""End to end: the real kopf operator against the KMock-based API emulator over HTTP, driven with
the real kubernetes client (docs/testing.md#kmock). Each test starts a fresh emulator and operator."""
import copy
import json
import time

import pytest

from longserve.operator.render import CONFIG_HASH_ANNOTATION, HASH_LABEL

pytestmark = pytest.mark.timeout(60)

DEPLOYMENTS, CONFIGMAPS, SERVICES = "apps/v1/deployments", "v1/configmaps", "v1/services"
PDBS, JOBS, PVCS = "policy/v1/poddisruptionbudgets", "batch/v1/jobs", "v1/persistentvolumeclaims"
NETWORK_POLICIES = "networking.k8s.io/v1/networkpolicies"


def resource(name="qwen", **spec) -> dict:
    base = {"model": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M"}, "context": {"maxModelLen": 1010000},
            "accelerator": {"gpuProduct": "NVIDIA-H200"}, "cache": {"enabled": False}}
    base.update(spec)
    return {"apiVersion": "longserve.io/v1alpha1", "kind": "LongContextModel",
            "metadata": {"name": name, "namespace": "default"}, "spec": base}


def conditions(obj) -> dict:
    return {c["type"]: (c["status"], c["reason"]) for c in ((obj or {}).get("status") or {}).get("conditions", [])}


def config_map(cluster, name="qwen") -> dict | None:
    """The engine ConfigMap the workload mounts (its name carries the content hash)."""
    pods = [d["spec"]["template"] for n, d in cluster.children(DEPLOYMENTS).items() if n == name]
    pods += [s["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
             for s in cluster.children("leaderworkerset.x-k8s.io/v1/leaderworkersets").values()
             if s["metadata"]["labels"]["app.kubernetes.io/instance"] == name]
    if not pods:
        return None
    volume = next(v for v in pods[0]["spec"]["volumes"] if v["name"] == "engine-config")
    return cluster.children(CONFIGMAPS).get(volume["configMap"]["name"])


def engine_config(cluster, name="qwen") -> dict:
    cm = config_map(cluster, name)
    return json.loads(cm["data"]["engine_config.json"]) if cm else {}


def status_of(cluster, name="qwen") -> dict:
    return (cluster.get(name) or {}).get("status") or {}


def test_create_renders_children_with_planned_gpus_and_owner_refs(cluster):
    cluster.create(resource())
    uid = cluster.get("qwen")["metadata"]["uid"]
    deployment = cluster.wait(lambda: cluster.children(DEPLOYMENTS).get("qwen"), "the Deployment")
    engine = deployment["spec"]["template"]["spec"]["containers"][0]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for path, name in [(DEPLOYMENTS, "qwen"), (SERVICES, "qwen"), (PDBS, "qwen"), (CONFIGMAPS, None)]:
        obj = cluster.wait(
            lambda path=path, name=name: cluster.children(path).get(name) if name else config_map(cluster), path)
        owner = obj["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == \
            ("LongContextModel", "qwen", uid, True)
    assert engine_config(cluster)["tensor_parallel_size"] == 1
    st = cluster.wait(lambda: status_of(cluster).get("plan") and status_of(cluster), "status.plan")
    assert st["plan"]["tensorParallelSize"] == 1 and st["plan"]["prefillChunkTokens"] == 131072
    assert "TP=1" in st["plan"]["explanation"] and st["observedGeneration"] == 1
    assert conditions(cluster.get("qwen"))["SpecValid"] == ("True", "SpecValid")
    assert conditions(cluster.get("qwen"))["Sized"] == ("True", "PlanComputed")
    assert st["phase"] == "Starting" and st["endpoints"]["openai"] == "http://qwen.default.svc:8000/v1"
    # no controllers in the emulator: report the pod as ready; the timer refreshes status
    cluster.patch_status("apps/v1", "deployments", "qwen", {"replicas": 1, "readyReplicas": 1})
    cluster.wait(lambda: status_of(cluster).get("phase") == "Ready", "phase Ready")
    assert conditions(cluster.get("qwen"))["Ready"] == ("True", "AllConditionsMet")
    assert status_of(cluster)["readyReplicas"] == 1


def test_update_max_model_len_rolls_config_and_deployment(cluster):
    cluster.create(resource())
    cluster.wait(lambda: status_of(cluster).get("plan"), "the first plan")
    before = cluster.children(DEPLOYMENTS)["qwen"]
    config_before = config_map(cluster)
    cluster.patch_spec("qwen", {"context": {"maxModelLen": 524288}})
    cluster.wait(lambda: engine_config(cluster).get("max_model_len") == 524288, "the new engine config")
    after = cluster.wait(lambda: (d := cluster.children(DEPLOYMENTS)["qwen"])["metadata"]["labels"][HASH_LABEL]
                         != before["metadata"]["labels"][HASH_LABEL] and d, "the Deployment patched")
    annotation = after["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    assert annotation != before["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    assert annotation == config_map(cluster)["metadata"]["labels"][HASH_LABEL]
    assert config_before["metadata"]["labels"][HASH_LABEL] != annotation
    st = cluster.wait(lambda: status_of(cluster).get("observedGeneration") == 2 and status_of(cluster),
                      "status for generation 2")
    assert st["plan"]["maxModelLen"] == 524288
    assert after["metadata"]["uid"] == before["metadata"]["uid"]          # patched, not re-created


def test_hand_edited_deployment_is_repaired_by_the_timer(cluster):
    cluster.create(resource())
    cluster.wait(lambda: cluster.children(DEPLOYMENTS).get("qwen"), "the Deployment")
    edit = {"spec": {"replicas": 3, "template": {"spec": {"containers": [
        {"name": "engine", "image": "example.com/hacked:1", "resources": {"limits": {"nvidia.com/gpu": "2"}}}]}}}}
    cluster.apps.patch_namespaced_deployment("qwen", "default", edit)
    edited = cluster.children(DEPLOYMENTS)["qwen"]
    assert edited["spec"]["replicas"] == 3
    repaired = cluster.wait(lambda: (d := cluster.children(DEPLOYMENTS)["qwen"])["spec"]["replicas"] == 1 and d,
                            "the timer's drift repair")
    engine = repaired["spec"]["template"]["spec"]["containers"][0]
    assert engine["image"] == "ghcr.io/longserve/longserve:0.1.0"
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert engine["startupProbe"]["httpGet"]["path"] == "/health"


def test_deleted_child_is_recreated(cluster):
    cluster.create(resource())
    cluster.wait(lambda: cluster.children(SERVICES).get("qwen"), "the Service")
    cluster.api.delete("v1", "Service", "default", "qwen")
    assert "qwen" not in cluster.children(SERVICES)
    cluster.wait(lambda: cluster.children(SERVICES).get("qwen"), "the Service re-created")


def test_infeasible_spec_sets_sized_false_and_deploys_nothing(cluster):
    spec = {"model": {"uri": "hf://Qwen/Qwen2.5-14B-Instruct-1M"},
            "sizing": {"mode": "Manual", "tensorParallelSize": 1}}
    cluster.create(resource("big", **spec))
    cluster.wait(lambda: conditions(cluster.get("big")).get("Sized", ("",))[0] == "False", "Sized=False")
    st = status_of(cluster, "big")
    assert conditions(cluster.get("big"))["Sized"] == ("False", "Infeasible")
    assert conditions(cluster.get("big"))["Ready"] == ("False", "Infeasible")
    assert st["phase"] == "Failed" and "tokens fit" in st["conditions"][1]["message"]
    assert any(a["tensorParallelSize"] == 8 and a["fitsRequestedLength"] for a in st["plan"]["alternatives"])
    time.sleep(3 * 0.3)                                # a few timer ticks: still nothing deployed
    assert not cluster.children(DEPLOYMENTS) and not cluster.children(CONFIGMAPS)


def test_invalid_tp_is_rejected_with_a_clear_condition(cluster):
    spec = {"sizing": {"mode": "Manual", "tensorParallelSize": 8}}
    cluster.create(resource("tp8", **spec))
    cluster.wait(lambda: conditions(cluster.get("tp8")).get("SpecValid", ("",))[0] == "False", "SpecValid=False")
    valid = next(c for c in status_of(cluster, "tp8")["conditions"] if c["type"] == "SpecValid")
    assert valid["reason"] == "InvalidTP" and "valid: 1, 2, 4" in valid["message"]
    assert status_of(cluster, "tp8")["phase"] == "Failed" and not cluster.children(DEPLOYMENTS)


def test_dry_run_reports_the_plan_only(cluster):
    cluster.create(resource("dry", sizing={"mode": "DryRun", "objective": "MaxPrefillThroughput"}))
    st = cluster.wait(lambda: status_of(cluster, "dry").get("phase") == "Planned" and status_of(cluster, "dry"),
                      "phase Planned")
    assert st["plan"]["tensorParallelSize"] == 4 and st["plan"]["feasible"]
    assert conditions(cluster.get("dry"))["Ready"] == ("False", "DryRun")
    time.sleep(3 * 0.3)
    assert not cluster.children(DEPLOYMENTS) and not cluster.children(CONFIGMAPS) and not cluster.children(SERVICES)


def test_model_cache_gates_the_workload(cluster):
    cluster.create(resource("cached", cache={"enabled": True}))
    job = cluster.wait(lambda: cluster.children(JOBS).get("cached-download-main"), "the download Job")
    assert cluster.children(PVCS)["cached-weights"]["spec"]["resources"]["requests"]["storage"] == "33Gi"
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "cached-weights"
    cluster.wait(lambda: status_of(cluster, "cached").get("phase") == "Caching", "phase Caching")
    assert conditions(cluster.get("cached"))["ModelCached"] == ("False", "Downloading")
    assert "cached" not in cluster.children(DEPLOYMENTS)
    cluster.patch_status("batch/v1", "jobs", "cached-download-main", {"succeeded": 1})
    cluster.wait(lambda: cluster.children(DEPLOYMENTS).get("cached"), "the Deployment after the download")
    cluster.wait(lambda: "cached-download-main" not in cluster.children(JOBS), "the finished Job removed")
    st = cluster.wait(lambda: status_of(cluster, "cached").get("cache"), "status.cache")
    assert st["complete"] and st["revision"] == "main"
    assert conditions(cluster.get("cached"))["ModelCached"] == ("True", "DownloadComplete")


def test_failed_download_is_reported(cluster):
    cluster.create(resource("cached", cache={"enabled": True}))
    cluster.wait(lambda: cluster.children(JOBS).get("cached-download-main"), "the download Job")
    cluster.patch_status("batch/v1", "jobs", "cached-download-main", {"failed": 7, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    cluster.wait(lambda: conditions(cluster.get("cached")).get("ModelCached") == ("False", "DownloadFailed"),
                 "ModelCached=False/DownloadFailed")
    assert status_of(cluster, "cached")["phase"] == "Failed"
    assert "cached" not in cluster.children(DEPLOYMENTS)


def test_delete_leaves_only_owned_children_for_garbage_collection(cluster):
    cluster.create(resource())
    uid = cluster.get("qwen")["metadata"]["uid"]
    cluster.wait(lambda: len(cluster.children(DEPLOYMENTS)) == 1 and len(cluster.children(PDBS)) == 1, "children")
    cluster.delete("qwen")
    cluster.wait(lambda: cluster.get("qwen") is None, "the resource deleted (finalizer released)")
    # the emulator has no garbage collector: every child must point at the deleted owner
    for path in (DEPLOYMENTS, CONFIGMAPS, SERVICES, PDBS):
        for obj in cluster.children(path).values():
            assert [r["uid"] for r in obj["metadata"]["ownerReferences"]] == [uid]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_longserve_operator_command_runs_against_the_emulator(emulator, tmp_path):
    """The shipped entry point: kubeconfig login, liveness endpoint, reconcile, clean SIGTERM exit."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    import kubernetes

    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "longserve.server.cli", "operator", "--all-namespaces", "--kubeconfig", str(kubeconfig),
         f"--liveness-port={port}", "--metrics-port=0", "--timer-interval=0.3", "--log-format=plain"],
        env={**os.environ, "PYTHONSAFEPATH": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=emulator.url))
        kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(
            "longserve.io", "v1alpha1", "default", "longcontextmodels", resource())
        deadline = time.monotonic() + 30
        while "qwen" not in emulator.objects(DEPLOYMENTS, "default"):
            assert proc.poll() is None and time.monotonic() < deadline, "the operator did not reconcile"
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200
        requests = [r for r in list(emulator.emulator) if r.headers.get("Authorization")]   # the request log
        assert requests and all(r.headers["Authorization"] == "Bearer test-token" for r in requests)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output[-3000:]


def test_revision_change_downloads_beside_the_old_files_then_rolls_the_pods(cluster):
    """A new revision gets its own Job and directory; the running pods' Deployment and engine config
    stay on the old revision until that Job completes, then both move to the new directory."""
    from longserve.operator.render import MODEL_REVISION_ANNOTATION

    def dest(job):
        command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        return command[command.index("--dest") + 1]

    def template_annotations():
        return cluster.children(DEPLOYMENTS)["rev"]["spec"]["template"]["metadata"]["annotations"]

    cluster.create(resource("rev", cache={"enabled": True}, networkPolicy={"enabled": True}))
    first = cluster.wait(lambda: cluster.children(JOBS).get("rev-download-main"), "the first download Job")
    policy = cluster.wait(lambda: cluster.children(NETWORK_POLICIES).get("rev"), "the NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "rev"
    old_path = dest(first)
    assert old_path == "/models/Qwen--Qwen2.5-7B-Instruct-1M/main"
    cluster.patch_status("batch/v1", "jobs", "rev-download-main", {"succeeded": 1})
    cluster.wait(lambda: cluster.children(DEPLOYMENTS).get("rev"), "the Deployment on revision main")
    cluster.wait(lambda: "rev-download-main" not in cluster.children(JOBS), "the finished Job removed")
    before = copy.deepcopy(cluster.children(DEPLOYMENTS)["rev"])
    assert engine_config(cluster, "rev")["model_path"] == old_path
    assert template_annotations()[MODEL_REVISION_ANNOTATION] == "main"

    cluster.patch_spec("rev", {"model": {"revision": "v2"}})
    second = cluster.wait(lambda: cluster.children(JOBS).get("rev-download-v2"), "the download Job for v2")
    assert dest(second) == "/models/Qwen--Qwen2.5-7B-Instruct-1M/v2"
    assert not dest(second).startswith(old_path + "/") and dest(second) != old_path
    cluster.wait(lambda: conditions(cluster.get("rev")).get("ModelCached") == ("False", "Downloading"),
                 "ModelCached=False while v2 downloads")
    time.sleep(3 * 0.3)                                    # a few timer ticks: the pods stay on main
    held = cluster.children(DEPLOYMENTS)["rev"]
    assert held["spec"]["template"] == before["spec"]["template"]
    assert held["metadata"]["labels"][HASH_LABEL] == before["metadata"]["labels"][HASH_LABEL]
    assert engine_config(cluster, "rev")["model_path"] == old_path

    cluster.patch_status("batch/v1", "jobs", "rev-download-v2", {"succeeded": 1})
    rolled = cluster.wait(lambda: template_annotations()[MODEL_REVISION_ANNOTATION] == "v2"
                          and cluster.children(DEPLOYMENTS)["rev"], "the Deployment rolled to v2")
    assert engine_config(cluster, "rev")["model_path"] == "/models/Qwen--Qwen2.5-7B-Instruct-1M/v2"
    assert rolled["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] != \
        before["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    assert rolled["metadata"]["uid"] == before["metadata"]["uid"]          # patched: a rolling update
    st = cluster.wait(lambda: (status_of(cluster, "rev").get("cache") or {}).get("revision") == "v2"
                      and status_of(cluster, "rev"), "status.cache on v2")
    assert st["cache"]["complete"]
    cluster.wait(lambda: "rev-download-v2" not in cluster.children(JOBS), "the v2 Job removed")


# --- tensor parallelism: a TP Deployment, and a LeaderWorkerSet for a replica spanning nodes ---

LWS = "leaderworkerset.x-k8s.io/v1/leaderworkersets"


def test_tp_example_renders_a_deployment_with_tp_args_and_shm(cluster):
    from pathlib import Path

    import yaml
    body = yaml.safe_load((Path(__file__).resolve().parents[2] / "manifests/examples/qwen25-7b-1m-a100x4.yaml")
                          .read_text())
    body["metadata"]["namespace"] = "default"
    body["spec"]["cache"] = {"enabled": False}        # no download Job to wait for
    cluster.create(body)
    name = body["metadata"]["name"]
    deployment = cluster.wait(lambda: cluster.children(DEPLOYMENTS).get(name), "the TP Deployment")
    pod = deployment["spec"]["template"]["spec"]
    engine = pod["containers"][0]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {e["name"]: e.get("value") for e in engine["env"]}["OMP_NUM_THREADS"] == "3"
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert engine_config(cluster, name)["tensor_parallel_size"] == 4
    st = cluster.wait(lambda: status_of(cluster, name).get("layout") and status_of(cluster, name), "status.layout")
    assert st["layout"] == {"gpusPerReplica": 4, "gpusPerPod": 4, "podsPerReplica": 1, "nodesPerReplica": 1,
                            "workload": {"kind": "Deployment", "name": name}}
    assert not cluster.children(LWS)


def test_plan_spanning_nodes_runs_a_leader_worker_set(cluster):
    spec = {"model": {"uri": "hf://Qwen/Qwen2.5-14B-Instruct-1M"},
            "accelerator": {"gpuProduct": "NVIDIA-L40S", "gpusPerNode": 4, "nodes": 2}}
    cluster.create(resource("big", **spec))
    uid = cluster.get("big")["metadata"]["uid"]
    lws = cluster.wait(lambda: cluster.children(LWS).get("big-group"), "the LeaderWorkerSet")
    assert [r["uid"] for r in lws["metadata"]["ownerReferences"]] == [uid]       # deleted with the resource
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader = group["leaderTemplate"]["spec"]["containers"][0]
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == "4" and "startupProbe" in leader
    assert "ports" not in group["workerTemplate"]["spec"]["containers"][0]
    headless = cluster.wait(lambda: cluster.children(SERVICES).get("big-group"), "the group's headless Service")
    assert headless["spec"]["clusterIP"] == "None"
    client = cluster.wait(lambda: cluster.children(SERVICES).get("big"), "the client Service")
    assert client["spec"]["selector"]["longserve.io/role"] == "leader"
    assert "big" not in cluster.children(DEPLOYMENTS)
    assert engine_config(cluster, "big")["tensor_parallel_size"] == 8
    st = cluster.wait(lambda: status_of(cluster, "big").get("layout") and status_of(cluster, "big"), "status.layout")
    assert st["layout"] == {"gpusPerReplica": 8, "gpusPerPod": 4, "podsPerReplica": 2, "nodesPerReplica": 2,
                            "workload": {"kind": "LeaderWorkerSet", "name": "big-group"}}
    assert st["phase"] == "Starting" and st["plan"]["podsPerReplica"] == 2
    assert conditions(cluster.get("big"))["WorkloadAvailable"] == ("False", "Progressing")
    # the LeaderWorkerSet's readiness (a group counts once all its pods are ready) drives the status;
    # its Progressing=False beside Available=True is normal for this kind
    cluster.patch_status("leaderworkerset.x-k8s.io/v1", "leaderworkersets", "big-group", {
        "replicas": 1, "readyReplicas": 1, "conditions": [
            {"type": "Available", "status": "True", "reason": "AllGroupsReady", "message": ""},
            {"type": "Progressing", "status": "False", "reason": "GroupsProgressing", "message": ""}]})
    cluster.wait(lambda: status_of(cluster, "big").get("phase") == "Ready", "phase Ready from the LeaderWorkerSet")
    assert conditions(cluster.get("big"))["WorkloadAvailable"] == ("True", "MinimumReplicasAvailable")
    # drift repair: a hand-edited group size is put back by the timer
    cluster.api.request("PATCH", "/apis/leaderworkerset.x-k8s.io/v1/namespaces/default/leaderworkersets/big-group",
                        {"spec": {"leaderWorkerTemplate": {"size": 5}}}, content_type="application/merge-patch+json")
    cluster.wait(lambda: cluster.children(LWS)["big-group"]["spec"]["leaderWorkerTemplate"]["size"] == 2,
                 "the group size repaired")
    # a bigger GPU fits within one node: the Deployment replaces the LeaderWorkerSet and its Service
    cluster.patch_spec("big", {"accelerator": {"gpuProduct": "NVIDIA-H100-80GB-HBM3", "gpusPerNode": 8, "nodes": 2}})
    cluster.wait(lambda: cluster.children(DEPLOYMENTS).get("big"), "the Deployment")
    cluster.wait(lambda: "big-group" not in cluster.children(LWS), "the LeaderWorkerSet deleted")
    cluster.wait(lambda: "big-group" not in cluster.children(SERVICES), "the headless Service deleted")
    st = cluster.wait(lambda: (s := status_of(cluster, "big")).get("layout", {}).get("podsPerReplica") == 1 and s,
                      "the layout of one pod")
    assert st["layout"]["workload"] == {"kind": "Deployment", "name": "big"}
    assert "longserve.io/role" not in cluster.children(SERVICES)["big"]["spec"]["selector"]


def test_plan_spanning_nodes_without_the_leader_worker_set_api_says_so(cluster):
    resources = cluster.emulator.emulator.resources
    declared = resources.pop(LWS_PATH := "leaderworkerset.x-k8s.io/v1/leaderworkersets")      # no LWS controller
    spec = {"model": {"uri": "hf://Qwen/Qwen2.5-14B-Instruct-1M"},
            "accelerator": {"gpuProduct": "NVIDIA-L40S", "gpusPerNode": 4, "nodes": 2}}
    cluster.create(resource("big", **spec))
    cluster.wait(lambda: (conditions(cluster.get("big")).get("WorkloadAvailable", ("", ""))[1]
                          == "LeaderWorkerSetUnavailable"),
                 "WorkloadAvailable=False LeaderWorkerSetUnavailable")
    assert status_of(cluster, "big")["phase"] == "Starting"
    assert conditions(cluster.get("big"))["Ready"] == ("False", "LeaderWorkerSetUnavailable")
    cluster.wait(lambda: cluster.children(SERVICES).get("big"), "the rest is applied")
    resources[LWS_PATH] = declared                  # the controller is installed: the timer creates the group
    cluster.wait(lambda: cluster.children(LWS).get("big-group"), "the LeaderWorkerSet")
    cluster.wait(lambda: conditions(cluster.get("big"))["WorkloadAvailable"] == ("False", "Progressing"),
                 "WorkloadAvailable from the LeaderWorkerSet")
