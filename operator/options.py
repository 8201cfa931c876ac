"""Parsed, validated forms of the resource's deployment options (pure, standard library only).

`spec.auth`, `spec.networkPolicy`, `spec.pod` and `spec.cache.download` have their own parsers
here so `types.parse` stays readable; each raises `SpecError("InvalidSpec", ...)` naming the field.
The pieces of the pod template the operator owns (its labels, volumes, mount paths, the accelerator
resource) cannot be replaced through these options: a collision is an error, not a silent override.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from longserve.operator.errors import SpecError

# Labels and annotations the operator sets on the pods it renders (prefixes included).
RESERVED_LABEL_KEYS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                       "app.kubernetes.io/component")
RESERVED_PREFIX = "longserve.io/"
# Volumes and mount paths of the rendered engine pod; extra volumes must use other names and paths.
RESERVED_VOLUMES = ("engine-config", "dshm", "models", "tmp", "cache", "api-key")
RESERVED_MOUNT_PATHS = ("/etc/longserve", "/dev/shm", "/models", "/tmp", "/var/cache/longserve",
                        "/var/run/secrets/longserve")
# Prometheus from kube-prometheus-stack: its pods carry this label in a namespace named "monitoring".
DEFAULT_SCRAPER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
DEFAULT_BACKOFF_LIMIT = 4

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def invalid(message: str) -> SpecError:
    return SpecError("InvalidSpec", message)


def obj(parent: dict, key: str, where: str) -> dict:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{where}.{key} must be an object")
    return value


def objects(parent: dict, key: str, where: str) -> tuple:
    value = parent.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise invalid(f"{where}.{key} must be a list of objects")
    return tuple(value)


def name_of(value, where: str, pattern=_DNS_SUBDOMAIN) -> str:
    if not isinstance(value, str) or not value or len(value) > 253 or not pattern.match(value):
        raise invalid(f"{where} must be a Kubernetes object name, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class SecretKey:
    """A key of a Secret in the resource's namespace."""
    name: str
    key: str


def secret_key(parent: dict, key: str, where: str) -> SecretKey | None:
    ref = obj(parent, key, where)
    if not ref:
        return None
    if not ref.get("name") or not ref.get("key"):
        raise invalid(f"{where}.{key} needs name and key")
    name = name_of(ref["name"], f"{where}.{key}.name")
    if not isinstance(ref["key"], str) or not re.match(r"^[-._a-zA-Z0-9]+$", ref["key"]):
        raise invalid(f"{where}.{key}.key must be a Secret data key, got {ref['key']!r}")
    return SecretKey(name, ref["key"])


