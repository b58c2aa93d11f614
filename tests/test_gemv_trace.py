"""benchmarks/gemv_trace.py's analysis of GEMV block records, on records made up here."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gemv_trace.py"


@pytest.fixture(scope="module")
def trace():
    spec = importlib.util.spec_from_file_location("gemv_trace", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(start, waited, staged, looped, done, n, k, block, sm):
    """One row as the kernel writes it: 5 times, then (n, k) and (block, sm) as int32 pairs."""
    return [start, waited, staged, looped, done, n | (k << 32), block | (sm << 32), 0]


def launch(t0, n, k, blocks, done_last):
    """Blocks starting at t0 + i, waiting until t0 + 1000, staging 500 ns, the last one done at
    t0 + done_last and the others 200 ns earlier."""
    rows = []
    for i in range(blocks):
        done = t0 + done_last - (0 if i == blocks - 1 else 200)
        rows.append(record(t0 + i, t0 + 1000 + i, t0 + 1500 + i, done - 10, done, n, k, i, i % 3))
    return rows


def test_launches_are_split_by_shape_in_start_order(trace):
    rows = launch(0, 6144, 4096, 4, 5000) + launch(6000, 4096, 4096, 3, 4000)
    rows = rows[::-1]   # any order
    launches = trace.kernels(torch.tensor(rows, dtype=torch.int64))
    assert [lch["shape"] for lch in launches] == [(6144, 4096), (4096, 4096)]
    assert [len(lch["blocks"]) for lch in launches] == [4, 3]
    assert launches[0]["blocks"][2]["sm"] == 2 and launches[1]["blocks"][1]["block"] == 1


def test_figures_of_a_launch(trace):
    rows = launch(0, 6144, 4096, 4, 5000) + launch(6000, 4096, 4096, 3, 4000)
    first, second = trace.kernels(torch.tensor(rows, dtype=torch.int64))
    f = trace.launch_figures(second["blocks"], 5000, 8_000_000)
    assert f["lead"] == pytest.approx(1.0)            # started 1 us before its wait returned
    assert f["wait_skew"] == pytest.approx(0.002)
    assert f["span"] == pytest.approx(3.0)            # 7000 -> 10000 ns
    assert f["gap_before"] == pytest.approx(2.0)      # previous done 5000, first wait 7000
    assert f["staging"] == pytest.approx(0.5)
    assert f["tail"] == pytest.approx(0.2)
    assert f["gbs"] == pytest.approx(8_000_000 / 3000)
    assert f["last_blocks"][-1] == 2


def test_summary_takes_the_median_per_linear(trace):
    rows = []
    t = 0
    for span in (5000, 7000, 6000):       # three layers of two linears
        rows += launch(t, 6144, 4096, 2, span)
        rows += launch(t + span + 100, 4096, 4096, 2, 3000)
        t += span + 100 + 4000
    summary = trace.summarize(torch.tensor(rows, dtype=torch.int64),
                              {(6144, 4096): "qkv_proj", (4096, 4096): "o_proj"}, 128, 0)
    assert summary["launches"] == 6
    qkv = summary["linears"]["qkv_proj"]
    assert qkv["launches"] == 3
    assert qkv["span"] == pytest.approx((6000 - 1000) / 1e3)
    assert "gap_before" in summary["linears"]["o_proj"]
    assert summary["timer_step_ns"] == 1


def test_weight_bytes(trace):
    assert trace.weight_bytes(4096, 4096, 128) == 4096 * 2048 + 4 * 4096 * 32
