#!/usr/bin/env python
"""Teacher-forced passkey accuracy of the demo model with and without DCA, on transformers.

Why: choosing the DCA window (local_size) for the demo checkpoint needs a quick, engine-independent
measurement. This runs the Hugging Face model with an attention function that applies RoPE itself:
the model is called with all position ids 0 (so its own rotary is the identity) and the attention
function rotates q/k at the DCA-remapped positions of algorithms.md §1.2 (or at absolute positions
for plain RoPE), concatenates the intra / successive / inter key ranges of each query sub-block and
takes one softmax over them (equal to the LSE merge of §1.4). Accuracy is exact match of the answer
digits under teacher forcing, which equals greedy decoding's exact match on those digits.

    python tools/demo_dca_eval.py --model models/demo-passkey --lengths 512 2048 4096 \
        --depths 0 0.25 0.5 0.75 1 --samples 4 --local 64 128 off
"""
from __future__ import annotations

import argparse
import random
import sys

import torch
from transformers import AttentionInterface, PreTrainedTokenizerFast, Qwen2ForCausalLM

from longserve.bench import demo_prompts as dp

ATTN_NAME = "demo_dca_eval"
_SETTINGS: dict = {"chunk_size": None, "local_size": None}


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
    B, H, L, D = query.shape
    g = H // key.shape[1]
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    scale = scaling if scaling is not None else D ** -0.5
    chunk, local = _SETTINGS["chunk_size"], _SETTINGS["local_size"]
    cl = L if chunk is None else chunk - local
    pos = torch.arange(L)
    kpos = pos if chunk is None else pos % cl
    k = rope(k, kpos, theta)
    out = torch.empty_like(query)
    for b0 in range(0, L, cl):
        e = min(b0 + cl, L)
        rows = pos[b0:e]
        o = rows - b0
        qb = query[:, :, b0:e]
        parts = []
        if b0 >= 2 * cl:
            q_inter = rope(qb, torch.full_like(rows, min(2 * cl - 1, chunk)), theta)
            parts.append(q_inter @ k[:, :, : b0 - cl].transpose(-1, -2))
        if b0 >= cl:
            q_succ = rope(qb, torch.clamp(o + cl, max=chunk), theta)
            parts.append(q_succ @ k[:, :, b0 - cl: b0].transpose(-1, -2))
        q_intra = rope(qb, o if chunk is not None else rows, theta)
        intra = q_intra @ k[:, :, b0:e].transpose(-1, -2)
        parts.append(intra.masked_fill(torch.ones(e - b0, e - b0, dtype=torch.bool).triu(1), float("-inf")))
        probs = torch.softmax(torch.cat(parts, -1).float() * scale, dim=-1).to(v.dtype)
        out[:, :, b0:e] = probs @ v[:, :, :e]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, dca_attention)


def load(model_dir: str):
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_dir, attn_implementation=ATTN_NAME, dtype=torch.float32)
    model.eval()
    return model, tok


@torch.no_grad()
def answer_correct(model, tok, sample: dp.Sample, chunk_size: int | None, local_size: int | None) -> bool:
    """True iff every target digit is the argmax given the prompt and the correct answer prefix."""
    _SETTINGS.update(chunk_size=chunk_size, local_size=local_size)
    prompt = tok.encode(dp.chat_prompt(sample.prompt), add_special_tokens=False)
    head = sample.answer.rpartition(sample.target)[0]
    head_ids = tok.encode(head, add_special_tokens=False)
    digits = tok.encode(sample.target, add_special_tokens=False)
    ids = torch.tensor([prompt + head_ids + digits])
    hidden = model.model(input_ids=ids, position_ids=torch.zeros_like(ids)).last_hidden_state
    first = len(prompt) + len(head_ids) - 1
    logits = model.lm_head(hidden[0, first: first + len(digits)])
    return bool((logits.argmax(-1) == torch.tensor(digits)).all())


def grid(model, tok, lengths, depths, samples: int, settings, seed: int, task: str = "passkey"):
    """{setting: {(length, depth): accuracy}} with the same prompts for every setting."""
    count = lambda s: len(tok.encode(dp.chat_prompt(s.prompt), add_special_tokens=False))  # noqa: E731
    results = {name: {} for name, _ in settings}
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}-{length}-{depth}")
            cell = [dp.sized_sample(count, rng, length, task, depth=depth, key_digits=5) for _ in range(samples)]
            for name, (chunk, local) in settings:
                hits = sum(answer_correct(model, tok, s, chunk, local) for s in cell)
                results[name][(length, depth)] = hits / samples
                print(f"{task} L={length} depth={depth} {name}: {hits}/{samples}", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--lengths", type=int, nargs="+", required=True)
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--local", nargs="+", default=["64", "128", "off"],
                   help="DCA local_size values to compare; 'off' = plain RoPE")
    p.add_argument("--task", choices=["passkey", "kv"], default="passkey")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    chunk = model.config.dual_chunk_attention_config["chunk_size"]
    settings = [("plain" if x == "off" else f"dca/{x}", (None, None) if x == "off" else (chunk, int(x)))
                for x in args.local]
    res = grid(model, tok, args.lengths, args.depths, args.samples, settings, args.seed, args.task)
    print("length  " + "  ".join(f"{n:>9}" for n, _ in settings))
    for length in args.lengths:
        avgs = [sum(res[n][(length, d)] for d in args.depths) / len(args.depths) for n, _ in settings]
        print(f"{length:>6}  " + "  ".join(f"{100 * a:8.1f}%" for a in avgs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
