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
