"""`types.parse`: defaults, quantities, and the CEL rules re-checked without an API server."""
import pytest

from longserve.operator.render import size
from longserve.operator.types import SpecError, gib_quantity, parse, parse_quantity


def body(**spec):
    base = {"model": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct-1M"}, "accelerator": {"gpuProduct": "NVIDIA-H200"}}
    base.update(spec)
    return {"metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 2}, "spec": base}


def test_defaults():
    lcm = parse(body())
    assert (lcm.runtime, lcm.mode, lcm.objective, lcm.replicas, lcm.max_num_seqs) == ("native", "Auto", "MinGPUs", 1, 1)
    assert lcm.model.served_model_name == "m" and lcm.model.revision == "main" and lcm.downloads
    assert lcm.max_model_len is None and lcm.generation == 2 and not lcm.cpu_mode


def test_quantities():
    assert parse_quantity("139Gi", "x") == 139 * 2**30
    assert parse_quantity("80G", "x") == 80 * 10**9
    assert parse_quantity(1024, "x") == 1024
    assert gib_quantity(2**30 + 1) == "2Gi" and gib_quantity(0) == "1Gi"
    with pytest.raises(SpecError):
        parse_quantity("lots", "x")
    assert parse(body(accelerator={"memoryPerGpu": "24Gi", "resourceName": ""})).cpu_mode


@pytest.mark.parametrize("spec,reason,fragment", [
    ({"model": {}}, "InvalidSpec", "spec.model.uri is required"),
    ({"model": {"uri": "s3://x/y"}}, "InvalidSpec", "must be hf://"),
    ({"replicas": -1}, "InvalidSpec", "spec.replicas must be >= 0"),
    ({"sizing": {"mode": "Manual"}}, "InvalidSpec", "TP always, in Manual mode"),
    ({"sizing": {"tensorParallelSize": 2}}, "InvalidSpec", "only, and TP always, in Manual mode"),
    ({"sizing": {"mode": "Manual", "tensorParallelSize": 3}}, "InvalidTP", "1, 2, 4 or 8"),
    ({"sizing": {"mode": "Manual", "tensorParallelSize": 1, "prefillChunkTokens": 1000}}, "InvalidSpec",
     "multiple of 16"),
    ({"context": {"maxModelLen": 4096, "maxOutputTokens": 4096}}, "InvalidSpec", "below maxModelLen"),
    ({"runtime": {"name": "vllm"}}, "InvalidSpec", "need an image"),
    ({"accelerator": {}}, "InvalidSpec", "needs gpuProduct or memoryPerGpu"),
    ({"sizing": {"gpuMemoryUtilization": 0.2}}, "InvalidSpec", "within [0.5, 0.98]"),
    ({"serving": {"httpPort": 9000, "grpcPort": 9000}}, "InvalidSpec", "must differ"),
    ({"resources": {"cpu": "many"}}, "InvalidSpec", "CPU quantity"),
])
def test_invalid_specs(spec, reason, fragment):
    with pytest.raises(SpecError) as info:
        parse(body(**spec))
    assert info.value.reason == reason and fragment in info.value.message


def test_name_length_cap():
    b = body()
    b["metadata"]["name"] = "x" * 41
    with pytest.raises(SpecError, match="name too long"):
        parse(b)


@pytest.mark.parametrize("spec,reason", [
    ({"model": {"uri": "hf://acme/unknown-model"}}, "UnknownModel"),
    ({"accelerator": {"gpuProduct": "NVIDIA-Imaginary"}}, "UnknownGPU"),
    ({"sizing": {"mode": "Manual", "tensorParallelSize": 8}}, "InvalidTP"),
    ({"context": {"maxModelLen": 2_000_000}}, "InvalidSpec"),
])
def test_sizing_errors_become_spec_errors(spec, reason):
    with pytest.raises(SpecError) as info:
        size(parse(body(**spec)))
    assert info.value.reason == reason


def test_unknown_gpu_with_explicit_memory_is_planned():
    model, plan = size(parse(body(accelerator={"gpuProduct": "NVIDIA-Custom", "memoryPerGpu": "139Gi"})))
    assert plan.feasible and plan.tensor_parallel_size == 1
