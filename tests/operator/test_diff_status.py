"""Pure diff (no-op, changed spec hash, drift, extra child) and status roll-ups from fake children."""
import copy

from longserve.operator.diff import contains, diff
from longserve.operator.render import HASH_LABEL, desired
from longserve.operator.status import build_status, invalid_status, merge_conditions
from longserve.operator.types import SpecError

BODY = {"apiVersion": "longserve.io/v1alpha1", "kind": "LongContextModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u-1"},
        "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M"}, "accelerator": {"gpuProduct": "NVIDIA-H200"},
                 "cache": {"enabled": False}}}


def live_copy(objects):
    """What an API server returns: our objects plus defaults and status."""
    out = copy.deepcopy(objects)
    for obj in out:
        obj["metadata"]["uid"] = "x"
        obj["metadata"]["resourceVersion"] = "7"
        if obj["kind"] == "Deployment":
            obj["spec"]["progressDeadlineSeconds"] = 600
            obj["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
            obj["status"] = {"replicas": 1}
    return out


def test_contains():
    assert contains({"a": 1, "b": {"c": "1", "d": 2}}, {"b": {"c": 1}})
    assert not contains({"a": [1, 2]}, {"a": [1]})
    assert not contains({"a": True}, {"a": "True"})
    assert not contains({}, {"a": None})


def test_no_op_when_live_matches():
    objects = desired(BODY).objects
    assert diff(objects, live_copy(objects)) == []


def test_missing_children_are_created_in_order():
    objects = desired(BODY).objects
    actions = diff(objects, [])
    assert [a.verb for a in actions] == ["create"] * len(objects)
    assert [a.kind for a in actions] == [o["kind"] for o in objects]


def test_changed_spec_hash_patches_only_changed_objects():
    before = desired(BODY).objects
    body = copy.deepcopy(BODY)
    body["spec"]["replicas"] = 2
    after = desired(body).objects
    actions = diff(after, live_copy(before))
    # the PDB too: at one replica it is minAvailable 1, at two maxUnavailable 1 (rollout.py)
    assert [(a.verb, a.kind) for a in actions] == [("patch", "Deployment"), ("patch", "PodDisruptionBudget")]
    assert "spec hash" in actions[0].reason


def test_hand_edit_is_drift():
    objects = desired(BODY).objects
    live = live_copy(objects)
    deployment = next(o for o in live if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "2"
    actions = diff(objects, live)
    assert [(a.verb, a.kind, a.reason) for a in actions] == [("patch", "Deployment", "drift repaired")]
    assert actions[0].body["metadata"]["labels"][HASH_LABEL] == deployment["metadata"]["labels"][HASH_LABEL]


def test_unwanted_children_are_deleted_last():
    objects = desired(BODY).objects
    live = live_copy(objects)
    extra = copy.deepcopy(next(o for o in live if o["kind"] == "ConfigMap"))
    extra["metadata"]["name"] = "m-old"
    actions = diff(objects[1:], live + [extra])
    assert [(a.verb, a.name) for a in actions] == [("delete", objects[0]["metadata"]["name"]), ("delete", "m-old")]


def conds(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def deployment(ready, replicas=1, progressing=True):
    st = {"replicas": replicas, "readyReplicas": ready}
    if not progressing:
        st["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                             "message": "timed out"}]
    return {"status": st}


def test_status_ready_starting_degraded():
    d = desired(BODY)
    ready = build_status(d, namespace="ns", deployment=deployment(1), cache_state=None)
    assert ready["phase"] == "Ready" and conds(ready)["Ready"] == ("True", "AllConditionsMet")
    assert ready["plan"]["tensorParallelSize"] == 1 and ready["plan"]["perGpuGB"]["weights"] == 15.2
    assert ready["endpoints"] == {"openai": "http://m.ns.svc:8000/v1", "grpc": "m.ns.svc:50051"}
    assert ready["selector"] == "app.kubernetes.io/instance=m,app.kubernetes.io/name=longserve"
    starting = build_status(d, namespace="ns", deployment=deployment(0), cache_state=None)
    assert starting["phase"] == "Starting" and conds(starting)["Ready"] == ("False", "Progressing")
    stuck = build_status(d, namespace="ns", deployment=deployment(0, progressing=False), cache_state=None)
    assert conds(stuck)["WorkloadAvailable"] == ("False", "ProgressDeadlineExceeded")
    body = copy.deepcopy(BODY)
    body["spec"]["replicas"] = 2
    degraded = build_status(desired(body), namespace="ns", deployment=deployment(1, 2), cache_state=None)
    assert degraded["phase"] == "Degraded" and degraded["readyReplicas"] == 1


def test_status_caching_dry_run_infeasible_invalid():
    d = desired(BODY)
    caching = build_status(d, namespace="ns", deployment=None, cache_state="Downloading")
    assert caching["phase"] == "Caching"
    assert conds(caching)["ModelCached"] == ("False", "Downloading")
    assert conds(caching)["Ready"] == ("False", "Downloading")
    body = copy.deepcopy(BODY)
    body["spec"]["sizing"] = {"mode": "DryRun"}
    dry = build_status(desired(body), namespace="ns", deployment=None, cache_state=None)
    assert dry["phase"] == "Planned" and conds(dry)["Ready"] == ("False", "DryRun") and "endpoints" not in dry
    body = copy.deepcopy(BODY)
    body["spec"]["context"] = {"maxModelLen": 1010000, "maxNumSeqs": 8}
    infeasible = build_status(desired(body), namespace="ns", deployment=None, cache_state=None)
    assert infeasible["phase"] == "Failed" and conds(infeasible)["Sized"] == ("False", "Infeasible")
    assert infeasible["plan"]["alternatives"]
    phase, items = invalid_status(SpecError("InvalidTP", "TP must divide"))
    assert phase == "Failed" and items[0]["reason"] == "InvalidTP" and items[-1]["reason"] == "InvalidTP"


def test_transition_time_kept_while_status_unchanged():
    first = merge_conditions(None, [{"type": "Ready", "status": "False", "reason": "a", "message": ""}], "t1", 1)
    same = merge_conditions(first, [{"type": "Ready", "status": "False", "reason": "b", "message": ""}], "t2", 2)
    flipped = merge_conditions(same, [{"type": "Ready", "status": "True", "reason": "c", "message": ""}], "t3", 2)
    assert [c["lastTransitionTime"] for c in first + same + flipped] == ["t1", "t1", "t3"]
    assert same[0]["observedGeneration"] == 2


def test_pvc_is_create_only_and_a_changed_job_is_recreated():
    body = copy.deepcopy(BODY)
    body["spec"]["cache"] = {"enabled": True}
    objects = desired(body).objects
    live = live_copy(objects)
    body["spec"]["cache"] = {"enabled": True, "size": "40Gi"}
    body["spec"]["model"]["authSecretRef"] = {"name": "hf", "key": "token"}
    actions = diff(desired(body).objects, live)
    kinds = [(a.verb, a.kind) for a in actions]
    assert ("delete", "Job") in kinds and not any(k == "PersistentVolumeClaim" for _, k in kinds)
    assert diff(objects, [o for o in live if o["kind"] != "PersistentVolumeClaim"])[0].verb == "create"
