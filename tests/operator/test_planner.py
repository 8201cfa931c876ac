"""Planner tables (issue acceptance, docs/operator.md#worked-plans) and the memory arithmetic (O16
(docs/algorithms.md#oracle-memory-arithmetic))."""
import json
import subprocess
import sys

import pytest

from longserve.operator.catalog import GiB, lookup_gpu, lookup_model
from longserve.operator.memory import memory_breakdown, minimum_total_vram, valid_tensor_parallel_sizes
from longserve.operator.planner import SizingRequest, engine_config_for, plan
from longserve.server import memory_model as mm

M7 = "Qwen/Qwen2.5-7B-Instruct-1M"
M14 = "Qwen/Qwen2.5-14B-Instruct-1M"
FULL = 1_010_000


def run_plan(model, gpu, **kw):
    kw.setdefault("max_model_len", FULL)
    return plan(lookup_model(model), lookup_gpu(gpu), SizingRequest(**kw))


# (model, gpu, request kwargs) -> (feasible, TP, chunk, fraction)
TABLE = [
    ((M7, "H200-141GB", {}), (True, 1, 131072, 0.90)),
    ((M7, "H100-80GB", {}), (True, 2, 131072, 0.90)),
    ((M7, "A100-80GB", {}), (True, 2, 131072, 0.90)),
    ((M7, "H100-80GB", {"objective": "MaxPrefillThroughput"}), (True, 4, 131072, 0.90)),
    ((M7, "H200-141GB", {"objective": "MaxPrefillThroughput"}), (True, 4, 131072, 0.90)),
    ((M14, "H200-141GB", {}), (True, 2, 32768, 0.90)),
    ((M14, "H100-80GB", {}), (True, 4, 131072, 0.90)),
    ((M14, "A100-80GB", {}), (True, 4, 131072, 0.90)),
    ((M14, "H100-80GB", {"objective": "MaxPrefillThroughput"}), (True, 8, 131072, 0.90)),
    ((M14, "H200-141GB", {"gpus_per_node": 1}), (False, None, None, None)),
    ((M14, "H200-141GB", {"mode": "Manual", "tensor_parallel_size": 1}), (False, 1, None, None)),
    ((M7, "L4-24GB", {"max_model_len": 32768}), (True, 1, 8192, 0.90)),
    ((M7, "H200-141GB", {"runtime": "vllm"}), (True, 1, 131072, 0.67)),
    ((M7, "H200-141GB", {"runtime": "vllm", "mode": "Manual", "tensor_parallel_size": 1,
                         "prefill_chunk_tokens": 65536}), (True, 1, 65536, 0.71)),
    ((M14, "H100-80GB", {"runtime": "vllm", "objective": "MaxPrefillThroughput"}), (True, 8, 131072, 0.87)),
    ((M14, "H100-80GB", {"runtime": "sglang", "objective": "MaxPrefillThroughput"}), (True, 8, 131072, 0.80)),
    ((M7, "A100-40GB", {}), (True, 4, 131072, 0.90)),
    ((M7, "L4-24GB", {}), (False, None, None, None)),
]


@pytest.mark.parametrize("case,expected", TABLE,
                         ids=[f"{c[0].split('/')[1]}-{c[1]}-{i}" for i, (c, _) in enumerate(TABLE)])
def test_planner_table(case, expected):
    model, gpu, kw = case
    p = run_plan(model, gpu, **kw)
    assert (p.feasible, p.tensor_parallel_size, p.prefill_chunk_tokens, p.gpu_memory_utilization) == expected
    if p.feasible:
        assert p.kv_capacity_tokens >= p.max_model_len * p.max_num_seqs
        assert p.per_gpu_bytes["total"] <= p.per_gpu_bytes["budget"] or kw.get("runtime") in ("vllm", "sglang")
        assert f"TP={p.tensor_parallel_size}" in p.explanation and str(p.prefill_chunk_tokens) in p.explanation


def test_planner_golden(golden):
    plans = {}
    for (model, gpu, kw), _ in TABLE:
        key = f"{model.split('/')[1]} {gpu} " + " ".join(f"{k}={v}" for k, v in sorted(kw.items()))
        plans[key.strip()] = run_plan(model, gpu, **kw).to_dict()
    golden.check_json("planner/plans.json", plans)


