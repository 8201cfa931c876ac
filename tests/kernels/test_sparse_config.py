"""sparse_attention_config.json loading/validation, SparseHeadBudgets, and recall-based refinement
(docs/algorithms.md#refinement, docs/algorithms.md#sparse-config)."""
import json

import pytest
import torch

from longserve.kernels import (
    HeadPattern,
    SparseAttentionConfig,
    SparseHeadBudgets,
    load_sparse_attention_config,
    refine_sparse_config,
)
from longserve.kernels.sparse_config import increment_for, measure_recall

VS = "vertical_and_slash"


def _layers(num_layers=2, num_heads=4):
    return [{str(h): [VS, 1000 + h, 6096 - h, 0.95] for h in range(num_heads)} for _ in range(num_layers)]


def test_load_from_file_and_list(tmp_path):
    path = tmp_path / "sparse_attention_config.json"
    path.write_text(json.dumps(_layers()))
    cfg = load_sparse_attention_config(path, num_layers=2, num_heads=4)
    assert cfg.num_layers == 2 and cfg.num_heads == 4
    assert cfg.layers[1][3] == HeadPattern(1003, 6093, 0.95, VS)
    assert load_sparse_attention_config(_layers(), 2, 4) == cfg
    assert load_sparse_attention_config(str(path), 2, 4).to_json() == _layers()
    out = tmp_path / "copy.json"
    cfg.save(out)
    assert load_sparse_attention_config(out, 2, 4) == cfg


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop(), "has 1 layers"),
    (lambda d: d[1].pop("2"), "layer 1: missing heads [2]"),
    (lambda d: d[0].update({"01": d[0].pop("1")}), "layer 0: head key '01'"),
    (lambda d: d[0].update({"x": [VS, 1, 1, 1.0]}), "head key 'x'"),
    (lambda d: d[1].update({"4": [VS, 1, 1, 1.0]}), "layer 1 head '4': index outside"),
    (lambda d: d[0].update({"3": ["stream_llm", 100, 800, 0.9]}), "layer 0 head '3': pattern 'stream_llm' is not"),
    (lambda d: d[0].update({"3": ["a_shape", 100, 800, 0.9]}), "unknown pattern type"),
    (lambda d: d[1].update({"0": [VS, 0, 800, 0.9]}), "layer 1 head '0': vertical_size must be a positive"),
    (lambda d: d[1].update({"0": [VS, 10, 8.5, 0.9]}), "slash_size must be a positive"),
    (lambda d: d[1].update({"0": [VS, True, 8, 0.9]}), "vertical_size"),
    (lambda d: d[1].update({"0": [VS, 10, 8, "high"]}), "score must be a number"),
    (lambda d: d[1].update({"0": [VS, 10, 8]}), "expected [pattern_type"),
    (lambda d: d.__setitem__(0, [1, 2]), "layer 0: expected a dict"),
])
def test_validation_errors_name_layer_and_head(mutate, message):
    data = _layers()
    mutate(data)
    with pytest.raises(ValueError) as err:
        load_sparse_attention_config(data, 2, 4)
    assert message in str(err.value)


def test_unreadable_inputs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sparse_attention_config(bad, 2, 4)
    with pytest.raises(ValueError, match="cannot read"):
        load_sparse_attention_config(tmp_path / "missing.json", 2, 4)
    with pytest.raises(ValueError, match="list of per-layer dicts"):
        load_sparse_attention_config({"0": {}}, 1, 1)


def test_budgets_per_rank_use_global_head_ids():
    cfg = load_sparse_attention_config(_layers(num_heads=8), 2, 8)
    b = cfg.budgets(1, rank=1, tp=2, threshold=100, last_q=32)
    assert b.vertical == (1004, 1005, 1006, 1007) and b.slash == (6092, 6091, 6090, 6089)
    assert (b.threshold, b.last_q, b.num_heads) == (100, 32, 4)
    assert cfg.budgets(0).num_heads == 8 and cfg.budgets(0).threshold == 32768 and cfg.budgets(0).last_q == 64
    with pytest.raises(ValueError):
        cfg.budgets(0, rank=0, tp=3)
    with pytest.raises(ValueError):
        cfg.budgets(2)


