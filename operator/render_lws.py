"""A replica spanning nodes: the engine Deployment's pod turned into a LeaderWorkerSet group (pure).

When the plan puts a replica on several pods (`plan.pods_per_replica > 1`: TP larger than one
node's GPUs), each replica is one LeaderWorkerSet group (`leaderworkerset.x-k8s.io/v1`) of that
many pods, one per node, each with `plan.gpus_per_pod` GPUs. The pods are the Deployment's pod
(same image, config, volumes, security context and `spec.pod` knobs, built by render.py) with:

- leader (worker index 0, global ranks 0..G-1): serves HTTP/gRPC; keeps the startup budget and
  the probes; opens the rendezvous port; the client Service selects it alone (role label);
- workers: the same command, no ports and no probes (they serve nothing; a worker whose peer
  dies exits non-zero, and `RecreateGroupOnPodRestart` re-forms the whole group);
- ranks and the rendezvous address come from the variables LeaderWorkerSet injects into every
  container (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX); the native process group's
  start-up (LONGSERVE_DIST_INIT_TIMEOUT, as for any TP pod) waits as long as the startup budget, so
  a worker that starts before a slow leader does not give up early;
  vllm/sglang pods run those runtimes' own multi-node launch (runtimes.multi_node_command).

`startupPolicy: LeaderCreated`: the workers start with the leader. LeaderReady would deadlock, as
the leader only reports ready once every worker has joined its process group.

A headless Service named after the LeaderWorkerSet gives the pods the DNS names behind
LWS_LEADER_ADDRESS (`<lws>-<group>.<lws>.<namespace>`); the LeaderWorkerSet controller creates
one itself only when none exists, so rendering it keeps it owned, repaired and deleted with the
resource. It publishes not-ready addresses: the workers must find the leader before it is ready.
"""
from __future__ import annotations

import copy

from longserve.operator import runtimes
from longserve.operator.planner import Plan

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_KIND = "LeaderWorkerSet"
ROLE_LABEL = "longserve.io/role"
GROUP_SUFFIX = "-group"


def group_name(name: str) -> str:
    """The LeaderWorkerSet's (and its headless Service's) name: the client Service keeps the
    resource's own name, and the group's DNS needs a headless Service of the LeaderWorkerSet's."""
    return f"{name}{GROUP_SUFFIX}"


def _container(template: dict) -> dict:
    return template["spec"]["containers"][0]


def _role_template(base: dict, role: str, runtime: str, pods: int, startup_seconds: int, user_env: set) -> dict:
    template = copy.deepcopy(base)
    template["metadata"]["labels"][ROLE_LABEL] = role
    container = _container(template)
    container["command"] = runtimes.multi_node_command(
        runtime, container["command"], leader=role == "leader", pods=pods, startup_seconds=startup_seconds)
    env = [e for e in runtimes.multi_node_env(runtime) if e["name"] not in user_env]
    container["env"] = container["env"] + env
    if role == "leader":
        container["ports"] = container["ports"] + [runtimes.rendezvous_port(runtime)]
    else:
        for key in ("ports", "startupProbe", "readinessProbe", "livenessProbe"):
            container.pop(key, None)
    return template


def leader_worker_set(meta: dict, deployment: dict, p: Plan, runtime: str, replicas: int,
                      startup_seconds: int, user_env: set) -> dict:
    """The LeaderWorkerSet for a multi-pod plan, from the rendered Deployment (its pod template and
    metadata); `meta` is the object's metadata (name, namespace, labels, owner)."""
    base = deployment["spec"]["template"]
    pods = p.pods_per_replica
    leader = _role_template(base, "leader", runtime, pods, startup_seconds, user_env)
    worker = _role_template(base, "worker", runtime, pods, startup_seconds, user_env)
    return {
        "apiVersion": LWS_API_VERSION, "kind": LWS_KIND, "metadata": meta,
        "spec": {"replicas": replicas, "startupPolicy": "LeaderCreated",
                 "rolloutStrategy": {"type": "RollingUpdate",
                                     "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0}},
                 "networkConfig": {"subdomainPolicy": "Shared"},
                 "leaderWorkerTemplate": {"size": pods, "restartPolicy": "RecreateGroupOnPodRestart",
                                          "leaderTemplate": leader, "workerTemplate": worker}}}


def headless_service(meta: dict, pod_selector: dict) -> dict:
    """DNS for the group's pods (no ports: the rendezvous and NCCL connect pod to pod)."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": dict(pod_selector)}}


def shared_claim(pvc: dict) -> dict:
    """The cache claim the operator creates, mountable by the pods of a group on several nodes
    (ReadWriteMany: the download Job writes it, every pod reads it; the storage class must offer
    it, e.g. NFS or a cloud file store). A claim given as cache.existingClaim is the user's."""
    out = copy.deepcopy(pvc)
    out["spec"]["accessModes"] = ["ReadWriteMany"]
    return out


def group_alerts(rule: dict, namespace: str, name: str) -> dict:
    """The replicas-not-ready alert on a LeaderWorkerSet: its leaders' StatefulSet (named after it,
    one leader per group) has a ready leader only once every rank of the group has joined and
    loaded, so ready leaders below desired means groups that do not serve."""
    out = copy.deepcopy(rule)
    sts = f'namespace="{namespace}",statefulset="{name}"'
    for group in out["spec"]["groups"]:
        for r in group["rules"]:
            if r["alert"] == "LongServeReplicasNotReady":
                r["expr"] = f"kube_statefulset_status_replicas_ready{{{sts}}} < kube_statefulset_replicas{{{sts}}}"
    return out


def leader_only(service: dict) -> dict:
    """The client Service selects the leaders: the workers serve no API."""
    out = copy.deepcopy(service)
    out["spec"]["selector"] = {**out["spec"]["selector"], ROLE_LABEL: "leader"}
    return out


def with_group_traffic(policy: dict, pod_selector: dict) -> dict:
    """The NetworkPolicy also admits the group's own pods on every port: the rendezvous port and
    the connections NCCL/gloo open between ranks (ephemeral ports)."""
    out = copy.deepcopy(policy)
    out["spec"]["ingress"] = out["spec"]["ingress"] + [{"from": [{"podSelector": {"matchLabels": dict(pod_selector)}}]}]
    return out
