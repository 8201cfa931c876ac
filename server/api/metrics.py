"""Prometheus metrics (docs/serving.md#metrics): `longserve_*` series plus vLLM-compatible `vllm:*` exports.

One plain registry per server. Counters are declared without `_total` (the client appends it).
Queue gauges are read from `EngineClient.load_stats()` at scrape time, so they are never stale.
Request series are fed by `RequestRecorder` (one per engine request, see generation.py). Every engine
request that was admitted ends in `vllm:request_success_total{finished_reason}` once per choice, with
the choice's own reason: stop, length, abort (client gone, drain) or error (its step failed; also
`longserve_request_failures_total{reason}`), and its computed prompt and generated tokens count in
the token counters whatever the outcome, so `vllm:*` and `longserve_*` agree. Refusals before
admission (`rejected_*` outcomes) never reach vLLM's series, as in vLLM.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

from longserve.server.api.engine_client import (
    CompletionDelta,
    FailureCause,
    FinishReason,
    LoadStats,
    PrefillProgress,
    RequestFailed,
    RequestFinished,
)
from longserve.server.config import EngineConfig

log = logging.getLogger("longserve.server.api")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 240.0, 320.0, 480.0, 640.0, 960.0, 1280.0, 1920.0, 2560.0)
THROUGHPUT_BUCKETS = (100, 250, 500, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5)
CHUNK_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
CHUNK_TOKENS_BUCKETS = tuple(2 ** k for k in range(9, 19))                 # 512 … 262144
DENSITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
PROMPT_BYTES_BUCKETS = tuple(2 ** k for k in range(10, 27, 2))             # 1Ki … 64Mi
N_BUCKETS = (1, 2, 5, 10, 20)
ITERATION_TOKENS_BUCKETS = (1,) + tuple(2 ** k for k in range(3, 19))      # 1 8 16 … 262144
OUTCOMES = (*(r.value for r in FinishReason), "rejected_too_long", "rejected_overload", "rejected_invalid")
SUCCESS_REASONS = tuple(FinishReason)      # vllm:request_success labels: stop, length, abort, error


def buckets_125(limit: int, *, cover: bool) -> tuple[int, ...]:
    """1-2-5 series: `cover=False` stops at values <= limit (vLLM); `cover=True` adds the first >= limit."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            value = m * scale
            if value > limit and (not cover or (out and out[-1] >= limit)):
                return tuple(out)
            out.append(value)
        scale *= 10


