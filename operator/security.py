"""Security pieces of the rendered pods (pure): restricted Pod Security, scratch space, the API key
file and the engine's NetworkPolicy.

Every pod the operator renders (engine and download Job) passes the `restricted` Pod Security
Standard: a fixed non-root uid/gid (the image's user), RuntimeDefault seccomp, no privilege
escalation, all capabilities dropped, and a read-only root filesystem with emptyDirs for /tmp and
the caches that torch, Triton and the hub library write. Secrets reach the container as a mounted
file or a secretKeyRef, never as an argument or in a ConfigMap.
"""
from __future__ import annotations

from longserve.operator.options import SecretKey

RUN_AS_USER = 10001            # the image's `longserve` user and group
RUN_AS_GROUP = 10001
CACHE_DIR = "/var/cache/longserve"
API_KEY_DIR = "/var/run/secrets/longserve"
API_KEY_FILE = "api-key"
# 0440: readable by the owner (root, as kubelet writes it) and the fsGroup the engine runs in.
API_KEY_MODE = 0o440
SCRATCH_ENV = {
    "HOME": "/tmp",
    "XDG_CACHE_HOME": CACHE_DIR,
    "HF_HOME": f"{CACHE_DIR}/huggingface",
    "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
    "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_DIR}/inductor",
}


def pod_security_context() -> dict:
    """Pod-level: non-root uid/gid, the group that owns mounted volumes, RuntimeDefault seccomp."""
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_GROUP, "fsGroup": RUN_AS_GROUP,
            # chown only a volume whose root is not yet ours: a weights PVC holds many large files
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def scratch(env_overrides: dict | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """emptyDir volumes, mounts and environment for the writable paths a read-only root needs."""
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_DIR}]
    values = {**SCRATCH_ENV, **(env_overrides or {})}
    return volumes, mounts, [{"name": k, "value": v} for k, v in values.items()]


def api_key_volume(ref: SecretKey) -> tuple[dict, dict, list[str]]:
    """The Secret key as a read-only file, and the server arguments that point at the file."""
    volume = {"name": "api-key", "secret": {"secretName": ref.name, "defaultMode": API_KEY_MODE,
                                            "items": [{"key": ref.key, "path": API_KEY_FILE, "mode": API_KEY_MODE}]}}
    mount = {"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True}
    return volume, mount, ["--api-key-file", f"{API_KEY_DIR}/{API_KEY_FILE}"]


def secret_env(name: str, ref: SecretKey | None) -> list[dict]:
    if ref is None:
        return []
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def network_policy(meta: dict, pod_labels: dict, clients: tuple, scraper: dict, api_ports: list[int],
                   metrics_port: int) -> dict:
    """Ingress to the engine pods: `clients` on the API ports, the metrics scraper on the metrics port.

    Egress is not restricted (the engine without a cache PVC downloads from the hub).
    """
    def ports(numbers):
        return [{"protocol": "TCP", "port": n} for n in numbers]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
            "spec": {"podSelector": {"matchLabels": pod_labels}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [dict(p) for p in clients], "ports": ports(api_ports)},
                                 {"from": [dict(scraper)], "ports": ports([metrics_port])}]}}
