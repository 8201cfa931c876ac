"""Prefix caching through the engine: outputs identical with and without the cache, a repeated long request
skips its shared prefill (TTFT), metrics count the hits."""
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from longserve.server.engine import LLM, SamplingParams
from longserve.server.engine.protocol import CompletionDelta, RequestFinished
from longserve.server.tiny_checkpoint import build_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def tokens(rng, n):
    return [rng.randrange(3, 1000) for _ in range(n)]


def outputs(results):
    return [o.outputs[0].token_ids for o in results]


@pytest.fixture(scope="module")
def engines(tiny_dca_model_dir):
    kw = dict(prefill_chunk_tokens=48, kv_capacity_tokens=4096, kv_block_size=16, dtype="float32")
    with LLM(tiny_dca_model_dir, **kw) as cached, \
            LLM(tiny_dca_model_dir, enable_prefix_caching=False, **kw) as plain:
        yield cached, plain


def test_shared_prefixes_give_the_same_greedy_outputs(engines):
    cached, plain = engines
    rng = random.Random(0)
    doc = tokens(rng, 200)                           # spans several DCA chunks (64) and prefill chunks (48)
    prompts = [doc + tokens(rng, 5), doc + tokens(rng, 37), doc[:150] + tokens(rng, 20), doc, doc + tokens(rng, 1)]
    expected = outputs(plain.generate(prompts, GREEDY))
    assert outputs(cached.generate(prompts[:1], GREEDY)) == expected[:1]      # fills the cache
    assert outputs(cached.generate(prompts, GREEDY)) == expected               # hits, in one batch
    assert cached.engine.blocks.num_cached_blocks > 0 and plain.engine.blocks.num_cached_blocks == 0
    assert cached.engine.blocks.num_used_blocks == 0     # cached blocks are free once nobody holds them


def test_interleaved_requests_share_blocks_while_decoding(engines):
    cached, plain = engines
    rng = random.Random(1)
    doc = tokens(rng, 130)
    prompts = [doc + tokens(rng, 9) for _ in range(4)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    expected = outputs(plain.generate(prompts, params))
    engine = cached.engine
    got, computed = {}, {}
    engine.add_request("p0", prompts[0], params)
    for step in range(1, 1000):
        if step < 4:
            engine.add_request(f"p{step}", prompts[step], params)     # arrives while the others run
        for event in engine.step():
            if isinstance(event, CompletionDelta):
                got.setdefault(event.request_id, []).extend(event.token_ids)
            elif isinstance(event, RequestFinished):
                computed[event.request_id] = sum(event.timings.prefill_chunk_tokens)
        if not engine.has_work():
            break
    assert [got[f"p{i}"] for i in range(4)] == expected
    assert computed["p0"] == 139 and all(computed[f"p{i}"] < 139 for i in range(1, 4))
    assert engine.blocks.num_used_blocks == 0


def test_prompt_logprobs_skip_the_cache(engines):
    cached, plain = engines
    rng = random.Random(2)
    prompt = tokens(rng, 100)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    cached.generate([prompt], GREEDY)                # the prompt is now cached
    got, = cached.generate([prompt], params)
    want, = plain.generate([prompt], params)
    assert got.finished.timings.prefill_chunk_tokens == want.finished.timings.prefill_chunk_tokens
    assert [e.logprob for e in got.prompt_logprobs[1:]] == pytest.approx([e.logprob for e in want.prompt_logprobs[1:]])


def test_hits_are_counted_in_the_metrics(engines):
    from longserve.server.api.metrics import Metrics
    cached, _ = engines
    rng = random.Random(3)
    prompt = tokens(rng, 100)
    first, = cached.generate([prompt], GREEDY)
    again, = cached.generate([prompt], GREEDY)
    assert sum(again.finished.timings.prefill_chunk_tokens) == 100 - 96      # 6 full blocks hit, 4 tokens run
    metrics = Metrics(cached.engine.config)
    for out in (first, again):
        metrics.observe_finished(out.finished, [len(out.outputs[0].token_ids)])
    values = {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode())
              for s in f.samples}
    assert values["vllm:prefix_cache_queries_total"] == 200
    assert values["vllm:prefix_cache_hits_total"] == 96


def test_repeat_of_a_16k_request_skips_its_prefill(tmp_path):
    """A resent long document costs only its last block: TTFT at least 5x lower, same output."""
    n = 16384
    model = build_tiny_checkpoint(str(tmp_path / "m"), max_position_embeddings=n + 512,
                                  dca={"chunk_size": 8192, "local_size": 1024, "original_max_position_embeddings": 0})
    prompt = tokens(random.Random(4), n)
    with LLM(model, prefill_chunk_tokens=2048, kv_capacity_tokens=n + 256, dtype="float32", max_num_seqs=1) as llm:
        first, = llm.generate([prompt], GREEDY)
        again, = llm.generate([prompt], GREEDY)
    ttft = [o.finished.timings.first_token_seconds for o in (first, again)]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert sum(again.finished.timings.prefill_chunk_tokens) == 16      # the last block, recomputed
    assert ttft[1] * 5 <= ttft[0], ttft


def test_bench_repeat_row(tiny_model_dir):
    """`longserve bench prefill --repeat`: one process, the prompt then its repeat (computing 200 - 12*16)."""
    from longserve.bench.prefill import measure_repeat
    row = measure_repeat(tiny_model_dir, 200, 64, 1)
    assert row["same_output"] and row["repeat_computed_tokens"] == 8, row
    assert row["first_ttft_s"] > 0 and row["repeat_ttft_s"] > 0
