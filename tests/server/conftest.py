"""Tiny random Qwen2 checkpoints shared by the engine tests (built once per session, ~0.1 s each)."""
import pytest

from longserve.server.tiny_checkpoint import build_tiny_checkpoint

TOY_DCA = {"chunk_size": 64, "local_size": 16, "original_max_position_embeddings": 0}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_dca_model_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_dca")), dca=TOY_DCA, tie_word_embeddings=False,
                                 shards=2)


@pytest.fixture(scope="session")
def hf_model():
    def load(directory):
        import torch
        from transformers import Qwen2ForCausalLM
        return Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    return load
