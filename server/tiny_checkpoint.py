"""Build a tiny random Qwen2 checkpoint (Hugging Face layout) with a byte-level BPE tokenizer and a
ChatML chat template: the independent oracle for engine and server tests (docs/testing.md#transformers-oracle).
transformers and tokenizers are imported lazily (dev-only dependencies)."""
from __future__ import annotations

import json
import os

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The pass key is 28884. Remember it. 28884 is the pass key.", "Hello, world! Bonjour le monde.",
          "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
          "def add(a, b):\n    return a + b\n", "数字 1234567890 こんにちは 안녕하세요 Привет мир 🙂"]


def build_tokenizer(directory: str, vocab_size: int = 1000) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    added = {str(tok.token_to_id(s)): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False} for s in SPECIALS}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "added_tokens_decoder": added, "chat_template": CHATML,
              "model_max_length": 131072}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)


def build_tiny_checkpoint(directory: str, *, seed: int = 0, vocab_size: int = 1000, hidden_size: int = 64,
                          intermediate_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                          num_kv_heads: int = 2, max_position_embeddings: int = 4096, tie_word_embeddings: bool = True,
                          rope_theta: float = 10000.0, dca: dict | None = None, sparse_config: list | None = None,
                          shards: int = 1) -> str:
    """Write the checkpoint into `directory` (created) and return it. `dca` is a dual_chunk_attention_config."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    os.makedirs(directory, exist_ok=True)
    build_tokenizer(directory, vocab_size)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                      rope_theta=rope_theta, eos_token_id=2, bos_token_id=None, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():           # larger random weights so logits are not all near-uniform
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    max_shard = None if shards <= 1 else f"{max(1, sum(p.numel() * 4 for p in model.parameters()) // shards // 1000)}KB"
    kwargs = {"max_shard_size": max_shard} if max_shard else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    if dca is not None:
        config["dual_chunk_attention_config"] = dca
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"eos_token_id": [2], "temperature": 0.7, "top_p": 0.8}, fh)
    if sparse_config is not None:
        with open(os.path.join(directory, "sparse_attention_config.json"), "w", encoding="utf-8") as fh:
            json.dump(sparse_config, fh)
    return directory
