"""Owns the device: the model weights, the KV cache tensors, per-step input preparation and sampling.

KV capacity: `EngineConfig.kv_capacity_tokens` when set; otherwise on a GPU the free memory after
loading times `gpu_memory_utilization` minus a profiled prefill-chunk transient, and on a CPU enough
blocks for `max_num_seqs` full-length sequences (host memory is not profiled).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from longserve.server.config import EngineConfig
from longserve.server.engine.scheduler import ScheduledBatch
from longserve.server.engine.sequence import Sequence
from longserve.server.engine.step_metadata import StepMetadataBuilder
from longserve.server.hf_config import Checkpoint
from longserve.server.layers.attention import DCASettings, KVCache, PagedDCABackend, StepMetadata
from longserve.server.layers.sampler import Sampled, sample
from longserve.server.models.qwen2 import Qwen2ForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_state_dict(files) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path}: cannot read safetensors ({exc})") from None
    return tensors


@dataclass(frozen=True)
class StepResult:
    """What one executed step returns: a sample per sampling chunk (batch order) and, when sparse prefill ran,
    the (query, key) pairs it computed against the dense causal count."""
    sampled: list[Sampled]
    pair_stats: object | None = None      # longserve.kernels PairStats, or None when no sparse prefill ran


class ModelRunner:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint, *, device: str | None = None):
        self.config = config
        self.facts = checkpoint.facts
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[config.dtype]
        start = time.monotonic()
        torch.manual_seed(config.seed)
        model = Qwen2ForCausalLM(self.facts)
        model.load_weights(load_state_dict(checkpoint.weight_files), checkpoint.path)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.load_seconds = time.monotonic() - start
        f = self.facts
        chunk = config.dca_chunk_size if config.dca_chunk_size is not None else f.dca_chunk_size
        local = config.dca_local_size if config.dca_local_size is not None else f.dca_local_size
        use_dca = config.dca and chunk is not None
        self.dca = DCASettings(rope_theta=f.rope_theta, chunk_size=chunk if use_dca else None,
                               local_size=local if use_dca else None,
                               original_max_position_embeddings=f.dca_original_max_position_embeddings
                               if use_dca else 0)
        if use_dca and (chunk - local) % config.kv_block_size:
            raise ValueError(f"kv_block_size {config.kv_block_size} must divide the DCA chunk length "
                             f"{chunk - local} (chunk_size - local_size)")
        self.num_kv_blocks = self._kv_blocks()
        self.cache = KVCache(f.num_layers, self.num_kv_blocks, config.kv_block_size, f.num_kv_heads, f.head_dim,
                             self.dtype, self.device)
        self.step_metadata = StepMetadataBuilder(self.device, config.kv_block_size, head_dim=f.head_dim,
                                                 original_max_position_embeddings=self.dca.original_max_position_embeddings)
        self.sparse_budgets = None
        self._rng = random.Random(config.seed)
        self._generators: dict[int, torch.Generator] = {}

    def _kv_blocks(self) -> int:
        c, bs = self.config, self.config.kv_block_size
        if c.kv_capacity_tokens is not None:
            return -(-c.kv_capacity_tokens // bs)
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            per_block = 2 * self.facts.num_layers * bs * self.facts.num_kv_heads * self.facts.head_dim \
                * self.model.model.embed_tokens.weight.element_size()
            reserve = 3 * c.prefill_chunk_tokens * (self.facts.hidden_size + self.facts.intermediate_size) * 2
            return max(1, int((free * c.gpu_memory_utilization - reserve) // per_block))
        return -(-c.max_model_len * c.max_num_seqs // bs) + c.max_num_seqs

    def set_sparse(self, budgets_for_layer) -> None:
        """`budgets_for_layer(layer) -> SparseHeadBudgets` enables sparse prefill above its threshold."""
        self.sparse_budgets = budgets_for_layer

    def generator_for(self, seq: Sequence) -> torch.Generator:
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            seed = seq.params.seed + seq.choice_index if seq.params.seed is not None else self._rng.getrandbits(63)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[seq.seq_id] = gen
        return gen

    def release(self, seq: Sequence) -> None:
        """Drop the per-sequence device state (finished or aborted)."""
        self._generators.pop(seq.seq_id, None)
        self.step_metadata.drop(seq.seq_id)

    def _metadata(self, batch: ScheduledBatch) -> tuple[torch.Tensor, StepMetadata]:
        """This step's token ids and attention metadata; host work independent of the contexts' lengths."""
        return self.step_metadata.build(batch)

    @torch.inference_mode()
    def forward_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run the batch; logits [N, V] (fp32) for the chunks that sample, in batch order."""
        ids, meta = self._metadata(batch)
        backend = PagedDCABackend(self.cache, meta, self.dca, self.sparse_budgets)
        hidden = self.model(ids, backend)
        last_rows, row = [], 0
        for chunk in batch.chunks:
            row += chunk.num_tokens
            if chunk.samples:
                last_rows.append(row - 1)
        return self.model.logits(hidden[last_rows])

    def execute(self, batch: ScheduledBatch, blocked: dict[int, tuple[int, ...]], *,
                count_pairs: bool = False) -> StepResult:
        """Run and sample one scheduled batch; ``count_pairs`` collects sparse pair statistics."""
        stats = None
        if count_pairs:
            from longserve.kernels.reference.sparse_dca import collect_pair_stats
            with collect_pair_stats(count_selected=False) as stats:
                logits = self.forward_logits(batch)
        else:
            logits = self.forward_logits(batch)
        seqs = [c.seq for c in batch.chunks if c.samples]
        sampled = sample(logits, seqs, [self.generator_for(s) for s in seqs],
                         [blocked.get(s.seq_id, ()) for s in seqs])
        return StepResult(sampled, stats)
