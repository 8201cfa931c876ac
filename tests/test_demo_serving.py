"""`make demo` as documented: the server started with the Makefile's DEMO_ARGS answers the README's two passkey
requests (the `curl` block and the `openai` block, read from README.md and sent as written) correctly.

The curl block runs in bash with `curl` replaced by a function that prints its arguments, so the shell's own
expansion builds the request body; the body is then sent with httpx (the suite does not need a curl binary)."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import subprocess
from pathlib import Path

import httpx
import pytest

from longserve.bench import demo_prompts as dp

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "The pass key is 28884."


def _demo_args() -> list[str]:
    line = re.search(r"^DEMO_ARGS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert line, "Makefile has no DEMO_ARGS line"
    return shlex.split(line.group(1))


def _readme_block(language: str, needle: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if needle in b]
    assert len(found) == 1, f"expected one ```{language} block containing {needle!r} in README.md"
    return found[0]


@pytest.fixture(scope="module")
def demo_server():
    from longserve.server.api.app import BackgroundServer, ServingStack
    from longserve.server.engine.async_engine import AsyncEngine
    from longserve.server.serve_cli import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(ROOT / a) if a.startswith("models/") else a for a in _demo_args()])
    config = build_config(args)
    engine = AsyncEngine(config)
    srv = BackgroundServer(ServingStack(config, http_port=0, grpc_port=0)).start(engine)
    yield srv, config
    srv.stop()
    engine.shutdown()


def test_readme_curl_request_is_answered(demo_server):
    srv, config = demo_server
    script = 'curl() { for a in "$@"; do printf "%s\\0" "$a"; done; }\n' + _readme_block("bash", "NEEDLE=")
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True, timeout=30).stdout
    argv = out.decode().split("\0")[:-1]
    url = next(a for a in argv if "/v1/" in a)
    headers = dict(h.split(": ", 1) for h in (argv[i + 1] for i, a in enumerate(argv) if a == "-H"))
    body = argv[argv.index("-d") + 1]
    request = json.loads(body)                                  # the shell built valid JSON
    assert request["model"] == config.served_model_name
    prompt = request["messages"][0]["content"]
    assert prompt.count("28884") == 2 and prompt.endswith("What is the pass key?")

    base = srv.stack.http_url
    count = httpx.post(base + "/tokenize", json={"messages": request["messages"]}).json()["count"]
    training_length = dp.training_length(ROOT / "models/demo-passkey")
    assert 1.5 * training_length <= count <= 2.5 * training_length, count     # "about twice the training length"
    reply = httpx.post(re.sub(r"^(https?://)?localhost:\d+", base, url), content=body, headers=headers, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == ANSWER


def test_readme_openai_snippet_prints_the_key(demo_server):
    srv, _ = demo_server
    code = _readme_block("python", "OpenAI(")
    assert "http://localhost:8000/v1" in code
    code = code.replace("http://localhost:8000/v1", srv.stack.http_url + "/v1")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})              # noqa: S102 - the README's own example
    assert printed.getvalue().strip() == ANSWER
