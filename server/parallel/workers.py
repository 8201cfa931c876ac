"""Worker processes of a tensor-parallel replica: starting them, watching them, and the worker loop.

One process per GPU (per rank on the CPU). On the leader pod the serving process is rank 0 and starts local
ranks 1..g-1; on a follower pod the `longserve serve` process is the pod's first rank and starts the rest. Every
worker builds the same sharded `ModelRunner` and then loops: receive a step message, run the same forward
(its all-reduces pair with rank 0's), until told to stop.

No orphans, no hangs: a worker asks the kernel to kill it when its parent dies (`PR_SET_PDEATHSIG`) and also
watches the parent pid; the parent polls its workers and, when one exits unexpectedly, kills the others and
reports (`on_failure`: the server exits non-zero, the offline engine raises). Across pods a dead rank closes its
sockets, which fails the next collective or heartbeat on every other rank; a hung rank fails them after the
group's timeout. At TP > 1 a failed collective is fatal for the replica: the process group cannot be repaired
with some ranks mid-collective, so the pods restart as a group.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from longserve.server.parallel.topology import Topology

log = logging.getLogger("longserve.parallel")
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent exits (Linux), and exit now if that already happened."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):   # not Linux: the parent-pid watch below still applies
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)
    threading.Thread(target=watch, name="longserve-parent-watch", daemon=True).start()


class LocalWorkers:
    """Local ranks 1..g-1 of this pod as child processes, with a watchdog thread."""

    def __init__(self, config, topology: Topology, device_type: str, on_failure):
        self.topology, self.on_failure = topology, on_failure
        self.procs: dict[int, subprocess.Popen] = {}
        self._stopping = threading.Event()
        env = dict(os.environ, **topology.to_env(), LONGSERVE_ENGINE_CONFIG=config.to_json(),
                   LONGSERVE_DEVICE_TYPE=device_type, LONGSERVE_PARENT_PID=str(os.getpid()))
        if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # ranks share the host's cores: without a cap each spins a full OpenMP team against the others
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // topology.gpus_per_node))
        for local in range(1, topology.gpus_per_node):
            self.procs[topology.global_rank(local)] = subprocess.Popen(
                [sys.executable, "-m", "longserve.server.parallel.workers"],
                env=dict(env, LONGSERVE_LOCAL_RANK=str(local)), stdin=subprocess.DEVNULL)
        self._watch = threading.Thread(target=self._watchdog, name="longserve-tp-watchdog", daemon=True)
        self._watch.start()

    def _watchdog(self) -> None:
        while not self._stopping.wait(0.2):
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    self._stopping.set()
                    log.error("tensor-parallel worker rank %d (pid %d) exited with code %s", rank, proc.pid, code,
                              extra={"event": "tp_worker_exit", "rank": rank, "exit_code": code})
                    self.kill()
                    self.on_failure(f"tensor-parallel worker rank {rank} exited with code {code}")
                    return

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the workers to exit after a stop message; kill the ones that do not."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def exit_process(reason: str) -> None:
    """The serving process's failure handler: a replica with a lost rank cannot serve; exit non-zero now."""
    log.critical("exiting: %s", reason, extra={"event": "tp_failed", "reason": reason})
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


class LeaderLink:
    """Rank 0's side of a replica: the local workers, the group, and (once the runner is built, so that no
    heartbeat meets a rank still loading) the step sender. `on_failure(reason)` is told when a rank is lost, after
    the local workers are killed; `failure` keeps the reason."""

    def __init__(self, config, topology: Topology, device_type: str, on_failure=None):
        from longserve.server.parallel.group import TPGroup

        if not topology.is_leader:
            raise ValueError(f"node rank {topology.node_rank} is a follower: it runs workers, not the engine")
        self.failure: str | None = None
        self._on_failure = on_failure
        self._closed = False
        self.sender = None
        self.workers = LocalWorkers(config, topology, device_type, self._failed)
        try:
            self.group = TPGroup(topology, 0, device_for(device_type, 0))
        except BaseException:
            self.workers.kill()
            raise
        atexit.register(self.close)     # an offline LLM never closed: stop the heartbeats before Python finalizes

    def _failed(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            self.workers.kill()
            if self._on_failure is not None:
                self._on_failure(reason)

    def start_sending(self, heartbeat_s: float = 1.0):
        from longserve.server.parallel.steps import StepSender
        self.sender = StepSender(self.group, heartbeat_s=heartbeat_s, on_failure=self._failed)
        return self.sender

    def close(self) -> None:
        """Stop the workers (a stop message, then wait) and leave the group; idempotent."""
        atexit.unregister(self.close)
        if self._closed:
            return
        self._closed = True
        if self.sender is not None:
            self.sender.stop()
        else:
            self.workers.kill()
        self.workers.join()
        self.group.destroy()


def device_for(device_type: str, local_rank: int):
    import torch
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def run_worker(config, topology: Topology, local_rank: int, device_type: str) -> int:
    """One non-zero rank until rank 0 says stop: 0 then, 1 when the group fails."""
    from longserve.server.engine.model_runner import ModelRunner
    from longserve.server.hf_config import load_checkpoint
    from longserve.server.parallel.group import TPGroup
    from longserve.server.parallel.steps import HEARTBEAT, STEP, STOP, StepMirror

    rank = topology.global_rank(local_rank)
    device = device_for(device_type, local_rank)
    group = TPGroup(topology, rank, device)
    try:
        runner = ModelRunner(config, load_checkpoint(config.model_path, config.sparse_config_path),
                             device=str(device), tp=group)
        runner.enable_sparse()
        mirror = StepMirror()
        while True:
            kind, body = group.broadcast_object()
            if kind == STEP:
                batch, jobs = mirror.decode(body, runner.release)
                if batch.chunks:           # the logits are rank 0's to sample; here only the collectives matter
                    runner.forward_logits(batch, prompt_jobs=jobs)
            elif kind == HEARTBEAT:
                group.barrier()
            elif kind == STOP:
                log.info("stopping on rank 0's request", extra={"event": "tp_worker_stop", "rank": rank})
                group.destroy()
                return 0
            else:
                raise ValueError(f"unknown step message {kind!r}")
    except Exception:
        log.exception("tensor-parallel rank %d failed", rank, extra={"event": "tp_failed", "rank": rank})
        return 1


def run_follower(config, topology: Topology) -> int:
    """A follower pod: this process is the pod's first rank and starts the others; serves nothing."""
    import torch
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    workers = LocalWorkers(config, topology, device_type, exit_process)
    code = run_worker(config, topology, 0, device_type)
    if code == 0:
        workers.join()
    else:
        workers.kill()
    return code


def main() -> int:
    """Entry of a local worker process started by `LocalWorkers` (everything comes in the environment)."""
    from longserve.server.config import EngineConfig
    from longserve.server.jsonlog import configure_logging
    from longserve.server.parallel.topology import resolve

    die_with_parent(int(os.environ["LONGSERVE_PARENT_PID"]))
    configure_logging(os.environ.get("LONGSERVE_LOG_LEVEL", "info"))
    config = EngineConfig.from_dict(json.loads(os.environ["LONGSERVE_ENGINE_CONFIG"]))
    topology = resolve(config.tensor_parallel_size)
    return run_worker(config, topology, int(os.environ["LONGSERVE_LOCAL_RANK"]),
                      os.environ["LONGSERVE_DEVICE_TYPE"])


if __name__ == "__main__":
    sys.exit(main())
