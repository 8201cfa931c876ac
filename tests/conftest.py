"""Suite-wide settings: interpreter mode for Triton before any kernel import, offline HF, seeds."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Test models are tiny: one intra-op thread avoids OpenMP spin-waits that slow small ops by 10x when
# the two CI cores are shared (also inherited by the servers tests start as subprocesses).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (runs in bench/gpu)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


class Golden:
    """Golden files under tests/golden/: LONGSERVE_REGEN_GOLDENS=1 (`make goldens`) rewrites them
    instead of comparing; the diff is reviewed like code."""

    def __init__(self, root):
        self.root = root
        self.regenerating = os.environ.get("LONGSERVE_REGEN_GOLDENS") == "1"

    def check_text(self, relative: str, actual: str) -> None:
        path = self.root / relative
        if self.regenerating:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(actual, encoding="utf-8")
            return
        assert path.exists(), f"missing golden {path}; run `make goldens`"
        expected = path.read_text(encoding="utf-8")
        assert actual == expected, f"{path} differs from the computed value; if intended, run `make goldens`"

    def check_json(self, relative: str, actual) -> None:
        import json
        self.check_text(relative, json.dumps(actual, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@pytest.fixture
def golden():
    from pathlib import Path
    return Golden(Path(__file__).parent / "golden")
