"""Checkpoint loading: sharded safetensors, generation defaults, sparse config, tokenizer and chat
template; every broken file gives one error naming it."""
import json
import os
import shutil

import pytest

from longserve.server.engine import LLM, SamplingParams
from longserve.server.hf_config import load_checkpoint
from longserve.server.tokenizer import Tokenizer


def test_sharded_checkpoint_and_defaults(tiny_dca_model_dir):
    ck = load_checkpoint(tiny_dca_model_dir)
    assert len(ck.weight_files) >= 2                      # sharded with an index file
    assert ck.facts.dca_chunk_size == 64 and not ck.facts.tie_word_embeddings
    assert ck.eos_token_ids == (2,)
    assert ck.sparse_config is None


def test_chat_template_is_chatml(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi 🙂"}], add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in tok.special_ids


def test_chat_template_from_jinja_file(tmp_path, tiny_model_dir):
    d = tmp_path / "ck"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert Tokenizer(str(d)).apply_chat_template([{"role": "user", "content": "x"}]) == "[user] x\n"


@pytest.mark.parametrize("breakage,fragment", [
    (lambda d: os.remove(d / "config.json"), "config.json: missing"),
    (lambda d: (d / "config.json").write_text("{"), "config.json: unreadable JSON"),
    (lambda d: os.remove(d / "tokenizer.json"), "tokenizer.json: missing"),
    (lambda d: os.remove(d / "model.safetensors"), "no model.safetensors"),
    (lambda d: (d / "sparse_attention_config.json").write_text("{}"), "sparse_attention_config.json: expected a list"),
])
def test_broken_checkpoints_name_the_file(tmp_path, tiny_model_dir, breakage, fragment):
    d = tmp_path / "ck"
    shutil.copytree(tiny_model_dir, d)
    breakage(d)
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        LLM(str(d), kv_capacity_tokens=256)


def test_weights_inconsistent_with_config_are_reported(tmp_path, tiny_model_dir):
    d = tmp_path / "ck"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        LLM(str(d), kv_capacity_tokens=256)


def test_sparse_prefill_switches_on_strictly_above_the_threshold(tmp_path):
    """O12 (docs/algorithms.md#oracle-threshold-switch) at the model level: threshold -> dense (equal to a dense
    engine), threshold + 1 -> sparse."""
    from longserve.server.tiny_checkpoint import build_tiny_checkpoint
    sparse = [{str(h): ["vertical_and_slash", 2, 2, 0.9] for h in range(4)} for _ in range(2)]
    d = build_tiny_checkpoint(str(tmp_path / "sp"), dca={"chunk_size": 96, "local_size": 32,
                                                        "sparse_attention_threshold": 150},
                              sparse_config=sparse)
    sparse_llm = LLM(d, prefill_chunk_tokens=256, kv_capacity_tokens=1024)
    dense_llm = LLM(d, prefill_chunk_tokens=256, kv_capacity_tokens=1024, sparse_prefill=False)
    assert sparse_llm.engine.sparse_threshold == 150 and dense_llm.engine.sparse_threshold is None
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    at = list(range(3, 153))
    above = list(range(3, 154))
    same = sparse_llm.generate([at], params)[0].outputs[0].logprobs[0]
    ref = dense_llm.generate([at], params)[0].outputs[0].logprobs[0]
    assert same.top == ref.top
    sp = sparse_llm.generate([above], params)[0].outputs[0].logprobs[0]
    de = dense_llm.generate([above], params)[0].outputs[0].logprobs[0]
    assert sp.top != de.top                 # tiny budgets: the sparse path really ran

    # the engine reports the computed fraction of causal pairs for sparse chunks (metrics histogram input)
    from longserve.server.api.engine_client import PrefillProgress
    engine = sparse_llm.engine
    engine.add_request("density", above, SamplingParams(max_tokens=1))
    events = []
    while engine.has_work():
        events += engine.step()
    densities = [e.sparse_density for e in events if isinstance(e, PrefillProgress)]
    assert densities and all(d is not None and 0 < d < 1 for d in densities)
    engine.add_request("dense", at, SamplingParams(max_tokens=1))
    events = []
    while engine.has_work():
        events += engine.step()
    assert [e.sparse_density for e in events if isinstance(e, PrefillProgress)] == [None]
