"""The Qwen2 architecture in one module: embeddings, decoder layers (QKV bias, RMSNorm, SwiGLU MLP),
final norm and LM head (tied or untied). Parameter names follow the Hugging Face checkpoint layout, so
a safetensors state dict loads directly. Attention is delegated to an `AttentionBackend` the model
runner provides per step (KV cache, DCA positions, sparse prefill); the model itself is cache-free.

Tensor parallelism (`tp`, a `parallel.group.TPGroup`; None is TP 1 and builds exactly the unsharded modules):
q/k/v and gate/up are column-parallel (this rank's heads, KV heads and intermediate columns), o_proj and
down_proj row-parallel with their outputs summed over the ranks, the embedding and the LM head vocab-parallel
(rows of ceil(V / tp) tokens, the last padded with zeros; logits gathered over the ranks)."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from longserve.server.config import ModelFacts


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, G, D] (un-rotated) for this step's tokens -> [T, H, D]."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def tp_size(tp) -> int:
    return 1 if tp is None else tp.size


def check_tp(f: ModelFacts, size: int) -> None:
    """Valid TP sizes divide both head counts (KV heads are split, never replicated)."""
    if f.num_heads % size or f.num_kv_heads % size:
        raise ValueError(f"tensor_parallel_size {size} must divide both the {f.num_heads} attention heads and the "
                         f"{f.num_kv_heads} KV heads of this model")


def vocab_rows(vocab_size: int, size: int) -> int:
    """Rows of the vocab-parallel embedding / LM head each rank holds."""
    return -(-vocab_size // size)


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * n, (rank + 1) * n) of the embedding; a token outside them contributes zeros, and the sum over
    the ranks is the full lookup."""

    def __init__(self, vocab_size: int, hidden: int, tp):
        super().__init__()
        self.tp, self.rows = tp, vocab_rows(vocab_size, tp.size)
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)


class Qwen2Attention(nn.Module):
    def __init__(self, f: ModelFacts, layer: int, tp=None):
        super().__init__()
        n = tp_size(tp)
        self.tp = tp
        self.layer, self.head_dim = layer, f.head_dim
        self.num_heads, self.num_kv_heads = f.num_heads // n, f.num_kv_heads // n     # this rank's heads
        self.q_proj = nn.Linear(f.hidden_size, self.num_heads * f.head_dim, bias=f.qkv_bias)
        self.k_proj = nn.Linear(f.hidden_size, self.num_kv_heads * f.head_dim, bias=f.qkv_bias)
        self.v_proj = nn.Linear(f.hidden_size, self.num_kv_heads * f.head_dim, bias=f.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * f.head_dim, f.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        out = self.o_proj(backend.attend(self.layer, q, k, v).reshape(t, self.num_heads * self.head_dim))
        return out if self.tp is None else self.tp.all_reduce(out)


class Qwen2MLP(nn.Module):
    def __init__(self, f: ModelFacts, tp=None):
        super().__init__()
        self.tp = tp
        if f.intermediate_size % tp_size(tp):
            raise ValueError(f"tensor_parallel_size {tp_size(tp)} must divide intermediate_size "
                             f"{f.intermediate_size}")
        inter = f.intermediate_size // tp_size(tp)
        self.gate_proj = nn.Linear(f.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(f.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, f.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return out if self.tp is None else self.tp.all_reduce(out)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, f: ModelFacts, layer: int, tp=None):
        super().__init__()
        self.input_layernorm = RMSNorm(f.hidden_size, f.rms_norm_eps)
        self.self_attn = Qwen2Attention(f, layer, tp)
        self.post_attention_layernorm = RMSNorm(f.hidden_size, f.rms_norm_eps)
        self.mlp = Qwen2MLP(f, tp)

    def forward(self, x: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Backbone(nn.Module):
    def __init__(self, f: ModelFacts, tp=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(f.vocab_size, f.hidden_size) if tp is None else \
            VocabParallelEmbedding(f.vocab_size, f.hidden_size, tp)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(f, i, tp) for i in range(f.num_layers))
        self.norm = RMSNorm(f.hidden_size, f.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, facts: ModelFacts, tp=None):
        super().__init__()
        if tp is not None:
            check_tp(facts, tp.size)
        self.facts, self.tp = facts, tp
        self.model = Qwen2Backbone(facts, tp)
        rows = facts.vocab_size if tp is None else vocab_rows(facts.vocab_size, tp.size)
        self.lm_head = None if facts.tie_word_embeddings else nn.Linear(facts.hidden_size, rows, bias=False)

    def forward(self, input_ids: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden] (logits are computed only where needed)."""
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, backend)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.tp is None:
            return (hidden @ weight.t()).float()
        return self.tp.gather_last_dim(hidden @ weight.t())[..., :self.facts.vocab_size].float()

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy a checkpoint state dict in (at TP > 1: this rank's slices, `parallel.shards`); every expected
        tensor must be present with its shape."""
        expected = self.state_dict()
        tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
        if self.lm_head is None:
            tensors.pop("lm_head.weight", None)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not match config.json (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{tuple(expected[name].shape)}")
        self.load_state_dict(tensors, strict=True)
