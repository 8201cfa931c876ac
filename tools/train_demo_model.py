#!/usr/bin/env python
"""Train the demo passkey model: a few-million-parameter Qwen2 model, from scratch, on CPU.

Why: the repository's first command should serve a model that actually answers, and the DCA /
sparse-prefill claims need a model trained at a short length T to test far beyond T. The model learns
two synthetic retrieval tasks (bench/demo_prompts.py) in ChatML form with its own byte-level BPE
tokenizer (one token per digit). Everything is seeded (data, init, tokenizer corpus) and runs on
deterministic CPU kernels with a fixed thread count, so a rerun reproduces the loss curve.

Writes a Hugging Face checkpoint (config.json with a dual_chunk_attention_config scaled to T,
model.safetensors, tokenizer files with the chat template, generation_config.json) plus loss.csv,
evals.csv and train_args.json. It re-saves at every evaluation so an interrupted run is usable, and
stops early once held-out passkey accuracy at T reaches --stop-acc on two evaluations in a row.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from longserve.bench import demo_prompts as dp
from longserve.bench import haystacks as hs
from longserve.bench import passkey_oracle as oracle

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


chat_prompt = dp.chat_prompt


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(seed: int, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a seeded sample of the task text; digits are always single tokens."""
    rng = random.Random(seed + 7)
    corpus = []
    for i in range(400):
        style = "qwen" if i % 4 == 0 else "varied"
        s = (dp.passkey_sample(rng.randint(5, 40), rng.random(), dp.random_digits(rng, rng.randint(3, 8)),
                               style, rng) if i % 2 else
             dp.kv_sample(rng.randint(5, 40), rng.random(), rng, style, rng.randint(2, 6)))
        corpus.append(chat_prompt(s.prompt) + s.answer + "<|im_end|>\n")
    corpus += [s + " " for s in dp.FILLER_SENTENCES] + [f"The code for the {w} is" for w in dp.KV_ITEMS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:], chat_template=CHAT_TEMPLATE,
                                   model_max_length=1 << 20, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------- data
