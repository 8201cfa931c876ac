"""The committed demo model: its files are what the serving stack expects, its DCA attention matches the
kernels' reference, prompts are built as trained, its training script is reproducible, and our engine with
dual chunk attention answers passkey prompts at twice the training length."""
from __future__ import annotations

import csv
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from longserve.bench import demo_prompts as dp

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "demo-passkey"


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def dca():
    return json.loads((MODEL / "config.json").read_text())["dual_chunk_attention_config"]


def test_checkpoint_files_and_size(dca):
    names = {p.name for p in MODEL.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json", "loss.csv", "README.md", "sparse_attention_config.json"):
        assert required in names, required
    assert sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file()) <= 25 * 2**20
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"] and cfg["num_hidden_layers"] >= 2
    assert 0 < dca["local_size"] < dca["chunk_size"]
    sparse = json.loads((MODEL / "sparse_attention_config.json").read_text())
    assert len(sparse) == cfg["num_hidden_layers"]
    assert all(len(layer) == cfg["num_attention_heads"] for layer in sparse)


def test_chat_template_matches_training_format(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the pass key?"}],
                                         add_generation_prompt=True, tokenize=False)
    assert text == dp.chat_prompt("What is the pass key?")
    assert tokenizer.encode("28884", add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(c)
                                                                   for c in "28884"]


def test_training_length_is_read_from_the_recipe():
    assert dp.training_length(MODEL) == 512


