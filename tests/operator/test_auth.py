"""`spec.auth.apiKeySecretRef`: the rendered pod reads the key from a mounted Secret file, never from
its command line or a ConfigMap, and the real `longserve serve`, started with the rendered command,
environment and mounted files (pod paths mapped to temporary directories), rejects requests
without the key and serves them with it; /health and /metrics stay open for probes and Prometheus."""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from longserve.operator.render import desired

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "k3y-for-tests-7f2c1d"
HUB_TOKEN = "hf_test_token_value"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resource(**spec) -> dict:
    body = yaml.safe_load((ROOT / "manifests/examples/cpu-demo.yaml").read_text())
    body["metadata"].update(namespace="models", uid="6f1e8a52-0000-4000-8000-000000000001")
    body["spec"]["auth"] = {"apiKeySecretRef": {"name": "demo-api-key", "key": "api-key"}}
    body["spec"]["model"]["authSecretRef"] = {"name": "hub-token", "key": "token"}
    body["spec"].update(spec)
    return body


def secrets() -> dict:
    return {"demo-api-key": {"api-key": API_KEY}, "hub-token": {"token": HUB_TOKEN}}


def test_secrets_never_reach_arguments_or_config_maps():
    objects = desired(resource()).objects + desired(resource(), model_cached=True).objects
    text_of_configs = json.dumps([o["data"] for o in objects if o["kind"] == "ConfigMap"])
    for obj in objects:
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            argv = " ".join(container.get("command", []) + container.get("args", []))
            for name, data in secrets().items():
                assert name not in argv and name not in text_of_configs
                for _key, value in data.items():
                    assert value not in argv and value not in text_of_configs
            for env in container["env"]:
                if "valueFrom" in env:
                    assert set(env["valueFrom"]) == {"secretKeyRef"}
                else:
                    assert all(v not in env["value"] for d in secrets().values() for v in d.values())
    job = next(o for o in objects if o["kind"] == "Job")
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "token"}}} in env
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    engine_env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not any(e["name"] == "HF_TOKEN" for e in engine_env)      # a cached engine never needs the token


def test_api_key_volume_is_a_read_only_file_for_the_fs_group():
    deployment = next(o for o in desired(resource()).objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-key")
    assert volume["secret"]["secretName"] == "demo-api-key"
    assert volume["secret"]["items"] == [{"key": "api-key", "path": "api-key", "mode": 0o440}]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "api-key")
    assert mount["readOnly"] is True
    command = pod["containers"][0]["command"]
    assert command[command.index("--api-key-file") + 1] == f"{mount['mountPath']}/api-key"
    assert pod["securityContext"]["fsGroup"] == 10001


def test_vllm_gets_its_key_from_the_environment_and_sglang_is_refused():
    body = resource(runtime={"name": "vllm", "image": "vllm/vllm-openai:v0.10.1.1"})
    engine = next(o for o in desired(body).objects if o["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "demo-api-key", "key": "api-key"}}} \
        in engine["env"]
    assert "--api-key" not in engine["command"]
    from longserve.operator.types import SpecError
    with pytest.raises(SpecError, match="not supported for runtime sglang"):
        desired(resource(runtime={"name": "sglang", "image": "lmsysorg/sglang:v0.5.0"}))


class PodFiles:
    """A kubelet stand-in: lays out the pod's volumes under a directory and maps pod paths onto it."""

    def __init__(self, root: Path, pod: dict, objects: list[dict], claims: dict[str, Path]):
        self.mounts: list[tuple[str, Path]] = []
        config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
        sources = {}
        for volume in pod["volumes"]:
            where = root / volume["name"]
            if "persistentVolumeClaim" in volume:
                where = claims[volume["persistentVolumeClaim"]["claimName"]]
            elif "secret" in volume:
                where.mkdir()
                data = secrets()[volume["secret"]["secretName"]]
                for item in volume["secret"]["items"]:
                    path = where / item["path"]
                    path.write_text(data[item["key"]])
                    path.chmod(item["mode"])
            else:
                where.mkdir()
            sources[volume["name"]] = (where, volume)
        container = pod["containers"][0]
        for mount in container["volumeMounts"]:
            self.mounts.append((mount["mountPath"], sources[mount["name"]][0]))
        self.mounts.sort(key=lambda m: -len(m[0]))
        for _name, (where, volume) in sources.items():      # config files, with pod paths mapped
            if "configMap" in volume:
                for key, text in config_maps[volume["configMap"]["name"]].items():
                    (where / key).write_text(self.map_text(text))

    def map(self, value: str) -> str:
        for pod_path, host in self.mounts:
            if value == pod_path or value.startswith(pod_path + "/"):
                return str(host) + value[len(pod_path):]
        return value

    def map_text(self, text: str) -> str:
        data = json.loads(text)
        return json.dumps({k: self.map(v) if isinstance(v, str) else v for k, v in data.items()})


@pytest.mark.timeout(300)
def test_rendered_pod_rejects_requests_without_the_key(tmp_path):
    from longserve.server.tiny_checkpoint import build_tiny_checkpoint

    http_port, grpc_port = free_port(), free_port()
    # the CPU demo resource, sized down for a tiny checkpoint through the resource's own extraArgs
    body = resource(serving={"httpPort": http_port, "grpcPort": grpc_port},
                    runtime={"extraArgs": ["--host", "127.0.0.1", "--max-model-len", "512", "--max-output-tokens",
                                           "8", "--prefill-chunk-tokens", "128", "--kv-capacity-tokens", "1024",
                                           "--dtype", "float32", "--no-dca", "--no-sparse-prefill"]})
    objects = desired(body, model_cached=True).objects
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    claim = tmp_path / "pvc"
    config = json.loads(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["engine_config.json"])
    weights = claim / Path(config["model_path"]).relative_to("/models")
    weights.parent.mkdir(parents=True)
    shutil.copytree(build_tiny_checkpoint(str(tmp_path / "tiny")), weights)
    files = PodFiles(tmp_path, pod, objects, {"cpu-demo-weights": claim})
    key_file = Path(files.map(container["command"][container["command"].index("--api-key-file") + 1]))
    assert key_file.read_text() == API_KEY and stat.S_IMODE(key_file.stat().st_mode) == 0o440

    assert container["command"][:2] == ["longserve", "serve"]
    argv = [sys.executable, "-m", "longserve.server.cli", *[files.map(a) for a in container["command"][1:]]]
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "OMP_NUM_THREADS", "TRITON_INTERPRET")}
    env.update({e["name"]: files.map(e["value"]) for e in container["env"] if "value" in e})
    assert "LONGSERVE_API_KEY" not in env
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.5)
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401
        right = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        assert right.status_code == 200 and right.json()["data"][0]["id"] == "cpu-demo"
        chat = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "cpu-demo", "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 2}, timeout=60)
        assert chat.status_code == 200, chat.text
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 200     # Prometheus scrapes without it
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