def test_worked_plan_numbers():
    """Worked native plans: per-GPU need / budget in GB (server/memory_model.py, checked by `bench memory`)."""
    cases = [((M7, "H200-141GB", {}), 95.0, 120.9), ((M7, "H100-80GB", {}), 49.2, 68.7),
             ((M14, "H200-141GB", {}), 120.2, 120.9), ((M14, "H100-80GB", {}), 68.0, 68.7),
             ((M14, "H100-80GB", {"objective": "MaxPrefillThroughput"}), 38.4, None),
             ((M7, "H100-80GB", {"objective": "MaxPrefillThroughput"}), 26.6, None)]
    for (model, gpu, kw), need, budget in cases:
        p = run_plan(model, gpu, **kw)
        assert p.per_gpu_bytes["total"] / 1e9 == pytest.approx(need, abs=0.06)
        if budget:
            assert p.per_gpu_bytes["budget"] / 1e9 == pytest.approx(budget, abs=0.06)
    p = run_plan(M7, "H200-141GB")
    got = {k: round(v / 1e9, 1) for k, v in p.per_gpu_bytes.items()}
    # the peak is the sparse attention of the last full chunk: q/k/v and the residual (activations), query
    # variants and fp32 partial outputs (attention), the sparse work lists (counted as estimation)
    assert got["weights"] == 15.2 and got["kv"] == 57.9 and got["activations"] == 3.1
    assert got["attention"] == 11.5 and got["estimation"] == 4.9
    assert got["overhead"] == 2.4


def test_infeasible_14b_one_h200_has_alternatives():
    p = run_plan(M14, "H200-141GB", gpus_per_node=1)
    assert not p.feasible and p.reason == "Infeasible"
    by_tp = {a["tensorParallelSize"]: a for a in p.alternatives}
    assert set(by_tp) == {1, 2, 4, 8}
    assert not by_tp[1]["fitsRequestedLength"] and 400_000 <= by_tp[1]["maxModelLen"] <= 450_000
    assert by_tp[2]["fitsRequestedLength"] and not by_tp[2]["withinGpusPerNode"]
    assert "TP 2 fits" in p.explanation and "tokens fit" in p.explanation
    # the reported longest length really fits, 16 tokens more does not
    longest = by_tp[1]["maxModelLen"]
    assert run_plan(M14, "H200-141GB", gpus_per_node=1, max_model_len=longest).feasible
    assert not run_plan(M14, "H200-141GB", gpus_per_node=1, max_model_len=longest + 16).feasible


def test_manual_tp8_for_7b_names_the_heads():
    p = run_plan(M7, "H200-141GB", mode="Manual", tensor_parallel_size=8)
    assert not p.feasible and p.reason == "InvalidSpec"
    assert "28 attention heads" in p.explanation and "valid: 1, 2, 4" in p.explanation


@pytest.mark.parametrize("kw,fragment", [
    ({"mode": "Manual", "tensor_parallel_size": 2, "prefill_chunk_tokens": 1000}, "multiple of 16"),
    ({"max_model_len": 2_000_000}, "exceeds the model's maximum"),
    ({"gpu_memory_utilization": 0.99}, "gpu_memory_utilization"),
    ({"tensor_parallel_size": 2}, "set only, and TP always, in Manual mode"),
    ({"mode": "Manual"}, "set only, and TP always, in Manual mode"),
    ({"objective": "Fastest"}, "objective must be one of"),
])
def test_invalid_requests_are_rejected_with_reason(kw, fragment):
    p = run_plan(M7, "H200-141GB", **kw)
    assert not p.feasible and p.reason == "InvalidSpec" and fragment in p.explanation


def test_manual_chunk_is_validated_not_trusted():
    too_big = run_plan(M14, "H200-141GB", mode="Manual", tensor_parallel_size=2, prefill_chunk_tokens=131072)
    assert not too_big.feasible and too_big.reason == "Infeasible"
    ok = run_plan(M14, "H200-141GB", mode="Manual", tensor_parallel_size=2, prefill_chunk_tokens=8192)
    assert ok.feasible and ok.prefill_chunk_tokens == 8192


def test_valid_tp_sizes():
    assert valid_tensor_parallel_sizes(lookup_model(M7)) == [1, 2, 4]
    assert valid_tensor_parallel_sizes(lookup_model(M14)) == [1, 2, 4, 8]


def test_kv_bytes_per_token_and_weights():
    m7, m14 = lookup_model(M7), lookup_model(M14)
    assert m7.facts.kv_bytes_per_token(2) == 57_344
    assert m14.facts.kv_bytes_per_token(2) == 196_608
    assert m7.facts.num_parameters() / 1e9 == pytest.approx(7.616, abs=0.001)
    assert m14.facts.num_parameters() / 1e9 == pytest.approx(14.770, abs=0.001)
    assert m7.facts.kv_bytes_per_token(2) * FULL / 1e9 == pytest.approx(57.92, abs=0.01)


