"""Checkpoint directory -> what the engine needs: architecture facts, generation defaults, the sparse
attention config and the weight files. Every missing or inconsistent file gives one error naming it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from longserve.server.config import ModelFacts, model_facts_from_config


class CheckpointError(ValueError):
    """A checkpoint file is missing or inconsistent; the message names the file."""


def _read_json(path: str, *, required: bool):
    if not os.path.exists(path):
        if required:
            raise CheckpointError(f"{path}: missing (expected a Hugging Face checkpoint directory)")
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None


@dataclass(frozen=True)
class Checkpoint:
    path: str
    facts: ModelFacts
    config: dict
    generation_defaults: dict = field(default_factory=dict)
    sparse_config: list | None = None
    sparse_config_path: str | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        raw = self.generation_defaults.get("eos_token_id", self.config.get("eos_token_id"))
        if raw is None:
            return ()
        return tuple(raw) if isinstance(raw, list) else (int(raw),)

    @property
    def weight_files(self) -> tuple[str, ...]:
        """The safetensors files, looked up when weights are loaded (a random-weight engine needs none)."""
        return find_weight_files(self.path)


def find_weight_files(directory: str) -> tuple[str, ...]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        data = _read_json(index, required=True)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(directory, name)):
                raise CheckpointError(f"{os.path.join(directory, name)}: listed in {index} but missing")
        return tuple(os.path.join(directory, f) for f in files)
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return (single,)
    found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not found:
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    return tuple(os.path.join(directory, f) for f in found)


def load_checkpoint(directory: str, sparse_config_path: str | None = None) -> Checkpoint:
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    cfg_path = os.path.join(directory, "config.json")
    config = _read_json(cfg_path, required=True)
    try:
        facts = model_facts_from_config(config, source=cfg_path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    archs = config.get("architectures") or ["Qwen2ForCausalLM"]
    if not any(a in ("Qwen2ForCausalLM",) for a in archs):
        raise CheckpointError(f"{cfg_path}: architectures {archs} are not supported (Qwen2ForCausalLM only)")
    gen = _read_json(os.path.join(directory, "generation_config.json"), required=False) or {}
    sparse_path = sparse_config_path or os.path.join(directory, "sparse_attention_config.json")
    sparse = _read_json(sparse_path, required=sparse_config_path is not None)
    if sparse is not None and not isinstance(sparse, list):
        raise CheckpointError(f"{sparse_path}: expected a list of per-layer objects")
    return Checkpoint(path=directory, facts=facts, config=config, generation_defaults=gen, sparse_config=sparse,
                      sparse_config_path=sparse_path if sparse is not None else None)
