"""Verified capacity: ask a ready engine pod what it really holds, and judge it against the plan.

The planner's KV capacity is a model of memory; the engine measures its own at start-up (after
weights, activations and the CUDA context). `probe` asks one ready pod over HTTP:
`GET /v1/models` first (the native server's model card carries `max_model_len` and
`kv_capacity_tokens`), then `GET /metrics` when the card lacks a number or needs an API key
(metrics are served without one): `longserve_kv_cache_capacity_tokens` and
`longserve_engine_config_info{max_model_len}` (native), `vllm:cache_config_info{num_gpu_blocks,
block_size}` (vLLM). Standard library and prometheus_client only; one short request or two per
probe, and the caller rate-limits (handlers.py).
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

PROBE_TIMEOUT_SECONDS = 3.0
DEFAULT_INTERVAL_SECONDS = 300.0       # re-probe at most this often (and whenever the config changes)


class ProbeError(RuntimeError):
    """The engine did not answer with usable numbers."""


@dataclass(frozen=True)
class EngineCapacity:
    kv_capacity_tokens: int
    max_model_len: int
    source: str                        # "/v1/models" or "/metrics"


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "*/*"}), timeout=timeout) as r:
            return r.status, r.read(1 << 20)
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ProbeError(f"GET {url}: {getattr(exc, 'reason', exc)}") from None


def _from_card(body: bytes) -> tuple[int | None, int | None]:
    try:
        card = (json.loads(body).get("data") or [{}])[0]
    except (ValueError, AttributeError, IndexError):
        return None, None
    kv, length = card.get("kv_capacity_tokens"), card.get("max_model_len")
    return (int(kv) if isinstance(kv, int) else None), (int(length) if isinstance(length, int) else None)


def _from_metrics(text: str) -> tuple[int | None, int | None]:
    kv = length = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "longserve_kv_cache_capacity_tokens":
                    kv = int(sample.value)
                elif sample.name == "longserve_engine_config_info" and "max_model_len" in sample.labels:
                    length = int(sample.labels["max_model_len"])
                elif sample.name == "vllm:cache_config_info" and kv is None:
                    blocks, size = sample.labels.get("num_gpu_blocks"), sample.labels.get("block_size")
                    if blocks and size and blocks.isdigit() and size.isdigit():
                        kv = int(blocks) * int(size)
    except ValueError as exc:
        raise ProbeError(f"unreadable /metrics: {exc}") from None
    return kv, length


def probe(base_url: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> EngineCapacity:
    """KV capacity and max model length as the engine at `base_url` (http://IP:PORT) reports them."""
    base = base_url.rstrip("/")
    code, body = _get(f"{base}/v1/models", timeout)
    kv, length = _from_card(body) if code == 200 else (None, None)
    if kv is not None and length is not None:
        return EngineCapacity(kv, length, "/v1/models")
    code, body = _get(f"{base}/metrics", timeout)
    if code != 200:
        raise ProbeError(f"GET {base}/metrics: HTTP {code}")
    metric_kv, metric_len = _from_metrics(body.decode(errors="replace"))
    kv, length = kv if kv is not None else metric_kv, length if length is not None else metric_len
    if kv is None or length is None:
        raise ProbeError(f"{base} reports no KV capacity or max model length (neither /v1/models nor /metrics)")
    return EngineCapacity(kv, length, "/metrics")


def verdict(observed: dict, required_len: int) -> tuple[bool, str, str]:
    """(verified, reason, message) for `observed` = {kvCapacityTokens, maxModelLen, pod}: the engine
    must accept `required_len` tokens and hold one such sequence in its KV cache."""
    kv, length = int(observed["kvCapacityTokens"]), int(observed["maxModelLen"])
    numbers = (f"pod {observed.get('pod', '?')} reports max_model_len {length:,} and KV capacity {kv:,} tokens; "
               f"the plan needs {required_len:,}")
    if length < required_len:
        return False, "MaxModelLenBelowPlan", numbers
    if kv < required_len:
        return False, "InsufficientKVCapacity", numbers
    return True, "EngineReportsCapacity", numbers
