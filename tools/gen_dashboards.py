"""Generate the Grafana dashboards shipped in charts/longserve/dashboards/ (run after editing; a test
checks the committed JSON is fresh). Dashboards use a `datasource` template variable (not `__inputs`)
so the Grafana sidecar can load them as-is, and `namespace`, `model_name` and `pod` variables (every
panel filters on all three)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "charts" / "longserve" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace",model_name=~"$model_name",pod=~"$pod"'


def _panel(pid: int, title: str, exprs: list[tuple[str, str]], unit: str, x: int, y: int,
           kind: str = "timeseries", w: int = 12) -> dict:
    return {
        "id": pid, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(exprs)],
    }


def _variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "type": "query", "datasource": DS, "label": label, "query": query, "includeAll": True,
            "multi": True, "refresh": 2, "allValue": ".*", "current": {"text": "All", "value": "$__all"}}


def _dashboard(uid: str, title: str, panels: list[dict]) -> dict:
    return {
        "uid": uid, "title": title, "tags": ["longserve", "llm"], "schemaVersion": 39, "version": 1,
        "editable": True, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            _variable("namespace", "Namespace", "label_values(longserve_requests_running, namespace)"),
            _variable("model_name", "Model",
                      'label_values(longserve_requests_running{namespace=~"$namespace"}, model_name)'),
            _variable("pod", "Pod", 'label_values(longserve_requests_running{namespace=~"$namespace",'
                                    'model_name=~"$model_name"}, pod)'),
        ]},
        "panels": panels,
    }


def _quantiles(metric: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le, model_name) (rate({metric}_bucket{{{SEL}}}[5m])))",
             f"p{int(q * 100)} {{{{model_name}}}}") for q in (0.5, 0.9, 0.99)]


def vllm_compatible() -> dict:
    p = [
        _panel(1, "Requests running / waiting", [
            (f"sum by (model_name) (vllm:num_requests_running{{{SEL}}})", "running {{model_name}}"),
            (f"sum by (model_name) (vllm:num_requests_waiting{{{SEL}}})", "waiting {{model_name}}")],
            "short", 0, 0),
        _panel(2, "KV cache usage", [(f"max by (model_name) (vllm:kv_cache_usage_perc{{{SEL}}})",
                                      "{{model_name}}")], "percentunit", 12, 0),
        _panel(3, "Time to first token", _quantiles("vllm:time_to_first_token_seconds"), "s", 0, 8),
        _panel(4, "Inter-token latency", _quantiles("vllm:inter_token_latency_seconds"), "s", 12, 8),
        _panel(5, "Token throughput", [
            (f"sum by (model_name) (rate(vllm:prompt_tokens_total{{{SEL}}}[5m]))", "prompt {{model_name}}"),
            (f"sum by (model_name) (rate(vllm:generation_tokens_total{{{SEL}}}[5m]))", "generation {{model_name}}")],
            "short", 0, 16),
        _panel(6, "Finished requests by reason", [
            (f"sum by (model_name, finished_reason) (rate(vllm:request_success_total{{{SEL}}}[5m]))",
             "{{finished_reason}} {{model_name}}")], "reqps", 12, 16),
        _panel(7, "Preemptions", [(f"sum by (model_name) (rate(vllm:num_preemptions_total{{{SEL}}}[5m]))",
                                   "{{model_name}}")], "short", 0, 24),
        _panel(8, "End-to-end latency", _quantiles("vllm:e2e_request_latency_seconds"), "s", 12, 24),
    ]
    return _dashboard("longserve-vllm", "LongServe — vLLM-compatible serving", p)


def long_context() -> dict:
    p = [
        _panel(1, "TTFT by quantile (to 2560 s)", _quantiles("longserve_time_to_first_token_seconds"), "s", 0, 0),
        _panel(2, "Prefill tokens/s (computed)", [
            (f"sum by (model_name) (rate(longserve_prefill_tokens_total{{{SEL}}}[5m]))", "{{model_name}}")],
            "short", 12, 0),
        _panel(3, "Prefill chunk duration by attention", [
            (f"histogram_quantile(0.9, sum by (le, model_name, attention) "
             f"(rate(longserve_prefill_chunk_duration_seconds_bucket{{{SEL}}}[5m])))",
             "p90 {{attention}} {{model_name}}")], "s", 0, 8),
        _panel(4, "Prompt tokens pending (saturation)", [
            (f"sum by (model_name) (longserve_prefill_tokens_pending{{{SEL}}})", "{{model_name}}")],
            "short", 12, 8),
        _panel(5, "Sparse attention density", [
            (f"sum by (model_name) (rate(longserve_sparse_attention_density_sum{{{SEL}}}[15m])) / "
             f"sum by (model_name) (rate(longserve_sparse_attention_density_count{{{SEL}}}[15m]))",
             "mean {{model_name}}")], "percentunit", 0, 16),
        _panel(6, "KV tokens used vs capacity", [
            (f"max by (model_name) (longserve_kv_cache_usage_ratio{{{SEL}}}) * "
             f"max by (model_name) (longserve_kv_cache_capacity_tokens{{{SEL}}})", "used {{model_name}}"),
            (f"max by (model_name) (longserve_kv_cache_capacity_tokens{{{SEL}}})", "capacity {{model_name}}")],
            "short", 12, 16),
        _panel(7, "Prompt length", _quantiles("longserve_request_prompt_tokens"), "short", 0, 24),
        _panel(8, "Request body size by protocol", [
            ("histogram_quantile(0.99, sum by (le, protocol) "
             f"(rate(longserve_request_prompt_bytes_bucket{{{SEL}}}[15m])))",
             "p99 {{protocol}}")], "bytes", 12, 24),
        _panel(9, "Request outcomes", [
            (f"sum by (model_name, outcome) (rate(longserve_request_outcomes_total{{{SEL}}}[5m]))",
             "{{outcome}} {{model_name}}")], "reqps", 0, 32),
        _panel(10, "Prefill chunk tokens (planned chunk in use)", [
            ("histogram_quantile(0.5, sum by (le, model_name) "
             f"(rate(longserve_prefill_chunk_tokens_bucket{{{SEL}}}[15m])))",
             "median {{model_name}}")], "short", 12, 32),
        _panel(11, "Autoscaling signals per pod (spec.autoscaling targets these)", [
            (f"avg by (model_name) (longserve_prefill_tokens_pending{{{SEL}}})",
             "pending prefill tokens {{model_name}}"),
            (f"avg by (model_name) (vllm:num_requests_waiting{{{SEL}}})", "waiting requests {{model_name}}"),
            (f"avg by (model_name) (vllm:kv_cache_usage_perc{{{SEL}}})", "KV usage {{model_name}}")],
            "short", 0, 40, w=12),
        _panel(12, "Engine pods serving", [
            (f"count by (model_name) (longserve_prefill_tokens_pending{{{SEL}}})", "{{model_name}}")],
            "short", 12, 40),
    ]
    return _dashboard("longserve-long-context", "LongServe — long-context prefill", p)


def render() -> dict[str, str]:
    return {name: json.dumps(board, indent=2, sort_keys=True) + "\n"
            for name, board in (("vllm-compatible.json", vllm_compatible()),
                                ("long-context.json", long_context()))}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(render())} dashboards to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
