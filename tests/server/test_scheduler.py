"""Scheduler tables (torch-free): token budget, decode first, FCFS admission, preemption of the newest."""
import pytest

from longserve.server.engine.block_manager import BlockManager
from longserve.server.engine.scheduler import Scheduler
from longserve.server.engine.sequence import Sequence
from longserve.server.sampling import SamplingParams

P = SamplingParams(max_tokens=64)


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=16):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def new_seq(rid, n, t):
    return Sequence(rid, 0, list(range(n)), P, 64, arrival_time=t)


def run_step(s, sample_token=7):
    """Schedule, pretend the model ran, append a token to every sampling chunk."""
    batch = s.schedule()
    s.commit(batch)
    for chunk in batch.chunks:
        if chunk.samples:
            chunk.seq.output_token_ids.append(sample_token)
    return batch


def test_long_prompt_is_chunked_while_a_running_request_keeps_decoding():
    s = make(budget=16)
    short = new_seq("short", 3, 0.0)
    s.add(short)
    run_step(s)                                               # short prefilled, first token sampled
    s.add(new_seq("long", 100, 1.0))
    table = [[(c.seq.request_id, c.start, c.num_tokens) for c in run_step(s).chunks] for _ in range(8)]
    assert table[0] == [("short", 3, 1), ("long", 0, 15)]     # decode first, the rest of the budget prefills
    assert all(step[0][0] == "short" and step[0][2] == 1 for step in table)   # a token every step
    assert all(sum(n for *_, n in step) <= 16 for step in table)
    long_prefill = [n for step in table for rid, start, n in step if rid == "long" and start < 100]
    assert sum(long_prefill) == 100 and max(long_prefill) == 15


def test_fcfs_a_later_request_waits_for_the_budget():
    s = make(budget=16)
    s.add(new_seq("long", 40, 0.0))
    s.add(new_seq("short", 3, 1.0))
    order = [[c.seq.request_id for c in run_step(s).chunks] for _ in range(3)]
    assert order == [["long"], ["long"], ["long", "short"]]


def test_max_num_seqs_and_blocks_bound_admission():
    s = make(num_blocks=6, block_size=4, max_num_seqs=2, budget=64)
    for i in range(3):
        s.add(new_seq(f"r{i}", 4, float(i)))
    batch = run_step(s)
    assert {c.seq.request_id for c in batch.chunks} == {"r0", "r1"} and len(s.waiting) == 1
    big = make(num_blocks=3, block_size=4, budget=64)
    big.add(new_seq("a", 8, 0.0))
    big.add(new_seq("b", 8, 1.0))
    batch = run_step(big)
    assert [c.seq.request_id for c in batch.chunks] == ["a"]   # b waits for blocks, FCFS


def test_preemption_recomputes_the_newest_and_never_crashes():
    s = make(num_blocks=4, block_size=2, budget=32)
    old, new = new_seq("old", 3, 0.0), new_seq("new", 3, 1.0)
    s.add(old)
    s.add(new)
    preempted = []
    for _ in range(40):
        batch = run_step(s)
        preempted += [p.request_id for p in batch.preempted]
        for seq in list(s.running):
            if len(seq.output_token_ids) >= 3:       # the engine finishes at max_tokens
                s.finish(seq, "length")
        if not s.has_work:
            break
    assert not s.has_work and s.blocks.num_used_blocks == 0
    assert preempted and set(preempted) == {"new"}
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert len(new.output_token_ids) == 3


def test_abort_and_finish_free_blocks():
    s = make()
    a, b = new_seq("a", 10, 0.0), new_seq("b", 10, 1.0)
    s.add(a)
    s.add(b)
    run_step(s)
    used = s.blocks.num_used_blocks
    assert used > 0
    assert [q.request_id for q in s.abort("a")] == ["a"]
    s.finish(b, "stop")
    assert s.blocks.num_used_blocks == 0 and not s.has_work
    assert a.finish_reason == "abort" and b.finish_reason == "stop"


def test_sequence_that_can_never_fit_is_refused():
    s = make(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="never fit"):
        s.add(new_seq("huge", 100, 0.0))
