"""/metrics: parses with prometheus_client, matches the golden series list, counts a known workload exactly."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from longserve.server.api.metrics import buckets_125


def _scrape(server) -> dict:
    text = httpx.get(server.stack.http_url + "/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families, family, sample_name, **labels) -> float:
    for s in families[family].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {sample_name} {labels}")


def _describe(families) -> dict:
    out = {}
    for name, fam in sorted(families.items()):
        labels = sorted({k for s in fam.samples for k in s.labels if k != "le"})
        entry = {"type": fam.type, "labels": labels,
                 "samples": sorted({s.name for s in fam.samples})}
        bounds = sorted({float(s.labels["le"]) for s in fam.samples if "le" in s.labels})
        if bounds:
            entry["buckets"] = [b for b in bounds if b != float("inf")]
        out[name] = entry
    return out


def test_series_names_types_labels_buckets(server, golden):
    families = _scrape(server)
    golden.check_json("api/metrics_families.json", _describe(families))
    for fam in families.values():
        for s in fam.samples:
            assert s.labels.get("model_name") == "fake-model"
            if s.name.startswith("vllm:"):
                assert s.labels.get("engine") == "0"


def test_prompt_token_buckets_follow_max_model_len():
    assert buckets_125(1_010_000, cover=True)[-3:] == (500000, 1000000, 2000000)
    assert buckets_125(1_010_000, cover=False)[-2:] == (500000, 1000000)
    assert buckets_125(4096, cover=True)[-1] == 5000 and buckets_125(4096, cover=False)[-1] == 2000


def test_counters_equal_the_workload(server, engine):
    base = server.stack.http_url
    workload = [("p" * 600, 5), ("q" * 10, 7), ("r" * 300, 3)]     # chunks: 256+256+88, 10, 256+44
    for prompt, max_tokens in workload:
        resp = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})
        assert resp.status_code == 200
    assert httpx.post(base + "/v1/completions", json={"prompt": "x" * 5000}).status_code == 400
    assert httpx.post(base + "/v1/completions", json={"prompt": "x", "model": "nope"}).status_code == 404
    assert httpx.post(base + "/v1/completions", content=b"{").status_code == 400
    f = _scrape(server)
    prompt_total, output_total = 910, 15
    assert _value(f, "longserve_prefill_tokens", "longserve_prefill_tokens_total") == prompt_total
    assert _value(f, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == prompt_total
    assert _value(f, "vllm:prompt_tokens_by_source", "vllm:prompt_tokens_by_source_total",
                  source="local_compute") == prompt_total
    assert _value(f, "longserve_generation_tokens", "longserve_generation_tokens_total") == output_total
    assert _value(f, "vllm:generation_tokens", "vllm:generation_tokens_total") == output_total
    assert _value(f, "longserve_time_to_first_token_seconds", "longserve_time_to_first_token_seconds_count") == 3
    assert _value(f, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 3
    assert _value(f, "longserve_prefill_chunk_tokens", "longserve_prefill_chunk_tokens_count") == 6
    assert _value(f, "longserve_prefill_chunk_tokens", "longserve_prefill_chunk_tokens_sum") == prompt_total
    assert _value(f, "longserve_prefill_chunk_duration_seconds", "longserve_prefill_chunk_duration_seconds_count",
                  attention="dense") == 6
    assert _value(f, "longserve_request_prompt_tokens", "longserve_request_prompt_tokens_sum") == prompt_total
    assert _value(f, "longserve_request_prompt_bytes", "longserve_request_prompt_bytes_count", protocol="http") == 4
    assert _value(f, "longserve_request_outcomes", "longserve_request_outcomes_total", outcome="length") == 3
    assert _value(f, "longserve_request_outcomes", "longserve_request_outcomes_total",
                  outcome="rejected_too_long") == 1
    assert _value(f, "longserve_request_outcomes", "longserve_request_outcomes_total",
                  outcome="rejected_invalid") == 2
    assert _value(f, "vllm:request_success", "vllm:request_success_total", finished_reason="length") == 3
    assert _value(f, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 3
    assert _value(f, "vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == output_total
    # decode intervals: 4 + 6 + 2 inter-token gaps
    assert _value(f, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == 12
    assert _value(f, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") == 0
    assert _value(f, "longserve_kv_cache_capacity_tokens", "longserve_kv_cache_capacity_tokens") == 1_600_000
    assert _value(f, "vllm:cache_config_info", "vllm:cache_config_info", block_size="16",
                  num_gpu_blocks="100000") == 1
    assert _value(f, "longserve_engine_config_info", "longserve_engine_config_info", max_model_len="4096",
                  prefill_chunk_tokens="256", dca="true") == 1


def test_queue_gauges_follow_the_engine(server, engine):
    engine.blocks["r1"] = 25_000
    engine.pending_prefill["r1"] = 1234
    f = _scrape(server)
    assert _value(f, "vllm:num_requests_running", "vllm:num_requests_running") == 1
    assert _value(f, "longserve_requests_running", "longserve_requests_running") == 1
    assert _value(f, "longserve_prefill_tokens_pending", "longserve_prefill_tokens_pending") == 1234
    assert _value(f, "longserve_kv_cache_usage_ratio", "longserve_kv_cache_usage_ratio") == 0.25


def test_older_vllm_names_are_always_exported_as_aliases(server):
    httpx.post(server.stack.http_url + "/v1/completions", json={"prompt": "a", "max_tokens": 3})
    f = _scrape(server)
    assert _value(f, "vllm:gpu_cache_usage_perc", "vllm:gpu_cache_usage_perc") == \
        _value(f, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc")
    assert _value(f, "vllm:time_per_output_token_seconds", "vllm:time_per_output_token_seconds_count") == 2 == \
        _value(f, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count")
