"""Grammar-constrained decoding on its own: grammars from schemas and tools, the sampler's batched mask,
and the engine's handling of constrained requests (n > 1, max_tokens cut-off, bad constraints)."""
import json

import jsonschema
import pytest
import torch

from longserve.server.engine import LLM, SamplingParams
from longserve.server.engine.protocol import RequestRejected
from longserve.server.engine.structured import GrammarError, json_schema_grammar, tool_calls_grammar
from longserve.server.layers.sampler import constrain

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "colour"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                         "colour": {"enum": ["red", "green", "blue"]}}}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, prefill_chunk_tokens=64, kv_capacity_tokens=8192)


def test_invalid_schemas_and_tools_raise_grammar_errors():
    json_schema_grammar(SCHEMA)
    for bad in ({"type": "nope"}, '{"type": ', "[1]", {"properties": {"a": {"minimum": "x"}}}):
        with pytest.raises(GrammarError):
            json_schema_grammar(bad)
    tool_calls_grammar([{"name": "f", "parameters": SCHEMA}, {"name": "g"}])
    with pytest.raises(GrammarError):
        tool_calls_grammar([{"name": "f", "parameters": {"type": "nope"}}])
    with pytest.raises(GrammarError):
        tool_calls_grammar([])


def test_sampling_params_refuse_constraints_with_ignore_eos_or_min_tokens():
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(guided_json="{}", ignore_eos=True)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(guided_json="{}", min_tokens=2, max_tokens=8)
    with pytest.raises(ValueError, match="both"):
        SamplingParams(guided_json="{}", guided_tool_calls='{"tools": []}')


class _Allow:
    """A stand-in constraint allowing a fixed set of ids."""

    def __init__(self, ids):
        self.ids = ids

    def fill(self, row):
        bits = torch.zeros(row.numel() * 32, dtype=torch.bool)
        bits[self.ids] = True
        words = bits.view(-1, 32).to(torch.int64) << torch.arange(32)
        row.copy_(words.sum(-1).to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.int32))


def test_constrain_masks_only_constrained_rows():
    logits = torch.randn(3, 70)
    out = constrain(logits, [_Allow([0, 31, 32, 69]), None, _Allow([5])])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 31, 32, 69]
    assert torch.equal(out[1], logits[1])
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [5]
    assert constrain(logits, [None, None, None]) is logits


def test_engine_constrained_choices_validate_and_cut_off_at_max_tokens(llm):
    prompt = llm.engine.tokenizer.encode("The pass key is")
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=64,
                                                guided_json=json.dumps(SCHEMA)))[0]
    for choice in out.outputs:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    short = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, guided_json=json.dumps(SCHEMA)))
    assert short[0].outputs[0].finish_reason == "length"
    assert short[0].outputs[0].text.startswith("{")


def test_engine_rejects_a_bad_constraint_up_front(llm):
    with pytest.raises(RequestRejected) as err:
        llm.engine.add_request("bad-schema", [5, 6], SamplingParams(guided_json='{"type": "nope"}'))
    assert err.value.param == "response_format"
    assert "bad-schema" not in llm.engine.requests