def test_oracle_dca_equals_plain_up_to_the_chunk_size(dca):
    """Up to chunk_size tokens DCA positions are plain RoPE positions and the YaRN factor m is exactly 1."""
    from longserve.bench import passkey_oracle as po
    model, _ = po.load(str(MODEL))
    ids = torch.randint(0, model.config.vocab_size, (1, dca["chunk_size"]),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.model(input_ids=ids, position_ids=torch.zeros_like(ids)).last_hidden_state
        with po.settings(chunk_size=dca["chunk_size"], local_size=dca["local_size"]):
            with_dca = model.model(input_ids=ids, position_ids=torch.zeros_like(ids)).last_hidden_state
    assert (plain - with_dca).abs().max().item() < 1e-4


@pytest.mark.parametrize("chunk_size,local_size", [(16, 4), (None, None)])
def test_oracle_attention_matches_reference_dca(chunk_size, local_size):
    from types import SimpleNamespace

    from longserve.bench import passkey_oracle as po
    from longserve.kernels.reference.dca import dual_chunk_attention_reference

    g = torch.Generator().manual_seed(1)
    L, H, G, D = 45, 4, 2, 8
    q, k, v = (torch.randn(1, n, L, D, generator=g, dtype=torch.float64) for n in (H, G, G))
    module = SimpleNamespace(config=SimpleNamespace(rope_parameters={"rope_theta": 100.0}))
    with po.settings(chunk_size=chunk_size, local_size=local_size):
        got, _ = po.dca_attention(module, q, k, v, None, scaling=D ** -0.5)
    want = dual_chunk_attention_reference(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                          rope_theta=100.0, chunk_size=chunk_size, local_size=local_size)
    assert torch.allclose(got[0], want, atol=1e-10)


def test_oracle_settings_are_restored_after_the_block_and_on_error():
    from longserve.bench import passkey_oracle as po
    before = dict(po._SETTINGS)
    with pytest.raises(RuntimeError), po.settings(chunk_size=16, local_size=4):
        assert po._SETTINGS["chunk_size"] == 16
        raise RuntimeError("inside")
    assert po._SETTINGS == before
    with pytest.raises(KeyError, match="chunk"):
        with po.settings(chunk=16):
            pass


def test_oracle_yarn_scale_matches_reference_prefill_and_decode():
    """The oracle's YaRN scale: prompt rows at the prompt's length (the reference's ``prompt_len``), teacher-forced
    rows after the prompt at their own length, as the engine's decode applies it."""
    from types import SimpleNamespace

    from longserve.bench import passkey_oracle as po
    from longserve.kernels.reference.dca import dual_chunk_attention_reference

    g = torch.Generator().manual_seed(2)
    L, n_prompt, H, G, D = 45, 40, 4, 2, 8
    q, k, v = (torch.randn(1, n, L, D, generator=g, dtype=torch.float64) * 3 for n in (H, G, G))
    config = SimpleNamespace(rope_parameters={"rope_theta": 100.0},
                             dual_chunk_attention_config={"original_max_position_embeddings": 12})
    toy = dict(rope_theta=100.0, chunk_size=16, local_size=4, original_max_position_embeddings=12)
    with po.settings(chunk_size=16, local_size=4, prompt_len=n_prompt):
        got, _ = po.dca_attention(SimpleNamespace(config=config), q, k, v, None, scaling=D ** -0.5)
    qs, ks, vs = (x[0].transpose(0, 1) for x in (q, k, v))
    prefill = dual_chunk_attention_reference(qs[:n_prompt], ks[:n_prompt], vs[:n_prompt], **toy)
    unscaled = dual_chunk_attention_reference(qs, ks, vs, **dict(toy, original_max_position_embeddings=0))
    assert torch.allclose(got[0, :n_prompt], prefill[:n_prompt], atol=1e-10)
    assert (got[0] - unscaled).abs().max() > 1e-3          # the scale is really on
    for row in range(n_prompt, L):
        decode = dual_chunk_attention_reference(qs[: row + 1], ks[: row + 1], vs[: row + 1], **toy)
        assert torch.allclose(got[0, row], decode[row], atol=1e-10), row


def _first_number(text: str):
    from longserve.bench.passkey import first_number
    return first_number(text)


def test_training_is_reproducible(tmp_path):
    train = _load_tool("train_demo_model")
    argv = ["--tokenizer", str(MODEL), "--seed", "3", "--layers", "1", "--hidden", "32", "--heads", "2",
            "--kv-heads", "1", "--intermediate", "64", "--seq-len", "256", "--min-len", "200",
            "--tokens-per-step", "512", "--max-steps", "3", "--eval-every", "0", "--warmup", "2", "--threads", "1"]
    first = train.train(train.parse_args(argv))
    second = train.train(train.parse_args(argv))
    assert len(first) == 3
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    assert first[0]["loss"] != first[-1]["loss"]
    other = train.train(train.parse_args(argv[:3] + ["4"] + argv[4:]))
    assert [r["loss"] for r in other] != [r["loss"] for r in first]


def test_dca_training_steps_are_seeded_and_leave_the_data_stream_alone(tmp_path):
    """--dca-train runs a share of the steps with DCA positions at a chunk below T: the same data (its own random
    stream), a different forward (prompts of 200-256 tokens span several 64-token chunks), reproducible, and bad
    values refused."""
    train = _load_tool("train_demo_model")
    argv = ["--tokenizer", str(MODEL), "--seed", "3", "--layers", "1", "--hidden", "32", "--heads", "2",
            "--kv-heads", "1", "--intermediate", "64", "--seq-len", "256", "--min-len", "200",
            "--tokens-per-step", "512", "--max-steps", "2", "--eval-every", "0", "--warmup", "2", "--threads", "1"]
    plain = train.train(train.parse_args(argv))
    dca_argv = argv + ["--dca-train", "1.0", "--dca-train-chunks", "64"]
    first = train.train(train.parse_args(dca_argv))
    assert [r["dca_chunk"] for r in first] == [64, 64]
    assert [r["tokens"] for r in first] == [r["tokens"] for r in plain]
    assert first[0]["loss"] != plain[0]["loss"]
    assert [r["loss"] for r in first] == [r["loss"] for r in train.train(train.parse_args(dca_argv))]
    for bad in (["--dca-train", "1.5"], ["--dca-train", "0.5", "--dca-train-chunks", "30"]):
        with pytest.raises(SystemExit):
            train.parse_args(argv + bad)


def test_dca_loss_restores_the_attention_implementation(tokenizer):
    train = _load_tool("train_demo_model")
    from transformers import Qwen2ForCausalLM
    model = Qwen2ForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    before = model.config._attn_implementation
    tasks = train.Tasks(tokenizer, 0.0)
    s = tasks.sample(random.Random(0), 300, "passkey", depth=0.5, key_digits=5, style="pydoc")
    ids, valid, answer = train.collate([tasks.encode(s)], tokenizer.pad_token_id)
    with torch.no_grad():
        plain = train.losses(model, ids, valid, answer, False)[0]
        same = train.losses(model, ids, valid, answer, False, (512, 128))[0]       # one chunk: plain positions
        chunked = train.losses(model, ids, valid, answer, False, (64, 16))[0]
    assert model.config._attn_implementation == before
    assert abs(plain.item() - same.item()) < 1e-4 and abs(plain.item() - chunked.item()) > 1e-4


def test_finalize_sets_a_measured_chunk_size(tmp_path):
    finalize = _load_tool("demo_finalize")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (ckpt / name).write_bytes((MODEL / name).read_bytes())
    (ckpt / "model.safetensors").write_bytes(b"")
    dca = finalize.copy_checkpoint(ckpt, tmp_path / "out", 96, 1024, chunk_size=384)
    assert (dca["chunk_size"], dca["local_size"], dca["sparse_attention_threshold"]) == (384, 96, 1024)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dual_chunk_attention_config"] == dca
    with pytest.raises(ValueError, match="local-size"):
        finalize.copy_checkpoint(ckpt, tmp_path / "bad", 400, None, chunk_size=384)
    with pytest.raises(ValueError, match="chunk-size"):
        finalize.copy_checkpoint(ckpt, tmp_path / "bad", 96, None, chunk_size=10**6)


def test_prompts_fit_length_and_place_the_needle(tokenizer):
    count = lambda s: len(tokenizer.encode(dp.chat_prompt(s.prompt), add_special_tokens=False))  # noqa: E731
    rng = random.Random(0)
    for task in ("passkey", "kv"):
        for target in (300, 700):
            s = dp.sized_sample(count, rng, target, task, depth=0.5)
            assert target - 12 <= count(s) <= target
            assert s.answer.endswith(f"{s.target}.") and s.target in s.prompt
    early = dp.passkey_sample(40, 0.0, "12345", "qwen", random.Random(1)).prompt
    late = dp.passkey_sample(40, 1.0, "12345", "qwen", random.Random(1)).prompt
    assert early.index("12345") < len(early) * 0.3 < len(late) * 0.7 < late.index("12345")
    kv = dp.kv_sample(30, 0.5, random.Random(2), "varied", 4)
    assert kv.prompt.count("The code for the ") == 4
    with pytest.raises(ValueError):
        dp.fit_to_length(lambda n: dp.passkey_sample(n, 0.5, "1", "qwen", random.Random(0)), count, 10)


def test_bench_passkey_writes_table_csv_heatmap_and_pair_counts(tmp_path, capsys):
    import argparse

    from longserve.bench import passkey

    parser = argparse.ArgumentParser()
    passkey.add_arguments(parser)
    args = parser.parse_args(["--model", str(MODEL), "--lengths", "260", "--depths", "0,1", "--samples", "1",
                              "--backend", "oracle", "--sparse", "on", "--sparse-threshold", "128",
                              "--threads", "1", "--distance-bins", "128", "--out", str(tmp_path)])
    assert passkey.run(args) == 0
    out = capsys.readouterr().out
    assert "length \\ depth" in out and "sparse prefill computed" in out and "needle distance (tokens)" in out
    with open(tmp_path / "prompts.csv", newline="") as f:
        prompts = {float(r["depth"]): int(r["needle_distance"]) for r in csv.DictReader(f)}
    # depth 1: only the question and the chat template's tail follow the key; depth 0: nearly the whole prompt
    assert 10 < prompts[1.0] < 60 and 200 < prompts[0.0] <= 260
    rows = (tmp_path / "passkey.csv").read_text().strip().splitlines()
    assert rows[0].startswith("length,depth") and len(rows) == 3
    assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    pairs = json.loads((tmp_path / "summary.json").read_text())["sparse_pairs"]
    # computed: the causally visible pairs the kernels' 64-wide tiles score, returned by the attention calls
    assert 0 < pairs["computed_fraction"] <= 1 and pairs["computed"] <= pairs["dense_causal"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", str(MODEL), "--lengths", "0"])


def test_distance_table_bins_by_inclusive_upper_bounds_and_drops_empty_bins():
    from longserve.bench.passkey import distance_table, format_distance_table

    rows = [(512, True), (513, False), (513, True), (2000, False)]
    bins = distance_table(rows, [768, 512])
    assert bins == [{"low": 0, "high": 512, "prompts": 1, "correct": 1},
                    {"low": 513, "high": 768, "prompts": 2, "correct": 1},
                    {"low": 769, "high": None, "prompts": 1, "correct": 0}]
    assert distance_table([(5, True)], [512]) == [{"low": 0, "high": 512, "prompts": 1, "correct": 1}]
    table = format_distance_table(bins)
    assert "513-768" in table and ">= 769" in table and "50.0%" in table


def _heldout_replies(tokenizer, length: int, dca_on: bool):
    """(replies, samples): twenty held-out-haystack passkey prompts of `length` tokens (four per depth 0-100%, a
    prompt seed the bench grids do not use) through the engine, greedy, DCA on or off."""
    from longserve.bench.passkey import build_prompts
    from longserve.server.engine import LLM, SamplingParams

    grid = build_prompts(tokenizer, [length], [0.0, 0.25, 0.5, 0.75, 1.0], samples=4, key_digits=5,
                         filler="stdlib", seed=2026)
    samples = [s for cell in grid.values() for s, _ in cell]
    prompts = [ids for cell in grid.values() for _, ids in cell]
    assert all(length - 120 <= len(ids) <= length for ids in prompts)     # whole sentences of prose
    llm = LLM(str(MODEL), max_model_len=length + 32, dtype="float32", dca=dca_on)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    return [o.outputs[0].text for o in outputs], samples


def test_engine_with_dca_answers_passkeys_at_twice_the_training_length_on_unseen_text(tokenizer):
    """Twenty passkey prompts of 2T tokens whose filler is the held-out haystack (standard-library docstrings, text no
    training prompt contained), through the engine with DCA. At least 85% must be exactly right: the bench answers
    40 of 40 held-out 2T prompts (bench/RESULTS.md), so the bar is the model's accuracy less sampling noise."""
    replies, samples = _heldout_replies(tokenizer, 2 * dp.training_length(MODEL), dca_on=True)
    correct = sum(r == s.answer for r, s in zip(replies, samples))
    assert correct >= 0.85 * len(samples), list(zip(replies, [s.target for s in samples]))


def test_without_dca_the_model_fails_past_twice_the_training_length(tokenizer):
    """The ablation: the same kind of prompts at 4T without DCA must mostly fail (at most half right; the bench
    measures 0 of 40), while DCA answers all of them (bench/RESULTS.md). At 2T plain RoPE still answers 87.5% in the
    bench: it reads every needle up to 1.5T from the question (30 of 30; farther, 5 of 10), and of this test's 20 2T
    needles the 12 past T (545-975 tokens away) are read 9 times. At 4T plain RoPE breaks down at every
    depth, so the ablation is asserted there. (A stage trained with a lower RoPE base still answered 14 of the 20 2T
    prompts without DCA, and lost 16T with DCA: bench/RESULTS.md.)"""
    replies, samples = _heldout_replies(tokenizer, 4 * dp.training_length(MODEL), dca_on=False)
    assert sum(r == s.answer for r, s in zip(replies, samples)) <= 0.5 * len(samples), replies


def test_finalize_merges_training_stages_into_one_history(tmp_path):
    finalize = _load_tool("demo_finalize")
    for number, steps in ((1, 3), (2, 2)):
        stage = tmp_path / f"stage{number}"
        stage.mkdir()
        (stage / "loss.csv").write_text("step,loss\n" + "".join(f"{i},{1 / i}\n" for i in range(1, steps + 1)))
        (stage / "evals.csv").write_text(f"step,passkey_acc\n{steps},0.{number}\n")
        (stage / "train_args.json").write_text(json.dumps({"seed": number}))
    out = tmp_path / "out"
    out.mkdir()
    assert finalize.merge_stages([tmp_path / "stage1", tmp_path / "stage2"], out) == 5
    with open(out / "loss.csv", newline="") as f:
        rows = [(r["stage"], r["global_step"], r["step"]) for r in csv.DictReader(f)]
    assert rows == [("1", "1", "1"), ("1", "2", "2"), ("1", "3", "3"), ("2", "4", "1"), ("2", "5", "2")]
    with open(out / "evals.csv", newline="") as f:
        assert [(r["global_step"], r["passkey_acc"]) for r in csv.DictReader(f)] == [("3", "0.1"), ("5", "0.2")]
    assert json.loads((out / "train_args.json").read_text()) == {"stages": [{"seed": 1}, {"seed": 2}]}
    with pytest.raises(ValueError, match="lacks"):
        finalize.merge_stages([tmp_path / "missing"], out)


def test_committed_history_covers_every_step_and_ends_at_the_target():
    """The saved curve is the whole training (all stages, no gaps) and its last held-out evaluation at T
    meets the 95% passkey target."""
    with open(MODEL / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == list(range(1, len(rows) + 1))
    stages = json.loads((MODEL / "train_args.json").read_text())["stages"]
    assert [str(i) for i in range(1, len(stages) + 1)] == sorted({r["stage"] for r in rows})
    with open(MODEL / "evals.csv", newline="") as f:
        evals = list(csv.DictReader(f))
    assert float(evals[-1]["passkey_acc"]) >= 0.95
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) / 5


def test_answer_mask_marks_the_key_and_the_reply_ending(tokenizer):
    """The default mask also covers what stops the reply; the key-only mask (stages 1-3) lets a greedy reply
    run on past the key."""
    train = _load_tool("train_demo_model")
    sample = dp.passkey_sample(10, 0.5, "28884", "qwen", random.Random(0))
    for mask_ending, marked in ((True, "28884.<|im_end|>"), (False, "28884")):
        ids, mask = train.Tasks(tokenizer, 0.0, mask_ending=mask_ending).encode(sample)
        assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == marked
        assert tokenizer.decode(ids[:mask.index(1)]).endswith("<|im_start|>assistant\nThe pass key is ")


def test_finalize_continues_a_finalized_models_history(tmp_path):
    """A new stage trained from the committed model merges after that model's own merged history: stage numbers
    and global steps continue, and a column the new stage adds is kept (empty in the earlier rows)."""
    finalize = _load_tool("demo_finalize")
    old, new, out = tmp_path / "old", tmp_path / "new", tmp_path / "out"
    for d in (old, new, out):
        d.mkdir()
    (old / "loss.csv").write_text("stage,global_step,step,loss\n1,1,1,3.0\n1,2,2,2.0\n2,3,1,1.5\n")
    (old / "evals.csv").write_text("stage,global_step,step,passkey_acc\n2,3,1,0.5\n")
    (old / "train_args.json").write_text(json.dumps({"stages": [{"seed": 0}, {"seed": 1}]}))
    (new / "loss.csv").write_text("step,loss\n1,1.0\n2,0.9\n")
    (new / "evals.csv").write_text("step,passkey_acc,heldout_passkey_acc\n2,0.9,0.8\n")
    (new / "train_args.json").write_text(json.dumps({"seed": 5}))
    assert finalize.merge_stages([old, new], out) == 5
    with open(out / "loss.csv", newline="") as f:
        rows = [(r["stage"], r["global_step"], r["step"]) for r in csv.DictReader(f)]
    assert rows == [("1", "1", "1"), ("1", "2", "2"), ("2", "3", "1"), ("3", "4", "1"), ("3", "5", "2")]
    with open(out / "evals.csv", newline="") as f:
        evals = list(csv.DictReader(f))
    assert [(r["stage"], r["global_step"], r["heldout_passkey_acc"]) for r in evals] == [("2", "3", ""),
                                                                                          ("3", "5", "0.8")]
    assert json.loads((out / "train_args.json").read_text())["stages"] == [{"seed": 0}, {"seed": 1}, {"seed": 5}]
    with pytest.raises(SystemExit):         # the merged model cannot be its own output: it would be overwritten
        finalize.main(["--ckpt", str(new), "--out", str(old), "--local-size", "64", "--earlier-stages", str(old)])