class Metrics:
    """All series of one server; `model_name` is bound here so callers never pass labels."""

    def __init__(self, config: EngineConfig, *, legacy_vllm_aliases: bool = True):
        disable_created_metrics()     # process-wide: `_created` series only double the scrape (as vLLM does)
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = config.served_model_name
        self.attention_threshold: int | None = None
        self._load: Callable[[], LoadStats | None] = lambda: None
        # the older vLLM names (gpu_cache_usage_perc, time_per_output_token_seconds) are always exported: the
        # keyword is accepted for compatibility and no longer hides them
        del legacy_vllm_aliases
        r, m, v = self.registry, ("model_name",), ("model_name", "engine")
        name = config.served_model_name
        len_long = buckets_125(config.max_model_len, cover=True)
        len_vllm = buckets_125(config.max_model_len, cover=False)

        def hist(metric, doc, buckets):
            return Histogram(metric, doc, m, buckets=buckets, registry=r)

        self.ttft = hist("longserve_time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS).labels(name)
        self.prefill_tokens = Counter("longserve_prefill_tokens", "Prompt tokens computed (cache hits excluded).",
                                      m, registry=r).labels(name)
        self.prefill_tps = hist("longserve_prefill_throughput_tokens_per_second",
                                "Computed prompt tokens / prefill time, per request.", THROUGHPUT_BUCKETS).labels(name)
        self.chunk_seconds = Histogram("longserve_prefill_chunk_duration_seconds", "One prefill step.",
                                       m + ("attention",), buckets=CHUNK_SECONDS_BUCKETS, registry=r)
        self.chunk_tokens = hist("longserve_prefill_chunk_tokens", "Tokens per prefill step.",
                                 CHUNK_TOKENS_BUCKETS).labels(name)
        self.density = hist("longserve_sparse_attention_density",
                            "Computed / causal (query, key) pairs per sparse chunk.", DENSITY_BUCKETS).labels(name)
        self.kv_capacity = Gauge("longserve_kv_cache_capacity_tokens", "KV capacity measured at start-up.",
                                 m, registry=r).labels(name)
        self.prompt_tokens_hist = hist("longserve_request_prompt_tokens", "Prompt length.", len_long).labels(name)
        self.outcomes = Counter("longserve_request_outcomes", "Every request ends in exactly one outcome.",
                                m + ("outcome",), registry=r)
        self.generation_tokens = Counter("longserve_generation_tokens", "Decoded tokens.", m,
                                         registry=r).labels(name)
        self.itl = hist("longserve_inter_token_latency_seconds", "Decode pace.", ITL_BUCKETS).labels(name)
        self.e2e = hist("longserve_e2e_request_latency_seconds", "Arrival to last token.", E2E_BUCKETS).labels(name)
        self.prompt_bytes = Histogram("longserve_request_prompt_bytes", "Request prompt size in bytes.",
                                      m + ("protocol",), buckets=PROMPT_BYTES_BUCKETS, registry=r)
        self.config_info = Gauge("longserve_engine_config_info", "Engine configuration (value 1).",
                                 m + ("runtime", "tp", "max_model_len", "prefill_chunk_tokens", "dca",
                                      "sparse_prefill"), registry=r)
        self.config_info.labels(name, config.runtime, str(config.tensor_parallel_size),
                                str(config.max_model_len), str(config.prefill_chunk_tokens),
                                str(config.dca).lower(), str(config.sparse_prefill).lower()).set(1)
        self.load_seconds = Gauge("longserve_model_load_seconds", "Model load and warm-up time.", m,
                                  registry=r).labels(name)
        for outcome in OUTCOMES:
            self.outcomes.labels(name, outcome)
        self.failures = Counter("longserve_request_failures", "Requests the engine failed while running their step.",
                                m + ("reason",), registry=r)
        for cause in FailureCause:
            self.failures.labels(name, cause.value)

        # vLLM-compatible exports: same values, vLLM semantics.
        lv = (name, "0")
        self.v_cache_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries (tokens).", v,
                                       registry=r).labels(*lv)
        self.v_cache_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits (tokens).", v, registry=r).labels(*lv)
        self.v_preemptions = Counter("vllm:num_preemptions", "Preemptions.", v, registry=r).labels(*lv)
        self.v_prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", v, registry=r).labels(*lv)
        self.v_generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", v,
                                           registry=r).labels(*lv)
        self.v_prompt_by_source = Counter("vllm:prompt_tokens_by_source", "Prompt tokens by source.",
                                          v + ("source",), registry=r)
        self.v_success = Counter("vllm:request_success", "Finished requests.", v + ("finished_reason",), registry=r)
        for reason in SUCCESS_REASONS:
            self.v_success.labels(*lv, reason.value)
        for source in ("local_compute", "local_cache_hit"):
            self.v_prompt_by_source.labels(*lv, source)

        def vhist(metric, doc, buckets):
            return Histogram(metric, doc, v, buckets=buckets, registry=r).labels(*lv)

        self.v_ttft = vhist("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.v_itl = vhist("vllm:inter_token_latency_seconds", "Inter-token latency.", ITL_BUCKETS)
        self.v_tpot = vhist("vllm:request_time_per_output_token_seconds", "Decode time per output token.",
                            ITL_BUCKETS)
        self.v_e2e = vhist("vllm:e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS)
        self.v_queue = vhist("vllm:request_queue_time_seconds", "Time waiting in the queue.", E2E_BUCKETS)
        self.v_inference = vhist("vllm:request_inference_time_seconds", "Time running.", E2E_BUCKETS)
        self.v_prefill = vhist("vllm:request_prefill_time_seconds", "Prefill time.", E2E_BUCKETS)
        self.v_decode = vhist("vllm:request_decode_time_seconds", "Decode time.", E2E_BUCKETS)
        self.v_prompt_len = vhist("vllm:request_prompt_tokens", "Prompt tokens per request.", len_vllm)
        self.v_gen_len = vhist("vllm:request_generation_tokens", "Generation tokens per request.", len_vllm)
        self.v_max_tokens = vhist("vllm:request_params_max_tokens", "max_tokens per request.", len_vllm)
        self.v_max_gen = vhist("vllm:request_max_num_generation_tokens", "Longest choice per request.", len_vllm)
        self.v_kv_computed = vhist("vllm:request_prefill_kv_computed_tokens", "Prompt tokens computed.", len_vllm)
        self.v_n = vhist("vllm:request_params_n", "n per request.", N_BUCKETS)
        self.v_iteration = vhist("vllm:iteration_tokens_total", "Tokens per engine step.", ITERATION_TOKENS_BUCKETS)
        self.v_tpot_legacy = vhist("vllm:time_per_output_token_seconds",
                                   "Alias of vllm:inter_token_latency_seconds (vLLM's older name).", ITL_BUCKETS)
        self.v_cache_info = Gauge("vllm:cache_config_info", "KV cache configuration (value 1).",
                                  ("model_name", "engine", "block_size", "num_gpu_blocks",
                                   "gpu_memory_utilization", "cache_dtype"), registry=r)
        self._config = config
        r.register(_LoadCollector(self))

    def bind_engine(self, load: Callable[[], LoadStats], kv_capacity_tokens: int) -> None:
        """Called once the engine is loaded: queue gauges follow it, capacity and cache info are fixed."""
        self._load = load
        self.kv_capacity.set(kv_capacity_tokens)
        stats = load()
        self.v_cache_info.labels(self.model_name, "0", str(stats.kv_block_size), str(stats.kv_blocks_total),
                                 str(self._config.gpu_memory_utilization), self._config.dtype).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- request lifecycle -------------------------------------------------------------------------
    def observe_admitted(self, prompt_tokens: int, max_tokens: int, n: int) -> None:
        self.prompt_tokens_hist.observe(prompt_tokens)
        self.v_prompt_len.observe(prompt_tokens)
        self.v_max_tokens.observe(max_tokens)
        self.v_n.observe(n)

    def observe_prompt_bytes(self, num_bytes: int, protocol: str) -> None:
        self.prompt_bytes.labels(self.model_name, protocol).observe(num_bytes)

    def observe_outcome(self, outcome: str) -> None:
        self.outcomes.labels(self.model_name, str(outcome)).inc()

    def observe_failure(self, failure: RequestFailed, reasons: list) -> None:
        """A request the engine failed: its work so far still counts as computed tokens; each choice ends with
        its own reason (error, unless it had finished before the failure)."""
        self.failures.labels(self.model_name, FailureCause(failure.cause).value).inc()
        if failure.timings.first_token_seconds is not None:
            self.observe_first_token(failure.timings.first_token_seconds)
        self.observe_ended(sum(failure.timings.prefill_chunk_tokens), failure.num_output_tokens, reasons,
                           FinishReason.ERROR)

    def observe_ended(self, prompt_computed: int, output_tokens: int, reasons: list, default: FinishReason) -> None:
        """Token counters and vLLM's success counter of a request that ended without `RequestFinished`
        (aborted, failed): `reasons` per choice, None for a choice still running (it ends as `default`)."""
        self.prefill_tokens.inc(prompt_computed)
        self.v_prompt_tokens.inc(prompt_computed)
        self.v_cache_queries.inc(prompt_computed)
        self.v_prompt_by_source.labels(self.model_name, "0", "local_compute").inc(prompt_computed)
        self.generation_tokens.inc(output_tokens)
        self.v_generation_tokens.inc(output_tokens)
        for reason in reasons:
            self.v_success.labels(self.model_name, "0", FinishReason(reason or default).value).inc()

    def observe_iteration(self, tokens: int) -> None:
        """One engine step: the tokens it computed (prefill chunks and decodes together)."""
        self.v_iteration.observe(tokens)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.v_itl.observe(seconds)
        self.v_tpot_legacy.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.v_ttft.observe(seconds)

    def observe_finished(self, fin: RequestFinished, tokens_per_choice: list[int]) -> None:
        """Totals and timings of one finished engine request (TTFT is observed separately)."""
        t = fin.timings
        prompt = fin.num_prompt_tokens
        computed = sum(t.prefill_chunk_tokens) if t.prefill_chunk_tokens else prompt
        computed = min(computed, prompt)
        cached = prompt - computed
        self.prefill_tokens.inc(computed)
        self.v_prompt_tokens.inc(prompt)
        self.v_cache_queries.inc(prompt)
        self.v_cache_hits.inc(cached)
        self.v_prompt_by_source.labels(self.model_name, "0", "local_compute").inc(computed)
        self.v_prompt_by_source.labels(self.model_name, "0", "local_cache_hit").inc(cached)
        self.generation_tokens.inc(fin.num_output_tokens)
        self.v_generation_tokens.inc(fin.num_output_tokens)
        self.v_preemptions.inc(fin.num_preemptions)
        self.v_gen_len.observe(fin.num_output_tokens)
        self.v_max_gen.observe(max(tokens_per_choice, default=0))
        self.v_kv_computed.observe(computed)
        done = prompt - computed
        for seconds, tokens in zip(t.prefill_chunk_seconds, t.prefill_chunk_tokens):
            done += tokens
            self.chunk_seconds.labels(self.model_name, self._attention_kind(done)).observe(seconds)
            self.chunk_tokens.observe(tokens)
        for reason in fin.finish_reasons:
            self.v_success.labels(self.model_name, "0", FinishReason(reason).value).inc()
        self.v_queue.observe(t.queued_seconds)
        if t.first_token_seconds is not None:
            prefill = max(t.first_token_seconds - t.queued_seconds, 0.0)
            self.v_prefill.observe(prefill)
            if prefill > 0 and computed:
                self.prefill_tps.observe(computed / prefill)
        self.v_decode.observe(t.decode_seconds)
        if t.finished is not None:
            e2e = max(t.finished - t.arrival, 0.0)
            self.e2e.observe(e2e)
            self.v_e2e.observe(e2e)
            self.v_inference.observe(max(e2e - t.queued_seconds, 0.0))
        longest = max(tokens_per_choice, default=0)
        if longest > 1:
            self.v_tpot.observe(t.decode_seconds / (longest - 1))

    def _attention_kind(self, context_tokens: int) -> str:
        """Sparse prefill runs once the context passes the engine's threshold (docs/algorithms.md#sparse-threshold)."""
        threshold = self.attention_threshold
        return "sparse" if threshold is not None and context_tokens > threshold else "dense"


class RequestRecorder:
    """Metrics of one engine request; guarantees exactly one outcome."""

    def __init__(self, metrics: Metrics, request_id: str, prompt_tokens: int, n: int, arrival: float):
        self.metrics = metrics
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token = [None] * n
        self.tokens = [0] * n
        self.reasons: list[FinishReason | None] = [None] * n     # per choice, once it has ended
        self.prefilled = 0
        self.done = False

    def on_event(self, event) -> None:
        now = time.monotonic()
        if isinstance(event, PrefillProgress):
            self.prefilled = event.processed_tokens
            if event.sparse_density is not None:
                self.metrics.density.observe(event.sparse_density)
        elif isinstance(event, CompletionDelta) and event.finish_reason is not None and not event.token_ids:
            if 0 <= event.index < len(self.reasons):
                self.reasons[event.index] = event.finish_reason
        elif isinstance(event, CompletionDelta) and event.token_ids:
            if 0 <= event.index < len(self.reasons) and event.finish_reason is not None:
                self.reasons[event.index] = event.finish_reason
            if self.first_token is None:
                self.first_token = now
            i = event.index
            if 0 <= i < len(self.tokens):
                previous = self.last_token[i]
                if previous is not None:
                    step = (now - previous) / len(event.token_ids)
                    for _ in event.token_ids:
                        self.metrics.observe_itl(step)
                self.last_token[i] = now
                self.tokens[i] = event.num_output_tokens or self.tokens[i] + len(event.token_ids)
        elif isinstance(event, RequestFinished):
            ttft = event.timings.first_token_seconds
            if ttft is None and self.first_token is not None:
                ttft = self.first_token - self.arrival
            if ttft is not None:
                self.metrics.observe_first_token(ttft)
            self.metrics.observe_finished(event, self.tokens)
            reasons = event.finish_reasons
            outcome = FinishReason.ABORT if FinishReason.ABORT in reasons else (FinishReason.LENGTH if reasons and all(
                r == FinishReason.LENGTH for r in reasons) else FinishReason.STOP)
            self.outcome(outcome)
        elif isinstance(event, RequestFailed):
            if self.done:
                return
            self.metrics.observe_failure(event, self.reasons)
            log.warning("request %s failed: %s", self.request_id, event.message, extra={
                "event": "request_failed", "request_id": self.request_id, "reason": FailureCause(event.cause).value,
                "prompt_tokens": event.num_prompt_tokens, "output_tokens": event.num_output_tokens,
                "error": event.message})
            self.outcome(FinishReason.ERROR)

    def outcome(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        outcome = str(outcome)
        self.metrics.observe_outcome(outcome)
        ttft = None if self.first_token is None else round((self.first_token - self.arrival) * 1e3, 2)
        log.info("request %s ended: %s", self.request_id, outcome, extra={
            "event": "request_end", "request_id": self.request_id, "outcome": outcome,
            "prompt_tokens": self.prompt_tokens, "output_tokens": sum(self.tokens), "ttft_ms": ttft,
            "e2e_ms": round((time.monotonic() - self.arrival) * 1e3, 2)})

    def unfinished(self, outcome: str) -> None:
        """The engine request ended without RequestFinished (client gone, drain, engine error)."""
        if self.done:
            return
        if self.first_token is not None:
            self.metrics.observe_first_token(self.first_token - self.arrival)
        default = FinishReason.ERROR if str(outcome) == FinishReason.ERROR else FinishReason.ABORT
        self.metrics.observe_ended(self.prefilled, sum(self.tokens), self.reasons, default)
        self.outcome(outcome)


class _LoadCollector:
    """Scheduler and KV gauges, read from the engine at scrape time."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def describe(self):
        return []

    def collect(self):
        stats = self._metrics._load()
        running = stats.num_running if stats else 0
        waiting = stats.num_waiting if stats else 0
        pending = stats.pending_prefill_tokens if stats else 0
        usage = stats.kv_usage if stats else 0.0
        m, v = [self._metrics.model_name], [self._metrics.model_name, "0"]
        rows = [("longserve_requests_running", "Running requests.", m, running),
                ("longserve_requests_waiting", "Waiting requests.", m, waiting),
                ("longserve_prefill_tokens_pending", "Admitted prompt tokens not yet computed.", m, pending),
                ("longserve_kv_cache_usage_ratio", "Used / total KV blocks.", m, usage),
                ("vllm:num_requests_running", "Running requests.", v, running),
                ("vllm:num_requests_waiting", "Waiting requests.", v, waiting),
                ("vllm:kv_cache_usage_perc", "KV cache usage, fraction 0-1.", v, usage),
                ("vllm:gpu_cache_usage_perc", "Alias of vllm:kv_cache_usage_perc (vLLM's older name).", v, usage)]
        for metric, doc, values, value in rows:
            family = GaugeMetricFamily(metric, doc, labels=["model_name"] if len(values) == 1
                                       else ["model_name", "engine"])
            family.add_metric(values, value)
            yield family
