"""The allocation/sync tracer behind `longserve bench memory` and the sync-count tests."""
import pytest
import torch

from longserve.bench.trace import HostSyncInTrace, component_of, trace
from longserve.kernels.dca_math import apply_rope

MiB = 2**20


def test_peak_counts_live_storages_and_views_keep_them_alive():
    w = torch.empty(1024, 256, device="meta")               # made before the trace: not counted
    with trace() as t:
        x = torch.empty(256, 1024, device="meta")           # 1 MiB
        y = x @ w                                           # 0.25 MiB
        del x
        view = y.view(-1)[:10]                              # keeps y's storage alive
        del y
        a = torch.empty(512, 1024, device="meta")           # 2 MiB: live 2.25 MiB is the peak
        del a, view
    r = t.report
    assert r.peak_bytes == int(2.25 * MiB)
    assert r.live_bytes == 0
    assert r.largest[0][0] == 2 * MiB and r.largest[0][3] == (512, 1024)


def test_in_place_writes_into_old_storage_are_not_allocations():
    buf = torch.empty(1024, 1024, device="meta")
    with trace() as t:
        buf.add_(1)
        buf[:10].zero_()
    assert t.report.peak_bytes == 0


def test_components_come_from_the_innermost_repository_frame():
    q = torch.empty(4096, 28, 128, device="meta")
    pos = torch.empty(4096, dtype=torch.int64, device="meta")
    with trace() as t:
        out = apply_rope(q, pos, 1e6)
    assert t.report.peak_by_component.keys() == {"attention"}
    assert t.report.component_peaks["attention"] >= out.untyped_storage().nbytes()
    assert component_of(__file__) is None                   # tests are not a component


def test_syncs_are_counted_on_cpu_and_refused_on_meta():
    c = torch.zeros(8)
    with trace() as t:
        (c + 1).sum().item()
        (c > 0).nonzero()
        int(c[0])
    assert t.report.syncs == {"item": 2, "nonzero": 1}
    with pytest.raises(HostSyncInTrace, match="item"):
        with trace():
            int(torch.empty(3, device="meta").sum())
