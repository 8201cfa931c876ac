"""EngineConfig (the operator -> pod contract) and ModelFacts parsing of both config.json layouts."""
import json

import pytest

from longserve.server.config import EngineConfig, ModelFacts, load_model_facts, model_facts_from_config

BASE = dict(schema_version=1, runtime="native", model_path="/models/qwen", served_model_name="qwen",
            tensor_parallel_size=1, max_model_len=1010000, max_num_seqs=1, max_output_tokens=8192,
            prefill_chunk_tokens=131072, gpu_memory_utilization=0.9)


def test_json_round_trip_and_golden(golden):
    cfg = EngineConfig(**BASE)
    text = cfg.to_json()
    assert EngineConfig.from_json(text) == cfg
    assert list(json.loads(text)) == sorted(json.loads(text))
    golden.check_text("engine/engine_config.json", text)


@pytest.mark.parametrize("change,field", [
    ({"runtime": "tgi"}, "runtime"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"gpu_memory_utilization": 1.0}, "gpu_memory_utilization"),
    ({"max_output_tokens": 1010000}, "max_output_tokens"),
    ({"prefill_chunk_tokens": 1000}, "prefill_chunk_tokens"),
    ({"kv_block_size": 12}, "kv_block_size"),
    ({"grpc_port": 8000}, "grpc_port"),
    ({"dtype": "int4"}, "dtype"),
    ({"max_num_seqs": "1"}, "max_num_seqs"),
    ({"dca_chunk_size": 64}, "dca_local_size"),
    ({"dca_chunk_size": 64, "dca_local_size": 64}, "dca_local_size"),
    ({"kv_capacity_tokens": 0}, "kv_capacity_tokens"),
])
def test_invalid_combinations_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{**BASE, **change})


def test_from_json_rejects_unknown_missing_and_versions():
    data = EngineConfig(**BASE).to_dict()
    with pytest.raises(ValueError, match="unknown field.*surprise"):
        EngineConfig.from_dict({**data, "surprise": 1})
    with pytest.raises(ValueError, match="schema_version"):
        EngineConfig.from_dict({**data, "schema_version": 2})
    del data["model_path"]
    with pytest.raises(ValueError, match="missing field.*model_path"):
        EngineConfig.from_dict(data)
    with pytest.raises(ValueError, match="not JSON"):
        EngineConfig.from_json("{")


def test_frozen():
    cfg = EngineConfig(**BASE)
    with pytest.raises(AttributeError):
        cfg.max_model_len = 5


V4 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
      "max_position_embeddings": 1010000, "num_attention_heads": 28, "num_hidden_layers": 28,
      "num_key_value_heads": 4, "rms_norm_eps": 1e-05, "rope_theta": 10000000.0, "tie_word_embeddings": False,
      "torch_dtype": "bfloat16", "vocab_size": 152064,
      "dual_chunk_attention_config": {"chunk_size": 262144, "local_size": 8192,
                                      "original_max_position_embeddings": 262144}}


def test_model_facts_both_layouts_agree():
    v5 = {k: v for k, v in V4.items() if k not in ("rope_theta", "torch_dtype")}
    v5.update(rope_parameters={"rope_theta": 10000000.0, "rope_type": "default"}, dtype="bfloat16",
              layer_types=["full_attention"] * 28)
    a, b = model_facts_from_config(V4), model_facts_from_config(v5)
    assert a == b
    assert a.rope_theta == 1e7 and a.head_dim == 128 and a.group_size == 7
    assert a.dca_chunk_len == 253952 and a.dca_original_max_position_embeddings == 262144
    assert a.kv_bytes_per_token(2) == 57344


def test_model_facts_errors_name_the_file_and_key(tmp_path):
    broken = dict(V4)
    del broken["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"config\.json: missing required key 'num_hidden_layers'"):
        load_model_facts(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model_facts(str(tmp_path))
    with pytest.raises(ValueError, match="no such file"):
        load_model_facts(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="multiple of"):
        model_facts_from_config({**V4, "num_key_value_heads": 5})


def test_model_facts_without_dca():
    facts = model_facts_from_config({k: v for k, v in V4.items() if k != "dual_chunk_attention_config"})
    assert not facts.has_dca and facts.dca_chunk_len is None
    with pytest.raises(ValueError, match="local_size"):
        ModelFacts(**{**facts.to_dict(), "dca_chunk_size": 64})
