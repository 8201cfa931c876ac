"""capacity.py: the probe's sources (/v1/models, then /metrics for keys-protected or vLLM engines) and
the verdict against the plan."""
import http.server
import threading

import pytest

from longserve.operator import capacity

NATIVE_METRICS = """# TYPE longserve_kv_cache_capacity_tokens gauge
longserve_kv_cache_capacity_tokens{model_name="m"} 1.2e+06
# TYPE longserve_engine_config_info gauge
""" + ('longserve_engine_config_info{model_name="m",runtime="native",tp="1",max_model_len="1010000",'
       'prefill_chunk_tokens="131072",dca="true",sparse_prefill="true"} 1.0\n')
VLLM_METRICS = """# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="40000",model_name="m"} 1.0
"""


@pytest.fixture
def engine():
    routes = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = routes.get(self.path, (404, b""))
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield routes, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_model_card_first(engine):
    routes, url = engine
    routes["/v1/models"] = (200, b'{"data": [{"id": "m", "max_model_len": 1010000, "kv_capacity_tokens": 1100000}]}')
    assert capacity.probe(url) == capacity.EngineCapacity(1100000, 1010000, "/v1/models")


def test_metrics_when_the_api_needs_a_key(engine):
    routes, url = engine
    routes["/v1/models"] = (401, b"")
    routes["/metrics"] = (200, NATIVE_METRICS.encode())
    assert capacity.probe(url) == capacity.EngineCapacity(1200000, 1010000, "/metrics")


def test_vllm_card_with_metrics_for_the_cache(engine):
    routes, url = engine
    routes["/v1/models"] = (200, b'{"data": [{"id": "m", "max_model_len": 524288}]}')
    routes["/metrics"] = (200, VLLM_METRICS.encode())
    assert capacity.probe(url) == capacity.EngineCapacity(640000, 524288, "/metrics")


def test_no_numbers_is_a_probe_error(engine):
    routes, url = engine
    routes["/metrics"] = (200, b"# nothing\n")
    with pytest.raises(capacity.ProbeError, match="reports no KV capacity"):
        capacity.probe(url)
    with pytest.raises(capacity.ProbeError):
        capacity.probe("http://127.0.0.1:9", timeout=0.5)


@pytest.mark.parametrize("kv, length, expected", [
    (1_100_000, 1_010_000, (True, "EngineReportsCapacity")),
    (900_000, 1_010_000, (False, "InsufficientKVCapacity")),
    (2_000_000, 524_288, (False, "MaxModelLenBelowPlan")),
])
def test_verdict_names_the_numbers(kv, length, expected):
    ok, reason, message = capacity.verdict({"kvCapacityTokens": kv, "maxModelLen": length, "pod": "p-1"}, 1_010_000)
    assert (ok, reason) == expected
    assert f"{kv:,}" in message and f"{length:,}" in message and "p-1" in message


def test_the_probe_asks_a_group_leader_for_plans_spanning_nodes():
    """Workers of a LeaderWorkerSet group serve nothing: only leaders are asked."""
    import logging

    import kopf

    from longserve.operator import handlers
    from longserve.operator.render import desired
    from longserve.operator.render_lws import ROLE_LABEL

    class Api:
        def __init__(self):
            self.asked = []

        def ready_pod(self, namespace, labels, annotations):
            self.asked.append(labels)
            return None

    def body(**accelerator):
        return {"apiVersion": "longserve.io/v1alpha1", "kind": "LongContextModel",
                "metadata": {"name": "m", "namespace": "ns", "uid": "u"},
                "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-14B-Instruct-1M"}, "cache": {"enabled": False},
                         "accelerator": accelerator}}
    api = Api()
    for spec in ({"gpuProduct": "NVIDIA-L40S", "gpusPerNode": 4, "nodes": 2}, {"gpuProduct": "NVIDIA-H200"}):
        assert handlers._capacity(desired(body(**spec)), api, "ns", {}, None, kopf.Memo(), logging.getLogger()) is None
    assert api.asked[0][ROLE_LABEL] == "leader" and ROLE_LABEL not in api.asked[1]
