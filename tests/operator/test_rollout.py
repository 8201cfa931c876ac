"""Rollout rules (rollout.py): drain and grace from the plan, strategy, PDB at one replica, hashed config."""
import copy

import pytest

from longserve.operator import rollout
from longserve.operator.diff import diff
from longserve.operator.render import desired
from longserve.operator.types import SpecError

BODY = {"apiVersion": "longserve.io/v1alpha1", "kind": "LongContextModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
        "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M"}, "context": {"maxModelLen": 1010000},
                 "accelerator": {"gpuProduct": "NVIDIA-H200"}, "cache": {"enabled": False}}}


def body(**spec):
    out = copy.deepcopy(BODY)
    out["spec"].update(spec)
    return out


def kind(objects, k):
    return next(o for o in objects if o["kind"] == k)


def test_drain_covers_the_longest_request_and_the_grace_exceeds_it():
    d = desired(body())
    pod = kind(d.objects, "Deployment")["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    drain = int(command[command.index("--drain-grace-seconds") + 1])
    # 7.6B params: 1,010,000 tokens x 2 x params / 30 TFLOP/s, plus 8192 tokens at 20 tokens/s
    params = d.model.weight_bytes / d.model.dtype_bytes
    expected = 1010000 * 2 * params / rollout.PREFILL_FLOPS_PER_GPU + 8192 / rollout.DECODE_TOKENS_PER_SECOND
    assert drain == min(rollout.MAX_DRAIN_SECONDS, -(-int(expected * 1000) // 1000))
    assert 600 < drain < 1800
    assert pod["terminationGracePeriodSeconds"] == drain + rollout.EXIT_MARGIN_SECONDS


def test_overrides_and_user_flags_win():
    d = desired(body(rollout={"drainSeconds": 120, "terminationGracePeriodSeconds": 200, "maxSurge": 1,
                              "maxUnavailable": 0},
                     runtime={"extraArgs": ["--drain-grace-seconds", "90"]}))
    dep = kind(d.objects, "Deployment")
    command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-4:] == ["--drain-grace-seconds", "120", "--drain-grace-seconds", "90"]   # argparse: last wins
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 200
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


@pytest.mark.parametrize("rollout_spec, message", [
    ({"maxSurge": 0, "maxUnavailable": 0}, "cannot both be 0"),
    ({"maxSurge": "150%"}, "percentage"),
    ({"drainSeconds": 100, "terminationGracePeriodSeconds": 100}, "must exceed drainSeconds"),
    ({"protectSingleReplica": "yes"}, "boolean"),
])
def test_bad_rollout_options_are_rejected(rollout_spec, message):
    with pytest.raises(SpecError, match=message):
        desired(body(rollout=rollout_spec))


def test_pdb_protects_a_single_replica_unless_told_not_to():
    one = kind(desired(body()).objects, "PodDisruptionBudget")["spec"]
    assert one["minAvailable"] == 1 and "maxUnavailable" not in one
    assert one["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert one["selector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    two = kind(desired(body(replicas=2)).objects, "PodDisruptionBudget")["spec"]
    assert two["maxUnavailable"] == 1 and "minAvailable" not in two
    off = kind(desired(body(rollout={"protectSingleReplica": False})).objects, "PodDisruptionBudget")["spec"]
    assert off["maxUnavailable"] == 1


def test_service_selects_engine_pods_only():
    service = kind(desired(body()).objects, "Service")
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "engine"


def test_config_map_name_follows_its_content():
    a, b = desired(body()), desired(body(context={"maxModelLen": 524288}))
    cm_a, cm_b = kind(a.objects, "ConfigMap"), kind(b.objects, "ConfigMap")
    assert cm_a["metadata"]["name"] != cm_b["metadata"]["name"] and cm_a["immutable"]
    want = kind(desired(body()).objects, "ConfigMap")["metadata"]["name"]
    assert kind(a.objects, "ConfigMap")["metadata"]["name"] == want


def live_of(objects, **status):
    live = copy.deepcopy(objects)
    for obj in live:
        obj["metadata"]["generation"] = 2
        if obj["kind"] == "Deployment":
            obj["status"] = status
    return live


def test_old_config_map_is_deleted_only_after_the_rollout():
    old = desired(body()).objects
    new = desired(body(context={"maxModelLen": 524288})).objects
    # the new template is applied but its pods are not ready: the old ConfigMap stays
    live = live_of(new, observedGeneration=2, replicas=2, updatedReplicas=1, readyReplicas=1) + [kind(old, "ConfigMap")]
    actions = diff(new, live)
    assert any(a.verb == "delete" and a.kind == "ConfigMap" for a in actions)
    rolled = rollout.workloads_rolled_out(new, live, ("Deployment",))
    assert not rolled and not rollout.hold_old_configs(actions, live, rolled)
    # every pod on the new template and ready: deleted
    live = live_of(new, observedGeneration=2, replicas=1, updatedReplicas=1, readyReplicas=1) + [kind(old, "ConfigMap")]
    rolled = rollout.workloads_rolled_out(new, live, ("Deployment",))
    assert rolled and [a.name for a in rollout.hold_old_configs(diff(new, live), live, rolled)] == \
        [kind(old, "ConfigMap")["metadata"]["name"]]
    # a live Deployment still on the old template has not rolled out, whatever its counts say
    live = live_of(old, observedGeneration=2, replicas=1, updatedReplicas=1, readyReplicas=1)
    assert not rollout.workloads_rolled_out(new, live, ("Deployment",))


def test_a_group_spanning_nodes_gets_the_rollout_and_a_whole_group_pdb():
    spec = {"model": {"uri": "hf://Qwen/Qwen2.5-14B-Instruct-1M"}, "cache": {"enabled": False},
            "accelerator": {"gpuProduct": "NVIDIA-L40S", "gpusPerNode": 4, "nodes": 2}}
    base = {**BODY, "spec": spec}
    d = desired(base)
    lws = kind(d.objects, "LeaderWorkerSet")
    assert lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] == {"maxUnavailable": 1, "maxSurge": 0}
    assert kind(d.objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 2       # both pods of the group
    surge = desired({**BODY, "spec": {**spec, "rollout": {"maxSurge": 1, "maxUnavailable": 0}, "replicas": 2}})
    assert kind(surge.objects, "LeaderWorkerSet")["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] == \
        {"maxUnavailable": 0, "maxSurge": 1}
    assert kind(surge.objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    command = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["command"]
    assert "--drain-grace-seconds" in command
