"""The operator <-> pod contract: `EngineConfig` and `ModelFacts` (docs/architecture.md#engine-config).

Standard library only: the operator (no torch) builds exactly the object the server loads.
`EngineConfig` is frozen and validated once; values measured at start-up never get written back.
`ModelFacts` is what the planner and the engine need to know about a checkpoint's architecture,
parsed from a Hugging Face `config.json` in either the transformers-4 layout (top-level
`rope_theta`, `torch_dtype`) or the transformers-5 layout (`rope_parameters`, `dtype`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields

SCHEMA_VERSION = 1
RUNTIMES = ("native", "vllm", "sglang")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
LOAD_FORMATS = ("auto", "dummy")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    schema_version: int
    runtime: str                        # "native" | "vllm" | "sglang"
    model_path: str                     # path inside the pod (cache mount) or hub id
    served_model_name: str
    tensor_parallel_size: int
    max_model_len: int
    max_num_seqs: int
    max_output_tokens: int              # default and cap for max_tokens
    prefill_chunk_tokens: int           # tokens per scheduler step (max-num-batched-tokens)
    gpu_memory_utilization: float       # fraction of the GPU's *total* memory for everything (vLLM's meaning)
    kv_block_size: int = 16             # must divide the DCA chunk length (checked at start-up)
    kv_capacity_tokens: int | None = None   # explicit KV capacity; None: from gpu_memory_utilization
    dtype: str = "bfloat16"
    load_format: str = "auto"           # "auto": the checkpoint's safetensors; "dummy": seeded random weights
    dca: bool = True                    # use the model's dual_chunk_attention_config if present
    dca_chunk_size: int | None = None   # overrides of the checkpoint's DCA settings
    dca_local_size: int | None = None
    sparse_prefill: bool = True         # use sparse_attention_config.json if present
    sparse_config_path: str | None = None   # None: <model_path>/sparse_attention_config.json
    sparse_threshold: int | None = None     # None: model config, else 32768
    sparse_last_q: int = 64
    enable_prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix computed before
    seed: int = 0
    http_port: int = 8000
    grpc_port: int = 50051
    grpc_max_message_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        errors = _validate(self)
        if errors:
            raise ValueError("invalid EngineConfig: " + "; ".join(errors))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "EngineConfig":
        if not isinstance(data, dict):
            raise ValueError("invalid EngineConfig: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"invalid EngineConfig: schema_version must be {SCHEMA_VERSION}, got {version!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"invalid EngineConfig: unknown field(s) {', '.join(unknown)}")
        missing = sorted(f.name for f in fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ValueError(f"invalid EngineConfig: missing field(s) {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid EngineConfig: not JSON ({exc})") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(c: EngineConfig) -> list[str]:
    errors: list[str] = []
    int_fields = ("schema_version", "tensor_parallel_size", "max_model_len", "max_num_seqs",
                  "max_output_tokens", "prefill_chunk_tokens", "kv_block_size", "sparse_last_q",
                  "seed", "http_port", "grpc_port", "grpc_max_message_bytes")
    for name in int_fields:
        if not _is_int(getattr(c, name)):
            errors.append(f"{name} must be an integer, got {getattr(c, name)!r}")
    for name in ("kv_capacity_tokens", "dca_chunk_size", "dca_local_size", "sparse_threshold"):
        value = getattr(c, name)
        if value is not None and (not _is_int(value) or value < 1):
            errors.append(f"{name} must be a positive integer or null, got {value!r}")
    for name in ("dca", "sparse_prefill", "enable_prefix_caching"):
        if not isinstance(getattr(c, name), bool):
            errors.append(f"{name} must be true or false")
    if errors:
        return errors
    if c.runtime not in RUNTIMES:
        errors.append(f"runtime must be one of {', '.join(RUNTIMES)}, got {c.runtime!r}")
    if c.dtype not in DTYPES:
        errors.append(f"dtype must be one of {', '.join(DTYPES)}, got {c.dtype!r}")
    if c.load_format not in LOAD_FORMATS:
        errors.append(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {c.load_format!r}")
    if not isinstance(c.model_path, str) or not c.model_path:
        errors.append("model_path must be a non-empty string")
    if not isinstance(c.served_model_name, str) or not c.served_model_name:
        errors.append("served_model_name must be a non-empty string")
    if c.tensor_parallel_size < 1:
        errors.append("tensor_parallel_size must be >= 1")
    if c.max_model_len < 2:
        errors.append("max_model_len must be >= 2")
    if c.max_num_seqs < 1:
        errors.append("max_num_seqs must be >= 1")
    if not 1 <= c.max_output_tokens < c.max_model_len:
        errors.append(f"max_output_tokens must be >= 1 and < max_model_len ({c.max_model_len}), "
                      f"got {c.max_output_tokens}")
    if c.kv_block_size < 1 or c.kv_block_size & (c.kv_block_size - 1):
        errors.append(f"kv_block_size must be a power of two, got {c.kv_block_size}")
    elif c.prefill_chunk_tokens < c.kv_block_size or c.prefill_chunk_tokens % c.kv_block_size:
        errors.append(f"prefill_chunk_tokens must be a positive multiple of kv_block_size "
                      f"({c.kv_block_size}), got {c.prefill_chunk_tokens}")
    if isinstance(c.gpu_memory_utilization, bool) or not isinstance(c.gpu_memory_utilization, (int, float)) \
            or not 0 < c.gpu_memory_utilization < 1:
        errors.append(f"gpu_memory_utilization (a fraction of the GPU's total memory) must be in (0, 1), "
                      f"got {c.gpu_memory_utilization!r}")
    if c.dca_chunk_size is not None and c.dca_local_size is not None \
            and c.dca_local_size >= c.dca_chunk_size:
        errors.append("dca_local_size must be smaller than dca_chunk_size")
    if (c.dca_chunk_size is None) != (c.dca_local_size is None):
        errors.append("dca_chunk_size and dca_local_size are overridden together")
    if c.sparse_last_q < 1:
        errors.append("sparse_last_q must be >= 1")
    if c.kv_capacity_tokens is not None and c.kv_capacity_tokens < c.kv_block_size:
        errors.append("kv_capacity_tokens must hold at least one KV block")
    for name in ("http_port", "grpc_port"):
        if not 1 <= getattr(c, name) <= 65535:
            errors.append(f"{name} must be in 1..65535")
    if c.http_port == c.grpc_port:
        errors.append("http_port and grpc_port must differ")
    if c.grpc_max_message_bytes < 4 * 2**20:
        errors.append("grpc_max_message_bytes must be >= 4 MiB")
    return errors


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """Architecture facts of a Qwen2-family checkpoint (from config.json or the catalog)."""
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    dca_chunk_size: int | None = None
    dca_local_size: int | None = None
    dca_original_max_position_embeddings: int = 0
    sparse_attention_threshold: int | None = None
    sparse_attention_last_q: int | None = None
    torch_dtype: str = "bfloat16"
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.num_heads % self.num_kv_heads:
            problems.append(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_kv_heads})")
        if (self.dca_chunk_size is None) != (self.dca_local_size is None):
            problems.append("dual_chunk_attention_config needs both chunk_size and local_size")
        elif self.dca_chunk_size is not None and not 0 < self.dca_local_size < self.dca_chunk_size:
            problems.append("dual_chunk_attention_config: need 0 < local_size < chunk_size")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def has_dca(self) -> bool:
        return self.dca_chunk_size is not None

    @property
    def dca_chunk_len(self) -> int | None:
        """DCA chunk length cl = chunk_size - local_size (docs/algorithms.md#dca-parameters)."""
        return None if self.dca_chunk_size is None else self.dca_chunk_size - self.dca_local_size

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_parameters(self) -> int:
        """Parameter count of the Qwen2 architecture (QKV bias, RMSNorm weights, SwiGLU MLP)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + (q if self.qkv_bias else 0) + 2 * (h * kv + (kv if self.qkv_bias else 0)) + q * h
        per_layer = attn + 3 * h * i + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def model_facts_from_config(cfg: dict, source: str = "config.json") -> ModelFacts:
    """Parse a Hugging Face Qwen2 `config.json` dict (transformers 4 or 5 layout).

    Raises ValueError naming `source` and the missing or inconsistent key.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a JSON object")
    # transformers 5 may nest the language-model part under text_config
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        cfg = cfg["text_config"]

    def need(key: str):
        if key not in cfg:
            raise ValueError(f"{source}: missing required key {key!r}")
        return cfg[key]

    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    rope_params = cfg.get("rope_parameters") or {}
    if isinstance(rope_params, dict) and "rope_theta" not in rope_params and rope_params:
        # per-layer-type layout: {"full_attention": {...}}
        first = next(iter(rope_params.values()))
        rope_params = first if isinstance(first, dict) else {}
    rope_theta = rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dca = cfg.get("dual_chunk_attention_config") or None
    if dca is not None and not isinstance(dca, dict):
        raise ValueError(f"{source}: dual_chunk_attention_config must be an object")
    dca = dca or {}
    try:
        return ModelFacts(
            num_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            vocab_size=need("vocab_size"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=float(rope_theta),
            max_position_embeddings=need("max_position_embeddings"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            dca_chunk_size=dca.get("chunk_size"),
            dca_local_size=dca.get("local_size"),
            dca_original_max_position_embeddings=int(dca.get("original_max_position_embeddings", 0) or 0),
            sparse_attention_threshold=dca.get("sparse_attention_threshold"),
            sparse_attention_last_q=dca.get("sparse_attention_last_q"),
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
            qkv_bias=bool(cfg.get("attention_bias", True)),
        )
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def load_model_facts(path: str) -> ModelFacts:
    """ModelFacts from a `config.json` file or a checkpoint directory holding one."""
    import os
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{file}: no such file (expected a config.json or a checkpoint directory)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    return model_facts_from_config(cfg, source=file)
