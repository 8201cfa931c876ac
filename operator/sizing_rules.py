"""Sizing-mode rules, defined once: the CRD's CEL rules (`crd`), spec parsing (`types`) and the planner's
request validation (`planner`) all read them from here.

Manual mode is the only mode that names a tensor-parallel size (and then always does); a prefill chunk may be
named only in Manual mode, as a multiple of the KV block size that fits the context. The API server enforces
the CEL form at admission; the operator re-checks with `manual_sizing_errors` (a resource created before a rule
existed, or a request from `longserve plan`), and both give the same messages.
"""
from __future__ import annotations

from dataclasses import dataclass

from longserve.server.memory_model import KV_BLOCK_SIZE

MODES = ("Auto", "Manual", "DryRun")
OBJECTIVES = ("MinGPUs", "MaxPrefillThroughput")
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)          # what the engines and the CRD accept
MAX_TENSOR_PARALLEL_SIZE = max(TENSOR_PARALLEL_SIZES)
CHUNK_MULTIPLE = KV_BLOCK_SIZE                 # a prefill chunk fills whole KV blocks


@dataclass(frozen=True, slots=True)
class Rule:
    reason: str        # the status reason (`SpecError` code) a violation reports
    message: str       # the same text in the CEL rule and in the operator's error
    cel: str           # the rule on the LongContextModel spec


MANUAL_FIELDS = Rule(
    "InvalidSpec", "TP/chunk are set only, and TP always, in Manual mode",
    "self.sizing.mode == 'Manual' ? has(self.sizing.tensorParallelSize) : "
    "!has(self.sizing.tensorParallelSize) && !has(self.sizing.prefillChunkTokens)")
TP_VALUES = Rule(
    "InvalidTP", f"TP must be {', '.join(map(str, TENSOR_PARALLEL_SIZES[:-1]))} or {TENSOR_PARALLEL_SIZES[-1]}",
    f"!has(self.sizing.tensorParallelSize) || self.sizing.tensorParallelSize in {list(TENSOR_PARALLEL_SIZES)}")
CHUNK_SHAPE = Rule(
    "InvalidSpec", f"chunk: multiple of {CHUNK_MULTIPLE}, <= maxModelLen",
    f"!has(self.sizing.prefillChunkTokens) || (self.sizing.prefillChunkTokens % {CHUNK_MULTIPLE} == 0 && "
    "(!has(self.context.maxModelLen) || self.sizing.prefillChunkTokens <= self.context.maxModelLen))")
RULES = (MANUAL_FIELDS, TP_VALUES, CHUNK_SHAPE)


def manual_sizing_errors(mode: str, tensor_parallel_size: int | None, prefill_chunk_tokens: int | None,
                         max_model_len: int | None) -> list[tuple[Rule, str]]:
    """The rules a sizing request breaks, each with a message naming the values; [] when it is valid.
    `max_model_len` None: the model's maximum, checked later by the planner."""
    tp, chunk = tensor_parallel_size, prefill_chunk_tokens
    broken = []
    if (mode == "Manual") != (tp is not None) or (chunk is not None and mode != "Manual"):
        got = f"mode {mode}, tensorParallelSize {tp}, prefillChunkTokens {chunk}"
        broken.append((MANUAL_FIELDS, f"{MANUAL_FIELDS.message} (got {got})"))
    if tp is not None and tp not in TENSOR_PARALLEL_SIZES:
        broken.append((TP_VALUES, f"{TP_VALUES.message}, got {tp}"))
    if chunk is not None and (chunk < CHUNK_MULTIPLE or chunk % CHUNK_MULTIPLE
                              or (max_model_len is not None and chunk > max_model_len)):
        broken.append((CHUNK_SHAPE, f"{CHUNK_SHAPE.message}, got {chunk}"
                                    + (f" with maxModelLen {max_model_len}" if max_model_len is not None else "")))
    return broken
