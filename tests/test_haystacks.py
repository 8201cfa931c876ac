"""The haystacks of the demo model's prompts: the snapshot is what the build tool makes, the held-out source shares
no text with training, fillers are seeded and contiguous, and the trainer cannot be pointed at the held-out text."""
from __future__ import annotations

import gzip
import importlib.util
import random
import sys
from pathlib import Path

import pytest

from longserve.bench import demo_prompts as dp
from longserve.bench import haystacks as hs

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sources_are_prose_and_the_held_out_one_is_disjoint():
    train, held = hs.prose("pydoc"), hs.prose(hs.HELD_OUT)
    assert len(train) > 1000 and len(held) > 1000
    assert not set(train) & set(held)
    for s in train + held:
        assert s[0].isupper() and s.endswith((".", "!", "?")) and "\n" not in s
    assert hs.HELD_OUT not in hs.TRAINING_STYLES
    with pytest.raises(ValueError, match="unknown prose source"):
        hs.prose("nonsense")


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the snapshot was made with Python 3.11.7")
def test_build_tool_reproduces_the_committed_snapshot(tmp_path):
    import subprocess
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_haystacks.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    for name in hs.PROSE_SOURCES:
        assert (tmp_path / f"{name}.txt.gz").read_bytes() == (hs.DATA / f"{name}.txt.gz").read_bytes()
        with gzip.open(tmp_path / f"{name}.txt.gz", "rt") as f:
            assert tuple(f.read().splitlines()) == hs.prose(name)


def test_prose_filter_keeps_sentences_and_drops_code():
    tool = _load_tool("build_haystacks")
    text = ("This paragraph explains a thing. It has two sentences.\n\n    x = compute(1, 2)\n\n"
            ">>> print('hi')\n\nshort.\n\nA call like f(x)[0] == {'a': 1} is mostly symbols; {} [] () == != <>.")
    assert tool.prose_sentences(text) == ["This paragraph explains a thing.", "It has two sentences."]


@pytest.mark.parametrize("style", hs.ALL_STYLES)
def test_fillers_are_seeded_and_sized(style):
    a = dp.filler_sentences(random.Random(7), 25, style)
    assert a == dp.filler_sentences(random.Random(7), 25, style)
    assert len(a) == 25 and all(isinstance(s, str) and s for s in a)
    if style in hs.PROSE_SOURCES:             # a contiguous run of the source, wrapping at its end
        source = hs.prose(style)
        i = source.index(a[0])
        assert a == [source[(i + k) % len(source)] for k in range(25)]
    with pytest.raises(ValueError, match="unknown filler style"):
        dp.filler_sentences(random.Random(0), 3, "nonsense")


def test_tasks_values_and_wordings():
    rng = random.Random(3)
    assert dp.random_value(rng, "digits", 6).isdigit()
    assert dp.random_value(rng, "word") in dp.VALUE_WORDS
    code = dp.random_value(rng, "mixed")
    assert 5 <= len(code) <= 7 and any(c.isdigit() for c in code) and any(c.isalpha() for c in code)
    with pytest.raises(ValueError):
        dp.random_value(rng, "emoji")
    s = dp.passkey_sample(20, 0.5, "amber", "generated", random.Random(1), dp.NEEDLE_UNSEEN)
    assert dp.NEEDLE_UNSEEN.format(k="amber") in s.prompt and s.answer == "The pass key is amber."
    assert dp.NEEDLE_UNSEEN not in dp.NEEDLES
    none = dp.no_key_sample(20, hs.HELD_OUT, random.Random(1))
    assert "pass key is" not in none.prompt and none.answer == dp.NO_KEY_ANSWER and none.target in none.answer


def test_trainer_refuses_the_held_out_haystack_and_bad_weights(capsys):
    train = _load_tool("train_demo_model")
    ok = train.parse_args(["--haystacks", "pydoc:0.5,generated", "--value-kinds", "digits:3,word:1"])
    assert ok.haystacks == {"pydoc": 0.5, "generated": 1.0} and ok.value_kinds == {"digits": 3.0, "word": 1.0}
    for bad in (["--haystacks", hs.HELD_OUT], ["--haystacks", "pydoc:-1"], ["--value-kinds", "emoji"],
                ["--none-fraction", "0.8"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
    assert "unknown haystack" in capsys.readouterr().err


def test_default_data_stream_is_the_original_one():
    """Without the new options the trainer's samples are those the first four stages trained on: the same draws
    from the same seeded stream (stages 1-4 of the recipe replay exactly)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "demo-passkey")
    train = _load_tool("train_demo_model")
    tasks = train.Tasks(tok, 0.35)
    got = [tasks.sample(random.Random(11), 300) for _ in range(1)]
    rng = random.Random(11)
    task = "kv" if rng.random() < 0.35 else "passkey"
    want = [dp.sized_sample(tasks.count, rng, 300, task)]
    assert got[0].prompt == want[0].prompt
    assert want[0].prompt.count("The pass key is") <= 1 and got[0].task in ("passkey", "kv")