def string_map(value, where: str, *, labels: bool) -> dict:
    """Labels or annotations: qualified keys, no key the operator owns."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{where} must be a map of strings")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _QUALIFIED.match(key) or len(key) > 317:
            raise invalid(f"{where}: {key!r} is not a valid key")
        if key in RESERVED_LABEL_KEYS or key.startswith(RESERVED_PREFIX):
            raise invalid(f"{where}: {key!r} is set by the operator and cannot be overridden")
        if not isinstance(item, str) or (labels and (len(item) > 63 or not _LABEL_VALUE.match(item))):
            raise invalid(f"{where}.{key}: {item!r} is not a valid {'label' if labels else 'annotation'} value")
        out[key] = item
    return dict(sorted(out.items()))


def label_selector(value, where: str) -> dict:
    """A metav1.LabelSelector (matchLabels, matchExpressions), checked and copied."""
    if not isinstance(value, dict) or set(value) - {"matchLabels", "matchExpressions"}:
        raise invalid(f"{where} must be a label selector (matchLabels, matchExpressions)")
    out = {}
    if value.get("matchLabels") is not None:
        labels = value["matchLabels"]
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and _QUALIFIED.match(k) and isinstance(v, str) and _LABEL_VALUE.match(v)
                for k, v in labels.items()):
            raise invalid(f"{where}.matchLabels must map label keys to label values")
        out["matchLabels"] = dict(sorted(labels.items()))
    if value.get("matchExpressions") is not None:
        exprs = []
        for i, expr in enumerate(value["matchExpressions"] if isinstance(value["matchExpressions"], list) else [0]):
            at = f"{where}.matchExpressions[{i}]"
            if not isinstance(expr, dict) or not isinstance(expr.get("key"), str) or \
                    expr.get("operator") not in _SELECTOR_OPERATORS:
                raise invalid(f"{at} needs a key and an operator of {', '.join(_SELECTOR_OPERATORS)}")
            values = expr.get("values") or []
            if (expr["operator"] in ("In", "NotIn")) != bool(values) or \
                    not all(isinstance(v, str) for v in values):
                raise invalid(f"{at}: In/NotIn need values, Exists/DoesNotExist take none")
            exprs.append({"key": expr["key"], "operator": expr["operator"], **({"values": list(values)}
                                                                              if values else {})})
        out["matchExpressions"] = exprs
    return out


def peer(value, where: str) -> dict:
    """A NetworkPolicy peer limited to pod/namespace selectors (no IP blocks: pods move)."""
    if not isinstance(value, dict) or not value or set(value) - {"podSelector", "namespaceSelector"}:
        raise invalid(f"{where} must have podSelector and/or namespaceSelector")
    return {k: label_selector(value[k], f"{where}.{k}") for k in ("namespaceSelector", "podSelector") if k in value}


@dataclass(frozen=True, slots=True)
class NetworkPolicyOptions:
    """Who may connect to the engine pods. `clients` reach the API ports; `scraper` reaches /metrics."""
    enabled: bool = False
    clients: tuple = ()
    scraper: dict = field(default_factory=lambda: dict(DEFAULT_SCRAPER))


def network_policy(spec: dict) -> NetworkPolicyOptions:
    where = "spec.networkPolicy"
    section = obj(spec, "networkPolicy", "spec")
    enabled = section.get("enabled", False)
    if not isinstance(enabled, bool):
        raise invalid(f"{where}.enabled must be true or false")
    names = section.get("allowedNamespaces") or []
    if not isinstance(names, list):
        raise invalid(f"{where}.allowedNamespaces must be a list of namespace names")
    clients = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                       name_of(n, f"{where}.allowedNamespaces[{i}]", _DNS_LABEL)}}}
               for i, n in enumerate(names)]
    clients += [peer(p, f"{where}.clients[{i}]") for i, p in enumerate(objects(section, "clients", where))]
    if not clients:       # default: pods of the resource's own namespace
        clients = [{"podSelector": {}}]
    scraper = section.get("metricsScraper")
    scraper = DEFAULT_SCRAPER if scraper is None else peer(scraper, f"{where}.metricsScraper")
    return NetworkPolicyOptions(enabled=enabled, clients=tuple(clients), scraper=dict(scraper))


@dataclass(frozen=True, slots=True)
class PodOptions:
    """User knobs for the engine pod template (anchor: the vLLM production-stack chart's)."""
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    image_pull_secrets: tuple = ()
    service_account_name: str = ""
    priority_class_name: str = ""
    runtime_class_name: str = ""
    affinity: dict = field(default_factory=dict)
    topology_spread_constraints: tuple = ()
    volumes: tuple = ()
    volume_mounts: tuple = ()


def _optional_name(section: dict, key: str, where: str) -> str:
    value = section.get(key)
    return "" if value in (None, "") else name_of(value, f"{where}.{key}")


def pod_options(spec: dict) -> PodOptions:
    where = "spec.pod"
    section = obj(spec, "pod", "spec")
    pull = section.get("imagePullSecrets") or []
    if not isinstance(pull, list):
        raise invalid(f"{where}.imagePullSecrets must be a list of {{name: ...}}")
    pull_names = [name_of(p.get("name") if isinstance(p, dict) else None, f"{where}.imagePullSecrets[{i}].name")
                  for i, p in enumerate(pull)]
    volumes = objects(section, "volumes", where)
    volume_names = []
    for i, volume in enumerate(volumes):
        name = name_of(volume.get("name"), f"{where}.volumes[{i}].name", _DNS_LABEL)
        if name in RESERVED_VOLUMES or name in volume_names:
            raise invalid(f"{where}.volumes[{i}]: the name {name!r} is taken (rendered volumes: "
                          f"{', '.join(RESERVED_VOLUMES)})")
        if "hostPath" in volume:
            raise invalid(f"{where}.volumes[{i}]: hostPath volumes are not allowed (restricted Pod Security)")
        volume_names.append(name)
    mounts = objects(section, "volumeMounts", where)
    for i, mount in enumerate(mounts):
        at = f"{where}.volumeMounts[{i}]"
        if mount.get("name") not in volume_names:
            raise invalid(f"{at}: volume {mount.get('name')!r} is not one of spec.pod.volumes")
        path = mount.get("mountPath")
        if not isinstance(path, str) or not path.startswith("/"):
            raise invalid(f"{at}.mountPath must be an absolute path")
        if any(path.rstrip("/") == p or path.startswith(p + "/") or p.startswith(path.rstrip("/") + "/")
               for p in RESERVED_MOUNT_PATHS):
            raise invalid(f"{at}.mountPath {path!r} overlaps a path the operator mounts "
                          f"({', '.join(RESERVED_MOUNT_PATHS)})")
    affinity = obj(section, "affinity", where)
    if set(affinity) - {"nodeAffinity", "podAffinity", "podAntiAffinity"}:
        raise invalid(f"{where}.affinity takes nodeAffinity, podAffinity and podAntiAffinity")
    spread = objects(section, "topologySpreadConstraints", where)
    for i, item in enumerate(spread):
        if not isinstance(item.get("maxSkew"), int) or not item.get("topologyKey") or \
                item.get("whenUnsatisfiable") not in ("DoNotSchedule", "ScheduleAnyway"):
            raise invalid(f"{where}.topologySpreadConstraints[{i}] needs maxSkew, topologyKey and "
                          "whenUnsatisfiable (DoNotSchedule or ScheduleAnyway)")
    return PodOptions(
        labels=string_map(section.get("labels"), f"{where}.labels", labels=True),
        annotations=string_map(section.get("annotations"), f"{where}.annotations", labels=False),
        image_pull_secrets=tuple(pull_names),
        service_account_name=_optional_name(section, "serviceAccountName", where),
        priority_class_name=_optional_name(section, "priorityClassName", where),
        runtime_class_name=_optional_name(section, "runtimeClassName", where),
        affinity=affinity, topology_spread_constraints=spread, volumes=volumes, volume_mounts=mounts)


@dataclass(frozen=True, slots=True)
class DownloadOptions:
    """The weight download Job: a deadline (None: sized from the weights at render) and retries."""
    active_deadline_seconds: int | None = None
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT


def download_options(cache: dict) -> DownloadOptions:
    where = "spec.cache.download"
    section = obj(cache, "download", "spec.cache")
    deadline = section.get("activeDeadlineSeconds")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int) or deadline < 60):
        raise invalid(f"{where}.activeDeadlineSeconds must be an integer >= 60, got {deadline!r}")
    backoff = section.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)
    if isinstance(backoff, bool) or not isinstance(backoff, int) or not 0 <= backoff <= 20:
        raise invalid(f"{where}.backoffLimit must be an integer within [0, 20], got {backoff!r}")
    return DownloadOptions(active_deadline_seconds=deadline, backoff_limit=backoff)


def resource_overrides(resources: dict, accelerator_resource: str) -> tuple[dict, dict]:
    """`spec.resources.requests/limits`: quantities by resource name; the accelerator is the planner's."""
    out = []
    for key in ("requests", "limits"):
        value = obj(resources, key, "spec.resources")
        for name, quantity in value.items():
            if not isinstance(name, str) or not _QUALIFIED.match(name):
                raise invalid(f"spec.resources.{key}: {name!r} is not a resource name")
            if accelerator_resource and name == accelerator_resource:
                raise invalid(f"spec.resources.{key}.{name}: the GPU count is the planner's "
                              "(set spec.sizing.tensorParallelSize in Manual mode)")
            if isinstance(quantity, bool) or not isinstance(quantity, (int, str)) or \
                    not _QUANTITY.match(str(quantity).strip()):
                raise invalid(f"spec.resources.{key}.{name}: {quantity!r} is not a quantity")
        out.append({k: str(v) for k, v in sorted(value.items())})
    return out[0], out[1]
