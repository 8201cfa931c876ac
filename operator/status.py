"""Pure status: phase, conditions and the public plan from the sizing outcome and child states.

Condition semantics follow docs/operator.md#conditions: SpecValid, Sized, ModelCached (only when the operator
downloads), WorkloadAvailable, CapacityVerified and the Ready roll-up, whose reason is the first
failing condition's. `lastTransitionTime` changes only when a condition's status changes.
"""
from __future__ import annotations

from longserve.operator.render import Desired, selector
from longserve.operator.render_lws import LWS_KIND, group_name
from longserve.operator.types import SpecError

GB = 1e9


def condition(type_: str, status: bool | None, reason: str, message: str = "") -> dict:
    value = "Unknown" if status is None else ("True" if status else "False")
    return {"type": type_, "status": value, "reason": reason, "message": message}


def merge_conditions(previous: list | None, current: list[dict], now: str, generation: int) -> list[dict]:
    """Stamp times and generation; keep the old transition time while a status is unchanged."""
    before = {c.get("type"): c for c in previous or []}
    merged = []
    for cond in current:
        old = before.get(cond["type"])
        since = old.get("lastTransitionTime") if old and old.get("status") == cond["status"] else None
        merged.append({**cond, "lastTransitionTime": since or now, "observedGeneration": generation})
    return merged


def public_plan(d: Desired) -> dict:
    """The plan as shown in status (docs/operator.md#status): camelCase, per-GPU terms in GB."""
    data = d.plan.to_dict()
    per_gpu = data.pop("perGpuBytes")
    data["perGpuGB"] = {k: round(v / GB, 1) for k, v in per_gpu.items()}
    if d.plan.feasible:
        data.pop("alternatives")
        data.update(shmSize=d.shm_size, startupProbeSeconds=d.startup_probe_seconds)
    data["specHash"] = d.spec_hash
    return data


def layout(d: Desired) -> dict:
    """How one replica is laid out: its GPUs, pods and nodes, and the workload that runs it."""
    lcm, p = d.resource, d.plan
    multi = p.multi_node
    return {"gpusPerReplica": p.tensor_parallel_size, "gpusPerPod": p.gpus_per_pod,
            "podsPerReplica": p.pods_per_replica, "nodesPerReplica": p.pods_per_replica,
            "workload": {"kind": LWS_KIND if multi else "Deployment",
                         "name": group_name(lcm.name) if multi else lcm.name}}


def workload(deployment: dict | None, replicas: int, kind: str = "Deployment") -> tuple[dict, int, int]:
    """WorkloadAvailable from the workload's status (a Deployment, or a LeaderWorkerSet whose
    replicas are groups: a group is ready when all its pods are), with its replica counts."""
    if deployment is None:
        return condition("WorkloadAvailable", False, "Progressing", f"the {kind} is being created"), 0, 0
    st = deployment.get("status") or {}
    current, ready = int(st.get("replicas") or 0), int(st.get("readyReplicas") or 0)
    # a Deployment's Progressing=False means its deadline passed; a LeaderWorkerSet sets it False
    # whenever it is Available (the two exclude each other), so only the Deployment's counts
    for cond in (st.get("conditions") or []) if kind == "Deployment" else []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return condition("WorkloadAvailable", False, cond.get("reason") or "ProgressDeadlineExceeded",
                             cond.get("message") or ""), current, ready
    if replicas == 0:
        return condition("WorkloadAvailable", False, "ScaledToZero", "spec.replicas is 0"), current, ready
    if ready == 0:
        return condition("WorkloadAvailable", False, "Progressing",
                         f"0 of {replicas} replicas ready (loading weights takes minutes)"), current, ready
    return condition("WorkloadAvailable", True, "MinimumReplicasAvailable",
                     f"{ready} of {replicas} replicas ready"), current, ready


def _ready(conds: list[dict]) -> dict:
    for cond in conds:
        if cond["status"] == "False" or (cond["status"] == "Unknown" and cond["type"] != "CapacityVerified"):
            return condition("Ready", False, cond["reason"], f"{cond['type']}: {cond['message']}".rstrip(": "))
    return condition("Ready", True, "AllConditionsMet", "serving")


def invalid_status(error: SpecError) -> tuple[str, list[dict]]:
    conds = [condition("SpecValid", False, error.reason, error.message),
             condition("Sized", None, "NotSized", "the spec is invalid")]
    return "Failed", conds + [_ready(conds)]


def build_status(d: Desired, *, namespace: str, deployment: dict | None, cache_state: str | None,
                 capacity: dict | None = None, workload_api_missing: bool = False) -> dict:
    """Status for a parsed, sized resource. `deployment`: the live workload (the Deployment, or the
    LeaderWorkerSet of a plan spanning nodes). `cache_state`: None (no download), "Downloading",
    "DownloadFailed" or "DownloadComplete"."""
    lcm, p = d.resource, d.plan
    conds = [condition("SpecValid", True, "SpecValid", "")]
    status = {"plan": public_plan(d), "selector": ",".join(f"{k}={v}" for k, v in sorted(selector(lcm).items())),
              "replicas": 0, "readyReplicas": 0}
    if not p.feasible:
        conds.append(condition("Sized", False, "Infeasible", p.explanation))
        return {**status, "phase": "Failed", "conditions": conds + [_ready(conds)]}
    conds.append(condition("Sized", True, "PlanComputed", p.explanation))
    status["layout"] = layout(d)
    if lcm.mode == "DryRun":
        conds.append(condition("Ready", False, "DryRun", "plan only: sizing.mode is DryRun, nothing is deployed"))
        return {**status, "phase": "Planned", "conditions": conds}
    if cache_state is not None:
        conds.append(condition("ModelCached", cache_state == "DownloadComplete", cache_state,
                               f"{lcm.model.uri}@{lcm.model.revision}"))
    available, current, ready = workload(deployment, lcm.replicas, layout(d)["workload"]["kind"])
    if cache_state in ("Downloading", "DownloadFailed") and deployment is None:
        available = condition("WorkloadAvailable", False, "WaitingForCache",
                              "the engine starts once the cache is filled")
    elif workload_api_missing:        # the plan spans nodes and the cluster has no LeaderWorkerSet API
        available = condition("WorkloadAvailable", False, "LeaderWorkerSetUnavailable",
                              f"a replica spans {p.pods_per_replica} nodes: install the LeaderWorkerSet "
                              "controller (leaderworkerset.x-k8s.io/v1)")
    conds.append(available)
    # `capacity`: the CapacityVerified condition from a probe of a ready pod (handlers.py, capacity.py)
    conds.append(capacity or condition("CapacityVerified", None, "NotMeasured", "engine KV capacity not reported yet"))
    if cache_state == "DownloadFailed":
        phase = "Failed"
    elif cache_state == "Downloading":
        phase = "Caching"
    elif available["status"] == "True":
        phase = "Ready" if ready >= lcm.replicas else "Degraded"
    else:
        phase = "Pending" if lcm.replicas == 0 else "Starting"
    host = f"{lcm.name}.{namespace}.svc"
    endpoints = {"openai": f"http://{host}:{lcm.http_port}/v1"}
    if lcm.runtime == "native":
        endpoints["grpc"] = f"{host}:{lcm.grpc_port}"
    return {**status, "phase": phase, "conditions": conds + [_ready(conds)], "replicas": current,
            "readyReplicas": ready, "endpoints": endpoints}
