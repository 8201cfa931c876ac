"""One memory model for the planner and the engine: per-GPU bytes of one tensor-parallel rank (standard library
only, so the operator can import it without torch).

Terms, for a rank holding H/t query heads, G/t KV heads and F/t MLP columns (t = tensor parallelism), with b the
bytes of the weights' dtype, C the prefill chunk, L the context a step attends to, N = max_model_len and
S = max_num_seqs:

    weights     = parameters · b / t
    kv          = 2 · layers · (G/t) · D · b  per token
    transients  = the peak of live temporaries over one engine step (below)
    overhead    = 1.5 GiB + 5 % of the weights    CUDA context, NCCL, allocator fragmentation

Transients are modelled phase by phase, the way the engine's step runs: every phase lists the tensors that are
alive at its high point, grouped by the component that allocates them (the grouping `bench/trace.py` uses:
activations = the model's own tensors, attention = the attention backend and kernels, estimation = the sparse
pattern estimation and its region split, index = the sparse kernel's work lists, metadata = the runner's
per-step inputs). The step's transient peak is the largest phase, not the sum of every component's own maximum:
the estimation's buffers are freed before the attention kernels run, and the MLP's intermediates exist only
after attention has returned. `longserve bench memory` traces the engine's real code on the meta device and
compares its measured peak with these formulas.

The engine sizes its KV cache with the same functions (`kv_cache_bytes`):
`kv = utilisation · total − weights − transients(C, N, S) − overhead`, so `gpu_memory_utilization` is a
fraction of the GPU's *total* memory (vLLM's meaning) and the transient reserve stays free for the step that
needs it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

GiB = 2**30
KV_BLOCK_SIZE = 16
CHUNK_CANDIDATES = (131072, 65536, 32768, 16384, 8192)   # the planner's prefill chunks, largest first
CPU_DEFAULT_CHUNK = 8192            # `serve --model` on a CPU: host memory is not profiled
DEFAULT_SPARSE_THRESHOLD = 32768    # prompts longer than this use sparse prefill (Qwen's default)
DEFAULT_LAST_Q = 64                 # query rows the sparse estimation scores
DEFAULT_SPARSE_BUDGETS = (1000, 6096)   # (vertical, slash): the base vertical-slash pattern of Qwen's configs
SPARSE_BLOCK = 64                   # query rows per block of the sparse work lists (kernels/sparse_index.py)
DECODE_BLOCK = 64                   # keys per tile of the split-KV decode (kernels/paged_attention.py)
ESTIMATE_BLOCK_BYTES = 128 << 20    # one [H, last_q, block] fp32 logits block of the estimation (kernels/estimation.py)
OVERHEAD_FIXED_BYTES = 3 * GiB // 2
OVERHEAD_WEIGHT_FRACTION = 0.05
MARGIN_FULL_AT_BYTES = 32 * GiB     # the planner's safety margin reaches its full size at this request size
FP32, INT64 = 4, 8
PROMPT_LOGPROB_BLOCK_BYTES = 256 << 20    # one [rows, vocab] fp32 logits block of the prompt log-probabilities
COMPONENTS = ("activations", "attention", "estimation", "index", "metadata")


@dataclass(frozen=True, slots=True)
class RankShapes:
    """What one tensor-parallel rank computes with: head counts and MLP width already divided by TP."""
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int = 2
    dca_chunk_len: int | None = None        # cl = chunk_size - local_size; None: plain causal attention
    sparse_threshold: int | None = None     # prompts longer than this run sparse prefill; None: always dense
    sparse_last_q: int = DEFAULT_LAST_Q
    sparse_vertical: int = DEFAULT_SPARSE_BUDGETS[0]    # the largest per-head budgets of a layer (they size the
    sparse_slash: int = DEFAULT_SPARSE_BUDGETS[1]       # padded index lists); vertical as the estimator uses it
    block_size: int = KV_BLOCK_SIZE

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def sparse_at(self, prompt_len: int) -> bool:
        return self.sparse_threshold is not None and prompt_len > self.sparse_threshold


def rank_shapes(facts, tp: int = 1, *, dtype_bytes: int = 2, dca: bool = True, sparse: bool = True,
                sparse_threshold: int | None = None, sparse_last_q: int | None = None,
                sparse_budgets: tuple[int, int] | None = None, block_size: int = KV_BLOCK_SIZE) -> RankShapes:
    """One rank's shapes of a model (`server.config.ModelFacts`) at tensor parallelism `tp`.

    `sparse` says whether vertical-slash prefill is on (it needs DCA); its threshold and last_q default to the
    model's, then to 32768 and 64; `sparse_budgets` are the largest (vertical, slash) budgets of any layer
    (`sparse_budget_maxima` of a checkpoint's config), by default the base pattern (1000, 6096)."""
    if tp < 1 or facts.num_heads % tp or facts.num_kv_heads % tp:
        raise ValueError(f"tensor parallel size {tp} must divide the {facts.num_heads} attention heads and "
                         f"{facts.num_kv_heads} KV heads")
    use_dca = dca and facts.dca_chunk_len is not None
    threshold = None
    if sparse and use_dca:
        threshold = sparse_threshold or facts.sparse_attention_threshold or DEFAULT_SPARSE_THRESHOLD
    last_q = sparse_last_q or facts.sparse_attention_last_q or DEFAULT_LAST_Q
    return RankShapes(num_layers=facts.num_layers, hidden_size=facts.hidden_size,
                      intermediate_size=-(-facts.intermediate_size // tp), num_heads=facts.num_heads // tp,
                      num_kv_heads=facts.num_kv_heads // tp, head_dim=facts.head_dim, vocab_size=facts.vocab_size,
                      dtype_bytes=dtype_bytes, dca_chunk_len=facts.dca_chunk_len if use_dca else None,
                      sparse_threshold=threshold, sparse_last_q=last_q,
                      sparse_vertical=(sparse_budgets or DEFAULT_SPARSE_BUDGETS)[0],
                      sparse_slash=(sparse_budgets or DEFAULT_SPARSE_BUDGETS)[1], block_size=block_size)


def sparse_budget_maxima(config: list) -> tuple[int, int]:
    """Largest (vertical, slash) budgets in a `sparse_attention_config.json` list (one {head: [type, vertical,
    slash, score]} per layer), vertical as the estimator uses it (a configured 30 counts as 130)."""
    vertical = slash = 1
    for layer in config:
        for entry in layer.values():
            v, sl = int(entry[1]), int(entry[2])
            vertical, slash = max(vertical, v + 100 if v == 30 else v), max(slash, sl)
    return vertical, slash


# --- the static terms ---------------------------------------------------------------------------------------------

def weight_bytes(facts, tp: int = 1, dtype_bytes: int = 2) -> float:
    """Parameters × bytes, split evenly over the TP ranks."""
    return facts.num_parameters() * dtype_bytes / tp


def kv_bytes(shapes: RankShapes, tokens: int) -> float:
    """KV cache bytes of `tokens` token slots on one rank."""
    return shapes.kv_bytes_per_token * tokens


def overhead_bytes(weights: float) -> float:
    """CUDA context, communication buffers and allocator slack not seen as tensors."""
    return OVERHEAD_FIXED_BYTES + OVERHEAD_WEIGHT_FRACTION * weights


# --- transients -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Transients:
    """The step's peak of live temporaries: the largest phase, its bytes by component, and each component's own
    largest value over all phases (`own`, for reading which buffers matter)."""
    phase: str
    components: dict
    own: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)      # phase -> total bytes

    @property
    def peak(self) -> float:
        return float(sum(self.components.values()))


def _combine(phases: dict[str, dict]) -> Transients:
    totals = {name: float(sum(parts.values())) for name, parts in phases.items()}
    top = max(totals, key=lambda name: totals[name])
    own = {c: max(float(parts.get(c, 0)) for parts in phases.values()) for c in COMPONENTS}
    comps = {c: float(phases[top].get(c, 0)) for c in COMPONENTS}
    return Transients(phase=top, components=comps, own=own, phases=totals)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _metadata(s: RankShapes, tokens: int, context: int, decodes: int = 0) -> float:
    """The runner's step inputs: token ids, positions and cache slots (int64 per token) and, for a prefill, the
    sequence's block table (int64 per KV block); for decodes, their block tables gathered on the device (int32)."""
    blocks = -(-context // s.block_size)
    if decodes:
        return INT64 * 4 * tokens + 4 * decodes * blocks
    return INT64 * (4 * tokens + blocks)


def _rope_peak(rows: int, heads: int, head_dim: int) -> int:
    """`apply_rope` (kernels/dca_math.py) on a [rows, heads, D] bf16/fp16 tensor: at its high point the fp32
    copy (4 B per element), the two rotated halves it concatenates (fp32, 2 B each) and the fp32 concatenation
    (4 B), beside the fp64 angles and fp32 cos/sin [rows, D/2]."""
    return 12 * rows * heads * head_dim + 12 * rows * head_dim


def _regions(cl: int | None, P: int) -> int:
    """DCA regions a sub-block in the chunk starting at P attends: intra; succ once a chunk lies behind; inter
    once two do."""
    return 1 if cl is None else 1 + (P >= cl) + (P >= 2 * cl)


def sub_blocks(context: int, chunk: int, cl: int | None) -> list[tuple[int, int, int]]:
    """(rows, end, regions) of the DCA sub-blocks of a prefill step of `chunk` tokens ending at key `context`:
    the step's queries cut at DCA chunk boundaries, as the attention kernels cut them."""
    out, b = [], context - chunk
    while b < context:
        P = 0 if cl is None else b // cl * cl
        e = context if cl is None else min(P + cl, context)
        out.append((e - b, e, _regions(cl, P)))
        b = e
    return out


def prompt_logprob_rows(vocab_size: int) -> int:
    """Rows per LM-head block when scoring prompt tokens (server/engine/prompt_logprobs.py): about
    PROMPT_LOGPROB_BLOCK_BYTES of fp32 logits, at most 4096 rows."""
    return max(1, min(4096, PROMPT_LOGPROB_BLOCK_BYTES // (4 * vocab_size)))


def _region_lengths(cl: int | None, end: int) -> list[int]:
    """Key counts of the regions a sub-block ending at `end` attends: intra [P, e), succ [P - cl, P), inter
    [0, P - cl)."""
    if cl is None:
        return [end]
    P = (end - 1) // cl * cl
    return [end - P] + ([cl] if P >= cl else []) + ([P - cl] if P >= 2 * cl else [])


def estimation_bytes(s: RankShapes, end: int, rows: int | None = None) -> float:
    """Vertical-slash estimation of one sub-block ending at key `end` (kernels/estimation.py): the two score
    vectors `vertical`/`diagonal` [H, e] fp32; pass 2's probabilities `p` [H, n, B] and their skewed copy `skew`
    [H, n, B + n - 1] fp32, where a key block B holds about ESTIMATE_BLOCK_BYTES of logits and never straddles a
    region; `select_top`'s masks and ranks (about 16 bytes per score, heads grouped to ESTIMATE_BLOCK_BYTES); and
    the rotated last rows of each region with their fp32 copy."""
    H, D = s.num_heads, s.head_dim
    n = min(s.sparse_last_q, rows or s.sparse_last_q)
    per_key = H * n * FP32
    block = max(1, ESTIMATE_BLOCK_BYTES // per_key)
    block = block - block % 64 if block >= 64 else block
    B = min(block, max(_region_lengths(s.dca_chunk_len, end)))
    scores = 2 * H * end * FP32
    pass2 = per_key * (2 * B + n - 1)
    groups = max(1, ESTIMATE_BLOCK_BYTES // (16 * end))
    select = 16 * min(groups, H) * end
    rotated_rows = len(_region_lengths(s.dca_chunk_len, end)) * n * H * D * (s.dtype_bytes + FP32)
    return scores + max(pass2, select) + rotated_rows


def _list_widths(s: RankShapes, rows: int, end: int, worst_case: bool) -> list[tuple[int, int]]:
    """(vertical, slash) widths of each region's padded index lists (split_regions in kernels/estimation.py): the
    largest budgets capped by what the region can hold, at least the ~5 fallback indices. `worst_case` caps them
    by the context only (any sub-block position)."""
    cl = s.dca_chunk_len
    kv_v, kv_s = min(s.sparse_vertical, end), min(s.sparse_slash, end)
    P = 0 if cl is None else (end - 1) // cl * cl
    regions = [(end - P, end - P)]                         # intra: keys [P, e), diagonals met on [P, e)
    if cl is not None and P >= cl:
        regions.append((cl, cl + rows))                    # succ: keys [P - cl, P)
    if cl is not None and P >= 2 * cl:
        regions.append((P - cl, P - cl + rows))            # inter: keys [0, P - cl)
    if worst_case:
        regions = [(end, end)] * len(regions)
    return [(max(min(kv_v, keys), 6), max(min(kv_s, diagonals), 6)) for keys, diagonals in regions]


def work_list_bytes(s: RankShapes, rows: int, end: int, worst_case: bool = False) -> float:
    """The sparse kernel's index lists of one sub-block, every region's alive while it attends
    (kernels/sparse_index.py): block_count/column_count [H, R] and block_offset [H, R, slash width], column_index
    [H, R, vertical width] int32, R = ceil(rows / 64)."""
    R = -(-rows // SPARSE_BLOCK)
    return sum(4 * s.num_heads * R * (2 + nv + ns) for nv, ns in _list_widths(s, rows, end, worst_case))


def region_index_bytes(s: RankShapes, rows: int, end: int, worst_case: bool = False) -> float:
    """The region split of the selection (`RegionIndices`, kept while the sub-block attends): local verticals
    [H, vertical width] and slashes [H, slash width] int64 with their counts, per region."""
    return sum(INT64 * s.num_heads * (2 + nv + ns) for nv, ns in _list_widths(s, rows, end, worst_case))


def prefill_transients(s: RankShapes, chunk: int, context: int, prompt_len: int | None = None, *,
                       worst_case: bool = False) -> Transients:
    """Peak of one prefill step of `chunk` tokens whose keys end at `context`. `worst_case` bounds any step of
    that size up to that context instead: one sub-block of min(chunk, cl) rows with every region present and
    index lists as wide as the budgets allow."""
    if chunk < 1 or context < chunk:
        raise ValueError(f"need 1 <= chunk <= context, got chunk={chunk}, context={context}")
    b, h, F, H, G, D = s.dtype_bytes, s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads, s.head_dim
    C, cl = chunk, s.dca_chunk_len
    if worst_case:
        blocks = [(C if cl is None else min(C, cl), context, _regions(cl, (context - 1) // cl * cl) if cl else 1)]
    else:
        blocks = sub_blocks(context, C, cl)
    sparse = s.sparse_at(prompt_len or context)
    meta = _metadata(s, C, context)
    x = C * h * b                                   # one [C, hidden] hidden state
    into_attention = 2 * x + C * (H + 2 * G) * D * b    # the residual, the normed input, q_proj/k_proj/v_proj
    # attend(): k_rot [C, G, D] (written to the cache, held to the end), out [C, H, D]; the kernel's out [C, H, D]
    # and lse [C, H] fp32
    backend = C * G * D * b + 2 * C * H * D * b + C * H * FP32
    phases = {
        # post-attention RMSNorm: the layer's input (held by the model's loop), the new residual, its fp32 copy
        # and the fp32 square
        "norm": {"activations": 2 * x + 2 * C * h * FP32, "metadata": meta},
        # the layer's input (still held by the model's loop), the new residual, the normed input, and the MLP's
        # silu(gate), up and their product [C, F/t]
        "mlp": {"activations": 3 * x + 3 * C * F * b, "metadata": meta},
    }

    def offer(name: str, **parts) -> None:
        phase = {"activations": into_attention, "metadata": meta, "attention": backend, **parts}
        phase["attention"] = backend + parts.get("attention", 0)
        if name not in phases or sum(phase.values()) > sum(phases[name].values()):
            phases[name] = phase

    # One sub-block after the other (kernels/dca.py): the rotated query variants, then (sparse) the estimation,
    # its region split and the work lists, then the fp32 partial outputs o_parts [R, rows, H, D] and l_parts
    # [R, rows, H] when there is more than one region, the kernels, and the merge's output and LSE. A variable
    # keeps the previous sub-block's tensors until it is assigned again.
    prev = {"variants": 0, "parts": 0, "index": 0, "indices": 0}
    for rows, end, regions in blocks:
        q = rows * H * D
        variants = regions * q * b
        parts = regions * rows * H * (D + 1) * FP32 if regions > 1 else 0
        merged = rows * H * (D * b + FP32) if regions > 1 else 0
        lists = work_list_bytes(s, rows, end, worst_case) if sparse else 0
        indices = region_index_bytes(s, rows, end, worst_case) if sparse else 0
        rotating = (regions - 1) * q * b + _rope_peak(rows, H, D)
        offer("rotate", attention=prev["variants"] + prev["parts"] + rotating, index=prev["index"],
              estimation=prev["indices"])
        if sparse:
            offer("estimation", attention=variants + prev["parts"],
                  estimation=prev["indices"] + estimation_bytes(s, end, rows))
        offer("allocate", attention=variants + prev["parts"] + (regions * q * FP32 if regions > 1 else 0),
              index=lists, estimation=indices)
        offer("attention", attention=variants + parts + merged, index=lists, estimation=indices)
        prev = {"variants": variants, "parts": parts, "index": lists, "indices": indices}
    if worst_case:
        # prompt log-probabilities after the last layer: the final hidden state, one block of LM-head rows (its
        # output, the fp32 copy, the log-sum-exp's temporary), the targets and the packed results (top-k <= 20)
        rows = min(C, prompt_logprob_rows(s.vocab_size))
        phases["prompt_logprobs"] = {"activations": x + rows * s.vocab_size * (b + 2 * FP32)
                                     + C * (INT64 + 42 * INT64), "metadata": meta}
    return _combine(phases)


def decode_transients(s: RankShapes, num_seqs: int, context: int) -> Transients:
    """Peak of a decode step of `num_seqs` sequences at `context` keys: the model's tensors of one token per
    sequence; the three DCA parts [3, B, H, D] fp32, filled one after the other by a split-KV decode whose fp32
    partials [splits, B, H, D] use about 512 / (B·G) splits of at least 256 keys (kernels/paged_attention.py);
    and the logits [B, vocab] (the LM head's output and its fp32 copy)."""
    b, h, F, H, G, D = s.dtype_bytes, s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads, s.head_dim
    B = num_seqs
    wanted = max(1, min(_cdiv(512, max(B * G, 1)), _cdiv(context, 256)))
    per_split = max(DECODE_BLOCK, _cdiv(_cdiv(context, wanted), DECODE_BLOCK) * DECODE_BLOCK)
    splits = _cdiv(context, per_split)
    parts = 3 * B * H * (D + 1) * FP32 + splits * B * H * (D + 1) * FP32 + B * H * D * b
    meta = _metadata(s, B, context, decodes=B)
    phases = {"mlp": {"activations": 3 * B * h * b + 3 * B * F * b, "metadata": meta},
              "logits": {"activations": B * h * b + B * s.vocab_size * (b + FP32), "metadata": meta},
              "attention": {"activations": 2 * B * h * b + B * (H + 2 * G) * D * b, "attention": parts,
                            "metadata": meta}}
    return _combine(phases)


def step_transients(s: RankShapes, chunk: int, max_model_len: int, max_num_seqs: int = 1) -> Transients:
    """What the engine must keep free: the larger of the last prefill chunk of a max_model_len prompt and a decode
    step of max_num_seqs sequences at max_model_len."""
    chunk = min(chunk, max_model_len)
    prefill = prefill_transients(s, chunk, max_model_len, worst_case=True)
    decode = decode_transients(s, max_num_seqs, max_model_len)
    return prefill if prefill.peak >= decode.peak else decode


# --- budgets --------------------------------------------------------------------------------------------------------

def effective_margin(margin: float, request_bytes: float) -> float:
    """The safety margin guards the request-dependent terms, so it shrinks for small requests."""
    return margin * min(1.0, request_bytes / MARGIN_FULL_AT_BYTES)


def kv_cache_bytes(total_memory: float, utilization: float, weights: float, transients: float,
                   overhead: float) -> float:
    """KV bytes the engine may allocate: `utilization` of the GPU's total memory less everything else (>= 0)."""
    if not 0 < utilization < 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {utilization}")
    return max(0.0, utilization * total_memory - weights - transients - overhead)


def chunk_candidates(max_model_len: int) -> list[int]:
    """Prefill chunks to try, largest first, never longer than the context."""
    chunks = [c for c in CHUNK_CANDIDATES if c <= max_model_len]
    return chunks or [max(KV_BLOCK_SIZE, max_model_len // KV_BLOCK_SIZE * KV_BLOCK_SIZE)]


def largest_fitting_chunk(max_model_len: int, fits: Callable[[int], bool]) -> int | None:
    """The largest chunk candidate for which `fits(chunk)` holds, or None."""
    for chunk in chunk_candidates(max_model_len):
        if fits(chunk):
            return chunk
    return None


@dataclass(frozen=True, slots=True)
class NativeSizing:
    """The native engine's per-GPU terms for one (TP, chunk) and whether they fit the budget."""
    weights: float
    kv: float
    transients: Transients
    overhead: float
    budget: float
    margin: float

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.transients.peak + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def native_sizing(facts, *, tp: int, chunk: int, max_model_len: int, max_num_seqs: int, memory_per_gpu: float,
                  utilization: float, margin: float, dtype_bytes: int = 2, weights: float | None = None,
                  dca: bool = True, sparse: bool = True, sparse_threshold: int | None = None,
                  sparse_last_q: int | None = None, sparse_budgets: tuple[int, int] | None = None) -> NativeSizing:
    """Native engine sizing: weights + KV for N·S tokens + transients + overhead must fit u·M·(1 − m_eff)."""
    s = rank_shapes(facts, tp, dtype_bytes=dtype_bytes, dca=dca, sparse=sparse, sparse_threshold=sparse_threshold,
                    sparse_last_q=sparse_last_q, sparse_budgets=sparse_budgets)
    w = weight_bytes(facts, tp, dtype_bytes) if weights is None else weights
    kv = kv_bytes(s, max_model_len * max_num_seqs)
    tr = step_transients(s, chunk, max_model_len, max_num_seqs)
    m_eff = effective_margin(margin, kv + tr.peak)
    budget = utilization * memory_per_gpu * (1 - m_eff)
    return NativeSizing(weights=w, kv=kv, transients=tr, overhead=overhead_bytes(w), budget=budget, margin=m_eff)


def choose_chunk(facts, *, tp: int, max_model_len: int, memory_per_gpu: float, utilization: float,
                 max_num_seqs: int = 1, margin: float = 0.10, dtype_bytes: int = 2, dca: bool = True,
                 sparse: bool = True, sparse_threshold: int | None = None,
                 sparse_budgets: tuple[int, int] | None = None) -> int | None:
    """The planner's chunk for a native engine: the largest candidate that fits, or None."""
    return largest_fitting_chunk(max_model_len, lambda c: native_sizing(
        facts, tp=tp, chunk=c, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        memory_per_gpu=memory_per_gpu, utilization=utilization, margin=margin, dtype_bytes=dtype_bytes,
        dca=dca, sparse=sparse, sparse_threshold=sparse_threshold, sparse_budgets=sparse_budgets).fits)
