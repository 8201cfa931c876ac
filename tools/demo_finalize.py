#!/usr/bin/env python
"""Turn a training checkpoint into the committed demo model: copy the files, set the measured DCA window
and the sparse threshold, and produce sparse_attention_config.json by refining budgets on the model's
own attention (longserve.kernels.refine_sparse_config) over seeded passkey calibration prompts.

    python tools/demo_finalize.py --ckpt /tmp/demo_run/ckpt --out models/demo-passkey --local-size 64
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
from pathlib import Path

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "generation_config.json", "loss.csv", "evals.csv", "train_args.json")


def copy_checkpoint(ckpt: Path, out: Path, local_size: int, threshold: int | None,
                    chunk_size: int | None = None) -> dict:
    """Copies the checkpoint files and rewrites the DCA block of config.json (``chunk_size`` None keeps the
    checkpoint's, which the trainer sets to T); returns that block."""
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (ckpt / f).is_file()]
    if missing:
        raise ValueError(f"{ckpt} is not a training checkpoint (missing {', '.join(missing)})")
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, out / name)
    cfg = json.loads((out / "config.json").read_text())
    dca = cfg["dual_chunk_attention_config"]
    if chunk_size is not None:
        if chunk_size > cfg["max_position_embeddings"] or chunk_size < 2:
            raise ValueError(f"--chunk-size must be in [2, {cfg['max_position_embeddings']}]")
        dca["chunk_size"] = chunk_size
    if not 0 < local_size < dca["chunk_size"]:
        raise ValueError(f"--local-size must be in (0, {dca['chunk_size']})")
    dca["local_size"] = local_size
    dca["sparse_attention_threshold"] = threshold or 2 * dca["chunk_size"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dca


def merge_stages(stage_dirs: list[Path], out: Path) -> int:
    """A model trained in stages (each `--init-from` the previous): writes one loss.csv and evals.csv over all
    stages (leading columns `stage` and `global_step`) and train_args.json as {"stages": [...]}, so the saved
    curve is the whole training. A directory whose train_args.json already holds {"stages": [...]} (a finalized
    model) brings its merged history as it is, and the next stage continues its numbering. Returns the total
    number of steps."""
    curves: dict[str, list[dict]] = {"loss.csv": [], "evals.csv": []}
    stages, offset = [], 0
    for stage in stage_dirs:
        missing = [f for f in ("loss.csv", "evals.csv", "train_args.json") if not (stage / f).is_file()]
        if missing:
            raise ValueError(f"training stage {stage} lacks {', '.join(missing)}")
        meta = json.loads((stage / "train_args.json").read_text())
        merged = isinstance(meta, dict) and "stages" in meta
        first = len(stages) + 1
        stages += meta["stages"] if merged else [meta]
        last = offset
        for name, rows in curves.items():
            with open(stage / name, newline="") as f:
                for row in csv.DictReader(f):
                    if merged:
                        row = {**row, "stage": first - 1 + int(row["stage"]),
                               "global_step": offset + int(row["global_step"])}
                        last = max(last, int(row["global_step"]))
                    else:
                        row = {"stage": first, "global_step": offset + int(row["step"]), **row}
                        last = max(last, row["global_step"])
                    rows.append(row)
        offset = last
    for name, rows in curves.items():
        fields = list(dict.fromkeys(k for row in rows for k in row))     # later stages may add columns
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
    (out / "train_args.json").write_text(json.dumps({"stages": stages}, indent=2) + "\n")
    return offset


def calibration_prompts(tokenizer, lengths: list[int], per_length: int, seed: int,
                        filler: str | None = None) -> list[list[int]]:
    """Seeded passkey prompts (depths spread; filler drawn between the two seed styles unless `filler` names a
    training haystack) as token ids, for the recall calibration."""
    from longserve.bench import demo_prompts as dp
    count = lambda s: len(tokenizer.encode(dp.chat_prompt(s.prompt), add_special_tokens=False))  # noqa: E731
    rng = random.Random(seed)
    prompts = []
    for length in lengths:
        for i in range(per_length):
            s = dp.sized_sample(count, rng, length, "passkey", depth=(i + 0.5) / per_length, key_digits=5,
                               style=filler)
            prompts.append(tokenizer.encode(dp.chat_prompt(s.prompt), add_special_tokens=False))
    return prompts


def refine(out: Path, dca: dict, lengths: list[int], per_length: int, seed: int, base: tuple[int, int],
           increments, filler: str | None = None, max_rounds: int = 3) -> dict:
    """Captures each layer's un-rotated (q, k) in dense DCA prefills of the calibration prompts and refines a
    uniform base config layer by layer with longserve.kernels.refine_sparse_config; writes the JSON file."""
    import torch

    from longserve.bench import passkey_oracle as po
    from longserve.kernels import HeadPattern, SparseAttentionConfig, refine_sparse_config

    model, tok = po.load(str(out))
    cfg = model.config
    captured: list = []
    with po.settings(chunk_size=dca["chunk_size"], local_size=dca["local_size"], sparse=None, capture=captured), \
            torch.no_grad():
        for ids in calibration_prompts(tok, lengths, per_length, seed, filler):
            t = torch.tensor([ids])
            model.model(input_ids=t, position_ids=torch.zeros_like(t))
    heads = cfg.num_attention_heads
    config = SparseAttentionConfig(tuple(tuple(HeadPattern(*base) for _ in range(heads))
                                         for _ in range(cfg.num_hidden_layers)))
    recalls = {}
    for layer in range(cfg.num_hidden_layers):
        samples = [(q, k) for l_, q, k, _ in captured if l_ == layer]
        config, history = refine_sparse_config(
            config, layer, samples, rope_theta=float(cfg.rope_parameters["rope_theta"]),
            chunk_size=dca["chunk_size"], local_size=dca["local_size"], increments=increments, max_rounds=max_rounds)
        recalls[layer] = [[round(x, 4) for x in row] for row in history.tolist()]
        print(f"layer {layer}: recall per round {recalls[layer]}", flush=True)
    config.save(out / "sparse_attention_config.json")
    return {"base": list(base), "increments": [[b if b > -1 else None, i] for b, i in increments],
            "max_rounds": max_rounds,
            "calibration_lengths": lengths,
            "per_length": per_length, "calibration_filler": filler or "qwen/varied", "recall_history": recalls}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="training output directory")
    p.add_argument("--out", required=True, help="model directory to write (e.g. models/demo-passkey)")
    p.add_argument("--local-size", type=int, required=True, help="DCA local_size chosen by measurement")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="DCA chunk_size (the largest relative position DCA produces) chosen by measurement; "
                        "default: the checkpoint's (T)")
    p.add_argument("--sparse-threshold", type=int, default=None, help="default: 2 x chunk_size")
    p.add_argument("--calib-lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--calib-per-length", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-filler", default=None,
                   help="filler of the calibration prompts: a training haystack of bench/haystacks.py (never the "
                        "held-out one); default: the two seed styles")
    p.add_argument("--base-vertical", type=int, default=100, help="base vertical budget of every head")
    p.add_argument("--base-slash", type=int, default=120,
                   help="base slash budget (the 100 nearest diagonals are always forced)")
    p.add_argument("--increment-scale", type=int, default=64,
                   help="budget increments for recall buckets [0.8,0.9), [0.7,0.8), [0.6,0.7), below: 1x/2x/4x/6x this")
    p.add_argument("--max-rounds", type=int, default=3,
                   help="refinement rounds per layer at most (it stops earlier once every head's recall reaches 0.9)")
    p.add_argument("--earlier-stages", nargs="*", default=[], metavar="DIR",
                   help="outputs of the earlier training stages, in order (--ckpt is the last), or a finalized "
                        "model they continue: their loss.csv, evals.csv and train_args.json are merged with the "
                        "checkpoint's into one history")
    p.add_argument("--skip-sparse", action="store_true", help="only copy the files and set the DCA block")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from longserve.bench import haystacks as hs
    if args.calib_filler is not None and args.calib_filler not in hs.TRAINING_STYLES:
        p.error(f"--calib-filler must be one of {', '.join(hs.TRAINING_STYLES)} (the held-out haystack stays unseen)")
    if args.max_rounds < 1:
        p.error("--max-rounds must be >= 1")
    if any(Path(d).resolve() == Path(args.out).resolve() for d in args.earlier_stages):
        p.error("an --earlier-stages directory is --out itself: copy it elsewhere first (--out is overwritten)")
    try:
        dca = copy_checkpoint(Path(args.ckpt), Path(args.out), args.local_size, args.sparse_threshold,
                              args.chunk_size)
        if args.earlier_stages:
            steps = merge_stages([Path(d) for d in args.earlier_stages] + [Path(args.ckpt)], Path(args.out))
            n = len(json.loads((Path(args.out) / "train_args.json").read_text())["stages"])
            print(f"training history: {n} stages, {steps} steps")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"dual_chunk_attention_config: {json.dumps(dca, sort_keys=True)}")
    if args.skip_sparse:
        return 0
    import torch
    torch.set_num_threads(args.threads)
    inc = args.increment_scale
    increments = ((0.9, 0), (0.8, inc), (0.7, 2 * inc), (0.6, 4 * inc), (float("-inf"), 6 * inc))
    report = refine(Path(args.out), dca, args.calib_lengths, args.calib_per_length, args.seed,
                    (args.base_vertical, args.base_slash), increments, args.calib_filler, args.max_rounds)
    (Path(args.out) / "sparse_refinement.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
