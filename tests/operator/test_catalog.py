"""GPU and model catalogs: lookups by name, label and alias; the required products are present."""
import pytest

from longserve.operator.catalog import GPUS, GiB, lookup_gpu, lookup_model


def test_required_gpus_with_memory_and_labels():
    required = {"A100-40GB", "A100-80GB", "H100-80GB", "H20-96GB", "H200-141GB", "L40S-48GB", "L4-24GB",
                "B200-180GB"}
    names = {g.name for g in GPUS}
    assert required <= names
    for gpu in GPUS:
        assert gpu.product_label.startswith("NVIDIA-")
        nominal = int(gpu.name.rsplit("-", 1)[1].removesuffix("GB"))
        # usable memory as CUDA reports it (GiB): below the nominal size, by less than 15 %
        assert 0.85 * nominal * GiB <= gpu.memory_bytes <= nominal * GiB


@pytest.mark.parametrize("name", ["H200-141GB", "h200-141gb", "NVIDIA-H200", "h200"])
def test_lookup_gpu_by_name_label_alias(name):
    assert lookup_gpu(name).memory_bytes == 139 * GiB


def test_lookup_errors_list_known_entries():
    with pytest.raises(ValueError, match="unknown GPU 'X1'.*H200-141GB"):
        lookup_gpu("X1")
    with pytest.raises(ValueError, match="unknown model.*Qwen2.5-7B-Instruct-1M"):
        lookup_model("meta/llama")


def test_model_lookup_case_insensitive_and_hf_prefix():
    assert lookup_model("hf://qwen/QWEN2.5-14B-INSTRUCT-1M").facts.num_layers == 48
    m7 = lookup_model("Qwen/Qwen2.5-7B-Instruct-1M").facts
    assert (m7.num_heads, m7.num_kv_heads, m7.dca_chunk_size, m7.dca_local_size) == (28, 4, 262144, 8192)
