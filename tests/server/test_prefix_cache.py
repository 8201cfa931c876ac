"""Prefix caching in the block manager and scheduler (torch-free): chain hashes, sharing, reference counts
under finish/abort/preemption, LRU eviction of cached free blocks, the whole-prompt-cached case."""
import pytest

from longserve.server.engine.block_manager import BlockManager, OutOfBlocks
from longserve.server.engine.prefix_cache import chain_hash, full_block_hashes
from longserve.server.engine.protocol import FinishReason
from longserve.server.engine.scheduler import Scheduler
from longserve.server.engine.sequence import Sequence
from longserve.server.sampling import SamplingParams

BS = 4


def seq(tokens, rid="r", params=None, t=0.0):
    return Sequence(rid, 0, list(tokens), params or SamplingParams(max_tokens=8), 8, arrival_time=t)


def computed(bm, s):
    """Admit `s` and pretend its whole prompt was computed (what a step's commit does)."""
    bm.admit(s, bm.cached_prefix(s))
    s.num_computed_tokens = s.num_tokens
    bm.register_computed(s)
    return s


def test_chain_hash_names_the_whole_prefix():
    a = full_block_hashes(seq([1, 2, 3, 4, 5, 6, 7, 8, 9]), BS)
    b = full_block_hashes(seq([1, 2, 3, 4, 5, 6, 7, 8]), BS)
    c = full_block_hashes(seq([0, 2, 3, 4, 5, 6, 7, 8]), BS)
    assert len(a) == 2 and a == b                       # only full blocks are named
    assert c[1] != a[1]                                 # same block tokens, other parent: another prefix
    assert a[1] == chain_hash(chain_hash(None, [1, 2, 3, 4]), [5, 6, 7, 8])


def test_shared_prefix_is_reused_and_reference_counted():
    bm = BlockManager(8, BS)
    first = computed(bm, seq(range(10)))                # blocks 0,1 full, block 2 partial
    assert bm.num_cached_blocks == 2
    second = seq([*range(8), 50, 51, 52, 53, 54])
    hits = bm.cached_prefix(second)
    assert hits == first.block_table[:2]
    free = bm.num_free_blocks
    bm.admit(second, hits)
    assert second.num_computed_tokens == 8 and second.block_table[:2] == hits
    assert bm.num_free_blocks == free - 2               # only its own tail is allocated
    bm.free(first)
    assert bm.num_free_blocks == 8 - 4                  # shared blocks still held by `second`
    bm.free(second)
    assert bm.num_free_blocks == 8                      # cached-but-free blocks count as free
    assert bm.num_cached_blocks == 2                    # ... and still hold their prefix
    assert bm.cached_prefix(seq(range(9))) == hits


def test_whole_prompt_cached_recomputes_the_last_block():
    bm = BlockManager(8, BS)
    first = computed(bm, seq(range(8)))
    bm.free(first)
    again = seq(range(8))
    hits = bm.cached_prefix(again)
    assert len(hits) == 1                               # at most (8 - 1) // 4 blocks: the last token is computed
    bm.admit(again, hits)
    assert again.num_computed_tokens == 4 and again.num_pending_tokens == 4
    longer = seq(range(9))                              # one token past two cached blocks: only that token runs
    bm.admit(longer, bm.cached_prefix(longer))
    assert longer.num_computed_tokens == 8 and longer.num_pending_tokens == 1


def test_eviction_takes_never_cached_blocks_first_then_least_recently_freed_tails_first():
    bm = BlockManager(6, BS)
    old = computed(bm, seq(range(100, 108)))            # 2 blocks, cached
    new = computed(bm, seq(range(200, 208)))            # 2 blocks, cached
    bm.free(old)
    bm.free(new)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    filler = seq(range(300, 308))
    bm.admit(filler, [])                                # 2 never-cached blocks: nothing evicted
    assert bm.num_cached_blocks == 4
    tail = seq(range(400, 404))
    bm.admit(tail, [])                                  # evicts `old`'s last block (freed first)
    assert bm.num_cached_blocks == 3
    assert len(bm.cached_prefix(seq(range(100, 109)))) == 1       # head of `old` still cached
    assert len(bm.cached_prefix(seq(range(200, 209)))) == 2


