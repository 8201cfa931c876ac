"""The shared memory model: its terms, the engine's KV sizing from it (gpu_memory_utilization = a fraction of total
memory), and `serve --model` choosing the planner's prefill chunk for the GPU it finds."""
import json

import pytest

from longserve.operator.catalog import GiB, lookup_model
from longserve.server import memory_model as mm

M7 = lookup_model("Qwen/Qwen2.5-7B-Instruct-1M")
FULL = 1_010_000


def test_mirrored_kernel_constants_stay_equal():
    from longserve.kernels import estimation, paged_attention, sparse_config
    assert mm.ESTIMATE_BLOCK_BYTES == estimation.ESTIMATE_BLOCK_BYTES
    assert mm.DECODE_BLOCK == paged_attention.BLOCK_N
    assert (mm.DEFAULT_SPARSE_THRESHOLD, mm.DEFAULT_LAST_Q) == (sparse_config.DEFAULT_THRESHOLD,
                                                                sparse_config.DEFAULT_LAST_Q)


def test_rank_shapes_divide_heads_and_mlp():
    s = mm.rank_shapes(M7.facts, 2)
    assert (s.num_heads, s.num_kv_heads, s.intermediate_size) == (14, 2, 9472)
    assert s.kv_bytes_per_token * 2 == M7.facts.kv_bytes_per_token(2)
    assert s.dca_chunk_len == 262144 - 8192 and s.sparse_threshold == 32768
    assert mm.rank_shapes(M7.facts, 1, sparse=False).sparse_threshold is None
    assert mm.rank_shapes(M7.facts, 1, dca=False).sparse_threshold is None      # sparse prefill needs DCA
    with pytest.raises(ValueError, match="must divide"):
        mm.rank_shapes(M7.facts, 8)


def test_sub_blocks_cut_at_dca_chunk_boundaries():
    assert mm.sub_blocks(300_000, 65536, 253_952) == [(253_952 - 234_464, 253_952, 1), (46_048, 300_000, 2)]
    assert mm.sub_blocks(1000, 1000, None) == [(1000, 1000, 1)]


def test_peak_is_the_largest_phase_not_the_sum_of_components():
    t = mm.step_transients(mm.rank_shapes(M7.facts, 1), 131072, FULL)
    assert t.peak == max(t.phases.values()) and t.phase == "attention"
    assert t.peak < sum(t.own.values())          # the MLP's and the estimation's buffers are never live together
    dense = mm.step_transients(mm.rank_shapes(M7.facts, 1, sparse=False), 131072, FULL)
    assert dense.phase == "mlp" and dense.components["estimation"] == dense.components["index"] == 0


def test_estimation_grows_linearly_with_context():
    s = mm.rank_shapes(M7.facts, 1)
    a, b, c = (mm.estimation_bytes(s, n) for n in (600_000, 800_000, 1_000_000))
    assert c - b == pytest.approx(b - a, rel=1e-9) == 8 * 28 * 200_000     # linear: 8 bytes per head and key
    assert c < 1 * GiB                                             # not context x last_q x 5 fp32 (~35 GiB)


def test_sparse_budget_maxima_reads_a_config():
    cfg = [{"0": ["vertical_and_slash", 1000, 6096, 0.9], "1": ["vertical_and_slash", 30, 800, 0.95]},
           {"0": ["vertical_and_slash", 3500, 100, 0.9]}]
    assert mm.sparse_budget_maxima(cfg) == (3500, 6096)
    assert mm.sparse_budget_maxima([{"0": ["vertical_and_slash", 30, 100, 1.0]}]) == (130, 100)


def test_choose_chunk_is_the_planners_chunk():
    from longserve.operator.catalog import lookup_gpu
    from longserve.operator.planner import SizingRequest, plan
    for name, gpu, tp in [("Qwen/Qwen2.5-7B-Instruct-1M", "H200-141GB", 1),
                          ("Qwen/Qwen2.5-14B-Instruct-1M", "H200-141GB", 2),
                          ("Qwen/Qwen2.5-14B-Instruct-1M", "H100-80GB", 4)]:
        entry, g = lookup_model(name), lookup_gpu(gpu)
        p = plan(entry, g, SizingRequest(max_model_len=FULL))
        assert p.tensor_parallel_size == tp
        assert mm.choose_chunk(entry.facts, tp=tp, max_model_len=FULL, memory_per_gpu=g.memory_bytes,
                               utilization=0.9) == p.prefill_chunk_tokens


# --- the engine's KV sizing ------------------------------------------------------------------------------------

def _runner(tmp_path, **overrides):
    from longserve.server.config import EngineConfig
    from longserve.server.engine.model_runner import ModelRunner
    from longserve.server.hf_config import load_checkpoint

    cfg = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64,
           "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "vocab_size": 256, "max_position_embeddings": 65536, "rope_theta": 10000.0,
           "dual_chunk_attention_config": {"chunk_size": 8192, "local_size": 1024}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    values = dict(schema_version=1, runtime="native", model_path=str(tmp_path), served_model_name="m",
                  tensor_parallel_size=1, max_model_len=65536, max_num_seqs=2, max_output_tokens=16,
                  prefill_chunk_tokens=4096, gpu_memory_utilization=0.5, load_format="dummy", dtype="float16")
    values.update(overrides)
    return ModelRunner(EngineConfig(**values), load_checkpoint(str(tmp_path)), device="cpu")


