"""Owns the device: the model weights, the KV cache tensors, per-step input preparation and sampling.

KV capacity: `EngineConfig.kv_capacity_tokens` when set; otherwise on a GPU `gpu_memory_utilization` of the
GPU's total memory less the weights, one step's transient reserve and the overhead, all from the memory model
the planner uses (`server.memory_model`); on a CPU enough blocks for `max_num_seqs` full-length sequences (host
memory is not profiled).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from longserve.server.config import EngineConfig
from longserve.server.engine.prompt_logprobs import PromptLogprobJob, PromptScores, score_rows, unpack
from longserve.server.engine.scheduler import ScheduledBatch
from longserve.server.engine.sequence import Sequence
from longserve.server.engine.step_metadata import StepMetadataBuilder
from longserve.server.hf_config import Checkpoint
from longserve.server.layers.attention import DCASettings, KVCache, PagedDCABackend, StepMetadata
from longserve.server.layers.sampler import Sampled, SeenTokens, sample
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


def random_model(facts, device: torch.device, dtype: torch.dtype, std: float = 0.02, tp=None) -> Qwen2ForCausalLM:
    """Seeded random weights made directly on `device` (`load_format="dummy"`, for benchmarks without a
    checkpoint): built on the meta device, then allocated there and initialised in place, so a 15 GB model
    never passes through host memory. Norms start at 1 and biases at 0; the small std keeps activations finite.
    With `tp` each rank draws its own shard (a different model from TP 1's: for timing, not for comparisons)."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(facts, tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    if torch.device(device).type == "meta":
        return model                    # the memory bench: real shapes, no data to initialise
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std)
    return model


@dataclass(frozen=True)
class StepResult:
    """What one executed step returns: a sample per sampling chunk (batch order) and, when pair counting was
    asked for, the prefill (query, key) pairs computed against the dense causal count of the same regions."""
    sampled: list[Sampled]
    pair_stats: object | None = None      # longserve.kernels PairStats (ints) when counting was asked, else None
    prompt_scores: dict[int, PromptScores] = field(default_factory=dict)   # seq_id -> this step's prompt logprobs


