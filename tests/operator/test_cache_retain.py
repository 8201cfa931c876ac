"""spec.cache.retain: the cache PVC has no owner reference (it outlives the resource), is never deleted
by the operator, is adopted by a resource of the same name, and follows a change of the setting."""
import copy

from longserve.operator.diff import diff
from longserve.operator.render import RETAIN_LABEL, desired

BODY = {"apiVersion": "longserve.io/v1alpha1", "kind": "LongContextModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
        "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M"}, "context": {"maxModelLen": 1010000},
                 "accelerator": {"gpuProduct": "NVIDIA-H200"}, "cache": {"retain": True}}}


def pvc(objects):
    return next(o for o in objects if o["kind"] == "PersistentVolumeClaim")


def with_cache(**cache):
    body = copy.deepcopy(BODY)
    body["spec"]["cache"] = cache
    return body


def test_retained_claim_has_no_owner():
    claim = pvc(desired(BODY).objects)
    assert "ownerReferences" not in claim["metadata"] and claim["metadata"]["labels"][RETAIN_LABEL] == "true"
    owned = pvc(desired(with_cache()).objects)
    assert owned["metadata"]["ownerReferences"][0]["uid"] == "u1" and RETAIN_LABEL not in owned["metadata"]["labels"]


def test_retained_claim_is_never_deleted_and_is_adopted():
    live = [copy.deepcopy(pvc(desired(BODY).objects))]
    # the cache turned off: an owned claim would be deleted, a retained one stays
    assert not [a for a in diff(desired(with_cache(enabled=False)).objects, live) if a.kind == "PersistentVolumeClaim"]
    # a new resource of the same name (another uid) wanting a retained cache: nothing to do
    body = copy.deepcopy(BODY)
    body["metadata"]["uid"] = "u2"
    assert not [a for a in diff(desired(body).objects, live) if a.kind == "PersistentVolumeClaim"]


def test_changing_retain_patches_only_the_ownership():
    live = [copy.deepcopy(pvc(desired(BODY).objects))]
    actions = [a for a in diff(desired(with_cache(retain=False)).objects, live) if a.kind == "PersistentVolumeClaim"]
    assert [(a.verb, a.reason) for a in actions] == [("merge", "cache retention changed")]
    assert actions[0].body == {"metadata": {"ownerReferences": pvc(desired(with_cache()).objects)["metadata"]
                                            ["ownerReferences"], "labels": {RETAIN_LABEL: None}}}
    owned = [copy.deepcopy(pvc(desired(with_cache()).objects))]
    back = [a for a in diff(desired(BODY).objects, owned) if a.kind == "PersistentVolumeClaim"]
    assert back[0].body == {"metadata": {"ownerReferences": None, "labels": {RETAIN_LABEL: "true"}}}
