"""A transformers oracle for long-context retrieval: Qwen2 with DCA positions, teacher-forced scoring.

Why: the passkey bench and the demo model's DCA-window choice need a measurement that does not depend
on our engine (an independent check of it, and usable before it exists). The Hugging Face model is
called with all position ids 0, so its own rotary is the identity, and an attention function rotates
q/k at the DCA-remapped positions of docs/algorithms.md#dca-positions (or at absolute positions for plain RoPE),
concatenates the inter / successive / intra key ranges of each query sub-block and takes one softmax
over them (equal to the LSE merge, docs/algorithms.md#lse-merge). With DCA on, the YaRN attention scale of the
model's ``original_max_position_embeddings`` applies as in the engine (docs/algorithms.md#yarn-scale): prompt rows
at the prompt's length, rows after it (teacher-forced answer tokens) at their own length, as decode sees them.
Scoring is exact match of the answer digits under teacher forcing, which equals greedy decoding's exact match on
those digits when the answer prefix is right.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface, PreTrainedTokenizerFast, Qwen2ForCausalLM

from longserve.bench import demo_prompts as dp
from longserve.kernels.dca_math import yarn_mscale

ATTN_NAME = "longserve_dca_oracle"
# chunk_size/local_size: DCA (None: plain RoPE); sparse: None or (SparseAttentionConfig, threshold), which
# routes attention through longserve.kernels' sparse DCA; capture: None or a list that receives
# (layer, q [L,H,D], k [L,G,D], v [L,G,D]) un-rotated, per layer (refinement input); stats: None or a
# kernels.PairStats the sparse calls add their pair counts to; prompt_len: the prompt's length N of the YaRN
# scale (None: the whole input is the prompt).
_SETTINGS: dict = {"chunk_size": None, "local_size": None, "sparse": None, "capture": None, "stats": None,
                   "prompt_len": None}


@contextlib.contextmanager
def settings(**overrides):
    """Applies ``overrides`` to the oracle's settings for the block and restores the previous ones after it, also
    when the block raises; the one way callers (trainer, finalize, tests) switch DCA positions on and off."""
    unknown = set(overrides) - set(_SETTINGS)
    if unknown:
        raise KeyError(f"unknown oracle settings: {', '.join(sorted(unknown))}")
    saved = dict(_SETTINGS)
    _SETTINGS.update(overrides)
    try:
        yield
    finally:
        _SETTINGS.update(saved)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX half-split RoPE of x [..., n, D] at integer positions pos [n] (fp64 angles)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.to(torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def dca_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention over un-rotated q [B,H,L,D], k/v [B,G,L,D] with DCA positions (or plain RoPE
    when _SETTINGS has no chunk_size). Returns ([B,L,H,D], None) like transformers' attention functions."""
    theta = float(module.config.rope_parameters["rope_theta"])
    if _SETTINGS["capture"] is not None:
        _SETTINGS["capture"].append((module.layer_idx, *(x[0].transpose(0, 1).clone() for x in (query, key, value))))
    if _SETTINGS["sparse"] is not None:
        return _kernels_sparse(module, query, key, value, theta, scaling), None
    B, H, L, D = query.shape
    g = H // key.shape[1]
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    chunk, local = _SETTINGS["chunk_size"], _SETTINGS["local_size"]
    scale = row_scales(module.config, L, scaling if scaling is not None else D ** -0.5, dca=chunk is not None)
    blk = 512 if chunk is None else chunk - local        # query block: a DCA chunk, or a memory bound
    pos = torch.arange(L)
    k = rope(k, pos if chunk is None else pos % blk, theta)
    out = torch.empty_like(query)
    for b0 in range(0, L, blk):
        e = min(b0 + blk, L)
        rows = pos[b0:e]
        qb = query[:, :, b0:e]
        if chunk is None:
            parts = [rope(qb, rows, theta) @ k[:, :, :e].transpose(-1, -2)]
        else:
            o = rows - b0
            parts = []
            if b0 >= 2 * blk:
                q_inter = rope(qb, torch.full_like(rows, min(2 * blk - 1, chunk)), theta)
                parts.append(q_inter @ k[:, :, : b0 - blk].transpose(-1, -2))
            if b0 >= blk:
                q_succ = rope(qb, torch.clamp(o + blk, max=chunk), theta)
                parts.append(q_succ @ k[:, :, b0 - blk: b0].transpose(-1, -2))
            parts.append(rope(qb, o, theta) @ k[:, :, b0:e].transpose(-1, -2))
        scores = torch.cat(parts, -1)
        scores[..., b0:e].masked_fill_(torch.ones(e - b0, e - b0, dtype=torch.bool).triu(1), float("-inf"))
        work = torch.promote_types(scores.dtype, torch.float32)
        probs = torch.softmax(scores.to(work) * scale[b0:e, None].to(work), dim=-1).to(v.dtype)
        out[:, :, b0:e] = probs @ v[:, :, :e]
    return out.transpose(1, 2).contiguous(), None