def test_admission_counts_idle_hits_against_free_blocks():
    bm = BlockManager(3, BS)
    bm.free(computed(bm, seq(range(9))))                # 2 cached blocks, free
    s = seq([*range(8), 1, 2, 3, 4, 5])                 # 2 hits (idle) + 2 new blocks > 3 free
    hits = bm.cached_prefix(s)
    assert len(hits) == 2 and not bm.can_admit(s, hits)
    short = seq([*range(8), 1])
    assert bm.can_admit(short, bm.cached_prefix(short))


def test_prompt_logprobs_and_disabled_cache_compute_everything():
    bm = BlockManager(8, BS)
    computed(bm, seq(range(9)))
    assert bm.cached_prefix(seq(range(9), params=SamplingParams(prompt_logprobs=1))) == []
    off = BlockManager(8, BS, enable_prefix_caching=False)
    computed(off, seq(range(9)))
    assert off.num_cached_blocks == 0 and off.cached_prefix(seq(range(9))) == []


def run_step(s):
    batch = s.schedule()
    s.commit(batch)
    for chunk in batch.chunks:
        if chunk.samples:
            chunk.seq.output_token_ids.append(7)
    return batch


def test_scheduler_starts_a_repeat_after_its_cached_prefix_and_registers_chunk_by_chunk():
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=8)
    a = seq(range(20), "a")
    s.add(a)
    run_step(s)
    assert s.blocks.num_cached_blocks == 2              # the first chunk's 8 tokens are reusable already
    while a.is_prefilling:
        run_step(s)
    s.finish(a, FinishReason.STOP)
    b = seq([*range(20), 99], "b", t=1.0)
    s.add(b)
    chunks = run_step(s).chunks
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in chunks] == [("b", 20, 1)]


def test_refcounts_survive_preemption_and_abort():
    bm = BlockManager(6, BS)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = seq(range(8), "a", t=0.0), seq([*range(8), 9], "b", t=1.0)
    s.add(a)
    run_step(s)                                         # a: 2 full blocks, cached at commit
    s.add(b)
    run_step(s)                                         # b shares a's cached first block
    assert b.block_table[0] == a.block_table[0]
    while True:                                         # decode until the cache is short and b is preempted
        batch = run_step(s)
        if batch.preempted:
            break
    assert batch.preempted == [b] and b.block_table == []
    assert a.block_table and bm.num_used_blocks == len(a.block_table)
    s.abort("a")
    assert bm.num_free_blocks == 6                      # every reference returned
    n = b.num_tokens
    chunk, = run_step(s).chunks       # b comes back and reuses what is still cached: its blocks up to the one
    assert chunk.seq is b and b.num_preemptions == 1    # a's growth evicted right after the preemption
    assert chunk.start == (n - 1) // BS * BS - BS and chunk.start + chunk.num_tokens == n
    s.abort("b")
    assert bm.num_free_blocks == 6


def test_shared_block_is_never_handed_out_while_held():
    bm = BlockManager(5, BS)
    a = computed(bm, seq(range(8)))                     # 2 blocks, both cached and held
    b = seq([*range(4), 5, 5, 5, 5, 5])                 # shares a's first block, 2 of its own
    bm.admit(b, bm.cached_prefix(b))
    c = seq(range(50, 54))
    bm.admit(c, [])
    assert not set(c.block_table) & (set(a.block_table) | set(b.block_table))
    assert bm.num_free_blocks == 0
    with pytest.raises(OutOfBlocks):
        bm.admit(seq(range(60, 68)), [])


def test_a_miss_hashes_one_block_and_hashes_are_kept_for_registration():
    bm = BlockManager(64, BS)
    s = seq(range(100))
    assert bm.cached_prefix(s) == [] and len(s.block_hashes) == 16     # a long prompt's miss hashes a few blocks
    bm.admit(s, [])
    s.num_computed_tokens = 40
    bm.register_computed(s)
    assert len(s.block_hashes) == 16 and s.num_registered_blocks == 10 and bm.num_cached_blocks == 10
