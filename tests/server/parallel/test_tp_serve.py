"""`longserve serve --tensor-parallel-size 2` on the CPU (gloo): the demo model answers the README's passkey
request as TP 1 does (`tests/test_demo_serving.py`); killing a worker, or stopping one (a hang), makes the server
exit non-zero within 10 s;
two "pods" (two process trees given LeaderWorkerSet-style environments) form one TP 2 group, the leader answers
and the follower serves no HTTP."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[3]
ANSWER = "The pass key is 28884."
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 20
PROMPT = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.\n\n" + FILLER
          + "The pass key is 28884. Remember it. 28884 is the pass key.\n" + FILLER + "\nWhat is the pass key?")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_args() -> list[str]:
    line = re.search(r"^DEMO_ARGS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    return [str(ROOT / a) if a.startswith("models/") else a for a in shlex.split(line)]


def _start(extra: list[str], env: dict | None = None) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    argv = [sys.executable, "-m", "longserve.server.cli", "serve", *_demo_args(), "--port", str(port),
            "--grpc-port", str(_free_port()), "--tensor-parallel-size", "2", *extra]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LWS_", "MASTER_", "LONGSERVE_"))}
    log = tempfile.TemporaryFile("w+")           # a file, not a pipe: nobody reads while it serves
    proc = subprocess.Popen(argv, env=dict(base, **(env or {})), stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    return proc, port


def _log(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def _wait_ready(proc: subprocess.Popen, port: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, _log(proc)[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.5)


def _ask(port: int) -> str:
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
        "model": "demo-passkey", "max_tokens": 16, "messages": [{"role": "user", "content": PROMPT}]})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_tp2_server_answers_then_exits_when_a_worker_dies():
    proc, port = _start([])
    try:
        _wait_ready(proc, port)
        assert _ask(port) == ANSWER
        workers = _children(proc.pid)
        assert len(workers) == 1, workers                 # rank 1; rank 0 is the serving process itself
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(timeout=10)
        assert code != 0 and time.monotonic() - killed < 10
        assert "tensor-parallel worker rank 1" in _log(proc)
        assert not _alive(workers[0])
    finally:
        _stop(proc)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_tp2_server_exits_when_a_worker_hangs():
    """A stopped (hung) worker fails rank 0's next heartbeat after the collective timeout; the worker then dies
    with its parent."""
    proc, port = _start(["--dist-timeout-seconds", "3"])
    try:
        _wait_ready(proc, port)
        worker = _children(proc.pid)[0]
        os.kill(worker, signal.SIGSTOP)
        stopped = time.monotonic()
        assert proc.wait(timeout=15) != 0 and time.monotonic() - stopped < 10
        assert "stopped answering" in _log(proc)
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        _stop(proc)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_two_pods_form_one_tp2_group_and_only_the_leader_serves():
    lws = {"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": "2", "MASTER_PORT": str(_free_port())}
    leader, port = _start([], dict(lws, LWS_WORKER_INDEX="0"))
    follower, follower_port = _start([], dict(lws, LWS_WORKER_INDEX="1"))
    try:
        _wait_ready(leader, port)
        assert _children(leader.pid) == [] and _children(follower.pid) == []     # one GPU per "pod"
        assert _ask(port) == ANSWER
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", follower_port), timeout=2).close()
        assert follower.poll() is None
        leader.send_signal(signal.SIGTERM)                                # drain: workers are told to stop
        assert leader.wait(timeout=60) == 0, _log(leader)[-3000:]
        assert follower.wait(timeout=20) == 0, _log(follower)[-3000:]
    finally:
        _stop(leader, follower)
        assert not _alive(leader.pid) and not _alive(follower.pid)