def original_max(config) -> int:
    """The model's YaRN ``original_max_position_embeddings`` (0: no scale)."""
    dca = getattr(config, "dual_chunk_attention_config", None) or {}
    return int(dca.get("original_max_position_embeddings", 0) or 0)


def row_scales(config, L: int, base: float, *, dca: bool) -> torch.Tensor:
    """Softmax scale of each query row [L] (fp64): ``base * m(N)^2`` with N the prompt length for prompt rows
    and ``row + 1`` after it; ``base`` alone without DCA or with the scale off."""
    M = original_max(config) if dca else 0
    n_prompt = min(_SETTINGS["prompt_len"] or L, L)
    scales = torch.full((L,), float(base) * yarn_mscale(n_prompt, M) ** 2, dtype=torch.float64)
    for row in range(n_prompt, L):
        scales[row] = float(base) * yarn_mscale(row + 1, M) ** 2
    return scales


def _kernels_sparse(module, query, key, value, theta, scaling):
    """Sparse (vertical-slash) DCA through longserve.kernels for prompts above the threshold. The kernels take one
    YaRN length for all rows, the whole input's N + a (a teacher-forced answer tokens after the N-token prompt):
    the factor m^2 is then off from the engine's by less than 0.2 * a / N relative (5e-4 for a 10-token answer
    at 4096 tokens)."""
    from longserve.kernels import dual_chunk_attention
    config, threshold = _SETTINGS["sparse"]
    budgets = config.budgets(module.layer_idx, threshold=threshold)
    outs = [dual_chunk_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), rope_theta=theta,
                                 chunk_size=_SETTINGS["chunk_size"], local_size=_SETTINGS["local_size"],
                                 original_max_position_embeddings=original_max(module.config),
                                 sparse=budgets, scale=scaling, stats=_SETTINGS["stats"])
            for q, k, v in zip(query, key, value)]
    return torch.stack(outs)


AttentionInterface.register(ATTN_NAME, dca_attention)


def load(model_dir: str):
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_dir, attn_implementation=ATTN_NAME, dtype=torch.float32)
    model.eval()
    return model, tok


@torch.no_grad()
def answer_correct(model, tok, sample: dp.Sample, chunk_size: int | None, local_size: int | None,
                   sparse=None, stats=None) -> bool:
    """True iff every target digit is the argmax given the prompt and the correct answer prefix; ``stats`` (a
    ``kernels.PairStats``) gets the sparse calls' pair counts added."""
    prompt = tok.encode(dp.chat_prompt(sample.prompt), add_special_tokens=False)
    head = sample.answer.rpartition(sample.target)[0]
    head_ids = tok.encode(head, add_special_tokens=False)
    digits = tok.encode(sample.target, add_special_tokens=False)
    ids = torch.tensor([prompt + head_ids + digits])
    with settings(chunk_size=chunk_size, local_size=local_size, sparse=sparse, stats=stats, prompt_len=len(prompt)):
        hidden = model.model(input_ids=ids, position_ids=torch.zeros_like(ids)).last_hidden_state
    first = len(prompt) + len(head_ids) - 1
    logits = model.lm_head(hidden[0, first: first + len(digits)])
    return bool((logits.argmax(-1) == torch.tensor(digits)).all())
