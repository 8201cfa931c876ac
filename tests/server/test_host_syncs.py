"""Device->host syncs of one engine step, counted through the runner's real code on the Triton path.

The meta device stands in for a GPU: with `dispatch.tracing()` the Triton wrappers run their host code without
launching, and any read of a device value (`.item()`, `int(t)`, `.tolist()`, `nonzero`, a copy to the host)
raises `HostSyncInTrace` naming the call site. A clean trace therefore proves a count of exactly zero. The CPU
runs (real tensors, Triton interpreter) count what the sampler reads back, which needs real logits.
"""
import dataclasses

import pytest
import torch

from longserve.bench.trace import HostSyncInTrace, trace
from longserve.kernels import dispatch
from longserve.server.engine.llm_engine import LLMEngine
from longserve.server.engine.offline import default_engine_config
from longserve.server.engine.scheduler import ScheduledBatch, ScheduledChunk
from longserve.server.engine.sequence import Sequence
from longserve.server.sampling import SamplingParams
from longserve.server.tiny_checkpoint import build_tiny_checkpoint

NUM_LAYERS = 2
SPARSE_THRESHOLD = 150
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """DCA with YaRN on (so per-sequence scales differ) and sparse prefill above 150 tokens."""
    sparse = [{str(h): ["vertical_and_slash", 64, 64, 0.9] for h in range(4)} for _ in range(NUM_LAYERS)]
    dca = {"chunk_size": 64, "local_size": 16, "original_max_position_embeddings": 32,
           "sparse_attention_threshold": SPARSE_THRESHOLD}
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("syncs")), dca=dca, sparse_config=sparse,
                                 num_layers=NUM_LAYERS, max_position_embeddings=8192)


def _engine(model_dir, device):
    config = default_engine_config(model_dir, kv_capacity_tokens=8192, prefill_chunk_tokens=64, dtype="float32")
    if device == "meta":
        config = dataclasses.replace(config, load_format="dummy")
    return LLMEngine(config, device=device)


@pytest.fixture(scope="module")
def meta_engine(model_dir):
    return _engine(model_dir, "meta")


@pytest.fixture(scope="module")
def cpu_engine(model_dir):
    return _engine(model_dir, "cpu")


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")


def _tokens(n):
    return [3 + (i * 7) % 900 for i in range(n)]


def _decode_batch(engine, lengths):
    """One decode token for each sequence; sequence i has `lengths[i]` tokens including the new one."""
    chunks = []
    for n in lengths:
        seq = Sequence("decode", 0, _tokens(n - 1), GREEDY, 4)
        seq.output_token_ids.append(11)
        engine.blocks.grow(seq, n)
        seq.num_computed_tokens = n - 1
        chunks.append(ScheduledChunk(seq, n - 1, 1))
    return ScheduledBatch(chunks)


def _prefill_batch(engine, context, chunk):
    """A prefill chunk of `chunk` tokens after `context` cached ones (prompt `context + chunk` tokens)."""
    seq = Sequence("prefill", 0, _tokens(context + chunk), GREEDY, 4)
    engine.blocks.grow(seq, context + chunk)
    seq.num_computed_tokens = context
    return ScheduledBatch([ScheduledChunk(seq, context, chunk)])


def _release(engine, batch):
    for chunk in batch.chunks:
        engine.blocks.free(chunk.seq)
        engine.runner.release(chunk.seq)


def _meta_syncs(engine, batch):
    """Syncs of the runner's metadata + model forward on the meta device (raises at the first one)."""
    try:
        with dispatch.tracing(), trace() as t:
            engine.runner.forward_logits(batch)
    finally:
        _release(engine, batch)
    return t.report


@pytest.mark.parametrize("lengths", [(5, 40, 70), (300, 1500, 4000)], ids=["short", "long"])
def test_decode_step_reads_nothing_back_in_the_layers(meta_engine, lengths):
    report = _meta_syncs(meta_engine, _decode_batch(meta_engine, lengths))
    assert report.num_syncs == 0, report.sync_sites


