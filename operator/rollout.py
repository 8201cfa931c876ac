"""Rollouts that do not cut long requests: strategy, drain and grace, PDB, hashed engine config.

Pure (standard library only). What is decided here, and why:

- **Drain and grace from the worst request.** A pod being replaced or scaled in gets SIGTERM; the
  native server then stops taking requests and lets running ones finish for `--drain-grace-seconds`
  before it aborts them. A 1M-token prefill takes minutes, so the drain is the time of the longest
  request this plan admits — a prefill of `maxModelLen` tokens plus `maxOutputTokens` of decode —
  estimated from documented throughput assumptions (`PREFILL_FLOPS_PER_GPU`, `DECODE_TOKENS_PER_SECOND`;
  the planner sizes memory, not time). `spec.rollout.drainSeconds` overrides it;
  terminationGracePeriodSeconds is the drain plus `EXIT_MARGIN_SECONDS` (or the override).
- **No surge by default.** A surge pod waits for GPUs the old pod holds; `spec.rollout.maxSurge`
  and `maxUnavailable` change it where spare GPUs exist.
- **A PDB that means something at one replica.** `maxUnavailable: 1` lets a node drain evict the
  only replica (an outage); so at one replica the PDB is `minAvailable: 1`: voluntary evictions wait
  until someone scales up (or moves the model), while `unhealthyPodEvictionPolicy: AlwaysAllow` keeps
  a broken pod from blocking drains. `spec.rollout.protectSingleReplica: false` restores
  `maxUnavailable: 1`. With two or more replicas, one at a time may go.
- **Engine config by content hash.** The ConfigMap is `<name>-engine-<hash>`, immutable; a new
  config is a new object, so pods of the old ReplicaSet keep mounting the config they started with.
  An old ConfigMap is deleted only once the workload runs the new template everywhere and is ready.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from longserve.operator.errors import SpecError

PREFILL_FLOPS_PER_GPU = 30e12        # sustained, effective: long-context prefill (sparse attention on)
DECODE_TOKENS_PER_SECOND = 20.0      # per sequence at full context (memory-bound)
EXIT_MARGIN_SECONDS = 30             # after the drain: flush, close connections, exit
MIN_DRAIN_SECONDS = 30
MAX_DRAIN_SECONDS = 3600
CONFIG_COMPONENT = "config"


@dataclass(frozen=True, slots=True)
class RolloutOptions:
    max_surge: int | str = 0
    max_unavailable: int | str = 1
    drain_seconds: int | None = None
    termination_grace_seconds: int | None = None
    protect_single_replica: bool = True


def _int_or_percent(value, where: str) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit() and int(value[:-1]) <= 100:
        return value
    raise SpecError("InvalidSpec", f"{where} must be a non-negative integer or a percentage such as 25%, got {value!r}")


def _seconds(value, where: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError("InvalidSpec", f"{where} must be an integer within [{low}, {high}], got {value!r}")
    return value


def rollout_options(spec: dict) -> RolloutOptions:
    """`spec.rollout`, validated; maxSurge and maxUnavailable may not both be zero."""
    value = spec.get("rollout")
    if value is None:
        return RolloutOptions()
    if not isinstance(value, dict):
        raise SpecError("InvalidSpec", "spec.rollout must be an object")
    surge = _int_or_percent(value.get("maxSurge", 0), "spec.rollout.maxSurge")
    unavailable = _int_or_percent(value.get("maxUnavailable", 1), "spec.rollout.maxUnavailable")
    if str(surge).rstrip("%") == "0" and str(unavailable).rstrip("%") == "0":
        raise SpecError("InvalidSpec",
                        "spec.rollout.maxSurge and maxUnavailable cannot both be 0 (no rollout could progress)")
    drain = _seconds(value.get("drainSeconds"), "spec.rollout.drainSeconds", 0, 86400)
    grace = _seconds(value.get("terminationGracePeriodSeconds"), "spec.rollout.terminationGracePeriodSeconds", 1, 86400)
    if drain is not None and grace is not None and grace <= drain:
        raise SpecError("InvalidSpec", "spec.rollout.terminationGracePeriodSeconds must exceed drainSeconds "
                                       "(the kubelet kills the pod at the grace period)")
    protect = value.get("protectSingleReplica", True)
    if not isinstance(protect, bool):
        raise SpecError("InvalidSpec", "spec.rollout.protectSingleReplica must be a boolean")
    return RolloutOptions(surge, unavailable, drain, grace, protect)


def worst_request_seconds(max_model_len: int, max_output_tokens: int, weight_bytes: int, dtype_bytes: int,
                          gpus: int) -> float:
    """Prefill of `max_model_len` tokens (2·params FLOPs per token over `gpus` GPUs) plus the decode
    of `max_output_tokens` at DECODE_TOKENS_PER_SECOND."""
    params = weight_bytes / max(1, dtype_bytes)
    prefill = max_model_len * 2 * params / (PREFILL_FLOPS_PER_GPU * max(1, gpus))
    return prefill + max_output_tokens / DECODE_TOKENS_PER_SECOND


def drain_seconds(opts: RolloutOptions, worst_seconds: float) -> int:
    if opts.drain_seconds is not None:
        return opts.drain_seconds
    return int(min(MAX_DRAIN_SECONDS, max(MIN_DRAIN_SECONDS, math.ceil(worst_seconds))))


def grace_seconds(opts: RolloutOptions, drain: int) -> int:
    return opts.termination_grace_seconds if opts.termination_grace_seconds is not None else drain + EXIT_MARGIN_SECONDS


def with_drain(command: list[str], runtime: str, drain: int, user_args: int) -> list[str]:
    """The native server's drain flag, placed before the user's extra arguments (theirs win)."""
    if runtime != "native":
        return command      # vLLM/SGLang: the grace period is all Kubernetes can give them
    at = len(command) - user_args
    return command[:at] + ["--drain-grace-seconds", str(drain)] + command[at:]


def strategy(opts: RolloutOptions) -> dict:
    return {"type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": opts.max_surge, "maxUnavailable": opts.max_unavailable}}


def pdb_spec(opts: RolloutOptions, replicas: int, match_labels: dict, pods_per_replica: int = 1) -> dict:
    """Counts pods: a replica spanning nodes (a LeaderWorkerSet group) is lost with any of its pods,
    so one protected replica means all of its pods; with several, one pod (one group) at a time."""
    spec = {"selector": {"matchLabels": match_labels}, "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    if replicas <= 1 and opts.protect_single_replica:
        spec["minAvailable"] = max(1, pods_per_replica)
    else:
        spec["maxUnavailable"] = 1
    return spec


def config_map_name(name: str, data_hash: str) -> str:
    return f"{name}-engine-{data_hash}"


def rolled_out(workload: dict | None) -> bool:
    """The workload runs its current template on every replica and all are ready (a Deployment, or
    a LeaderWorkerSet, which reports the same counts)."""
    if not workload:
        return False
    meta, spec, st = workload.get("metadata") or {}, workload.get("spec") or {}, workload.get("status") or {}
    observed = st.get("observedGeneration")
    if observed is not None and observed < (meta.get("generation") or 0):
        return False
    want = int(spec.get("replicas", 1) or 0)
    updated, ready, current = (int(st.get(k) or 0) for k in ("updatedReplicas", "readyReplicas", "replicas"))
    return updated >= want and ready >= want and current <= want


def workloads_rolled_out(desired: list[dict], live: list[dict], kinds: tuple) -> bool:
    """Every rendered workload exists live with the rendered labels (so its spec-hash label: the
    current template was applied) and has rolled out."""
    live_by_key = {(o["kind"], o["metadata"]["name"]): o for o in live}
    wanted = [o for o in desired if o["kind"] in kinds]
    for obj in wanted:
        current = live_by_key.get((obj["kind"], obj["metadata"]["name"]))
        labels = (current or {}).get("metadata", {}).get("labels") or {}
        if current is None or any(labels.get(k) != v for k, v in obj["metadata"]["labels"].items()) \
                or not rolled_out(current):
            return False
    return bool(wanted)


def hold_old_configs(actions: list, live: list[dict], rolled: bool) -> list:
    """Drop deletions of engine ConfigMaps until the workload has rolled out its current template
    (pods of the old ReplicaSet still mount theirs)."""
    if rolled:
        return actions
    component = {(o["kind"], o["metadata"]["name"]): (o["metadata"].get("labels") or {}).get(
        "app.kubernetes.io/component") for o in live}
    return [a for a in actions if not (
        a.verb == "delete" and a.kind == "ConfigMap" and component.get((a.kind, a.name)) == CONFIG_COMPONENT)]
