"""Per-step metadata from incremental per-sequence state: equal to a per-token construction, device block
tables that follow the block manager's lists (tail copies, doubling, reallocation), state dropped on release."""
import math

import pytest
import torch

from longserve.kernels.dca_math import yarn_mscale
from longserve.server.engine import LLM, SamplingParams
from longserve.server.engine.block_manager import BlockManager
from longserve.server.engine.scheduler import ScheduledBatch, ScheduledChunk
from longserve.server.engine.sequence import Sequence
from longserve.server.engine.step_metadata import DeviceBlockTables, StepMetadataBuilder

BS = 4
HEAD_DIM = 16
ORIGINAL_MAX = 8


def _seq(prompt, outputs=(), computed=0):
    seq = Sequence("r", 0, list(prompt), SamplingParams(max_tokens=8), 8)
    seq.output_token_ids.extend(outputs)
    seq.num_computed_tokens = computed
    return seq


def test_token_ids_ranges_span_prompt_and_outputs_without_copying_the_rest():
    seq = _seq([10, 11, 12], [13, 14])
    assert seq.token_ids() == [10, 11, 12, 13, 14]
    assert seq.token_ids(1, 3) == [11, 12]
    assert seq.token_ids(2, 4) == [12, 13]
    assert seq.token_ids(4, 5) == [14] and seq.last_token_id == 14
    assert seq.token_ids(3, 3) == []
    with pytest.raises(ValueError, match="outside"):
        seq.token_ids(2, 6)


