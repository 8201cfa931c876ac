"""Sizing-mode rules are defined once (`sizing_rules`): the CRD's CEL rules, `types.parse` and the planner's
request validation report the same rule with the same message."""
import pytest

from longserve.operator import sizing_rules as rules
from longserve.operator.crd import CEL_RULES
from longserve.operator.planner import SizingRequest
from longserve.operator.types import SpecError, parse

CASES = [   # (sizing spec, max_model_len, the rule it breaks)
    ({"mode": "Manual"}, None, rules.MANUAL_FIELDS),
    ({"tensorParallelSize": 2}, None, rules.MANUAL_FIELDS),
    ({"prefillChunkTokens": 4096}, None, rules.MANUAL_FIELDS),
    ({"mode": "Manual", "tensorParallelSize": 3}, None, rules.TP_VALUES),
    ({"mode": "Manual", "tensorParallelSize": 2, "prefillChunkTokens": 1000}, None, rules.CHUNK_SHAPE),
    ({"mode": "Manual", "tensorParallelSize": 2, "prefillChunkTokens": 8192}, 4096, rules.CHUNK_SHAPE),
]


@pytest.mark.parametrize("sizing,max_model_len,rule", CASES)
def test_spec_parsing_and_planner_report_the_same_rule(sizing, max_model_len, rule):
    spec = {"model": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M"}, "accelerator": {"gpuProduct": "NVIDIA-H200"},
            "sizing": sizing}
    if max_model_len is not None:
        spec["context"] = {"maxModelLen": max_model_len, "maxOutputTokens": 1024}
    with pytest.raises(SpecError) as err:
        parse({"metadata": {"name": "m", "namespace": "ns"}, "spec": spec})
    assert err.value.reason == rule.reason and rule.message in str(err.value)
    request = SizingRequest(max_model_len=max_model_len or 1_010_000,
                            mode=sizing.get("mode", "Auto"), tensor_parallel_size=sizing.get("tensorParallelSize"),
                            prefill_chunk_tokens=sizing.get("prefillChunkTokens"))
    assert any(rule.message in e for e in request.validate())


def test_the_crd_carries_every_rule_as_cel():
    assert [{"rule": r.cel, "message": r.message} for r in rules.RULES] == CEL_RULES[:len(rules.RULES)]


def test_valid_sizing_breaks_nothing():
    assert rules.manual_sizing_errors("Auto", None, None, None) == []
    assert rules.manual_sizing_errors("Manual", 4, 65536, 1_010_000) == []
    assert rules.manual_sizing_errors("DryRun", None, None, 4096) == []
