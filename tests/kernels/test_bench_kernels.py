"""`longserve bench kernels` at tiny sizes: table fields, JSON rows, argument errors."""
import json

from longserve.bench import kernels as bench
from longserve.server.cli import main

TINY = ["--lengths", "120,200", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
        "--chunk-size", "160", "--local-size", "32"]


def test_bench_row_fields_and_values():
    row = bench.bench_length(300, heads=2, kv_heads=1, head_dim=16, chunk_size=160, local_size=32)
    assert set(row) == set(bench.FIELDS)
    assert (row["tokens"], row["heads"], row["kv_heads"], row["head_dim"]) == (300, 2, 1, 16)
    assert (row["vertical"], row["slash"]) == bench.scaled_budgets(300, 1000, 6096) == (30, 100)
    assert row["dense_s"] > 0 and row["sparse_s"] > 0 and row["speedup"] > 0
    # computed counts whole 64-row tiles, so at tiny lengths it may exceed the causal pair count
    assert 0 < row["selected_frac"] <= min(1.0, row["computed_frac"])
    assert 0 < row["recall_min"] <= row["recall_mean"] <= 1


def test_budget_scaling():
    assert bench.scaled_budgets(32768, 1000, 6096) == (1000, 6096)
    assert bench.scaled_budgets(65536, 1000, 6096) == (1000, 6096)
    assert bench.scaled_budgets(8192, 1000, 6096) == (250, 1524)
    assert bench.scaled_budgets(16384, 1000, 6096) == (500, 3048)


def test_cli_json_and_table(capsys):
    assert main(["bench", "kernels", *TINY, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["tokens"] for r in rows] == [120, 200]
    assert main(["bench", "kernels", *TINY]) == 0
    out = capsys.readouterr().out
    assert "dense/sparse" in out and "pairs computed" in out and len(out.strip().splitlines()) == 4


def test_cli_rejects_bad_arguments(capsys):
    assert main(["bench", "kernels", "--lengths", "0,5"]) == 2
    assert main(["bench", "kernels", "--lengths", "abc"]) == 2
    assert main(["bench", "kernels", "--lengths", "64", "--heads", "3", "--kv-heads", "2"]) == 2
    assert "longserve bench kernels:" in capsys.readouterr().err
