"""Prompt log-probabilities (SamplingParams.prompt_logprobs) against independent oracles: transformers' log-softmax
on short prompts, the fp64 reference DCA forward on longer ones, and the engine's own sparse forward."""
import pytest
import torch

from longserve.server.engine import LLM, SamplingParams
from longserve.server.engine.prompt_logprobs import wanted_positions
from longserve.server.engine.protocol import PromptLogprobs
from longserve.server.tiny_checkpoint import build_tiny_checkpoint
from tests.server.test_engine import TOY_DCA, _engine_prefill_logits, _naive_dca_logits, _prompt

SCORE = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=3)


def _ours(out):
    """(logprobs [n-1], top ids [n-1, k], top logprobs [n-1, k]) of an offline RequestOutput, checking its layout."""
    entries = out.prompt_logprobs
    assert entries[0] is None and len(entries) == len(out.prompt_token_ids)
    assert [e.token_id for e in entries[1:]] == out.prompt_token_ids[1:]
    lp = torch.tensor([e.logprob for e in entries[1:]], dtype=torch.float64)
    top_ids = torch.tensor([[t for t, _, _ in e.top] for e in entries[1:]])
    top_lp = torch.tensor([[v for _, _, v in e.top] for e in entries[1:]], dtype=torch.float64)
    return lp, top_ids, top_lp


def _expected(logits, ids):
    logp = torch.log_softmax(logits.double(), dim=-1)[:-1]
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logp


def test_wanted_positions_cover_each_prompt_token_once():
    covered = []
    for start in range(0, 10, 4):              # chunks [0,4) [4,8) [8,10) of a 10-token prompt
        lo, hi = wanted_positions(start, min(4, 10 - start), 10, len(covered) + 1)
        covered += range(lo, hi)
    assert covered == list(range(1, 10))
    assert wanted_positions(0, 10, 10, 10) == (10, 10)     # all scored already (recompute after preemption)


@pytest.mark.parametrize("chunk", [16, 48, 64, 208])
def test_prompt_logprobs_match_transformers(tiny_model_dir, hf_model, chunk):
    hf = hf_model(tiny_model_dir)
    llm = LLM(tiny_model_dir, prefill_chunk_tokens=chunk, kv_capacity_tokens=4096)
    prompts = [_prompt(n, seed=n) for n in (2, 50, 121)]
    outs = llm.generate(prompts, SCORE)
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref_lp, logp = _expected(hf(torch.tensor([ids])).logits[0], ids)
        lp, top_ids, top_lp = _ours(out)
        assert (lp - ref_lp).abs().max() < 1e-4
        ref_top = logp.topk(3, dim=-1)
        assert torch.equal(top_ids, ref_top.indices)
        assert (top_lp - ref_top.values).abs().max() < 1e-4
        ranks = [e.rank for e in out.prompt_logprobs[1:]]
        assert ranks == ((logp > ref_lp[:, None]).sum(dim=-1) + 1).tolist()
        assert [o.token_ids for o in out.outputs] == [[]] and out.outputs[0].finish_reason == "length"


def test_prompt_logprobs_with_generation_and_n(tiny_model_dir):
    """Generated tokens are unchanged by asking for prompt log-probabilities; n choices score the prompt once."""
    llm = LLM(tiny_model_dir, prefill_chunk_tokens=32, kv_capacity_tokens=4096)
    ids = _prompt(70, seed=1)
    plain = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    both = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, n=2,
                                              prompt_logprobs=0))[0]
    assert both.outputs[0].token_ids == plain.outputs[0].token_ids == both.outputs[1].token_ids
    assert len(both.prompt_logprobs) == 70 and all(e.top == () for e in both.prompt_logprobs[1:])


def test_prompt_logprobs_events_are_chunked_and_in_order(tiny_model_dir):
    llm = LLM(tiny_model_dir, prefill_chunk_tokens=16, kv_capacity_tokens=4096)
    engine = llm.engine
    engine.add_request("r", _prompt(50), SamplingParams(max_tokens=1, prompt_logprobs=0))
    events = []
    while engine.has_work():
        events += [e for e in engine.step() if isinstance(e, PromptLogprobs)]
    assert [(e.start, len(e.logprobs)) for e in events] == [(1, 16), (17, 16), (33, 16), (49, 1)]


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(ValueError, match="needs prompt_logprobs"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21)


