"""bench/gpu/engine_e2e.py in smoke mode: the lent-GPU engine run's code paths on a tiny random model (CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "bench/gpu/engine_e2e.py"


def _run(tmp_path, *args, timeout=240):
    out = tmp_path / "e2e.json"
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_smoke_run_measures_dense_and_sparse_with_planned_terms(tmp_path):
    proc, report = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert report["smoke"] and report["device"] == "cpu" and report["skipped"] == []
    runs = report["runs"]
    assert [(r["attention"], r["promptTokens"]) for r in runs] == [
        (mode, n) for mode in ("sparse", "dense") for n in (96, 200, 320)]
    for r in runs:
        assert "error" not in r, r
        assert 0 < r["ttftSeconds"] < 60 and r["prefillTokensPerSecond"] > 0
        planned = r["planned"]
        assert planned["weights"] > 0 and planned["kv"] > 0 and planned["overhead"] > 0
        assert planned["transient"] == planned["activations"] + planned["attention"] + planned["estimation"]
        assert r["decodeTokens"] == 4 and r["decodeMsPerToken"] > 0      # decode steps after every prompt
    # the planner's KV term is the engine's KV capacity: 2 (K, V) x layers x KV heads x head dim x 4 bytes per token
    assert runs[0]["planned"]["kv"] == report["kvCapacityTokens"] * 2 * 2 * 2 * 16 * 4
    assert {s["promptTokens"] for s in report["speedups"]} == {96, 200, 320}
    assert all(s["denseOverSparse"] > 0 for s in report["speedups"])
    assert report["table"].startswith("| attention | prompt tokens | TTFT s |") and report["table"] in proc.stdout
    assert report["elapsedSeconds"] < report["budgetSeconds"]


def test_spent_budget_skips_and_lists_every_measurement(tmp_path):
    proc, report = _run(tmp_path, "--budget-s", "0", "--modes", "dense", "--lengths", "96,200")
    assert proc.returncode == 0 and report["runs"] == []
    assert [(s["attention"], s["promptTokens"]) for s in report["skipped"]] == [("dense", 96), ("dense", 200)]
    assert all("s left" in s["reason"] for s in report["skipped"]) and "skipped" in proc.stdout


def test_full_run_without_gpu_exits_with_a_message(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full run is bench/gpu/engine.sh's job")
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "x.json")], cwd=ROOT,
                          env=dict(os.environ, PYTHONSAFEPATH="1"), capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
