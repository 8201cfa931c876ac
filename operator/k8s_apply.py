"""The only module that talks to the Kubernetes API: get, list, apply, delete by kind.

Built on the official client's `ApiClient` (auth, TLS, retries) with plain JSON bodies, so every
kind the operator renders — built-in or a Prometheus Operator CRD — goes through one small path,
and no generated model classes re-shape objects. Children are written with server-side apply
(`apply.py`: field manager `longserve-operator`, pruning of fields the operator stopped setting,
forced on conflicts and reported). NotFound on delete counts as success (docs/operator.md#reconciliation); label
selectors are also applied client-side.
"""
from __future__ import annotations

import json
import logging
from urllib.parse import quote

import kubernetes

from longserve.operator import apply as ssa
from longserve.operator.diff import Action
from longserve.operator.render import MANAGED_BY, RETAIN_LABEL

log = logging.getLogger(__name__)

PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Pod"): "pods",
    ("apps/v1", "Deployment"): "deployments",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkersets",     # replicas spanning nodes
    ("batch/v1", "Job"): "jobs",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrules",
    ("longserve.io/v1alpha1", "LongContextModel"): "longcontextmodels",
}
CHILD_KINDS = [k for k in PLURALS if k[1] not in ("Pod", "LongContextModel")]
MONITORING_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def load_configuration(kubeconfig: str | None = None) -> "kubernetes.client.Configuration":
    """In-cluster service account first, then a kubeconfig file (the explicit one, or the default)."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return configuration
        except kubernetes.config.ConfigException:
            pass
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return configuration


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    try:
        plural = PLURALS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"kind {api_version}/{kind} is not managed by the operator") from None
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = f"/namespaces/{quote(namespace)}" if namespace else ""
    return f"{base}{ns}/{plural}" + (f"/{quote(name)}" if name else "")


class Api:
    def __init__(self, configuration: "kubernetes.client.Configuration", timeout: float = 30.0):
        self.configuration = configuration
        self.client = kubernetes.client.ApiClient(configuration)
        self.timeout = timeout

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, resource_path: str, body=None, *, content_type: str = "application/json",
                query: list | None = None) -> tuple[int, dict | None]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        serialized = self.client.param_serialize(method, resource_path, query_params=query or [],
                                                 header_params=headers, body=body, auth_settings=["BearerToken"])
        response = self.client.call_api(*serialized, _request_timeout=self.timeout)
        raw = response.read()
        try:
            data = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            data = {"message": raw.decode(errors="replace")[:500]}
        return response.status, data

    def _checked(self, method: str, resource_path: str, body=None, ok=(200, 201, 202), **kw) -> dict | None:
        status, data = self.request(method, resource_path, body, **kw)
        if status not in ok:
            message = (data or {}).get("message", "") if isinstance(data, dict) else str(data)
            raise ApiError(status, f"{method} {resource_path}: {message}")
        return data

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        data = self._checked("GET", path(api_version, kind, namespace, name), ok=(200, 404))
        return None if not data or data.get("kind") == "Status" else data

    def has_api(self, group_version: str) -> bool:
        status, _ = self.request("GET", f"/apis/{group_version}")
        return status == 200

    def list_children(self, namespace: str, instance: str, owner_uid: str, kinds=None) -> list[dict]:
        """Objects of the managed kinds labelled for `instance` and owned by `owner_uid`."""
        selector = f"app.kubernetes.io/instance={instance},app.kubernetes.io/managed-by={MANAGED_BY}"
        found = []
        for api_version, kind in kinds or CHILD_KINDS:
            status, data = self.request("GET", path(api_version, kind, namespace),
                                        query=[("labelSelector", selector)])
            if status == 404:            # kind not installed (e.g. no Prometheus Operator)
                continue
            if status != 200:
                raise ApiError(status, f"list {kind}: {(data or {}).get('message', '')}")
            for item in (data or {}).get("items") or []:
                meta = item.get("metadata") or {}
                labels = meta.get("labels") or {}
                owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
                retained = labels.get(RETAIN_LABEL) == "true"     # outlives its resource: adopted by name
                if labels.get("app.kubernetes.io/instance") != instance \
                        or labels.get("app.kubernetes.io/managed-by") != MANAGED_BY \
                        or (owner_uid not in owners and not retained):
                    continue
                if meta.get("deletionTimestamp") or (meta.get("namespace") or namespace) != namespace:
                    continue
                found.append({"apiVersion": api_version, "kind": kind, **item})
        return found

    def ready_pod(self, namespace: str, labels: dict, annotations: dict) -> dict | None:
        """A Ready pod with an IP, these labels and these annotations (the current template's pods)."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        data = self._checked("GET", path("v1", "Pod", namespace), query=[("labelSelector", selector)])
        for pod in (data or {}).get("items") or []:
            meta, st = pod.get("metadata") or {}, pod.get("status") or {}
            if any((meta.get("labels") or {}).get(k) != v for k, v in labels.items()) or meta.get("deletionTimestamp"):
                continue
            if any((meta.get("annotations") or {}).get(k) != v for k, v in annotations.items()):
                continue
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])
            if ready and st.get("podIP"):
                return pod
        return None

    def apply_object(self, obj: dict) -> tuple[dict, ssa.Conflict | None]:
        """Server-side apply (creates when absent); on a conflict, apply again with force and say so."""
        meta = obj["metadata"]
        where = path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        body = ssa.apply_body(obj)
        status, data = self.request("PATCH", where, body, content_type=ssa.APPLY_CONTENT_TYPE,
                                    query=ssa.apply_query(force=False))
        conflict = None
        if status == 409:
            conflict = ssa.Conflict(obj["kind"], meta["name"], (data or {}).get("message", "conflict"))
            log.warning("taking fields back: %s", conflict)
            status, data = self.request("PATCH", where, body, content_type=ssa.APPLY_CONTENT_TYPE,
                                        query=ssa.apply_query(force=True))
        if status not in (200, 201):
            raise ApiError(status, f"apply {obj['kind']}/{meta['name']}: {(data or {}).get('message', '')}")
        return data, conflict

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._checked("DELETE", path(api_version, kind, namespace, name), {"propagationPolicy": "Background"},
                      ok=(200, 202, 404))

    def apply(self, actions: list[Action]) -> list[ssa.Conflict]:
        """Carry out the diff's actions; the conflicts that applies had to force, for an event."""
        conflicts = []
        for action in actions:
            log.info("%s", action)
            if action.verb in ("create", "patch"):
                conflict = self.apply_object(action.body)[1]
                if conflict is not None:
                    conflicts.append(conflict)
            elif action.verb == "merge":
                self._checked("PATCH", path(action.api_version, action.kind, action.namespace, action.name),
                              action.body, content_type="application/merge-patch+json")
            elif action.verb == "delete":
                self.delete(action.api_version, action.kind, action.namespace, action.name)
            else:
                raise ValueError(f"unknown action {action.verb!r}")
        return conflicts
