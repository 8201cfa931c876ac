"""The Qwen2 architecture in one module: embeddings, decoder layers (QKV bias, RMSNorm, SwiGLU MLP),
final norm and LM head (tied or untied). Parameter names follow the Hugging Face checkpoint layout, so
a safetensors state dict loads directly. Attention is delegated to an `AttentionBackend` the model
runner provides per step (KV cache, DCA positions, sparse prefill); the model itself is cache-free."""
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


class Qwen2Attention(nn.Module):
    def __init__(self, f: ModelFacts, layer: int):
        super().__init__()
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, f.num_heads, f.num_kv_heads, f.head_dim
        self.q_proj = nn.Linear(f.hidden_size, f.num_heads * f.head_dim, bias=f.qkv_bias)
        self.k_proj = nn.Linear(f.hidden_size, f.num_kv_heads * f.head_dim, bias=f.qkv_bias)
        self.v_proj = nn.Linear(f.hidden_size, f.num_kv_heads * f.head_dim, bias=f.qkv_bias)
        self.o_proj = nn.Linear(f.num_heads * f.head_dim, f.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        out = backend.attend(self.layer, q, k, v)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class Qwen2MLP(nn.Module):
    def __init__(self, f: ModelFacts):
        super().__init__()
        self.gate_proj = nn.Linear(f.hidden_size, f.intermediate_size, bias=False)
        self.up_proj = nn.Linear(f.hidden_size, f.intermediate_size, bias=False)
        self.down_proj = nn.Linear(f.intermediate_size, f.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, f: ModelFacts, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(f.hidden_size, f.rms_norm_eps)
        self.self_attn = Qwen2Attention(f, layer)
        self.post_attention_layernorm = RMSNorm(f.hidden_size, f.rms_norm_eps)
        self.mlp = Qwen2MLP(f)

    def forward(self, x: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Backbone(nn.Module):
    def __init__(self, f: ModelFacts):
        super().__init__()
        self.embed_tokens = nn.Embedding(f.vocab_size, f.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(f, i) for i in range(f.num_layers))
        self.norm = RMSNorm(f.hidden_size, f.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, facts: ModelFacts):
        super().__init__()
        self.facts = facts
        self.model = Qwen2Backbone(facts)
        self.lm_head = None if facts.tie_word_embeddings else nn.Linear(facts.hidden_size, facts.vocab_size,
                                                                         bias=False)

    def forward(self, input_ids: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden] (logits are computed only where needed)."""
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, backend)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (hidden @ weight.t()).float()

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy a checkpoint state dict in; every expected tensor must be present with its shape."""
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
