"""The GPU check script's code paths on CPU (--smoke under the interpreter) and sm_90 compilation of the kernels."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longserve.bench.gpu import patterns, timing

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONSAFEPATH="1", **extra)
    return env


def test_smoke_run_passes_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu/check.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=240)
    report = json.loads((tmp_path / "report.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"env", "correctness", "timing"}
    failed = [c for c in sections["correctness"]["checks"] if not c.get("ok")]
    assert not failed, failed
    assert sections["timing"]["ok"], sections["timing"]["errors"]
    assert len(sections["timing"]["records"]) == 2 and sections["timing"]["decode"]["ms"] > 0
    assert (tmp_path / "table.md").read_text().startswith("| tokens |")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_full_run_without_gpu_exits_with_a_message(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full run is bench/gpu/kernels.sh's job")
    proc = subprocess.run([sys.executable, "bench/gpu/check.py", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_kernels_compile_for_hopper():
    """Triton -> cubin for sm_90 without a GPU: catches what the interpreter cannot (dot shapes, loop types)."""
    pytest.importorskip("triton.backends.nvidia")
    proc = subprocess.run([sys.executable, "bench/gpu/compile_check.py", "--dtypes", "bf16", "--only", "causal=True"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) >= 4 and all(r["ok"] for r in results), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0


def test_qwen_like_pattern_budgets_and_forced_entries():
    vert, vc, sl, sc = patterns.qwen_like_pattern(20000, 3, vertical=1000, slash=6096, seed=1)
    assert vc.tolist() == [1000] * 3 and sc.tolist() == [6096] * 3
    for h in range(3):
        v, s = vert[h, :vc[h]], sl[h, :sc[h]]
        assert torch.equal(v, v.sort().values) and torch.equal(s, s.sort(descending=True).values)
        assert v.unique().numel() == 1000 and s.unique().numel() == 6096
        assert set(range(30)) <= set(v.tolist()) and set(range(100)) <= set(s.tolist())
    small = patterns.qwen_like_pattern(50, 2)
    assert small[1].tolist() == [50, 50] and small[3].tolist() == [50, 50]


def test_pair_counts_and_error_rules():
    assert patterns.causal_pairs(4, 4) == 10 and patterns.causal_pairs(2, 5) == 9 and patterns.causal_pairs(5, 2) == 3
    assert patterns.listed_pairs(torch.tensor([[2]]), torch.tensor([[3]])) == 2 * 64 * 64 + 3 * 64
    truth = torch.tensor([1.0, float("-inf")])
    assert patterns.max_err(torch.tensor([1.5, float("-inf")]), truth) == 0.5
    assert patterns.max_err(torch.tensor([1.0, 0.0]), truth) == float("inf")
    rule = patterns.two_x_rule(torch.tensor([1.1]), torch.tensor([1.2]), torch.tensor([1.0]), torch.float32)
    assert rule["ok"] and not patterns.two_x_rule(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]),
                                                  torch.float32)["ok"]


def test_ratio_table_formats_records():
    rec = {"n": 32768, "dense_triton": {"ms": 10.0, "tflops": 400.0}, "sdpa_flash": {"ms": 9.0, "tflops": 440.0},
           "dense_over_sdpa": 1.11, "sparse": {"index_ms": 1.0, "attn_ms": 2.0, "computed_fraction": 0.25},
           "dense_over_sparse": 3.33}
    table = timing.ratio_table([rec])
    assert "| 32768 | 10.0 | 400 | 9.0 | 440 | 1.11x | 1.0+2.0 | 25.0% | 3.33x |" in table
