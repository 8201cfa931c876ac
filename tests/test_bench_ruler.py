"""`longserve bench ruler`: the suite's prompts are what each task says, and a run writes the table, CSV, heatmap
and every reply; bad arguments exit with a message."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from longserve.bench import demo_prompts as dp
from longserve.bench import ruler

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "demo-passkey"


def _parser():
    parser = argparse.ArgumentParser()
    ruler.add_arguments(parser)
    return parser


def test_suite_prompts_follow_their_task():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    suite = ruler.build_suite(tok, list(ruler.TASKS), [400], 3, "stdlib", seed=1)
    assert suite == ruler.build_suite(tok, list(ruler.TASKS), [400], 3, "stdlib", seed=1)
    for (task, length), cell in suite.items():
        assert len(cell) == 3
        for sample, ids in cell:
            assert length - 120 <= len(ids) <= length       # whole sentences of prose: up to one short
            body = sample.prompt
            if task == "none":
                assert sample.answer == dp.NO_KEY_ANSWER and "pass key is" not in body
            elif task == "multikey":
                assert body.count("The code for the ") == 4 and sample.answer in body.replace("\n", " ") + "."
            else:
                assert f"pass key is {sample.target}" in body and sample.answer == f"The pass key is {sample.target}."
        if task == "wording":
            assert all(dp.NEEDLE_UNSEEN.format(k=s.target) in s.prompt for s, _ in cell)
        if task == "word":
            assert all(s.target in dp.VALUE_WORDS for s, _ in cell)
        if task == "code":
            assert all(re.fullmatch(r"[A-Z0-9]{5,7}", s.target) for s, _ in cell)
    depths = [s.depth for s, _ in suite[("single", 400)]]
    assert depths == [0.0, 0.5, 1.0]


def test_run_writes_table_csv_heatmap_and_replies(tmp_path, capsys):
    args = _parser().parse_args(["--model", str(MODEL), "--lengths", "300", "--tasks", "single,none",
                                 "--modes", "dca,nodca", "--samples", "2", "--threads", "1", "--out", str(tmp_path)])
    assert ruler.run(args) == 0
    out = capsys.readouterr().out
    assert "dca task \\ length" in out and "nodca task \\ length" in out
    rows = (tmp_path / "ruler.csv").read_text().strip().splitlines()
    assert rows[0] == "mode,task,length,samples,correct,accuracy,mean_prompt_tokens" and len(rows) == 5
    assert (tmp_path / "ruler.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "summary.json").read_text())
    cells = {(c["mode"], c["task"]): c for c in summary["cells"]}
    for (mode, task), c in cells.items():
        replies = summary["answers"][f"{mode}/{task}/300"]
        assert len(replies) == 2
        assert c["correct"] == sum(r["reply"].strip() == r["answer"] for r in replies)


@pytest.mark.parametrize("bad", [["--tasks", "single,juggling"], ["--modes", "turbo"], ["--lengths", "0"],
                                 ["--haystack", "poetry"]])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", str(MODEL), "--lengths", "300", *bad])


def test_missing_model_and_zero_samples_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        ruler.run(_parser().parse_args(["--model", str(tmp_path), "--lengths", "300"]))
    with pytest.raises(SystemExit, match="--samples"):
        ruler.run(_parser().parse_args(["--model", str(MODEL), "--lengths", "300", "--samples", "0"]))
