"""The tensor-parallel process group of one replica and the few collectives the engine uses.

Three groups over the same ranks: the device group (NCCL on CUDA, gloo on the CPU) carries the model's
all-reduces and the logits gather; a gloo group carries the step messages and heartbeats (host bytes, never on the
GPU's stream); a second gloo group, with the long start-up timeout, carries the start-up agreement (the KV
capacity), which waits for the slowest rank to load its weights. The rendezvous (a TCP store on rank 0) also has
the start-up timeout; every other collective has the topology's short one, so a rank that stops answering turns
into an error on the others instead of a hang.
"""
from __future__ import annotations

import datetime
import logging
import pickle

import torch
import torch.distributed as dist

from longserve.server.parallel.topology import Topology

log = logging.getLogger("longserve.parallel")


class TPGroup:
    def __init__(self, topology: Topology, rank: int, device: torch.device):
        self.topology, self.rank, self.size, self.device = topology, rank, topology.tp, device
        timeout = datetime.timedelta(seconds=topology.timeout_s)
        init_timeout = datetime.timedelta(seconds=topology.init_timeout_s)
        backend = "nccl" if device.type == "cuda" else "gloo"
        log.info("joining the tensor-parallel group at %s as rank %d of %d (%s)", topology.init_method, rank,
                 self.size, backend, extra={"event": "tp_waiting", "rank": rank, "world_size": self.size})
        store = dist.TCPStore(topology.master_addr, topology.master_port, self.size, is_master=rank == 0,
                              timeout=init_timeout)
        dist.init_process_group(backend, store=store, world_size=self.size, rank=rank, timeout=timeout)
        self.device_group = dist.group.WORLD
        self.cpu_group = dist.new_group(backend="gloo", timeout=timeout)   # a separate one on the CPU too: the
        # heartbeat thread's messages must never interleave with the engine thread's model collectives
        self.startup_group = dist.new_group(backend="gloo", timeout=init_timeout)
        log.info("joined the tensor-parallel group", extra={"event": "tp_joined", "rank": rank,
                                                            "world_size": self.size})

    # --- model collectives (device group) ---------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks in place (row-parallel outputs, the vocab-parallel embedding)."""
        dist.all_reduce(x, group=self.device_group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension (vocab-parallel logits)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=-1)

    # --- host messages (gloo group) -------------------------------------------------------------------
    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Rank 0 sends `payload`; every rank returns it (two broadcasts: the length, then the bytes)."""
        size = torch.tensor([len(payload) if self.rank == 0 else 0], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.cpu_group)
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == 0 else \
            torch.empty(int(size.item()), dtype=torch.uint8)
        if buf.numel():
            dist.broadcast(buf, src=0, group=self.cpu_group)
        return payload if self.rank == 0 else buf.numpy().tobytes()

    def broadcast_object(self, obj=None):
        return pickle.loads(self.broadcast_bytes(pickle.dumps(obj) if self.rank == 0 else None))

    def min_int(self, value: int) -> int:
        """The minimum of `value` over the ranks (the KV blocks every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.startup_group)
        return int(t.item())

    def barrier(self) -> None:
        """Every rank answers (a one-element all-reduce: a broadcast alone would not notice a hung receiver)."""
        t = torch.zeros(1, dtype=torch.int64)
        dist.all_reduce(t, group=self.cpu_group)

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