def test_head_budgets_validation_and_quirk():
    b = SparseHeadBudgets((30, 31, 1000), (100, 800, 6096))
    assert b.effective_vertical() == (130, 31, 1000)
    assert b.heads(1, 3).vertical == (31, 1000)
    assert SparseHeadBudgets.uniform(2, 5, 6).slash == (6, 6)
    assert SparseHeadBudgets((torch.tensor(5),), (torch.tensor(7),)).vertical == (5,)
    for bad in (dict(vertical=(1,), slash=(1, 2)), dict(vertical=(), slash=()), dict(vertical=(-1,), slash=(1,)),
                dict(vertical=(1.5,), slash=(1,)), dict(vertical=(1,), slash=(1,), last_q=0),
                dict(vertical=(1,), slash=(1,), threshold=-1)):
        with pytest.raises(ValueError):
            SparseHeadBudgets(**bad)
    with pytest.raises(ValueError):
        b.for_rank(0, 2)                              # 3 heads do not split over 2 ranks
    with pytest.raises(ValueError):
        b.heads(2, 2)


def test_increment_buckets():
    assert [increment_for(r) for r in (0.95, 0.9, 0.85, 0.75, 0.65, 0.1)] == [0, 0, 2048, 4096, 8192, 12288]
    assert increment_for(0.1, ((0.9, 0), (0.0, 12244))) == 12244
    with pytest.raises(ValueError):
        increment_for(0.1, ((0.5, 0),))


CFG = dict(rope_theta=1e4, chunk_size=80, local_size=16)


def _calibration(L=160, D=16, seed=0):
    """Head 0 attends mostly to itself (local); head 1 to four far-apart 'needle' columns."""
    g = torch.Generator().manual_seed(seed)
    q = 0.3 * torch.randn((L, 2, D), generator=g, dtype=torch.float64)
    k = 0.3 * torch.randn((L, 2, D), generator=g, dtype=torch.float64)
    self_dir = torch.randn((L, D), generator=g, dtype=torch.float64)
    q[:, 0] += 3 * self_dir                    # q_t . k_t large: the diagonal carries the mass
    k[:, 0] += 3 * self_dir
    slow = D // 2 - 1                          # the slowest RoPE pair: ~constant over these positions
    q[:, 1, slow] += 4.0
    q[:, 1, D - 1] += 4.0
    for j in (40, 90, 120, 150):
        k[j, 1, slow] += 4.0
        k[j, 1, D - 1] += 4.0
    return q, k


def test_refinement_raises_only_heads_that_need_it():
    q, k = _calibration()
    cfg = SparseAttentionConfig(tuple(tuple(HeadPattern(1, 1, None) for _ in range(4)) for _ in range(2)))
    new, recalls = refine_sparse_config(cfg, 1, [(q, k)], **CFG, head_start=2, max_rounds=3)
    assert recalls.shape == (2, 2)                                  # round 2 changes nothing: stop
    assert float(recalls[0, 0]) >= 0.9 > float(recalls[0, 1])      # local head fine, needle head starved
    assert new.layers[1][2].vertical == 1 and new.layers[1][2].slash == 1
    inc = increment_for(float(recalls[0, 1]))
    assert (new.layers[1][3].vertical, new.layers[1][3].slash) == (1 + inc, 1 + inc)
    assert new.layers[1][3].score == pytest.approx(float(recalls[1, 1]), abs=1e-6)
    assert float(recalls[1, 1]) == pytest.approx(1.0, abs=1e-9)   # budgets now cover the whole prompt
    assert new.layers[0] == cfg.layers[0] and new.layers[1][:2] == cfg.layers[1][:2]


def test_measured_recall_is_chunking_aware_and_bounded():
    q, k = _calibration(seed=1)
    b = SparseHeadBudgets((1, 1), (1, 1))
    whole = measure_recall(q, k, b, **CFG)
    chunked = measure_recall(q, k, b, **CFG, prefill_chunk=48)
    for r in (whole, chunked):
        assert torch.all(r > 0) and torch.all(r <= 1 + 1e-12)
    full = measure_recall(q, k, SparseHeadBudgets((160, 160), (160, 160)), **CFG)
    assert torch.allclose(full, torch.ones(2, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError):
        measure_recall(q[:10], k, b, **CFG)
    with pytest.raises(ValueError):
        refine_sparse_config(SparseAttentionConfig(((HeadPattern(1, 1),),)), 0, [], **CFG)
