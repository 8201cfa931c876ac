"""Kernel-test helpers: seeded fp64 inputs and error measures (docs/testing.md#tolerance-rule)."""
import pytest
import torch

# fp64 references agree with fp64 truths to rounding; fp32 paths to ~1e-5 (docs/algorithms.md#oracles)
FP64_TOL = 1e-10
FP32_TOL = 1e-5


def make_qkv(n_q, n_k, H, G, D=16, *, seed=0, dtype=torch.float64):
    """Seeded q ``[n_q, H, D]``, k/v ``[n_k, G, D]``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
                 for shape in ((n_q, H, D), (n_k, G, D), (n_k, G, D)))


def max_err(x, truth) -> float:
    """Max |x - truth| where the truth is finite; a mismatch in the infinity pattern fails outright."""
    x, truth = x.double(), truth.double()
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(x), finite), "inf/nan pattern differs from the truth"
    return float((x[finite] - truth[finite]).abs().max()) if finite.any() else 0.0


class Kit:
    """What kernel tests share; reach it through the ``kit`` fixture (test modules cannot import conftest)."""
    FP64_TOL = FP64_TOL
    FP32_TOL = FP32_TOL
    make_qkv = staticmethod(make_qkv)
    max_err = staticmethod(max_err)


@pytest.fixture
def kit():
    return Kit
