"""`load_format="dummy"`: an engine with seeded random weights made on the device, no safetensors needed."""
import os
import shutil

import pytest
import torch

from longserve.server.config import EngineConfig
from longserve.server.engine import LLM, SamplingParams


@pytest.fixture()
def config_only_dir(tmp_path, tiny_dca_model_dir):
    """The tiny DCA checkpoint without its weight files: config.json, tokenizer and generation config only."""
    d = tmp_path / "no-weights"
    shutil.copytree(tiny_dca_model_dir, d)
    for name in os.listdir(d):
        if "safetensors" in name:
            os.remove(d / name)
    return str(d)


def _greedy(llm, n=6):
    out = llm.generate("The pass key is", SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return out[0].outputs[0].token_ids


def test_dummy_engine_generates_without_weight_files(config_only_dir):
    llm = LLM(config_only_dir, load_format="dummy", kv_capacity_tokens=512)
    params = dict(llm.engine.runner.model.named_parameters())
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in params.values())
    assert torch.all(params["model.norm.weight"] == 1)
    assert torch.all(params["model.layers.0.self_attn.q_proj.bias"] == 0)
    assert 0.01 < params["model.embed_tokens.weight"].std().item() < 0.03       # std 0.02, not torch's defaults
    tokens = _greedy(llm)
    assert len(tokens) == 6 and all(0 <= t < 1000 for t in tokens)
    assert _greedy(LLM(config_only_dir, load_format="dummy", kv_capacity_tokens=512)) == tokens   # same seed
    other = LLM(config_only_dir, load_format="dummy", kv_capacity_tokens=512, seed=1)
    assert not torch.equal(dict(other.engine.runner.model.named_parameters())["model.embed_tokens.weight"],
                           params["model.embed_tokens.weight"])


def test_auto_load_format_still_needs_the_weights(config_only_dir):
    with pytest.raises(ValueError, match="no model.safetensors"):
        LLM(config_only_dir, kv_capacity_tokens=512)


def test_load_format_is_validated():
    base = {"schema_version": 1, "runtime": "native", "model_path": "/m", "served_model_name": "m",
            "tensor_parallel_size": 1, "max_model_len": 4096, "max_num_seqs": 1, "max_output_tokens": 16,
            "prefill_chunk_tokens": 256, "gpu_memory_utilization": 0.9}
    assert EngineConfig(**base).load_format == "auto"
    assert EngineConfig.from_json(EngineConfig(**base, load_format="dummy").to_json()).load_format == "dummy"
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy"):
        EngineConfig(**base, load_format="pt")
