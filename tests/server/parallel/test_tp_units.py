"""Tensor-parallel pieces without a process group: the topology from flags and environments, the per-rank
weight slices read from safetensors, and the step messages a worker rebuilds its batches from."""
from __future__ import annotations

import pytest
import torch

from longserve.server.config import load_model_facts
from longserve.server.engine.block_manager import BlockManager
from longserve.server.engine.model_runner import load_state_dict
from longserve.server.engine.prompt_logprobs import PromptLogprobJob
from longserve.server.engine.scheduler import Scheduler
from longserve.server.engine.sequence import Sequence
from longserve.server.hf_config import load_checkpoint
from longserve.server.models.qwen2 import check_tp
from longserve.server.parallel.shards import load_rank_state_dict, split_of
from longserve.server.parallel.steps import StepMirror, StepSender
from longserve.server.parallel.topology import Topology, resolve
from longserve.server.sampling import SamplingParams
from longserve.server.tiny_checkpoint import build_tiny_checkpoint


# --- topology ---------------------------------------------------------------------------------------------
def test_leaderworkerset_environment():
    env = {"LWS_LEADER_ADDRESS": "demo-0.demo.ns", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}
    t = resolve(8, env=env)
    assert (t.nnodes, t.node_rank, t.master_addr, t.master_port) == (2, 1, "demo-0.demo.ns", 29500)
    assert t.gpus_per_node == 4 and not t.is_leader
    assert [t.global_rank(i) for i in range(4)] == [4, 5, 6, 7]        # pod-local GPUs fill ranks in order
    assert t.init_method == "tcp://demo-0.demo.ns:29500"


def test_torchrun_environment_and_flags_win():
    env = {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234", "NNODES": "2", "NODE_RANK": "0", "WORLD_SIZE": "4"}
    t = resolve(4, env=env)
    assert (t.nnodes, t.node_rank, t.master_addr, t.master_port, t.is_leader) == (2, 0, "10.0.0.5", 1234, True)
    t = resolve(4, nnodes=1, master_addr="127.0.0.1", master_port=4321, env=env)
    assert (t.nnodes, t.master_addr, t.master_port) == (1, "127.0.0.1", 4321)


def test_single_pod_picks_a_free_port_and_round_trips_through_worker_env():
    t = resolve(2, env={})
    assert t.nnodes == 1 and t.master_addr == "127.0.0.1" and t.master_port != 29500
    assert resolve(2, env=t.to_env()) == t


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(tp=4, nnodes=3), {}, "multiple of the node count 3"),
    (dict(tp=4, nnodes=2, node_rank=2), {}, "node rank 2 outside"),
    (dict(tp=2), {"WORLD_SIZE": "8"}, "one process per GPU"),
    (dict(tp=2), {"LWS_GROUP_SIZE": "two"}, "node count must be an integer"),
    (dict(tp=2, master_port=70000), {}, "master port"),
])
def test_bad_topologies_are_refused(kwargs, env, message):
    tp = kwargs.pop("tp")
    with pytest.raises(ValueError, match=message):
        resolve(tp, env=env, **kwargs)


def test_tp_must_divide_both_head_counts(tmp_path):
    facts = load_model_facts(build_tiny_checkpoint(str(tmp_path), num_heads=8, num_kv_heads=2))
    check_tp(facts, 2)
    with pytest.raises(ValueError, match="must divide both the 8 attention heads and the 2 KV heads"):
        check_tp(facts, 4)
    with pytest.raises(ValueError, match="multiple of the node count"):
        Topology(tp=2, nnodes=4)


# --- weight slices ----------------------------------------------------------------------------------------
def test_rank_slices_reassemble_the_checkpoint(tmp_path):
    path = build_tiny_checkpoint(str(tmp_path), num_heads=8, num_kv_heads=4, vocab_size=999,
                                 tie_word_embeddings=False, shards=3)
    ckpt = load_checkpoint(path)
    assert len(ckpt.weight_files) > 1
    full = load_state_dict(ckpt.weight_files)
    parts = [load_rank_state_dict(ckpt.weight_files, r, 4, 999) for r in range(4)]
    for name, tensor in full.items():
        kind = split_of(name)
        if kind == "whole":
            assert all(torch.equal(p[name], tensor) for p in parts)
            continue
        dim = 1 if kind == "row" else 0
        joined = torch.cat([p[name] for p in parts], dim=dim)
        if kind == "vocab":
            assert joined.shape[0] == 4 * 250 and not joined[999:].any()      # padded rows are zeros
            joined = joined[:999]
        assert torch.equal(joined, tensor), name
    assert split_of("model.layers.0.self_attn.k_proj.bias") == "column"
    assert split_of("model.layers.0.mlp.down_proj.weight") == "row"


# --- step messages --------------------------------------------------------------------------------------
def _seq(i: int, n: int, params: SamplingParams) -> Sequence:
    return Sequence(f"r{i}", 0, list(range(10 + i, 10 + i + n)), params, 8, arrival_time=0.0)


def test_step_messages_carry_block_table_deltas_and_drops():
    sender = StepSender.__new__(StepSender)        # encoding only: no group, no heartbeat thread
    sender._tables, sender._dropped = {}, []
    mirror, released = StepMirror(), []
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    a, b = _seq(0, 10, params), _seq(1, 3, params)
    sched.add(a)
    sched.add(b)
    sizes = []
    for step in range(6):
        batch = sched.schedule()
        jobs = [PromptLogprobJob(a.seq_id, 1, [11, 12], row=0, k=2)] if step == 0 else []
        message = sender.encode(batch, jobs)
        sizes.append(sum(len(c[8]) for c in message["chunks"]))
        got, got_jobs = mirror.decode(message, released.append)
        assert [(c.seq.seq_id, c.start, c.num_tokens, c.is_decode, c.samples) for c in got.chunks] == \
            [(c.seq.seq_id, c.start, c.num_tokens, c.is_decode, c.samples) for c in batch.chunks]
        for c, g in zip(batch.chunks, got.chunks):
            assert g.seq.block_table == c.seq.block_table
            assert g.seq.token_ids(c.start, c.start + c.num_tokens) == c.seq.token_ids(c.start, c.start + c.num_tokens)
            assert g.seq.prompt_len == c.seq.prompt_len
        assert [(j.seq_id, j.first, j.targets, j.row, j.k) for j in got_jobs] == \
            [(j.seq_id, j.first, j.targets, j.row, j.k) for j in jobs]
        sched.commit(batch)
        for c in batch.chunks:
            if c.samples:
                c.seq.output_token_ids.append(5)
    assert sizes[0] >= 2                  # whole tables first (a's first chunk and all of b)
    assert max(sizes[2:]) <= 2            # then only new blocks (a decode adds at most one each)
    for seq in sched.abort(b.request_id):
        sender.released(seq.seq_id)
    got, _ = mirror.decode(sender.encode(sched.schedule(), []), released.append)
    assert [r.seq_id for r in released] == [b.seq_id] and b.seq_id not in mirror.tables


# --- bench/gpu/tp.py ------------------------------------------------------------------------------------
def test_tp_bench_script_skips_without_enough_gpus(tmp_path):
    """The lent-GPU script exits 0 and says why when the machine has fewer GPUs than --tp (its full CPU smoke
    run, `--smoke`, takes about a minute here and is run by hand; see bench/gpu/README.md)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine could run the real measurement")
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, "bench/gpu/tp.py", "--tp", "2", "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[3], env=dict(os.environ, PYTHONSAFEPATH="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["skipped"].startswith("needs 2 CUDA GPUs") and "skipped" in proc.stdout