def test_activation_arithmetic_and_native_terms_come_from_the_memory_model():
    """70.6 GiB gate/up for an unchunked 10^6-token prefill (7B) vs one 131072-token chunk; the native breakdown is
    the shared memory model's peak phase (activations include the runner's metadata)."""
    f = lookup_model(M7).facts
    gate_up = 10**6 * 2 * f.intermediate_size * 2
    assert gate_up / GiB == pytest.approx(70.57, abs=0.01)
    assert 1 - 32768 / 10**6 == pytest.approx(0.967232)
    bd = memory_breakdown(lookup_model(M7), 1, 131072, FULL, 1, "native", 139 * GiB, 0.9, 0.1)
    t = mm.step_transients(mm.rank_shapes(f, 1), 131072, FULL, 1)
    assert t.phase == "attention"
    assert t.own["activations"] == 3 * 131072 * 3584 * 2 + 3 * 131072 * 18944 * 2     # the MLP phase
    assert bd.activations == t.components["activations"] + t.components["metadata"]
    assert (bd.attention, bd.estimation) == (t.components["attention"],
                                             t.components["estimation"] + t.components["index"])
    assert bd.total == pytest.approx(bd.weights + bd.kv + t.peak + bd.overhead)


@pytest.mark.parametrize("model,published", [(M7, 120e9), (M14, 320e9)])
def test_vllm_minimum_total_vram_within_10_percent_of_published_floor(model, published):
    total, tp, chunk = minimum_total_vram(lookup_model(model), FULL, "vllm")
    assert abs(total - published) / published <= 0.10, (total / 1e9, tp, chunk)
    # the minimum is consistent with the planner: a GPU of that size at that TP is feasible
    per_gpu = total / tp * 1.001
    p = plan(lookup_model(model), None, SizingRequest(max_model_len=FULL, runtime="vllm", mode="Manual",
                                                        tensor_parallel_size=tp, prefill_chunk_tokens=chunk,
                                                        memory_per_gpu_bytes=int(per_gpu)))
    assert p.feasible
    smaller = plan(lookup_model(model), None, SizingRequest(max_model_len=FULL, runtime="vllm", mode="Manual",
                                                              tensor_parallel_size=tp, prefill_chunk_tokens=chunk,
                                                              memory_per_gpu_bytes=int(per_gpu * 0.95)))
    assert not smaller.feasible


def test_plan_is_deterministic_and_engine_config_follows():
    a, b = run_plan(M7, "H200-141GB"), run_plan(M7, "H200-141GB")
    assert a == b
    cfg = engine_config_for(a, model_path="/models/qwen", served_model_name="qwen")
    assert (cfg.tensor_parallel_size, cfg.prefill_chunk_tokens, cfg.max_model_len) == (1, 131072, FULL)
    assert cfg.gpu_memory_utilization == 0.9 and cfg.max_output_tokens == 8192
    with pytest.raises(ValueError, match="infeasible"):
        engine_config_for(run_plan(M14, "H200-141GB", gpus_per_node=1), model_path="m", served_model_name="m")


