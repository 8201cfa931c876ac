"""Where a process sits in a tensor-parallel replica, from flags and the environment (standard library only).

A replica of tensor-parallel size N spans `nnodes` pods with N / nnodes GPUs each; pod-local GPU i is global rank
`node_rank * gpus_per_node + i`. Rank 0 (pod 0, GPU 0) owns the scheduler, the sampler and the APIs; every other
rank runs a worker. Values come from flags first, then LeaderWorkerSet's variables (`LWS_GROUP_SIZE`,
`LWS_WORKER_INDEX`, `LWS_LEADER_ADDRESS`), then torchrun-style ones (`NNODES`, `NODE_RANK`, `MASTER_ADDR`,
`MASTER_PORT`). longserve starts its own per-GPU processes, so a per-process `WORLD_SIZE` is only checked.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

DEFAULT_MASTER_PORT = 29500
DEFAULT_TIMEOUT_S = 120.0          # one collective (a hung rank is noticed within this)
DEFAULT_INIT_TIMEOUT_S = 600.0     # rendezvous and start-up: every rank joined and loaded its shard


@dataclass(frozen=True)
class Topology:
    tp: int                          # ranks in the replica (all pods)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    timeout_s: float = DEFAULT_TIMEOUT_S    # collectives once running
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S   # rendezvous and the start-up agreement (weights loading)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tp}")
        if self.nnodes < 1 or self.tp % self.nnodes:
            raise ValueError(f"tensor_parallel_size {self.tp} must be a multiple of the node count {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node rank {self.node_rank} outside [0, {self.nnodes})")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master port {self.master_port} outside 1..65535")
        if self.timeout_s <= 0 or self.init_timeout_s <= 0:
            raise ValueError(f"distributed timeouts must be > 0 s, got {self.timeout_s} and {self.init_timeout_s}")

    @property
    def gpus_per_node(self) -> int:
        return self.tp // self.nnodes

    @property
    def is_leader(self) -> bool:
        """The pod whose local rank 0 is global rank 0: it alone serves HTTP/gRPC."""
        return self.node_rank == 0

    def global_rank(self, local_rank: int) -> int:
        if not 0 <= local_rank < self.gpus_per_node:
            raise ValueError(f"local rank {local_rank} outside [0, {self.gpus_per_node})")
        return self.node_rank * self.gpus_per_node + local_rank

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"

    def to_env(self) -> dict[str, str]:
        """The variables a local worker process is started with (read back by `from_env` there)."""
        return {"LONGSERVE_TP": str(self.tp), "LONGSERVE_NNODES": str(self.nnodes),
                "LONGSERVE_NODE_RANK": str(self.node_rank), "LONGSERVE_MASTER_ADDR": self.master_addr,
                "LONGSERVE_MASTER_PORT": str(self.master_port), "LONGSERVE_DIST_TIMEOUT": repr(self.timeout_s),
                "LONGSERVE_DIST_INIT_TIMEOUT": repr(self.init_timeout_s)}


def _first(env, *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return value
    return None


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def free_port() -> int:
    """A TCP port free on this host now (single-pod replicas rendezvous on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve(tp: int, *, nnodes: int | None = None, node_rank: int | None = None, master_addr: str | None = None,
            master_port: int | None = None, timeout_s: float | None = None, init_timeout_s: float | None = None,
            env=None) -> Topology:
    """The topology from explicit values (flags) first, then the environment. A single-pod replica without a
    given port picks a free one (nothing outside the pod needs to know it)."""
    env = os.environ if env is None else env
    if nnodes is None:
        nnodes = _int(_first(env, "LONGSERVE_NNODES", "LWS_GROUP_SIZE", "NNODES") or 1, "node count")
    if node_rank is None:
        node_rank = _int(_first(env, "LONGSERVE_NODE_RANK", "LWS_WORKER_INDEX", "NODE_RANK", "GROUP_RANK") or 0,
                         "node rank")
    if master_addr is None:
        master_addr = _first(env, "LONGSERVE_MASTER_ADDR", "LWS_LEADER_ADDRESS", "MASTER_ADDR") or "127.0.0.1"
    if master_port is None:
        port = _first(env, "LONGSERVE_MASTER_PORT", "MASTER_PORT")
        if port is not None:
            master_port = _int(port, "master port")
        else:
            master_port = DEFAULT_MASTER_PORT if nnodes > 1 or tp == 1 else free_port()
    if timeout_s is None:
        timeout_s = _seconds(env, "LONGSERVE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    if init_timeout_s is None:
        init_timeout_s = _seconds(env, "LONGSERVE_DIST_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT_S)
    world = _first(env, "WORLD_SIZE")
    if world is not None and _int(world, "WORLD_SIZE") not in (1, tp):
        raise ValueError(f"WORLD_SIZE={world} but tensor_parallel_size is {tp}: longserve starts one process per "
                         "GPU itself; launch one `longserve serve` per pod, not one per GPU")
    return Topology(tp, nnodes, node_rank, master_addr, master_port, timeout_s, init_timeout_s)


def _seconds(env, name: str, default: float) -> float:
    raw = _first(env, name)
    try:
        return float(raw) if raw is not None else default
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
