"""Tensor parallelism on the CPU with gloo: TP 2 and TP 4 give TP 1's greedy tokens and log-probabilities.

A tiny random Qwen2 checkpoint with 8 heads and 4 KV heads (both split at TP 2 and 4), an untied LM head, a
vocabulary that does not divide by 4 (the last vocab shard is padded), two safetensors shards, DCA with
64-token chunks, and a sparse config whose budgets differ per head (a rank using another rank's heads' budgets
would change the result). Prompts: a short one, one across several DCA chunks (chunked prefill of 48 tokens),
and one above the sparse threshold. 32 greedy tokens each; every generated and prompt position's top-5
log-probabilities (log-softmax of the gathered logits) within 1e-4 of TP 1's."""
from __future__ import annotations

import random

import pytest

from longserve.server.engine.offline import LLM
from longserve.server.sampling import SamplingParams
from longserve.server.tiny_checkpoint import build_tiny_checkpoint

DCA = {"chunk_size": 64, "local_size": 16, "original_max_position_embeddings": 0}
PARAMS = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=5)
ENGINE = dict(prefill_chunk_tokens=48, kv_capacity_tokens=4096, sparse_threshold=150, max_model_len=4096)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 999) for _ in range(n)]


PROMPTS = [_prompt(5, 1), _prompt(200, 2), _prompt(320, 3)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sparse = [{str(h): ["vertical_and_slash", 24 + 8 * h, 16 + 4 * ((h + layer) % 3), 0.9] for h in range(8)}
              for layer in range(2)]
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tp")), num_heads=8, num_kv_heads=4, vocab_size=999,
                                 tie_word_embeddings=False, dca=dict(DCA), sparse_config=sparse, shards=2)


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = LLM(model_dir, **ENGINE)
    assert llm.engine.sparse_threshold == 150 and llm.engine.runner.dca.chunk_size == 64
    return llm.generate(PROMPTS, PARAMS)


def _logprob_gap(a, b) -> float:
    gap = 0.0
    for x, y in zip(a, b):
        if x is None:
            assert y is None
            continue
        assert x.token_id == y.token_id
        gap = max(gap, abs(x.logprob - y.logprob))
        assert [t for t, _, _ in x.top] == [t for t, _, _ in y.top]
        gap = max([gap] + [abs(p - q) for (_, _, p), (_, _, q) in zip(x.top, y.top)])
    return gap


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_tp1(model_dir, reference, tp):
    with LLM(model_dir, tensor_parallel_size=tp, **ENGINE) as llm:
        assert llm.engine.runner.tp_size == tp
        assert llm.engine.runner.cache.k.shape[3] == 4 // tp            # this rank's KV heads only
        assert llm.engine.kv_capacity_tokens == 4096
        outs = llm.generate(PROMPTS, PARAMS)
    for ref, out in zip(reference, outs):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == 32
        assert _logprob_gap(ref.outputs[0].logprobs, out.outputs[0].logprobs) < 1e-4
        assert len(out.prompt_logprobs) == len(ref.prompt_logprobs)
        assert _logprob_gap(ref.prompt_logprobs, out.prompt_logprobs) < 1e-4