def _cli(*args):
    env = {"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "longserve.server.cli", "plan", *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_cli_json_fields_and_exit_codes():
    ok = _cli("--model", "qwen/qwen2.5-7b-instruct-1m", "--gpu", "h200-141gb", "-o", "json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    for key in ("feasible", "tensorParallelSize", "prefillChunkTokens", "maxModelLen", "kvCapacityTokens",
                "gpuMemoryUtilization", "perGpuBytes", "totalBytes", "explanation", "alternatives"):
        assert key in data
    assert {"weights", "kv", "activations", "overhead"} <= set(data["perGpuBytes"])
    bad = _cli("--model", M14, "--gpu", "H200-141GB", "--gpus-per-node", "1", "-o", "json")
    assert bad.returncode == 1 and json.loads(bad.stdout)["feasible"] is False
    assert len(bad.stderr.strip().splitlines()) == 1 and "Infeasible" in bad.stderr
    tp8 = _cli("--model", M7, "--gpu", "H200-141GB", "--tensor-parallel-size", "8")
    assert tp8.returncode == 1 and "28 attention heads" in tp8.stderr
    unknown = _cli("--model", M7, "--gpu", "RTX-9999")
    assert unknown.returncode == 2 and "unknown GPU" in unknown.stderr


def test_cli_table_output():
    out = _cli("--model", M14, "--gpu", "A100-80GB")
    assert out.returncode == 0 and "tensor parallel size    4" in out.stdout


def test_cli_accepts_config_json_path(tmp_path):
    cfg = {"num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 1010000,
           "rope_parameters": {"rope_theta": 10000000.0, "rope_type": "default"}, "dtype": "bfloat16",
           "dual_chunk_attention_config": {"chunk_size": 262144, "local_size": 8192,
                                           "original_max_position_embeddings": 262144}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    by_dir = _cli("--model", str(tmp_path), "--gpu", "H200-141GB", "-o", "json")
    assert by_dir.returncode == 0, by_dir.stderr
    data = json.loads(by_dir.stdout)
    assert data["tensorParallelSize"] == 1 and data["kvBytesPerToken"] == 57344
    missing = _cli("--model", str(tmp_path / "nope" / "config.json"), "--gpu", "H200-141GB")
    assert missing.returncode == 2


# --- nodes: TP within a node where it can, across nodes only when needed ---

def test_layout_splits_evenly_over_nodes():
    from longserve.operator.planner import layout
    assert layout(4, 8) == (1, 4) and layout(8, 4) == (2, 4) and layout(8, 8) == (1, 8)
    assert layout(4, 3) == (2, 2) and layout(8, 1) == (8, 1)
    assert layout(6, 4) == (2, 3)                 # the fewest pods with equal GPU counts, not 4 + 2


def test_14b_on_l40s_needs_two_nodes_of_four():
    one = run_plan(M14, "L40S-48GB", gpus_per_node=4)
    assert not one.feasible and one.reason == "Infeasible"
    assert "TP 8 fits (needs 2 nodes of 4 GPUs)" in one.explanation
    alt8 = next(a for a in one.alternatives if a["tensorParallelSize"] == 8)
    assert alt8["nodesNeeded"] == 2 and not alt8["withinNodes"]
    two = run_plan(M14, "L40S-48GB", gpus_per_node=4, nodes=2)
    assert two.feasible and two.tensor_parallel_size == 8
    assert (two.pods_per_replica, two.gpus_per_pod, two.nodes) == (2, 4, 2) and two.multi_node
    assert "2 pods per replica (one per node) with 4 GPUs each" in two.explanation
    d = two.to_dict()
    assert (d["gpusPerPod"], d["podsPerReplica"], d["nodes"], d["gpusPerReplica"]) == (4, 2, 2, 8)


@pytest.mark.parametrize("objective", ["MinGPUs", "MaxPrefillThroughput"])
def test_tp_stays_within_a_node_when_one_fits(objective):
    # 7B on H100s: TP 2 (MinGPUs) or 4 (MaxPrefillThroughput) fit in a node of 4: more nodes change nothing
    single = run_plan(M7, "H100-80GB", gpus_per_node=4, objective=objective)
    multi = run_plan(M7, "H100-80GB", gpus_per_node=4, nodes=4, objective=objective)
    assert multi.tensor_parallel_size == single.tensor_parallel_size <= 4
    assert (multi.pods_per_replica, multi.gpus_per_pod) == (1, single.tensor_parallel_size)
    # 14B on H100s with 2 GPUs per node: TP 2 does not fit, so MaxPrefillThroughput takes the
    # smallest TP across nodes (4 = 2 x 2), not the largest (8 = 4 x 2)
    p = run_plan(M14, "H100-80GB", gpus_per_node=2, nodes=4, objective=objective)
    assert p.feasible and p.tensor_parallel_size == 4 and (p.pods_per_replica, p.gpus_per_pod) == (2, 2)
    assert "no TP within one node fits" in p.explanation


def test_manual_tp_across_nodes_is_validated():
    ok = run_plan(M14, "L40S-48GB", gpus_per_node=4, nodes=2, mode="Manual", tensor_parallel_size=8)
    assert ok.feasible and (ok.pods_per_replica, ok.gpus_per_pod) == (2, 4)
    bad = run_plan(M14, "L40S-48GB", gpus_per_node=4, mode="Manual", tensor_parallel_size=8)
    assert bad.reason == "InvalidSpec"
    assert "exceeds the 4 GPUs per node; it needs 2 nodes of 4 GPUs (set nodes)" in bad.explanation
    assert "nodes must be >= 1" in run_plan(M7, "H200-141GB", nodes=0).explanation


def test_cli_nodes_lays_tp_over_nodes():
    one = _cli("--model", M14, "--gpu", "L40S-48GB", "--gpus-per-node", "4")
    assert one.returncode == 1 and "TP 8: fits the requested length" in one.stdout and "(needs 2 nodes)" in one.stdout
    two = _cli("--model", M14, "--gpu", "L40S-48GB", "--gpus-per-node", "4", "--nodes", "2")
    assert two.returncode == 0, two.stderr
    assert "tensor parallel size    8" in two.stdout
    assert "layout                  2 pod(s) per replica x 4 GPU(s) per pod" in two.stdout
    data = json.loads(_cli("--model", M14, "--gpu", "L40S-48GB", "--gpus-per-node", "4", "--nodes", "2",
                           "-o", "json").stdout)
    assert (data["gpusPerPod"], data["podsPerReplica"], data["nodes"]) == (4, 2, 2)
