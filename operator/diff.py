"""Pure diff of desired vs live children -> the actions that make live match desired.

A child is applied when its `longserve.io/spec-hash` label differs (the desired content changed)
or when a field the operator renders was edited by hand (drift): the desired object must be
contained in the live one (the API server adds defaults and status, so live is a superset).
"patch" actions are server-side applies (k8s_apply/apply.py): a field the new render leaves out
changes the hash, and the apply removes it from the child — containment alone never has to see it.
Children that are owned by the resource but no longer desired are deleted. Two kinds have
immutable parts: a PVC is only ever created (its claim is bound once; growing it is a manual
step), and a Job whose content changed is deleted so the next pass creates it afresh (a Job's pod
template cannot be patched).
"""
from __future__ import annotations

from dataclasses import dataclass

from longserve.operator.render import HASH_LABEL, RETAIN_LABEL

CREATE_ONLY = {"PersistentVolumeClaim"}
RECREATE = {"Job"}


@dataclass(frozen=True)
class Action:
    verb: str                  # "create" | "patch" (server-side applies) | "merge" (a merge patch) | "delete"
    api_version: str
    kind: str
    namespace: str
    name: str
    body: dict | None = None   # the desired object (create/patch)
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.verb} {self.kind}/{self.name} ({self.reason})"


def key(obj: dict) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace") or "", meta.get("name", "")


def contains(live, desired) -> bool:
    """True when every field of `desired` is present with the same value in `live`.

    Maps may carry extra keys (defaults); lists must match element-wise. Scalars compare equal, or
    equal as strings (quantities such as 1 and "1").
    """
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(live, list) and len(live) == len(desired)
                and all(contains(a, b) for a, b in zip(live, desired)))
    if live == desired:
        return True
    return not isinstance(desired, bool) and not isinstance(live, bool) and str(live) == str(desired)


def diff(desired: list[dict], live: list[dict]) -> list[Action]:
    """Create missing, patch changed or drifted, delete unwanted children (in that order)."""
    live_by_key = {key(obj): obj for obj in live}
    wanted = set()
    actions = []
    for obj in desired:
        k = key(obj)
        wanted.add(k)
        current = live_by_key.get(k)
        if current is None:
            actions.append(Action("create", *k, body=obj, reason="missing"))
            continue
        live_hash = ((current.get("metadata") or {}).get("labels") or {}).get(HASH_LABEL)
        changed = live_hash != obj["metadata"]["labels"][HASH_LABEL] or not contains(current, obj)
        if obj["kind"] in CREATE_ONLY:
            release = _retention_patch(obj, current)
            if release is not None:
                actions.append(Action("merge", *k, body=release, reason="cache retention changed"))
            continue
        if obj["kind"] in RECREATE and changed:
            actions.append(Action("delete", *k, reason="immutable Job changed; re-created on the next pass"))
        elif live_hash != obj["metadata"]["labels"][HASH_LABEL]:
            actions.append(Action("patch", *k, body=obj, reason=f"spec hash {live_hash} -> "
                                                                f"{obj['metadata']['labels'][HASH_LABEL]}"))
        elif not contains(current, obj):
            actions.append(Action("patch", *k, body=obj, reason="drift repaired"))
    for k in sorted(set(live_by_key) - wanted):
        if _labels(live_by_key[k]).get(RETAIN_LABEL) == "true":
            continue                   # retained (spec.cache.retain): never deleted by the operator
        actions.append(Action("delete", *k, reason="no longer wanted"))
    return actions


def _labels(obj: dict) -> dict:
    return (obj.get("metadata") or {}).get("labels") or {}


def _retention_patch(desired: dict, live: dict) -> dict | None:
    """A merge patch of the owner references and retain label when spec.cache.retain changed on a
    child whose spec cannot be re-applied (a bound PVC); None when nothing changed."""
    want_owner = (desired["metadata"].get("ownerReferences") or [])
    have_owner = (live.get("metadata") or {}).get("ownerReferences") or []
    want_retain, have_retain = _labels(desired).get(RETAIN_LABEL), _labels(live).get(RETAIN_LABEL)
    if [o.get("uid") for o in want_owner] == [o.get("uid") for o in have_owner] and want_retain == have_retain:
        return None
    return {"metadata": {"ownerReferences": want_owner or None, "labels": {RETAIN_LABEL: want_retain}}}