def weighted(text: str, known: tuple[str, ...], what: str) -> dict[str, float]:
    """Parse "a:0.6,b:0.4" (or "a,b" for equal weights) into {name: weight}, names checked against `known`."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, w = part.partition(":")
        if name not in known:
            raise argparse.ArgumentTypeError(f"unknown {what} {name!r} (expected one of {', '.join(known)})")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in {part!r}") from None
        if out[name] <= 0:
            raise argparse.ArgumentTypeError(f"weights must be > 0 ({part!r})")
    return out


def int_list(text: str) -> list[int]:
    """Parse "32,48,64" into [32, 48, 64]."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class Tasks:
    """Seeded generator of tokenised training / evaluation examples sized in tokens.

    With no haystacks, value kinds or needle choice given, the data stream is the original one (seed-style and
    pooled-sentence filler, digit keys, the seed prompt's needle), so the recipe's early stages replay exactly."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, kv_fraction: float, mask_ending: bool = True,
                 haystacks: dict[str, float] | None = None, value_kinds: dict[str, float] | None = None,
                 varied_needles: bool = False, none_fraction: float = 0.0):
        self.tok = tokenizer
        self.kv_fraction = kv_fraction
        self.none_fraction = none_fraction
        self.mask_ending = mask_ending
        self.haystacks = haystacks or {}
        self.value_kinds = value_kinds or {}
        self.varied_needles = varied_needles
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.newline = tokenizer.encode("\n", add_special_tokens=False)

    def count(self, s: dp.Sample) -> int:
        return len(self.tok.encode(chat_prompt(s.prompt), add_special_tokens=False))

    @staticmethod
    def _draw(rng: random.Random, weights: dict[str, float]) -> str:
        return rng.choices(list(weights), weights=list(weights.values()))[0]

    def sample(self, rng: random.Random, length: int, task: str | None = None, depth: float | None = None,
               key_digits: int | None = None, style: str | None = None) -> dp.Sample:
        if task is None:
            if self.none_fraction and rng.random() < self.none_fraction:
                task = "none"
            else:
                task = "kv" if rng.random() < self.kv_fraction else "passkey"
        if style is None and self.haystacks:
            style = self._draw(rng, self.haystacks)
        kind = self._draw(rng, self.value_kinds) if self.value_kinds and task == "passkey" else "digits"
        needle = None if self.varied_needles else dp.NEEDLES[0]
        return dp.sized_sample(self.count, rng, length, task, depth, key_digits, style, value_kind=kind,
                               needle=needle)

    def encode(self, s: dp.Sample) -> tuple[list[int], list[int]]:
        """(ids, answer_mask): prompt ids, then answer + <|im_end|>; the mask marks the target digits and what
        ends the reply after them (the final "." and <|im_end|>): copying the digits is not enough, the model
        must also stop after the last one, or a greedy reply runs on ("The pass key is 4125005.")."""
        prompt = self.tok.encode(chat_prompt(s.prompt), add_special_tokens=False)
        head, _, tail = s.answer.rpartition(s.target)
        pieces = [self.tok.encode(x, add_special_tokens=False) for x in (head, s.target, tail)]
        ids = prompt + pieces[0] + pieces[1] + pieces[2] + [self.im_end] + self.newline
        marked = len(pieces[1]) + (len(pieces[2]) + 1 if self.mask_ending else 0)
        mask = [0] * (len(prompt) + len(pieces[0])) + [1] * marked
        mask += [0] * (len(ids) - len(mask))
        return ids, mask


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad (causal attention never looks right, so pads need no attention mask)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(batch), width), dtype=torch.bool)
    answer = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, (x, m) in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        valid[i, :len(x)] = True
        answer[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, valid, answer


def losses(model, ids, valid, answer, autocast: bool, dca: tuple[int, int] | None = None):
    """Mean next-token loss over all real tokens, and over the answer's key digits and ending alone.
    ``dca`` = (chunk_size, local_size) runs the forward with DCA positions (the passkey oracle's differentiable
    attention, docs/algorithms.md#dca-positions) instead of plain RoPE."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if dca is None:
            logits = model(input_ids=ids).logits
        else:
            plain = model.config._attn_implementation
            model.set_attn_implementation(oracle.ATTN_NAME)
            try:        # all position ids 0: the model's own rotary is the identity, the oracle rotates
                with oracle.settings(chunk_size=dca[0], local_size=dca[1], sparse=None, capture=None, stats=None,
                                     prompt_len=None):
                    logits = model(input_ids=ids, position_ids=torch.zeros_like(ids)).logits
            finally:
                model.set_attn_implementation(plain)
    logits = logits[:, :-1].float()
    tgt, v, a = ids[:, 1:], valid[:, 1:], answer[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
    return nll[v].mean(), nll[a].mean(), logits, tgt, a


@torch.no_grad()
def accuracy(model, tasks: Tasks, examples: list[dp.Sample], batch: int, autocast: bool) -> float:
    """Exact match of the key digits and the reply's ending under teacher forcing: equals greedy decoding's
    exact match of the key (given the fixed lead-in "The pass key is "), because greedy output is correct iff
    every marked token is the argmax given correct predecessors."""
    model.eval()
    hits = 0
    for i in range(0, len(examples), batch):
        ids, valid, answer = collate([tasks.encode(s) for s in examples[i:i + batch]], tasks.tok.pad_token_id)
        _, _, logits, tgt, a = losses(model, ids, valid, answer, autocast)
        ok = (logits.argmax(-1) == tgt) | ~a
        hits += int(ok.all(dim=1).sum())
    model.train()
    return hits / len(examples)


# ---------------------------------------------------------------- model and checkpoint
def make_model(args, tokenizer) -> Qwen2ForCausalLM:
    torch.manual_seed(args.seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_position, rope_theta=args.rope_theta, tie_word_embeddings=True,
        rms_norm_eps=1e-6, use_sliding_window=False,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id)
    cfg.dual_chunk_attention_config = {
        "chunk_size": args.seq_len, "local_size": args.dca_local,
        "original_max_position_embeddings": 0,
        "sparse_attention_threshold": args.sparse_threshold or 2 * args.seq_len}
    return Qwen2ForCausalLM(cfg)


def save(out: Path, model, tokenizer, loss_rows, eval_rows, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, do_sample=False,
                     max_new_tokens=32).save_pretrained(out)
    for name, rows in (("loss.csv", loss_rows), ("evals.csv", eval_rows)):
        if rows:
            with open(out / name, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    (out / "train_args.json").write_text(json.dumps(
        {"argv": sys.argv[1:], **{k: v for k, v in vars(args).items() if k != "out"}}, indent=2) + "\n")


# ---------------------------------------------------------------- training
def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(args) -> list[dict]:
    """Run training; returns the loss rows (one per step). Thread count and deterministic mode are set
    for the run and restored afterwards (the function is also called in-process by the tests)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(args) -> list[dict]:
    source = args.init_from or args.tokenizer
    tokenizer = (PreTrainedTokenizerFast.from_pretrained(source) if source
                 else build_tokenizer(args.seed, args.vocab_size))
    tasks = Tasks(tokenizer, args.kv_fraction, mask_ending=args.answer_mask == "key+end",
                  haystacks=args.haystacks, value_kinds=args.value_kinds, varied_needles=args.needles == "varied",
                  none_fraction=args.none_fraction)
    model = make_model(args, tokenizer)
    if args.init_from:      # continue from a saved checkpoint (new optimiser; use a new --seed for fresh data)
        model.load_state_dict(Qwen2ForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M vocab {len(tokenizer)}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    data_rng = random.Random(args.seed)
    dca_rng = random.Random(args.seed + 3_000_017)     # its own stream: --dca-train leaves the data unchanged
    eval_rng = random.Random(args.seed + 1_000_003)
    n_eval = args.eval_samples
    eval_tasks = Tasks(tokenizer, 0.0, mask_ending=tasks.mask_ending)    # seed needle, 5-digit keys
    eval_pk = [eval_tasks.sample(eval_rng, args.seq_len, "passkey", depth=i / max(1, n_eval - 1), key_digits=5,
                                 style=args.eval_style) for i in range(n_eval)]
    eval_kv = [eval_tasks.sample(eval_rng, args.seq_len, "kv", depth=eval_rng.random(), style=args.eval_style)
               for _ in range(n_eval // 2)]
    # the held-out haystack, reported only (never used to stop or select): training never reads its text
    held_rng = random.Random(args.seed + 2_000_003)
    eval_held = [eval_tasks.sample(held_rng, args.seq_len, "passkey", depth=i / max(1, n_eval - 1), key_digits=5,
                                   style=hs.HELD_OUT) for i in range(n_eval)] if args.heldout_eval else []
    out = Path(args.out) if args.out else None
    loss_rows, eval_rows, streak, start = [], [], 0, time.time()
    model.train()
    for step in range(args.max_steps):
        length = args.seq_len if data_rng.random() < 0.5 else data_rng.randint(args.min_len, args.seq_len)
        bsz = max(1, args.tokens_per_step // length)
        batch = [tasks.encode(tasks.sample(data_rng, length)) for _ in range(bsz)]
        ids, valid, answer = collate(batch, tokenizer.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        dca = None
        if args.dca_train and dca_rng.random() < args.dca_train:
            chunk = dca_rng.choice(args.dca_train_chunks)
            dca = (chunk, chunk // 4)
        loss, ans_loss, *_ = losses(model, ids, valid, answer, args.autocast, dca)
        opt.zero_grad(set_to_none=True)
        (loss + args.answer_weight * ans_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.time() - start
        dca_column = {"dca_chunk": dca[0] if dca else 0} if args.dca_train else {}
        loss_rows.append({"step": step + 1, "tokens": int(valid.sum()), **dca_column, "loss": round(loss.item(), 6),
                          "answer_loss": round(ans_loss.item(), 6), "lr": round(lr_at(step, args), 8),
                          "elapsed_s": round(elapsed, 1)})
        if (step + 1) % args.log_every == 0:
            print(json.dumps(loss_rows[-1]), flush=True)
        last = (step + 1 == args.max_steps or step + 1 == args.stop_after_steps
                or elapsed > args.time_budget_min * 60)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or last):
            pk = accuracy(model, tasks, eval_pk, args.eval_batch, args.autocast)
            kv = accuracy(model, tasks, eval_kv, args.eval_batch, args.autocast)
            row = {"step": step + 1, "passkey_acc": pk, "kv_acc": kv}
            if eval_held:
                row["heldout_passkey_acc"] = accuracy(model, tasks, eval_held, args.eval_batch, args.autocast)
            eval_rows.append({**row, "elapsed_s": round(time.time() - start, 1)})
            print(json.dumps(eval_rows[-1]), flush=True)
            if out:
                save(out, model, tokenizer, loss_rows, eval_rows, args)
            streak = streak + 1 if pk >= args.stop_acc else 0
            if streak >= 2:
                print(f"stop: passkey accuracy >= {args.stop_acc} twice in a row", flush=True)
                break
        if last:
            break
    if out:
        save(out, model, tokenizer, loss_rows, eval_rows, args)
    return loss_rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="checkpoint directory (re-saved at each evaluation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="reuse this tokenizer directory instead of training one")
    p.add_argument("--init-from", help="start from this checkpoint's weights and tokenizer (same shape flags)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512, help="training length T")
    p.add_argument("--min-len", type=int, default=192, help="shortest random training length")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--rope-theta", type=float, default=1e4)
    p.add_argument("--max-position", type=int, default=32768, help="max_position_embeddings in config.json")
    p.add_argument("--dca-local", type=int, default=64, help="DCA local_size written to config.json")
    p.add_argument("--sparse-threshold", type=int, default=0, help="0: 2 x seq-len")
    p.add_argument("--kv-fraction", type=float, default=0.35, help="share of key-value lookup examples")
    p.add_argument("--haystacks", type=lambda t: weighted(t, hs.TRAINING_STYLES, "haystack"), default={},
                   help="training filler styles with weights, e.g. pydoc:0.35,generated:0.2,mixed:0.25,qwen:0.1,"
                        "varied:0.1 (default: the original qwen 30%% / varied 70%%); the held-out source is refused")
    p.add_argument("--value-kinds", type=lambda t: weighted(t, dp.VALUE_KINDS, "value kind"), default={},
                   help="pass key values with weights, e.g. digits:0.6,word:0.2,mixed:0.2 (default: digits)")
    p.add_argument("--needles", choices=["seed", "varied"], default="seed",
                   help="needle wording: the seed prompt's (default) or drawn among the training wordings")
    p.add_argument("--none-fraction", type=float, default=0.0,
                   help="share of prompts without a pass key, answered 'There is no pass key in the text.'")
    p.add_argument("--eval-style", choices=hs.TRAINING_STYLES, default=None,
                   help="filler of the evaluation prompts that can stop training (default: drawn as originally)")
    p.add_argument("--heldout-eval", action="store_true",
                   help="also report passkey accuracy at T on the held-out haystack (column heldout_passkey_acc)")
    p.add_argument("--dca-train", type=float, default=0.0,
                   help="share of steps whose forward uses DCA with a chunk_size below T (drawn from "
                        "--dca-train-chunks, local_size a quarter of it), so prompts of at most T tokens already "
                        "span several DCA chunks and their repeated positions, as prompts far past T do at serving")
    p.add_argument("--dca-train-chunks", type=int_list, default=[128, 192, 256],
                   help="chunk_size values for --dca-train steps (default 128,192,256)")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="extra weight of the loss on the key digits and the reply ending")
    p.add_argument("--answer-mask", choices=["key+end", "key"], default="key+end",
                   help="tokens of the answer loss and the held-out accuracy: the key digits and the reply's ending "
                        "(default), or the key digits alone (stages 1-3 of the committed model, see its README)")
    p.add_argument("--max-steps", type=int, default=2400)
    p.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop after this many steps without shortening the --max-steps schedule (0: no stop); "
                        "replays a run that a time budget stopped")
    p.add_argument("--time-budget-min", type=float, default=70.0, help="wall-clock stop (minutes)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--stop-acc", type=float, default=0.97)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--autocast", action="store_true",
                   help="bf16 autocast (fast only on CPUs with native bf16; default fp32)")
    args = p.parse_args(argv)
    if args.seq_len < 64 or args.min_len > args.seq_len:
        p.error("--seq-len must be >= 64 and --min-len <= --seq-len")
    if not 0.0 <= args.none_fraction < 1.0 or args.kv_fraction + args.none_fraction >= 1.0:
        p.error("--none-fraction must be in [0, 1) and leave room for passkey prompts with --kv-fraction")
    if args.stop_after_steps < 0:
        p.error("--stop-after-steps must be >= 0")
    if not 0 < args.dca_local < args.seq_len:
        p.error("--dca-local must be in (0, seq-len)")
    if not 0.0 <= args.dca_train <= 1.0:
        p.error("--dca-train must be in [0, 1]")
    if args.dca_train and not all(8 <= c <= args.seq_len and c % 4 == 0 for c in args.dca_train_chunks):
        p.error("--dca-train-chunks must be multiples of 4 in [8, seq-len]")
    if args.heads % args.kv_heads or args.hidden % args.heads:
        p.error("--heads must divide --hidden and be a multiple of --kv-heads")
    return args


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
