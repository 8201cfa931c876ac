"""User pod-template knobs (`spec.pod`, `spec.resources.requests/limits`) applied to rendered pods (pure).

Precedence, documented in docs/operator.md: the operator's labels, annotations, volumes, mounts and
security context always stand (options.py rejects collisions); `spec.resources.requests/limits`
win over the values derived from `cpu`/`memory`/`ephemeralStorage`; the accelerator count is the
planner's and cannot be overridden. A memory request raised above the derived limit raises the
limit with it (Kubernetes rejects request > limit).
"""
from __future__ import annotations

from longserve.operator.options import PodOptions


def merged_resources(derived: dict, requests: dict, limits: dict) -> dict:
    """The derived requests/limits with the user's overrides on top."""
    out = {"requests": {**derived.get("requests", {}), **requests},
           "limits": {**derived.get("limits", {}), **limits}}
    for name, value in requests.items():
        if name in out["limits"] and name not in limits and name in derived.get("limits", {}):
            out["limits"][name] = value      # keep request <= limit when only the request was given
    return {k: v for k, v in out.items() if v}


def apply_to_template(template: dict, opts: PodOptions, *, engine: bool) -> dict:
    """Add the knobs to a pod template in place; `engine` False (the download Job) applies only what
    pulling the image and the pod's identity need: imagePullSecrets and serviceAccountName."""
    meta, spec = template["metadata"], template["spec"]
    if opts.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in opts.image_pull_secrets]
    if opts.service_account_name:
        spec["serviceAccountName"] = opts.service_account_name
    if not engine:
        return template
    if opts.labels:
        meta["labels"] = {**opts.labels, **meta["labels"]}
    if opts.annotations:
        meta["annotations"] = {**opts.annotations, **meta.get("annotations", {})}
    if opts.priority_class_name:
        spec["priorityClassName"] = opts.priority_class_name
    if opts.runtime_class_name:
        spec["runtimeClassName"] = opts.runtime_class_name
    if opts.affinity:
        spec["affinity"] = dict(opts.affinity)
    if opts.topology_spread_constraints:
        spec["topologySpreadConstraints"] = [dict(c) for c in opts.topology_spread_constraints]
    if opts.volumes:
        spec["volumes"] = spec["volumes"] + [dict(v) for v in opts.volumes]
    if opts.volume_mounts:
        container = spec["containers"][0]
        container["volumeMounts"] = container["volumeMounts"] + [dict(m) for m in opts.volume_mounts]
    return template
