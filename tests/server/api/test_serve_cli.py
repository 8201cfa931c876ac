"""`longserve serve`: config building, JSON logs, and the SIGTERM drain with a request in flight."""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from longserve.server import serve_cli
from longserve.server.cli import build_parser
from longserve.server.config import EngineConfig

QWEN2_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64,
                "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
                "max_position_embeddings": 2048}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_config_from_model_dir_and_overrides(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_CONFIG))
    cfg = serve_cli.build_config(_parse("--model", str(tmp_path)))
    assert (cfg.model_path, cfg.served_model_name, cfg.max_model_len) == (str(tmp_path), str(tmp_path), 2048)
    assert cfg.max_output_tokens == 2047 and (cfg.http_port, cfg.grpc_port) == (8000, 50051)
    cfg = serve_cli.build_config(_parse("--model", str(tmp_path), "--max-model-len", "1024", "--port", "9000",
                                        "--served-model-name", "tiny", "--no-sparse-prefill", "--dtype", "float32"))
    assert (cfg.max_model_len, cfg.http_port, cfg.served_model_name) == (1024, 9000, "tiny")
    assert cfg.sparse_prefill is False and cfg.dtype == "float32" and cfg.dca is True


def test_config_file_with_overrides_and_errors(tmp_path, config_factory):
    path = tmp_path / "engine_config.json"
    path.write_text(config_factory().to_json())
    cfg = serve_cli.build_config(_parse("--config", str(path), "--grpc-port", "6000", "--max-num-seqs", "3"))
    assert cfg == EngineConfig.from_json(path.read_text()).replace(grpc_port=6000, max_num_seqs=3)
    with pytest.raises(ValueError, match="http_port and grpc_port must differ"):
        serve_cli.build_config(_parse("--config", str(path), "--port", "7000", "--grpc-port", "7000"))
    with pytest.raises(ValueError, match="cannot read --config"):
        serve_cli.build_config(_parse("--config", str(tmp_path / "missing.json")))
    with pytest.raises(SystemExit):
        _parse("--port", "1")                               # --model or --config is required


def test_bad_input_exits_2(tmp_path, capsys):
    key = tmp_path / "key"
    key.write_text("")
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_CONFIG))
    assert serve_cli.run(_parse("--model", str(tmp_path), "--api-key-file", str(key))) == 2
    assert "is empty" in capsys.readouterr().err
    assert serve_cli.run(_parse("--model", str(tmp_path / "nowhere"))) == 2


def test_json_log_lines():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(serve_cli.JsonFormatter())
    logger = logging.getLogger("longserve.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.warning("drained %d", 3, extra={"event": "drain", "in_flight": 2})
    line = json.loads(stream.getvalue())
    assert line["msg"] == "drained 3" and line["level"] == "warning" and line["event"] == "drain"
    assert line["in_flight"] == 2 and line["ts"].endswith("Z")


def test_sigterm_drains_in_flight_request_and_exits_0(tmp_path, monkeypatch, fake_engine_cls, config_factory):
    """In-process `longserve serve` (fake engine): health 503 -> 200, SIGTERM mid-stream, request finishes."""
    config = config_factory(served_model_name="tiny")
    path = tmp_path / "engine_config.json"
    path.write_text(config.to_json())
    engine = fake_engine_cls(config, token_delay=0.01)
    monkeypatch.setattr(serve_cli, "_load_engine", lambda cfg: engine)
    port = _free_port()
    args = _parse("--config", str(path), "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(_free_port()),
                  "--drain-grace-seconds", "20", "--log-level", "warning")
    url = f"http://127.0.0.1:{port}"
    seen: dict = {}

    def client():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:   # not listening yet
                ready = False
            if ready:
                break
            time.sleep(0.02)
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"prompt": "a", "max_tokens": 80, "stream": True}) as r:
            lines = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 3:
                        os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(0.1)
                        seen["health_during_drain"] = httpx.get(url + "/health", timeout=2).status_code
            seen["lines"] = lines

    thread = threading.Thread(target=client)
    thread.start()
    root_handlers = logging.getLogger().handlers[:]
    try:
        code = serve_cli.run(args)
    finally:
        logging.getLogger().handlers[:] = root_handlers
    thread.join(10)
    assert code == 0
    assert seen["health_during_drain"] == 503
    assert seen["lines"][-1] == "data: [DONE]" and '"finish_reason":"length"' in seen["lines"][-2]
    assert engine.load_stats().kv_blocks_used == 0
