"""`longserve bench serve --url`: bounded load against a server on the fake engine; summary and exit code."""
from __future__ import annotations

import json
import math

from longserve.bench import serve_load
from longserve.bench.cli import add_arguments


def _args(*argv):
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["serve", *argv])


def test_bench_serve_against_url(server, engine, capsys):
    args = _args("--url", server.stack.http_url, "--requests", "200", "--concurrency", "16",
                 "--max-prompt-words", "40", "--max-tokens", "6", "--json")
    assert serve_load.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completed"] == 200 and summary["errors"] == 0
    assert summary["model"] == "fake-model" and summary["output_tokens"] >= 200
    assert 0 < summary["ttft_p50_ms"] <= summary["ttft_p99_ms"] and summary["requests_per_s"] > 0
    assert engine.load_stats().kv_blocks_used == 0


def test_bench_serve_counts_errors(server_factory, config, fake_engine_cls, capsys):
    srv = server_factory(config, fake_engine_cls(config, fail_after_tokens=0))
    args = _args("--url", srv.stack.http_url, "--requests", "6", "--concurrency", "3", "--max-tokens", "8")
    assert serve_load.run(args) == 1
    out = capsys.readouterr().out
    assert "errors      6" in out and "TTFT" in out


def test_percentile_and_argument_checks(capsys):
    assert serve_load.percentile([5, 1, 3, 2, 4], 50) == 3
    assert serve_load.percentile(list(range(1, 101)), 99) == 99
    assert math.isnan(serve_load.percentile([], 50))
    assert serve_load.run(_args("--url", "http://127.0.0.1:9", "--requests", "0")) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_unreachable_url_fails_cleanly(capsys):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                      # bound, not listening: connection refused
        assert serve_load.run(_args("--url", f"http://127.0.0.1:{port}", "--requests", "1")) == 1
    assert "bench serve: ConnectError" in capsys.readouterr().err