class ModelRunner:
    """`tp` (a `parallel.group.TPGroup`, None at TP 1) makes this runner one rank of a tensor-parallel replica:
    it holds its shard of the weights and its KV heads, and agrees the KV capacity (the minimum over the ranks).
    On rank 0 `tp_sender` (a `parallel.steps.StepSender`) sends every executed step to the other ranks."""

    def __init__(self, config: EngineConfig, checkpoint: Checkpoint, *, device: str | None = None, tp=None):
        self.config = config
        self.checkpoint = checkpoint
        self.facts = checkpoint.facts
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[config.dtype]
        self.tp = tp
        self.tp_size, self.tp_rank = (1, 0) if tp is None else (tp.size, tp.rank)
        self.tp_sender = None
        start = time.monotonic()
        torch.manual_seed(config.seed + self.tp_rank)
        if config.load_format == "dummy":
            self.model = random_model(self.facts, self.device, self.dtype, tp=tp).eval()
        elif tp is None:
            model = Qwen2ForCausalLM(self.facts)
            model.load_weights(load_state_dict(checkpoint.weight_files), checkpoint.path)
            self.model = model.to(device=self.device, dtype=self.dtype).eval()
        else:
            from longserve.server.parallel.shards import load_rank_state_dict
            model = Qwen2ForCausalLM(self.facts, tp)
            model.load_weights(load_rank_state_dict(checkpoint.weight_files, tp.rank, tp.size,
                                                    self.facts.vocab_size), checkpoint.path)
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
        self.num_kv_blocks = self._kv_blocks(checkpoint.sparse_config)
        if tp is not None:                 # every rank must hold every block: the smallest capacity wins
            self.num_kv_blocks = tp.min_int(self.num_kv_blocks)
        self.cache = KVCache(f.num_layers, self.num_kv_blocks, config.kv_block_size, f.num_kv_heads // self.tp_size,
                             f.head_dim, self.dtype, self.device)
        self.step_metadata = StepMetadataBuilder(self.device, config.kv_block_size, head_dim=f.head_dim,
                                                 original_max_position_embeddings=self.dca.original_max_position_embeddings)
        self.seen_tokens = SeenTokens()          # repetition-penalty masks, kept across steps
        self.sparse_budgets = None
        self.pair_totals = None        # a kernels.PairStats every step adds its prefill pair counts to (benchmarks)
        self._rng = random.Random(config.seed)
        self._generators: dict[int, torch.Generator] = {}

    def _kv_blocks(self, sparse_config: list | None = None) -> int:
        c, bs = self.config, self.config.kv_block_size
        if c.kv_capacity_tokens is not None:
            return -(-c.kv_capacity_tokens // bs)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return self.kv_blocks_for_memory(total=total, free=free, sparse_config=sparse_config)
        return -(-c.max_model_len * c.max_num_seqs // bs) + c.max_num_seqs

    def kv_blocks_for_memory(self, *, total: int, free: int, sparse_config: list | None = None) -> int:
        """KV blocks from the shared memory model: `gpu_memory_utilization` of the GPU's total memory less the
        weights, the transient reserve of one step (kept free) and the overhead; `free` (after loading) must hold
        the cache and the reserve. `sparse_config` (the checkpoint's sparse_attention_config list) sizes the
        sparse prefill's buffers; without one prefill is dense. ValueError, naming every term, when they do not
        fit."""
        import dataclasses
        import logging

        from longserve.server import memory_model as mm

        c = self.config
        dtype_bytes = torch.empty((), dtype=self.dtype).element_size()
        shapes = mm.rank_shapes(self.facts, self.tp_size, dtype_bytes=dtype_bytes, dca=self.dca.chunk_size is not None,
                                sparse=c.sparse_prefill and sparse_config is not None,
                                sparse_threshold=c.sparse_threshold, sparse_last_q=c.sparse_last_q,
                                sparse_budgets=mm.sparse_budget_maxima(sparse_config) if sparse_config else None,
                                block_size=c.kv_block_size)
        if self.dca.chunk_size is not None:
            shapes = dataclasses.replace(shapes, dca_chunk_len=self.dca.chunk_size - self.dca.local_size)
        weights = mm.weight_bytes(self.facts, self.tp_size, dtype_bytes)
        reserve = mm.step_transients(shapes, c.prefill_chunk_tokens, c.max_model_len, c.max_num_seqs).peak
        overhead = mm.overhead_bytes(weights)
        kv = mm.kv_cache_bytes(total, c.gpu_memory_utilization, weights, reserve, overhead)
        blocks = int(kv // (shapes.kv_bytes_per_token * c.kv_block_size))
        terms = (f"{c.gpu_memory_utilization} of {total / 1e9:.1f} GB total, weights {weights / 1e9:.1f} GB, "
                 f"step transients {reserve / 1e9:.1f} GB (chunk {c.prefill_chunk_tokens}), overhead "
                 f"{overhead / 1e9:.1f} GB")
        if blocks < 1:
            raise ValueError(f"no room for the KV cache: {terms}; raise gpu_memory_utilization or lower "
                             "prefill_chunk_tokens")
        if kv + reserve > free:
            raise ValueError(f"the KV cache ({kv / 1e9:.1f} GB) and the step reserve ({reserve / 1e9:.1f} GB) "
                             f"exceed the {free / 1e9:.1f} GB free on the GPU ({terms}): another process holds "
                             "GPU memory; lower gpu_memory_utilization")
        logging.getLogger("longserve.engine").info("KV cache: %d blocks (%d tokens, %.1f GB) from %s",
                                                   blocks, blocks * c.kv_block_size, kv / 1e9, terms)
        return blocks

    def enable_sparse(self) -> int | None:
        """Sparse prefill from the checkpoint's sparse_attention_config when configured and DCA is on: this rank's
        heads' budgets (the config names global query heads); returns the threshold, or None (dense)."""
        from longserve.kernels import load_sparse_attention_config
        c, facts, ckpt = self.config, self.facts, self.checkpoint
        if not (c.sparse_prefill and self.dca.chunk_size is not None and ckpt.sparse_config):
            return None
        cfg = load_sparse_attention_config(ckpt.sparse_config, facts.num_layers, facts.num_heads)
        threshold = c.sparse_threshold or facts.sparse_attention_threshold or 32768
        rank, size = self.tp_rank, self.tp_size
        self.set_sparse(lambda layer: cfg.budgets(layer, rank=rank, tp=size, threshold=threshold,
                                                  last_q=c.sparse_last_q))
        return threshold

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
        if self.tp_sender is not None:
            self.tp_sender.released(seq.seq_id)
        self.step_metadata.drop(seq.seq_id)
        self.seen_tokens.drop(seq.seq_id)

    def _metadata(self, batch: ScheduledBatch) -> tuple[torch.Tensor, StepMetadata]:
        """This step's token ids and attention metadata; host work independent of the contexts' lengths."""
        return self.step_metadata.build(batch)

    @torch.inference_mode()
    def forward_logits(self, batch: ScheduledBatch, pair_stats=None,
                       prompt_jobs: list[PromptLogprobJob] = ()) -> torch.Tensor:
        """Run the batch; logits [N, V] (fp32) for the chunks that sample, in batch order. ``pair_stats`` (a
        ``kernels.PairStats``) gets the prefill (query, key) pair counts of every layer added. Each of
        ``prompt_jobs`` (rows of this batch's prefill chunks) gets its prompt log-probabilities in ``result``:
        scored in row blocks, read back with one transfer for the whole step."""
        ids, meta = self._metadata(batch)
        backend = PagedDCABackend(self.cache, meta, self.dca, self.sparse_budgets, pair_stats)
        hidden = self.model(ids, backend)
        last_rows, row = [], 0
        for chunk in batch.chunks:
            row += chunk.num_tokens
            if chunk.samples:
                last_rows.append(row - 1)
        if prompt_jobs:
            self._score_prompts(hidden, prompt_jobs)
        return self.model.logits(hidden[last_rows])

    def _score_prompts(self, hidden: torch.Tensor, jobs: list[PromptLogprobJob]) -> None:
        from longserve.server.memory_model import prompt_logprob_rows

        block = prompt_logprob_rows(self.facts.vocab_size)
        packed = []
        for job in jobs:
            targets = torch.tensor(job.targets, dtype=torch.int64).to(self.device, non_blocking=True)
            packed.append(score_rows(hidden[job.row:job.row + len(job.targets)], self.model.logits, targets,
                                     job.k, block))
        width = max(p.shape[1] for p in packed)
        host = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in packed]).cpu()
        at = 0
        for job, p in zip(jobs, packed):
            job.result = unpack(job, host[at:at + p.shape[0], :p.shape[1]])
            at += p.shape[0]

    def prompt_jobs(self, batch: ScheduledBatch, wanted: dict[int, PromptLogprobJob]) -> list[PromptLogprobJob]:
        """The jobs of ``wanted`` (by seq_id) whose chunk is in ``batch``, with their hidden rows placed."""
        jobs, row = [], 0
        for chunk in batch.chunks:
            job = wanted.get(chunk.seq.seq_id)
            if job is not None:
                job.row = row + (job.first - 1 - chunk.start)
                jobs.append(job)
            row += chunk.num_tokens
        return jobs

    def execute(self, batch: ScheduledBatch, blocked: dict[int, tuple[int, ...]], *,
                count_pairs: bool = False, prompt_logprobs: dict[int, PromptLogprobJob] | None = None,
                constraints: dict | None = None) -> StepResult:
        """Run and sample one scheduled batch; ``count_pairs`` returns the step's prefill pair counts (ints,
        read back once per step) in ``StepResult.pair_stats``; ``prompt_logprobs`` (seq_id -> job) asks for
        prompt log-probabilities of those sequences' chunks (``StepResult.prompt_scores``); ``constraints``
        (seq_id -> ``structured.Constraint``) limits those sequences to their grammars' tokens."""
        from longserve.kernels import PairStats

        stats = PairStats() if count_pairs or self.pair_totals is not None else None
        jobs = self.prompt_jobs(batch, prompt_logprobs) if prompt_logprobs else []
        if self.tp_sender is not None:     # the other ranks run the same forward, their all-reduces pair with ours
            self.tp_sender.send_step(batch, jobs)
        if jobs:
            logits = self.forward_logits(batch, stats, prompt_jobs=jobs)
        else:
            logits = self.forward_logits(batch, stats)
        seqs = [c.seq for c in batch.chunks if c.samples]
        sampled = sample(logits, seqs, [self.generator_for(s) for s in seqs],
                         [blocked.get(s.seq_id, ()) for s in seqs], self.seen_tokens,
                         [constraints.get(s.seq_id) for s in seqs] if constraints else None)
        if stats is not None:
            stats = stats.resolved()
            if self.pair_totals is not None:
                self.pair_totals.add(stats)
        return StepResult(sampled, stats if count_pairs else None,
                          {job.seq_id: job.result for job in jobs if job.result is not None})
