"""The committed gRPC stubs match proto/longserve/v1/generation.proto and import as package modules."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_generate_check_passes():
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run([str(ROOT / "proto" / "generate.sh"), "--check"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fresh" in result.stdout


def test_stub_imports_through_the_package():
    text = (ROOT / "server/api/grpc/pb/generation_pb2_grpc.py").read_text()
    assert "from longserve.server.api.grpc.pb import generation_pb2" in text
