"""Resolve a model reference to a `ModelEntry`: a built-in catalog id, or a local config.json /
checkpoint directory (weights sized from the safetensors headers when present)."""
from __future__ import annotations

import json
import os
import struct

from longserve.operator.catalog import ModelEntry, lookup_model
from longserve.server.config import DTYPE_BYTES, load_model_facts

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                      "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_weight_bytes(directory: str) -> int | None:
    """Sum of tensor sizes declared in the headers of every *.safetensors file (no tensor is read)."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        return None
    total = 0
    for name in files:
        path = os.path.join(directory, name)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: truncated safetensors header")
            (length,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(fh.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}: unreadable safetensors header ({exc})") from None
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            total += end - start
    return total


def resolve_model(reference: str) -> ModelEntry:
    """`reference` is a catalog id (case-insensitive) or a path to config.json / a checkpoint dir."""
    if os.path.exists(reference):
        facts = load_model_facts(reference)
        directory = reference if os.path.isdir(reference) else os.path.dirname(reference) or "."
        dtype_bytes = DTYPE_BYTES.get(facts.torch_dtype, 2)
        weights = safetensors_weight_bytes(directory)
        if weights is None:
            weights = facts.num_parameters() * dtype_bytes
        return ModelEntry(hf_id=os.path.abspath(reference), facts=facts, weight_bytes=weights,
                          dtype_bytes=dtype_bytes)
    return lookup_model(reference)