def _naive(batch, bs):
    """The per-token construction the builder replaces."""
    ids, pos, blocks, decode_lens, decode_tables = [], [], [], [], []
    for c in batch.chunks:
        s, a, e = c.seq, c.start, c.start + c.num_tokens
        ids += (s.prompt_token_ids + s.output_token_ids)[a:e]
        pos += list(range(a, e))
        blocks += [s.block_table[p // bs] for p in range(a, e)]
        if c.is_decode:
            decode_lens.append(e)
            decode_tables.append(s.block_table)
    return ids, pos, blocks, decode_lens, decode_tables


def test_metadata_equals_the_per_token_construction_for_a_mixed_batch():
    bm = BlockManager(64, BS)
    builder = StepMetadataBuilder(torch.device("cpu"), BS, head_dim=HEAD_DIM,
                                  original_max_position_embeddings=ORIGINAL_MAX)
    decode_a = _seq(range(100, 121), [7], computed=21)          # 22 tokens, decoding the 22nd
    prefill = _seq(range(200, 230), computed=8)                 # prompt chunk [8, 20)
    decode_b = _seq(range(300, 303), [8, 9], computed=4)        # 5 tokens
    recompute = _seq(range(400, 410), [5, 6, 4], computed=6)    # preempted: recompute [6, 13) spans outputs
    for seq, n in ((decode_a, 22), (prefill, 30), (decode_b, 5), (recompute, 13)):
        bm.grow(seq, n)
    batch = ScheduledBatch([ScheduledChunk(decode_a, 21, 1), ScheduledChunk(prefill, 8, 12),
                            ScheduledChunk(decode_b, 4, 1), ScheduledChunk(recompute, 6, 7)])
    ids, meta = builder.build(batch)
    n_ids, n_pos, n_blocks, n_lens, n_tables = _naive(batch, BS)
    assert ids.tolist() == n_ids
    assert meta.positions.tolist() == n_pos
    assert meta.slots.tolist() == [b * BS + p % BS for b, p in zip(n_blocks, n_pos)]
    assert meta.decode_rows.tolist() == [0, 13]
    assert meta.decode_seq_lens.tolist() == n_lens and meta.decode_max_seq_len == 22
    width = -(-22 // BS)
    assert meta.decode_block_tables.shape == (2, width)
    for row, table in zip(meta.decode_block_tables.tolist(), n_tables):
        assert row[:len(table)] == table
    expected = [m * m / math.sqrt(HEAD_DIM) for m in (yarn_mscale(n, ORIGINAL_MAX) for n in n_lens)]
    assert meta.decode_scales.dtype == torch.float64 and meta.decode_scales.tolist() == expected
    spans = {span.rows.start: span for span in meta.prefills}
    assert sorted(spans) == [1, 14]
    assert spans[1].end == 20 and spans[1].prompt_len == 30 and spans[1].block_table.tolist() == prefill.block_table[:5]
    assert spans[14].end == 13 and spans[14].prompt_len == 13
    assert spans[14].block_table.tolist() == recompute.block_table[:4]


def test_device_tables_copy_only_new_blocks_and_grow_by_doubling():
    bm = BlockManager(512, BS)
    tables = DeviceBlockTables(torch.device("cpu"), rows=2, width=4)
    seqs = [_seq(range(3)) for _ in range(3)]
    for i, seq in enumerate(seqs):
        bm.grow(seq, 4 * (i + 1))
        tables.row_of(seq)
    assert tables.table.shape == (4, 4) and tables.num_live == 3        # rows doubled
    row = tables.row_of(seqs[0])
    tables.table[row, 0] = -1                         # a marker: rows are not re-copied once synced
    bm.grow(seqs[0], 4 * 9)                           # 9 blocks: width doubles twice
    assert tables.row_of(seqs[0]) == row and tables.table.shape == (4, 16)
    assert tables.table[row, 1:9].tolist() == seqs[0].block_table[1:9]
    assert tables.table[row, 0].item() == -1          # only the 8 new blocks were copied
    for seq in seqs[1:]:
        assert tables.table[tables.row_of(seq), :len(seq.block_table)].tolist() == seq.block_table


def test_freed_and_regrown_tables_are_rebuilt_and_dropped_rows_reused():
    bm = BlockManager(16, BS)
    tables = DeviceBlockTables(torch.device("cpu"), rows=2, width=8)
    a, b = _seq(range(3)), _seq(range(3))
    bm.grow(a, 12)
    bm.grow(b, 8)
    row_a = tables.row_of(a)
    tables.row_of(b)
    bm.free(a)                                        # preemption frees the list and starts a new one
    bm.free(b)
    bm.grow(b, 4)
    bm.grow(a, 8)                                     # same sequence, other physical blocks, fewer of them
    assert tables.row_of(a) == row_a
    assert tables.table[row_a, :2].tolist() == a.block_table
    tables.drop(a.seq_id)
    c = _seq(range(3))
    bm.grow(c, 4)
    assert tables.row_of(c) == row_a and tables.num_live == 2


def test_preempted_sequences_in_a_batch_lose_their_device_rows():
    bm = BlockManager(16, BS)
    builder = StepMetadataBuilder(torch.device("cpu"), BS, head_dim=HEAD_DIM, original_max_position_embeddings=0)
    victim, other = _seq(range(8)), _seq(range(8))
    for seq in (victim, other):
        bm.grow(seq, 8)
    builder.build(ScheduledBatch([ScheduledChunk(victim, 0, 8), ScheduledChunk(other, 0, 8)]))
    assert builder.tables.num_live == 2
    bm.free(victim)
    victim.reset_for_recompute()
    builder.build(ScheduledBatch([], preempted=[victim]))
    assert builder.tables.num_live == 1


def test_chunks_beyond_the_block_table_are_refused():
    bm = BlockManager(16, BS)
    builder = StepMetadataBuilder(torch.device("cpu"), BS, head_dim=HEAD_DIM, original_max_position_embeddings=0)
    seq = _seq(range(12))
    bm.grow(seq, 8)
    with pytest.raises(ValueError, match="block table covers 8"):
        builder.build(ScheduledBatch([ScheduledChunk(seq, 0, 12)]))


def test_engine_drops_device_state_of_preempted_finished_and_aborted_sequences(tiny_model_dir):
    """A KV cache too small for all sequences forces preemptions: after every step only running sequences hold
    device rows, and none is left once everything finished or was aborted."""
    llm = LLM(tiny_model_dir, prefill_chunk_tokens=32, kv_capacity_tokens=80, kv_block_size=16)
    engine, tables = llm.engine, llm.engine.runner.step_metadata.tables
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", list(range(3 + i, 13 + i)), params)
    preemptions = 0
    while engine.has_work():
        engine.step()
        preemptions += sum(s.num_preemptions for s in engine.scheduler.waiting)
        assert tables.num_live <= len(engine.scheduler.running)
    assert preemptions > 0 and tables.num_live == 0
    engine.add_request("gone", list(range(3, 40)), params)
    engine.step()
    assert tables.num_live == 1
    engine.abort("gone")
    assert tables.num_live == 0


def test_bench_host_runs_the_runner_at_two_contexts(capsys):
    """`longserve bench host` in smoke size: real 7B shapes (one layer) on the meta device, two contexts."""
    from longserve.bench import host
    result = host.measure("Qwen/Qwen2.5-7B-Instruct-1M", [64, 5000], batch=2, steps=2, layers=1)
    assert [r["context"] for r in result["rows"]] == [64, 5000] and result["layers"] == 1
    assert all(r["metadataMs"] > 0 and r["stepMs"] >= r["metadataMs"] for r in result["rows"])
    assert result["rows"][0]["metadataRatio"] == 1.0
    assert "5000" in host.table(result)


def test_repetition_mask_follows_new_outputs_without_rebuilding():
    from longserve.server.layers.sampler import SeenTokens
    seen = SeenTokens()
    seq = _seq([5, 9, 5, 3])
    first = seen.mask(seq, 16, torch.device("cpu"))
    seq.output_token_ids.extend([12, 9])
    again = seen.mask(seq, 16, torch.device("cpu"))
    assert again is first                                  # updated in place, not rebuilt from the history
    assert again.nonzero().flatten().tolist() == sorted({5, 9, 3, 12})
    seen.drop(seq.seq_id)
    assert seen.num_live == 0


def test_engine_with_repetition_penalty_drops_its_masks(tiny_model_dir):
    llm = LLM(tiny_model_dir, prefill_chunk_tokens=32, kv_capacity_tokens=512)
    params = SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=1, max_tokens=6, ignore_eos=True)
    llm.generate([list(range(3, 40)), list(range(5, 30))], params)
    assert llm.engine.runner.seen_tokens.num_live == 0