@pytest.mark.parametrize("context", [192, 3000], ids=["short", "long"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_prefill_chunk_syncs_are_a_constant_independent_of_the_context(meta_engine, context, sparse):
    """Dense and sparse (estimation, index conversion, vertical-slash) prefill chunks above the threshold: zero
    syncs on the device path at both context lengths."""
    saved = meta_engine.runner.sparse_budgets
    meta_engine.runner.sparse_budgets = saved if sparse else None
    try:
        report = _meta_syncs(meta_engine, _prefill_batch(meta_engine, context, 64))
    finally:
        meta_engine.runner.sparse_budgets = saved
    assert report.num_syncs == 0, report.sync_sites
    assert ("estimation" in report.component_peaks) == sparse      # the sparse path really ran


def test_mixed_step_decodes_and_prefill_together(meta_engine):
    decode = _decode_batch(meta_engine, (33, 900))
    prefill = _prefill_batch(meta_engine, 256, 64)
    batch = ScheduledBatch(decode.chunks + prefill.chunks)
    report = _meta_syncs(meta_engine, batch)
    assert report.num_syncs == 0, report.sync_sites


def test_the_trace_sees_a_decode_that_reads_lengths_back(meta_engine):
    """The instrument works: without the step's precomputed max length the decode reads it back and the
    meta trace refuses it."""
    from longserve import kernels
    runner = meta_engine.runner
    batch = _decode_batch(meta_engine, (20, 50))
    try:
        _, meta = runner._metadata(batch)
        q = torch.empty((2, 4, runner.facts.head_dim), device="meta")
        with dispatch.tracing(), trace() as t:
            kernels.paged_dca_decode(q, runner.cache.k[0], runner.cache.v[0], meta.decode_block_tables,
                                     meta.decode_seq_lens, max_seq_len=meta.decode_max_seq_len,
                                     scales=meta.decode_scales, rope_theta=10000.0, chunk_size=64, local_size=16)
        assert t.report.num_syncs == 0
        with pytest.raises((HostSyncInTrace, NotImplementedError)):      # meta tensors hold no values
            with dispatch.tracing(), trace() as t:
                kernels.paged_dca_decode(q, runner.cache.k[0], runner.cache.v[0], meta.decode_block_tables,
                                         meta.decode_seq_lens, rope_theta=10000.0, chunk_size=64, local_size=16)
        assert [site for site in t.report.sync_sites if "kernels/dca_decode.py" in site]
    finally:
        _release(meta_engine, batch)


def test_decode_step_on_real_tensors_reads_back_once_in_the_sampler(cpu_engine, monkeypatch):
    """Real CPU tensors through the Triton interpreter, runner.execute end to end: the layers and the metadata
    read nothing back, and the sampler reads the step's tokens and log-probabilities in one `.tolist()` (which
    the dispatch trace cannot see on CPU tensors, so it is counted here by its caller)."""
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    readbacks = []
    tolist = torch.Tensor.tolist

    def counted(self):
        caller = os.path.abspath(sys._getframe(1).f_code.co_filename)
        if caller.startswith(root) and os.sep + "tests" + os.sep not in caller:
            readbacks.append(os.path.relpath(caller, root))
        return tolist(self)

    lengths = (9, 120, 700)
    batch = _decode_batch(cpu_engine, lengths)
    try:
        monkeypatch.setattr(torch.Tensor, "tolist", counted)
        with trace() as t:
            result = cpu_engine.runner.execute(batch, {})
    finally:
        _release(cpu_engine, batch)
    assert len(result.sampled) == len(lengths)
    assert t.report.num_syncs == 0, t.report.sync_sites
    assert readbacks == ["server/layers/sampler.py"]


def test_constrained_decode_step_still_reads_back_once(cpu_engine, monkeypatch):
    """Grammar masks (structured output) add a host->device copy of the step's bitmasks, never a readback."""
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    readbacks = []
    tolist = torch.Tensor.tolist

    def counted(self):
        caller = os.path.abspath(sys._getframe(1).f_code.co_filename)
        if caller.startswith(root) and os.sep + "tests" + os.sep not in caller:
            readbacks.append(os.path.relpath(caller, root))
        return tolist(self)

    lengths = (9, 120, 700)
    batch = _decode_batch(cpu_engine, lengths)
    params = SamplingParams(guided_json='{"type": "object", "properties": {"a": {"type": "integer"}}}')
    constraints = {c.seq.seq_id: cpu_engine.grammars.constraint(params) for c in batch.chunks[:2]}
    try:
        monkeypatch.setattr(torch.Tensor, "tolist", counted)
        with trace() as t:
            result = cpu_engine.runner.execute(batch, {}, constraints=constraints)
    finally:
        _release(cpu_engine, batch)
    assert t.report.num_syncs == 0, t.report.sync_sites
    assert readbacks == ["server/layers/sampler.py"]
    brace = cpu_engine.tokenizer.encode("{")
    assert [s.token_id for s in result.sampled[:2]] == brace * 2     # the grammar's only first token


def test_paged_attention_wrapper_bounds_its_grid_without_a_readback():
    """Without `max_num_keys` the split grid is sized from the block tables' capacity, not read back."""
    from longserve.kernels.paged_attention import paged_attention_decode
    B, H, G, D, page = 3, 8, 2, 64, 16
    q = torch.empty((B, H, D), device="meta")
    cache = torch.empty((64, page, G, D), device="meta")
    tables = torch.empty((B, 20), dtype=torch.int32, device="meta")
    start = torch.empty(B, dtype=torch.int64, device="meta")
    with dispatch.tracing(), trace() as t:
        o, lse = paged_attention_decode(q, cache, cache, tables, start, start, scale=0.125)
    assert t.report.num_syncs == 0 and o.shape == (B, H, D) and lse.shape == (B, H)