def test_dca_prompt_logprobs_match_fp64_reference_forward(tiny_dca_model_dir, hf_model):
    """300- and 333-token prompts cross several DCA chunks (64) and prefill chunks (48)."""
    hf = hf_model(tiny_dca_model_dir).double()
    llm = LLM(tiny_dca_model_dir, prefill_chunk_tokens=48, kv_capacity_tokens=4096)
    for n in (300, 333):
        ids = _prompt(n, seed=n)
        with torch.no_grad():
            ref_lp, logp = _expected(_naive_dca_logits(hf, ids, TOY_DCA), ids)
        lp, top_ids, top_lp = _ours(llm.generate([ids], SCORE)[0])
        assert (lp - ref_lp).abs().max() < 1e-4
        assert (top_lp - logp.topk(3, dim=-1).values).abs().max() < 1e-4


@pytest.fixture(scope="module")
def sparse_model_dir(tmp_path_factory):
    sparse = [{str(h): ["vertical_and_slash", 64, 64, 0.9] for h in range(4)} for _ in range(2)]
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_sparse")), dca=dict(TOY_DCA),
                                 sparse_config=sparse)


def test_sparse_prefill_prompt_logprobs(sparse_model_dir):
    """With sparse prefill on (threshold 150 < 320 tokens): exactly the log-softmax of the engine's own sparse
    forward, and close to the dense result's distribution."""
    ids = _prompt(320, seed=5)
    sparse = LLM(sparse_model_dir, prefill_chunk_tokens=48, kv_capacity_tokens=4096, sparse_threshold=150)
    assert sparse.engine.sparse_threshold == 150
    lp, _, _ = _ours(sparse.generate([ids], SCORE)[0])
    ref_lp, _ = _expected(_engine_prefill_logits(sparse, ids, 48), ids)
    assert (lp - ref_lp).abs().max() < 1e-4
    dense = LLM(sparse_model_dir, prefill_chunk_tokens=48, kv_capacity_tokens=4096, sparse_prefill=False)
    dense_lp, _, _ = _ours(dense.generate([ids], SCORE)[0])
    assert not torch.equal(lp, dense_lp)               # the sparse path really ran
    assert (lp - dense_lp).abs().mean() < 0.05


def test_preemption_by_recompute_neither_duplicates_nor_loses_prompt_logprobs(tiny_model_dir):
    """Two requests outgrow a 128-token cache while decoding: the newest is preempted and recomputed, and its
    prompt log-probabilities still arrive once per token, equal to an unpreempted run's."""
    from longserve.server.engine.protocol import RequestFinished

    prompts = {"a": _prompt(40, seed=1), "b": _prompt(40, seed=2)}
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)
    alone = LLM(tiny_model_dir, prefill_chunk_tokens=32, kv_capacity_tokens=4096)
    expected = {rid: [e.logprob for e in alone.generate([ids], params)[0].prompt_logprobs[1:]]
                for rid, ids in prompts.items()}
    engine = LLM(tiny_model_dir, prefill_chunk_tokens=32, kv_capacity_tokens=128).engine
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    seen = {rid: [] for rid in prompts}
    preemptions = 0
    while engine.has_work():
        for event in engine.step():
            if isinstance(event, PromptLogprobs):
                assert event.start == len(seen[event.request_id]) + 1       # in order, no gap, no repeat
                seen[event.request_id] += [e.logprob for e in event.logprobs]
            elif isinstance(event, RequestFinished):
                preemptions += event.num_preemptions
    assert preemptions > 0
    for rid in prompts:
        assert seen[rid] == pytest.approx(expected[rid], abs=1e-5)


def test_score_rows_in_bounded_blocks_equals_one_block():
    """The LM head never sees more than `block_rows` rows, and block edges change nothing."""
    from longserve.server.engine.prompt_logprobs import score_rows

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (50,), generator=g)
    seen = []

    def head(rows):
        seen.append(rows.shape[0])
        return rows @ weight.t()
    blocked = score_rows(hidden, head, targets, 4, block_rows=7)
    assert max(seen) == 7 and sum(seen) == 50
    whole = score_rows(hidden, lambda rows: rows @ weight.t(), targets, 4, block_rows=4096)
    assert torch.allclose(blocked, whole)
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1).double()
    assert torch.allclose(whole[:, 0], logp.gather(1, targets[:, None])[:, 0], atol=1e-5)
