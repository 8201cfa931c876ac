"""The engine against transformers (independent oracle) and against the reference DCA forward."""
import pytest
import torch

from longserve.kernels.reference.dca import dual_chunk_attention_reference
from longserve.server.engine import LLM, SamplingParams
from longserve.server.engine.scheduler import ScheduledBatch, ScheduledChunk
from longserve.server.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
TOY_DCA = {"chunk_size": 64, "local_size": 16, "original_max_position_embeddings": 0}


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def _engine_prefill_logits(llm, ids, chunk):
    """Logits for every prompt position, computed by the engine in prefill chunks of `chunk` tokens."""
    engine = llm.engine
    seq = Sequence("probe", 0, list(ids), SamplingParams(max_tokens=1), 1)
    engine.blocks.grow(seq, len(ids))
    rows = []
    try:
        for start in range(0, len(ids), chunk):
            n = min(chunk, len(ids) - start)
            batch = ScheduledBatch([ScheduledChunk(seq, start, n)])
            ids_t, meta = engine.runner._metadata(batch)
            from longserve.server.layers.attention import PagedDCABackend
            with torch.inference_mode():
                hidden = engine.runner.model(ids_t, PagedDCABackend(engine.runner.cache, meta, engine.runner.dca,
                                                                    engine.runner.sparse_budgets))
                rows.append(engine.runner.model.logits(hidden))
            seq.num_computed_tokens = start + n
    finally:
        engine.blocks.free(seq)
    return torch.cat(rows)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, prefill_chunk_tokens=64, kv_capacity_tokens=8192)


def test_prefill_logits_match_transformers(llm, tiny_model_dir, hf_model):
    hf = hf_model(tiny_model_dir)
    ids = _prompt(120)
    ours = _engine_prefill_logits(llm, ids, 48)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, rel


def test_greedy_32_tokens_identical_to_transformers(llm, tiny_model_dir, hf_model, golden):
    hf = hf_model(tiny_model_dir)
    prompts = [_prompt(n, seed=n) for n in (1, 7, 63, 100)]
    outs = llm.generate(prompts, GREEDY)
    ours = []
    for ids, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"
        ours.append(out.outputs[0].token_ids)
    golden.check_json("engine/greedy_token_ids.json", ours)


def test_batch_equals_each_alone(llm):
    settings = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=12, ignore_eos=True),
                SamplingParams(temperature=1.2, top_k=20, seed=2, max_tokens=12, ignore_eos=True),
                SamplingParams(temperature=0.7, min_p=0.05, seed=3, max_tokens=10, ignore_eos=True),
                SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=4, max_tokens=12, ignore_eos=True),
                SamplingParams(temperature=0.9, presence_penalty=1.0, frequency_penalty=0.5, seed=5, max_tokens=9,
                               ignore_eos=True),
                SamplingParams(temperature=1.0, seed=6, max_tokens=12, n=2, ignore_eos=True),
                SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True)]
    prompts = [_prompt(n, seed=10 + n) for n in (5, 17, 40, 70, 90, 33, 61, 128)]
    together = llm.generate(prompts, settings)
    for ids, p, out in zip(prompts, settings, together):
        alone = llm.generate([ids], p)[0]
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in alone.outputs]
    assert together[6].outputs[0].token_ids != together[6].outputs[1].token_ids
    assert len(together[7].outputs[0].logprobs[0].top) == 3


def _naive_dca_logits(hf, ids, dca):
    """Full-sequence forward with the transformers weights and the reference DCA attention (no cache)."""
    m = hf.model
    cfg = hf.config
    x = m.embed_tokens(torch.tensor(ids))
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    for layer in m.layers:
        h = layer.input_layernorm(x)
        a = layer.self_attn
        q = a.q_proj(h).view(len(ids), H, D)
        k = a.k_proj(h).view(len(ids), G, D)
        v = a.v_proj(h).view(len(ids), G, D)
        o = dual_chunk_attention_reference(q, k, v, rope_theta=cfg.rope_parameters["rope_theta"],
                                           chunk_size=dca["chunk_size"], local_size=dca["local_size"])
        x = x + a.o_proj(o.reshape(len(ids), H * D))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return hf.lm_head(m.norm(x))


@pytest.fixture(scope="module")
def dca_llm(tiny_dca_model_dir):
    return LLM(tiny_dca_model_dir, prefill_chunk_tokens=32, kv_capacity_tokens=8192)


def test_dca_engine_equals_naive_reference_forward(dca_llm, tiny_dca_model_dir, hf_model):
    hf = hf_model(tiny_dca_model_dir)
    for n in (300, 333):
        ids = _prompt(n, seed=n)
        with torch.no_grad():
            ref = _naive_dca_logits(hf, ids, TOY_DCA)
        ours = _engine_prefill_logits(dca_llm, ids, 32)
        assert (ours - ref).abs().max() / ref.abs().max() < 1e-4


def test_dca_model_equals_plain_rope_up_to_chunk_size_plus_one(dca_llm, tiny_dca_model_dir, hf_model):
    hf = hf_model(tiny_dca_model_dir)
    ids = _prompt(120, seed=3)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = _engine_prefill_logits(dca_llm, ids, 16)
    exact = TOY_DCA["chunk_size"] + 1          # positions 0 .. chunk_size: every relative position is exact
    scale = ref.abs().max()
    inside = (ours[:exact] - ref[:exact]).abs().max() / scale
    beyond = (ours[exact:] - ref[exact:]).abs().max() / scale
    assert inside < 1e-5
    assert beyond > 100 * inside      # beyond chunk_size + 1 the DCA really remaps positions


@pytest.mark.parametrize("chunk", [16, 47, 48, 49, 96])
def test_dense_chunked_prefill_equals_unchunked(dca_llm, chunk):
    ids = _prompt(200, seed=chunk)
    whole = _engine_prefill_logits(dca_llm, ids, 200)
    parts = _engine_prefill_logits(dca_llm, ids, chunk)
    assert (whole - parts).abs().max() / whole.abs().max() < 1e-5


def test_dca_decode_continues_the_prefill(dca_llm, tiny_dca_model_dir, hf_model):
    """Greedy decode past several DCA chunks equals argmax of the naive full-sequence forward."""
    hf = hf_model(tiny_dca_model_dir)
    ids = _prompt(150, seed=9)
    out = dca_llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    seq = ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = _naive_dca_logits(hf, seq[:-1], TOY_DCA)
    assert ref[len(ids) - 1:].argmax(-1).tolist() == out.outputs[0].token_ids
