"""`longserve bench memory` at a small shape: it traces the engine's real code (a planted temporary shows up in the
peak), its JSON agrees with the planner's memory model, and estimation memory grows linearly with the context."""
import json

import pytest
import torch

from longserve.bench import memory as bench

# 32 query heads make the estimation's key block (about 128 MiB of [H, 64, block] fp32 logits) 16384 keys, so
# contexts of 64K-256K show its bound
CONFIG = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2, "hidden_size": 512,
          "intermediate_size": 1024, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 16,
          "vocab_size": 1024, "max_position_embeddings": 262144, "rope_theta": 1e6,
          "dual_chunk_attention_config": {"chunk_size": 16384, "local_size": 2048,
                                          "sparse_attention_threshold": 8192}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-memory-model")
    (d / "config.json").write_text(json.dumps(CONFIG))
    return str(d)


def _measure(model_dir, **kw):
    kw.setdefault("prompt_tokens", 40960)
    kw.setdefault("chunk", 8192)
    kw.setdefault("tp", 1)
    return bench.measure(model_dir, "L4-24GB", **kw)


@pytest.mark.parametrize("dense,tp", [(False, 1), (True, 1), (False, 2)])
def test_bench_json_agrees_with_the_planners_memory_model(model_dir, dense, tp):
    """At TP 2 the runner is rank 0 of the sharded model (half the heads, KV heads, MLP columns and vocabulary)."""
    r = _measure(model_dir, dense=dense, tp=tp)
    for key in ("peakTransientBytes", "planTransientBytes", "kvBytes", "fits", "components", "model", "gpu", "tp",
                "chunk", "prompt"):
        assert key in r
    assert r["fits"] and r["peakTransientBytes"] > 0
    assert abs(r["peakTransientBytes"] - r["planTransientBytes"]) <= 0.10 * r["planTransientBytes"]
    assert abs(r["peakTransientBytes"] - r["predictedTransientBytes"]) <= 0.02 * r["predictedTransientBytes"]
    assert not r["syncs"], r["syncs"]                       # the traced path reads nothing back to the host
    comps = r["components"]
    assert (comps["estimation"]["measuredOwnPeak"] > 0) == (not dense)
    assert (comps["index"]["measuredOwnPeak"] > 0) == (not dense)
    for name in ("activations", "attention", "estimation", "index"):
        c = comps[name]
        assert c["measuredOwnPeak"] == pytest.approx(c["predictedOwnPeak"], rel=0.05, abs=2e5), name
    assert [s["step"] for s in r["steps"]][-1] == "decode" and len(r["steps"]) == 6    # 5 prefill chunks + decode
    for step in r["steps"]:                                  # every step, decode included, as the model says
        assert step["peakBytes"] == pytest.approx(step["predictedBytes"], rel=0.05), step


@pytest.mark.parametrize("dense", [False, True])
def test_bench_really_traces_the_code(model_dir, monkeypatch, dense):
    """A temporary planted in the decoder layer (held while the layer runs) raises the measured peak by its size,
    whichever phase of the layer holds the peak."""
    from longserve.server.models.qwen2 import Qwen2DecoderLayer
    base = _measure(model_dir, dense=dense, chunks="last")
    extra_bytes = 8192 * 4096 * 4
    original = Qwen2DecoderLayer.forward

    def forward_with_temporary(self, x, backend):
        scratch = torch.empty((x.shape[0], 4096), dtype=torch.float32, device=x.device)
        out = original(self, x, backend)
        del scratch
        return out

    monkeypatch.setattr(Qwen2DecoderLayer, "forward", forward_with_temporary)
    grown = _measure(model_dir, dense=dense, chunks="last")
    assert grown["peakTransientBytes"] - base["peakTransientBytes"] == pytest.approx(extra_bytes, rel=0.01)
    assert grown["components"]["activations"]["measured"] - base["components"]["activations"]["measured"] \
        == pytest.approx(extra_bytes, rel=0.01)


def test_bench_traces_the_kernels_host_code(model_dir, monkeypatch):
    """A temporary planted in the sparse estimation's selection (kernels/estimation.py) shows up in the
    estimation component and in the peak."""
    from longserve.kernels import estimation
    base = _measure(model_dir, chunks="last")
    extra_bytes = 4 * base["peakTransientBytes"]
    original = estimation.select_top

    def select_top_with_temporary(scores, *args, **kwargs):
        scratch = torch.empty(extra_bytes, dtype=torch.uint8, device=scores.device)
        out = original(scores, *args, **kwargs)
        del scratch
        return out

    monkeypatch.setattr(estimation, "select_top", select_top_with_temporary)
    grown = _measure(model_dir, chunks="last")
    est_base, est_grown = (r["components"]["estimation"]["measuredOwnPeak"] for r in (base, grown))
    assert extra_bytes <= est_grown - est_base + base["peakTransientBytes"] and est_grown >= extra_bytes
    assert extra_bytes - base["peakTransientBytes"] <= grown["peakTransientBytes"] - base["peakTransientBytes"] \
        <= extra_bytes


def test_estimation_memory_grows_linearly_not_with_context_times_last_q(model_dir):
    # prompts of 4, 8 and 16 DCA chunks (cl = 14336): the last step is one sub-block with all three regions
    rows = [_measure(model_dir, prompt_tokens=n, chunks="last", layers=1)["components"]["estimation"]
            for n in (57344, 114688, 229376)]
    est = [r["measuredOwnPeak"] for r in rows]
    assert est[2] - est[1] == pytest.approx(2 * (est[1] - est[0]), rel=0.05)    # the same bytes per key
    heads, last_q = CONFIG["num_attention_heads"], 64
    assert est[2] - est[1] < 131072 * heads * last_q * 4 / 16    # far below [H, last_q, context] fp32 per key
    for r in rows:
        assert r["measuredOwnPeak"] == pytest.approx(r["predictedOwnPeak"], rel=0.05)


def test_cli_prints_json_and_exit_code(model_dir, capsys):
    from longserve.server.cli import build_parser
    args = build_parser().parse_args(["bench", "memory", "--model", model_dir, "--gpu", "L4-24GB", "--prompt-tokens",
                                      "20000", "--prefill-chunk-tokens", "8192", "--tp", "1", "--chunks", "last",
                                      "-o", "json"])
    assert args._bench_run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == 20000 and out["chunk"] == 8192 and out["fits"] is True
    args = build_parser().parse_args(["bench", "memory", "--model", model_dir, "--gpu", "L4-24GB",
                                      "--prompt-tokens", "1"])
    assert args._bench_run(args) == 2 and "prompt-tokens" in capsys.readouterr().err
