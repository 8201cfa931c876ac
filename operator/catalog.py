"""Catalogs as data: GPU products and the built-in models (docs/architecture.md#habits).

GPU memory is the usable total CUDA reports, rounded down to whole GiB (docs/operator.md#sizing-inputs); the GPU
check prints the measured value so entries can be corrected. `product_label` is the value of the
`nvidia.com/gpu.product` node label set by NVIDIA's GPU feature discovery.
"""
from __future__ import annotations

from dataclasses import dataclass

from longserve.server.config import ModelFacts

GiB = 2**30


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str                   # catalog name, e.g. "H200-141GB"
    product_label: str          # nvidia.com/gpu.product value
    memory_bytes: int           # usable memory per GPU
    aliases: tuple[str, ...] = ()

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


@dataclass(frozen=True, slots=True)
class ModelEntry:
    hf_id: str
    facts: ModelFacts
    weight_bytes: int
    dtype_bytes: int = 2

    @property
    def short_name(self) -> str:
        return self.hf_id.rsplit("/", 1)[-1]


def _gpu(name: str, label: str, gib: int, *aliases: str) -> GpuSpec:
    return GpuSpec(name=name, product_label=label, memory_bytes=gib * GiB, aliases=aliases)


GPUS: tuple[GpuSpec, ...] = (
    _gpu("A100-40GB", "NVIDIA-A100-SXM4-40GB", 39, "NVIDIA-A100-PCIE-40GB", "A100-SXM4-40GB"),
    _gpu("A100-80GB", "NVIDIA-A100-SXM4-80GB", 79, "NVIDIA-A100-80GB-PCIe", "A100-SXM4-80GB"),
    _gpu("H100-80GB", "NVIDIA-H100-80GB-HBM3", 79, "NVIDIA-H100-PCIe", "H100-SXM5-80GB"),
    _gpu("H100-NVL-94GB", "NVIDIA-H100-NVL", 93),
    _gpu("H20-96GB", "NVIDIA-H20", 95),
    _gpu("H200-141GB", "NVIDIA-H200", 139, "NVIDIA-H200-NVL", "H200"),
    _gpu("B200-180GB", "NVIDIA-B200", 178, "B200"),
    _gpu("L40S-48GB", "NVIDIA-L40S", 44, "L40S"),
    _gpu("L4-24GB", "NVIDIA-L4", 22, "L4"),
    _gpu("A10G-24GB", "NVIDIA-A10G", 22, "A10G"),
)


def lookup_gpu(name: str) -> GpuSpec:
    """Find a GPU by catalog name, node-label product or alias (case-insensitive)."""
    key = name.strip().lower()
    for gpu in GPUS:
        if key in (gpu.name.lower(), gpu.product_label.lower(), *(a.lower() for a in gpu.aliases)):
            return gpu
    names = ", ".join(g.name for g in GPUS)
    raise ValueError(f"unknown GPU {name!r}; known: {names} (or set the memory per GPU explicitly)")


def _qwen25_1m(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int) -> ModelFacts:
    return ModelFacts(
        num_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=128, vocab_size=152064,
        tie_word_embeddings=False, rope_theta=1e7, max_position_embeddings=1_010_000,
        rms_norm_eps=1e-5, dca_chunk_size=262144, dca_local_size=8192,
        dca_original_max_position_embeddings=262144, torch_dtype="bfloat16", qkv_bias=True)


def _entry(hf_id: str, facts: ModelFacts) -> ModelEntry:
    return ModelEntry(hf_id=hf_id, facts=facts, weight_bytes=facts.num_parameters() * 2)


MODELS: tuple[ModelEntry, ...] = (
    _entry("Qwen/Qwen2.5-7B-Instruct-1M", _qwen25_1m(28, 3584, 18944, 28, 4)),
    _entry("Qwen/Qwen2.5-14B-Instruct-1M", _qwen25_1m(48, 5120, 13824, 40, 8)),
)


def lookup_model(hf_id: str) -> ModelEntry:
    """Find a built-in model by Hugging Face id (case-insensitive; `hf://` prefix allowed)."""
    key = hf_id.strip().lower().removeprefix("hf://")
    for model in MODELS:
        if key in (model.hf_id.lower(), model.short_name.lower()):
            return model
    known = ", ".join(m.hf_id for m in MODELS)
    raise ValueError(f"unknown model {hf_id!r}; built in: {known} (or pass a config.json / checkpoint path)")
