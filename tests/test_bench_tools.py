"""The GPU benchmark's trace analysis, on synthetic kernel events.

`benchmarks/gpu_ablation.py` sums kernels per name and splits the device's
idle time into launch gaps and host gaps.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
gpu_ablation = pytest.importorskip("gpu_ablation")


def _k(ts, dur, name="k"):
  return {"ph": "X", "ts": ts, "dur": dur, "name": name}


def test_idle_gaps_splits_launch_gaps_from_host_gaps():
  # Two steps of three kernels; the second kernel overlaps the first (two
  # streams), 5 us launch gaps inside a step, 100 us between the steps.
  events = [
    _k(0, 10),
    _k(5, 10),
    _k(20, 10),
    _k(130, 10),
    _k(145, 10),
    _k(160, 10),
  ]
  g = gpu_ablation.idle_gaps(events, steps=2)
  assert g["span_ms"] == pytest.approx(0.170 / 2)
  assert g["busy_ms"] == pytest.approx((15 + 10 + 10 + 10 + 10) / 1e3 / 2)
  assert (g["short_gaps"], g["long_gaps"]) == (1.5, 0.5)
  assert g["short_gap_ms"] == pytest.approx((5 + 5 + 5) / 1e3 / 2)
  assert g["long_gap_ms"] == pytest.approx(100 / 1e3 / 2)
  # busy + gaps cover the span exactly.
  assert g["busy_ms"] + g["short_gap_ms"] + g["long_gap_ms"] == pytest.approx(
    g["span_ms"]
  )
  assert "0.09 ms per step" in gpu_ablation.gaps_sentence(g)
  assert gpu_ablation.idle_gaps([], steps=3) == {}
  assert gpu_ablation.gaps_sentence({}) == ""


def test_kernel_table_sums_per_name():
  rows, ms = gpu_ablation.kernel_table(
    [
      _k(0, 30, "nvjet_gemm"),
      _k(40, 10, "loop_add_fusion"),
      _k(60, 30, "nvjet_gemm"),
    ],
    steps=2,
  )
  assert ms == pytest.approx(0.035)
  assert rows[0]["kernel"] == "nvjet_gemm" and rows[0]["kind"] == "matmul"
  assert rows[0]["calls_per_step"] == 1.0 and rows[0]["pct"] == pytest.approx(
    85.7
  )


def test_idle_gaps_names_the_kernel_after_the_longest_gaps():
  events = [_k(0, 10, "a"), _k(50, 10, "b"), _k(62, 10, "c"), _k(75, 5, "d")]
  g = gpu_ablation.idle_gaps(events, steps=1, top=2)
  assert g["longest"] == [
    {"us": 40.0, "before": "b"},
    {"us": 3.0, "before": "d"},
  ]


def test_variant_fields_are_checked_model_fields():
  parse = gpu_ablation.parse_fields
  assert parse(["kv_stacked=1", "cudnn_multiple=2", "pad_tokens=auto"]) == {
    "kv_stacked": 1,
    "cudnn_multiple": 2,
    "pad_tokens": None,
  }
  assert parse(["gelu_form=erfc", "fuse_qkv=true"]) == {
    "gelu_form": "erfc",
    "fuse_qkv": True,
  }
  with pytest.raises(ValueError, match="'kv_stackd=1'"):
    parse(["kv_stackd=1"])
  with pytest.raises(ValueError, match="'kv_stacked'"):
    parse(["kv_stacked"])