def test_engine_kv_sizing_uses_the_shared_functions_and_total_memory(tmp_path):
    runner = _runner(tmp_path)
    total = 8 * GiB
    blocks = runner.kv_blocks_for_memory(total=total, free=total)
    assert runner.kv_blocks_for_memory(total=total, free=total * 3 // 4) == blocks   # free memory is only a check
    s = mm.rank_shapes(runner.facts, 1, dtype_bytes=2, sparse=False)    # no sparse config: dense prefill
    weights = mm.weight_bytes(runner.facts, 1, 2)
    reserve = mm.step_transients(s, 4096, 65536, 2).peak
    kv = 0.5 * total - weights - reserve - mm.overhead_bytes(weights)
    assert blocks == int(kv // (s.kv_bytes_per_token * 16)) and blocks > 0
    # a larger utilisation gives the KV cache exactly the extra fraction of total memory
    more = _runner(tmp_path, gpu_memory_utilization=0.6).kv_blocks_for_memory(total=total, free=total)
    assert more == int((kv + 0.1 * total) // (s.kv_bytes_per_token * 16))
    # a sparse config adds the estimation and the index lists to the reserve
    sparse_cfg = [{str(h): ["vertical_and_slash", 1000, 6096, 0.9] for h in range(4)}] * 2
    sparse = runner.kv_blocks_for_memory(total=total, free=total, sparse_config=sparse_cfg)
    s_sparse = mm.rank_shapes(runner.facts, 1, dtype_bytes=2)
    assert sparse == int((kv + reserve - mm.step_transients(s_sparse, 4096, 65536, 2).peak)
                         // (s.kv_bytes_per_token * 16)) < blocks


def test_engine_kv_sizing_errors_name_the_terms(tmp_path):
    runner = _runner(tmp_path)
    with pytest.raises(ValueError, match="no room for the KV cache.*step transients"):
        runner.kv_blocks_for_memory(total=3 * GiB, free=3 * GiB)    # 1.5 GB < the 1.5 GiB fixed overhead
    with pytest.raises(ValueError, match="free on the GPU.*lower gpu_memory_utilization"):
        runner.kv_blocks_for_memory(total=8 * GiB, free=1 * GiB)


# --- serve --model defaults ------------------------------------------------------------------------------------

def _serve_config(tmp_path, monkeypatch, total, *argv):
    from longserve.bench.memory import write_config
    from longserve.server import serve_cli
    from longserve.server.cli import build_parser
    write_config(M7.facts, str(tmp_path))
    monkeypatch.setattr(serve_cli, "gpu_total_memory", lambda: total)
    return serve_cli.build_config(build_parser().parse_args(["serve", "--model", str(tmp_path), *argv]))


def test_serve_model_chooses_the_planners_chunk_on_a_gpu(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="longserve.serve")
    cfg = _serve_config(tmp_path, monkeypatch, 139 * GiB)
    assert cfg.max_model_len == FULL and cfg.prefill_chunk_tokens == 131072
    logged = [r for r in caplog.records if getattr(r, "event", None) == "prefill_chunk"]
    assert logged and logged[-1].prefill_chunk_tokens == 131072 and "149.3 GB GPU" in logged[-1].getMessage()
    small = _serve_config(tmp_path, monkeypatch, 79 * GiB)           # 7B at 1M on one 80 GB GPU: nothing fits
    assert small.prefill_chunk_tokens == 8192
    shorter = _serve_config(tmp_path, monkeypatch, 22 * GiB, "--max-model-len", "32768")
    assert shorter.prefill_chunk_tokens == mm.choose_chunk(M7.facts, tp=1, max_model_len=32768,
                                                           memory_per_gpu=22 * GiB, utilization=0.9)
    assert _serve_config(tmp_path, monkeypatch, 139 * GiB, "--prefill-chunk-tokens", "4096").prefill_chunk_tokens \
        == 4096


def test_serve_model_sizes_sparse_buffers_from_the_checkpoints_budgets(tmp_path, monkeypatch):
    def config(vertical, slash):
        layers = [{str(h): ["vertical_and_slash", vertical, slash, 0.9] for h in range(28)}] * 28
        (tmp_path / "sparse_attention_config.json").write_text(json.dumps(layers))
        return _serve_config(tmp_path, monkeypatch, 139 * GiB)

    assert config(1000, 6096).prefill_chunk_tokens == 131072
    # budgets as large as the widest heads of Qwen's published 7B config: the index lists need ~32 GB at 131072
    assert config(22032, 24528).prefill_chunk_tokens == 65536
    (tmp_path / "sparse_attention_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="cannot read the sparse attention config"):
        _serve_config(tmp_path, monkeypatch, 139 * GiB)


def test_serve_model_on_a_cpu_keeps_the_documented_default(tmp_path, monkeypatch):
    assert _serve_config(tmp_path, monkeypatch, None).prefill_chunk_tokens == mm.CPU_DEFAULT_CHUNK == 8192


def test_gpu_memory_utilization_is_documented_as_a_fraction_of_total_memory():
    import inspect

    from longserve.server import config
    assert "fraction of the GPU's *total* memory" in inspect.getsource(config.EngineConfig)
