"""Per-step attention metadata built from host ints and device-resident block tables.

The scheduler and block manager are torch-free and own each sequence's block table as a host list. This module
keeps a device copy of every live sequence's table (one row of a [rows, width] int32 tensor, both dimensions
grown by doubling) and, each step, copies only the blocks appended since the previous step. A decode token's
position and KV slot are O(1) host ints; a prefill chunk's positions and slots are computed on the device
(`arange` and a gather from the device table). All host ints of a step go up in one upload, so the host work of a
step depends on the number of chunks and of this step's tokens, never on how long the contexts are.

What decode needs (sequence lengths, their maximum, per-sequence softmax scales, the padded block-table batch)
is prepared here once per step, so the attention layers never read a device value back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.kernels.dca_math import softmax_scale
from longserve.server.engine.scheduler import ScheduledBatch
from longserve.server.engine.sequence import Sequence
from longserve.server.layers.attention import PrefillSpan, StepMetadata


@dataclass
class _Row:
    index: int              # row of the device table
    host: list              # the block manager's list this row mirrors (a new list object means a new table)
    synced: int = 0         # leading entries already on the device


class DeviceBlockTables:
    """Device mirror of the block manager's per-sequence block tables, keyed by sequence id."""

    def __init__(self, device: torch.device, *, rows: int = 8, width: int = 64):
        if rows < 1 or width < 1:
            raise ValueError(f"need rows >= 1 and width >= 1, got {rows}, {width}")
        self.device = device
        self.table = torch.zeros((rows, width), dtype=torch.int32, device=device)
        self._rows: dict[int, _Row] = {}
        self._free = list(range(rows - 1, -1, -1))        # pop() hands out low rows first

    @property
    def num_live(self) -> int:
        return len(self._rows)

    def row_of(self, seq: Sequence) -> int:
        """The device row of `seq`, updated to cover its current host block table (new tail only)."""
        with torch.inference_mode(False):     # the table outlives the step: keep it a normal tensor
            return self._sync(seq)

    def _sync(self, seq: Sequence) -> int:
        host = seq.block_table
        row = self._rows.get(seq.seq_id)
        if row is not None and (row.host is not host or row.synced > len(host)):
            row.host, row.synced = host, 0                # freed and reallocated: the old entries are stale
        if row is None:
            if not self._free:
                self._resize(rows=2 * self.table.shape[0])
            row = self._rows[seq.seq_id] = _Row(self._free.pop(), host)
        n = len(host)
        if n > row.synced:
            if n > self.table.shape[1]:
                width = self.table.shape[1]
                while width < n:
                    width *= 2
                self._resize(width=width)
            tail = torch.tensor(host[row.synced:n], dtype=torch.int32)
            self.table[row.index, row.synced:n].copy_(tail, non_blocking=True)
            row.synced = n
        return row.index

    def drop(self, seq_id: int) -> None:
        """Forget a sequence (finished, aborted or preempted); its row is reused."""
        row = self._rows.pop(seq_id, None)
        if row is not None:
            self._free.append(row.index)

    def _resize(self, *, rows: int | None = None, width: int | None = None) -> None:
        old = self.table
        rows = old.shape[0] if rows is None else rows
        width = old.shape[1] if width is None else width
        self.table = torch.zeros((rows, width), dtype=torch.int32, device=self.device)
        self.table[:old.shape[0], :old.shape[1]].copy_(old)
        self._free = list(range(rows - 1, old.shape[0] - 1, -1)) + self._free


class StepMetadataBuilder:
    """Builds a step's token ids and `StepMetadata` from a scheduled batch (see the module docstring)."""

    def __init__(self, device: torch.device, block_size: int, *, head_dim: int, original_max_position_embeddings: int,
                 tables: DeviceBlockTables | None = None):
        self.device, self.block_size = device, block_size
        self.head_dim, self.original_max = head_dim, original_max_position_embeddings
        self.tables = tables if tables is not None else DeviceBlockTables(device)

    def drop(self, seq_id: int) -> None:
        self.tables.drop(seq_id)

    def build(self, batch: ScheduledBatch) -> tuple[torch.Tensor, StepMetadata]:
        for seq in batch.preempted:                       # their tables were freed: drop the device copies
            self.tables.drop(seq.seq_id)
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        # Decode tokens: O(1) host ints each (position, slot from the host table, lengths). Prefill chunks: a
        # position range whose slots are gathered on the device. Consecutive decodes form one "run".
        pieces: list[tuple] = []        # ("run", first decode index, count) | ("range", start, end, table row)
        prefills, decode_rows, decode_pos, decode_slots, decode_table_rows = [], [], [], [], []
        run_start = None
        for chunk in batch.chunks:
            seq = chunk.seq
            start, end = chunk.start, chunk.start + chunk.num_tokens
            if end > len(seq.block_table) * bs:
                raise ValueError(f"sequence {seq.seq_id}: tokens up to {end} but its block table covers "
                                 f"{len(seq.block_table) * bs}")
            row0 = len(ids)
            ids.extend(seq.token_ids(start, end))
            table_row = self.tables.row_of(seq)
            if chunk.is_decode:
                if run_start is None:
                    run_start = len(decode_pos)
                decode_rows.append(row0)
                decode_pos.append(start)
                decode_slots.append(seq.block_table[start // bs] * bs + start % bs)
                decode_table_rows.append(table_row)
                continue
            if run_start is not None:
                pieces.append(("run", run_start, len(decode_pos) - run_start))
                run_start = None
            pieces.append(("range", start, end, table_row))
            prefills.append(PrefillSpan(slice(row0, len(ids)), end, max(seq.prompt_len, end),
                                        self.tables.table[table_row, :-(-end // bs)]))
        if run_start is not None:
            pieces.append(("run", run_start, len(decode_pos) - run_start))

        # Every host int of the step goes up in one upload; the tensors below are views of it.
        B = len(decode_pos)
        packed = torch.tensor(ids + decode_rows + decode_pos + decode_slots + decode_table_rows, dtype=torch.int64)
        packed = packed.to(dev, non_blocking=True)
        ids_t = packed[:len(ids)]
        rows_t, pos_t, slots_t, table_rows_t = packed[len(ids):].view(4, B).unbind(0)

        table = self.tables.table
        pos_parts, slot_parts = [], []
        for piece in pieces:
            if piece[0] == "run":
                _, first, count = piece
                pos_parts.append(pos_t[first:first + count])
                slot_parts.append(slots_t[first:first + count])
            else:
                _, start, end, row = piece
                pos = torch.arange(start, end, dtype=torch.int64, device=dev)
                pos_parts.append(pos)
                slot_parts.append(table[row][pos // bs].to(torch.int64) * bs + pos % bs)

        lens = [p + 1 for p in decode_pos]
        max_len = max(lens, default=0)
        scales = [softmax_scale(self.head_dim, None, self.original_max, n) for n in lens]
        meta = StepMetadata(
            positions=_cat(pos_parts, dev), slots=_cat(slot_parts, dev), prefills=tuple(prefills),
            decode_rows=rows_t,
            decode_block_tables=table[:, :-(-max_len // bs)][table_rows_t],     # gathered on the device
            decode_seq_lens=(pos_t + 1).to(torch.int32), decode_max_seq_len=max_len,
            decode_scales=torch.tensor(scales, dtype=torch.float64).to(dev, non_blocking=True))
        return ids_t, meta


def _cat(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
