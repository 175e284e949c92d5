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
  from vptpc.models.levers import Levers

  parse = gpu_ablation.parse_fields
  fields = parse(["kv_stacked=1", "cudnn_multiple=2", "pad_tokens=auto"])
  assert fields == {"kv_stacked": 1, "cudnn_multiple": 2, "pad_tokens": None}
  assert gpu_ablation.model_kwargs(fields, "cudnn") == {
    "levers": Levers("cudnn", cudnn_multiple=2, kv_stacked=True)
  }
  assert parse(["layer_scale=true"]) == {"layer_scale": True}
  for bad in ("kv_stackd=1", "fuse_qkv=1", "gelu_form=erfc"):
    with pytest.raises(ValueError, match=repr(bad)):
      parse([bad])
  with pytest.raises(ValueError, match="'kv_stacked'"):
    parse(["kv_stacked"])


def test_variant_items_split_into_model_fields_and_xla_options():
  pos, fields, xla = gpu_ablation.parse_variant(
    "auto:1:kv_stacked=1:xla_gpu_graph_min_graph_size=1"
    ":xla_gpu_enable_command_buffer=:xla_foo=false"
  )
  assert pos == ["auto", "1"]
  assert fields == {"kv_stacked": 1}
  assert xla == {
    "xla_gpu_graph_min_graph_size": "1",
    "xla_gpu_enable_command_buffer": "",
    "xla_foo": "False",
  }
  assert gpu_ablation.xla_flags(xla) == (
    "--xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_command_buffer= "
    "--xla_foo=False"
  )
  with pytest.raises(ValueError, match="'xla_x'"):
    gpu_ablation.parse_xla_options(["xla_x"])
  with pytest.raises(ValueError, match="'kv_stackd=1'"):
    gpu_ablation.parse_variant("auto:1:kv_stackd=1")
  # The former attention:cast:fuse[:pad:gelu:ln:form] form is named.
  with pytest.raises(ValueError, match="expected attention:cast"):
    gpu_ablation.parse_variant("auto:1:0:auto:0:0")


def test_xla_options_reach_the_compiler_and_a_bad_one_is_named():
  import jax
  import jax.numpy as jnp

  opts = gpu_ablation.parse_xla_options(["xla_gpu_graph_min_graph_size=1"])
  f = jax.jit(lambda x: x * 2, compiler_options=opts)
  assert float(f(jnp.ones(()))) == 2.0
  bad = gpu_ablation.parse_xla_options(["xla_gpu_graph_min_grph_size=1"])
  with pytest.raises(Exception, match="xla_gpu_graph_min_grph_size"):
    jax.jit(lambda x: x * 2, compiler_options=bad)(jnp.ones(()))


def _train_row(
  i, img_s, fields=None, xla=None, pos=("auto", "1"), err="8.1e-03"
):
  return dict(
    variant=i,
    img_s=img_s,
    fields=fields or {},
    xla_options=xla or {},
    positional=list(pos),
    logits_rel_err=err,
  )


def test_winners_are_combined_the_faster_keeping_a_shared_name():
  rows = [
    _train_row(0, 100.0),
    _train_row(1, 103.0, {"kv_stacked": 1}),
    _train_row(2, 100.5, {"cudnn_multiple": 2}),  # within the margin
    _train_row(3, 104.0, {"cudnn_multiple": 1}),
    _train_row(4, 102.0, {"cudnn_multiple": 2}),
    _train_row(5, 105.0, xla={"xla_gpu_graph_min_graph_size": "1"}),
    _train_row(6, 120.0, {"kv_stacked": 1}, pos=("auto", "0")),
  ]
  both = gpu_ablation.combine_winners(rows)
  assert both == dict(
    fields={"kv_stacked": 1, "cudnn_multiple": 1},
    xla_options={"xla_gpu_graph_min_graph_size": "1"},
    of=[4, 1, 3, 5],
  )
  # One winner (or none) is already measured as it is.
  assert gpu_ablation.combine_winners(rows[:3]) is None
  assert gpu_ablation.combine_winners(rows[1:]) is None  # no default


def test_pick_levers_ranks_each_variant_against_its_own_baseline():
  rows = [
    dict(_train_row(0, 100.0), what="train"),
    dict(_train_row(1, 103.0, {"kv_stacked": 1}), what="train"),
    # Faster, but a lever the later stages cannot pass on.
    dict(_train_row(2, 150.0, pos=("xla", "1")), what="train"),
    dict(_train_row(3, 0.0), what="error"),
  ]
  pick = gpu_ablation.pick_levers
  assert pick(rows)["variant"] == 1
  assert pick(rows, margin=0.05)["variant"] == 0  # none beats it by 5%
  # Named levers do go on: a row that differs only there is picked.
  pad = dict(_train_row(4, 104.0, {"pad_tokens": 1}), what="train")
  assert pick([*rows, pad])["variant"] == 4
  # A combined row's raw rate is the highest, but in its own rounds the
  # default ran faster too: 106 / 105 is within the margin, 103 / 100 not.
  both = dict(_train_row(5, 106.0, {"kv_stacked": 1}), what="train")
  both["default_img_s_same_rounds"] = 105.0
  assert pick([*rows, both])["variant"] == 1
  both["default_img_s_same_rounds"] = 98.0
  assert pick([*rows, both])["variant"] == 5
  assert pick(rows[1:]) is None


def test_a_variant_past_the_logits_bound_is_never_picked_or_combined():
  bound = gpu_ablation.MAX_LOGITS_ERR
  assert bound == 1e-2  # the documented bound on bf16 logits
  off = dict(
    _train_row(1, 130.0, xla={"xla_gpu_cudnn_gemm_fusion_level": "2"}),
    logits_rel_err="2.0e-02",
  )
  rows = [
    dict(_train_row(0, 100.0), what="train"),
    dict(off, what="train"),
    dict(_train_row(2, 103.0, {"kv_stacked": 1}), what="train"),
    dict(_train_row(3, 104.0, {"cudnn_multiple": 1}), what="train"),
  ]
  assert gpu_ablation.pick_levers(rows)["variant"] == 3
  assert gpu_ablation.combine_winners(rows)["of"] == [2, 3]
  # Unmeasured is not within the bound either; the bound itself is.
  for err, ok in (
    ("", False),
    ("nan", False),
    (None, False),
    ("1.0e-02", True),
  ):
    row = dict(off, logits_rel_err=err)
    assert gpu_ablation.within_error_bound(row) is ok, err
  assert not gpu_ablation.within_error_bound({})


def test_pick_lines_are_what_the_gpu_script_reads(tmp_path):
  import json

  row = dict(
    _train_row(1, 110.0, {"kv_stacked": 1, "cudnn_multiple": 1}),
    xla_options={"xla_gpu_graph_min_graph_size": "1"},
    what="train",
  )
  default = dict(_train_row(0, 100.0), what="train")
  path = tmp_path / "ablation.json"
  path.write_text(json.dumps({"rows": [default, row]}))
  assert gpu_ablation.pick_lines(str(path)) == [
    "kv_stacked=1,cudnn_multiple=1",
    "--config.model.kv_stacked=True --config.model.cudnn_multiple=1",
    "--xla_gpu_graph_min_graph_size=1",
  ]
  assert gpu_ablation.pick_lines(str(path), margin=0.2) == ["-", "-", "-"]
  path.write_text(json.dumps({"rows": []}))
  assert gpu_ablation.pick_lines(str(path)) == ["-", "-", "-"]


def test_time_per_image_interpolates_and_never_extrapolates_downwards():
  e2e_bench = pytest.importorskip("e2e_bench")
  t = e2e_bench.time_per_image("0:1000,10:800,100:500")
  assert t(0) == pytest.approx(1e-3)
  assert t(55) == pytest.approx((1 / 800 + 1 / 500) / 2)
  assert t(200) == pytest.approx(1 / 500 + (1 / 500 - 1 / 800) * 100 / 90)
  # A faster rate at more prompts (noise on a tiny model) projects flat.
  noisy = e2e_bench.time_per_image("0:1000,3:900,10:950")
  assert noisy(200) == pytest.approx(1 / 950)
  assert e2e_bench.time_per_image("10:800")(100) == pytest.approx(1 / 800)


def test_gpu_table_marks_a_variant_past_the_logits_bound(tmp_path):
  import json

  gpu_table = pytest.importorskip("gpu_table")
  (tmp_path / "ablation").mkdir()
  rows = [
    dict(_train_row(0, 100.0), name="default", what="train"),
    dict(_train_row(1, 130.0, err="2.0e-02"), name="flagged", what="train"),
  ]
  (tmp_path / "ablation" / "ablation.json").write_text(
    json.dumps({"rows": rows})
  )
  table = gpu_table.main(str(tmp_path))
  assert "cut off" not in table  # no "complete" key: an older file
  assert "| default | 100 |  | 8.1e-03 |" in table
  assert "| flagged | 130 |  | 2.0e-02 (over 0.01: never picked) |" in table
  (tmp_path / "ablation" / "ablation.json").write_text(
    json.dumps({"rows": rows, "complete": False})
  )
  assert "The ablation was cut off" in gpu_table.main(str(tmp_path))


def test_gpu_table_falls_back_to_the_bench_rows_a_cut_off_run_streamed(
  tmp_path,
):
  import json

  gpu_table = pytest.importorskip("gpu_table")
  row = dict(
    model="B/16",
    batch=128,
    prompts=100,
    path="kv",
    what="train",
    mode="jit",
    img_s=4552.87,
    device="gpu:NVIDIA H200",
  )
  peer = dict(
    impl="torch-peer+compile", prompts=100, path="kv", what="train", img_s=4017
  )
  (tmp_path / "peer_compile.jsonl").write_text(json.dumps(peer) + "\n")
  (tmp_path / "bench.jsonl").write_text(
    "peak matmul (8192^2, bfloat16): 645723.2 GFLOP/s\n"
    + json.dumps(row)
    + "\n| model | prompts |\n"
  )
  table = gpu_table.main(str(tmp_path))
  assert "| train step, 100 prompts | 4,553 | – | 4,017 | – | 1.13× | – |" in (
    table
  )
  assert "cut off before it wrote `bench/bench.json`" in table
  bench, from_log = gpu_table._bench(str(tmp_path))
  assert from_log and bench["peak_matmul_gflop_s"] == 645723.2
  # A whole run's bench.json wins over the log.
  (tmp_path / "bench").mkdir()
  (tmp_path / "bench" / "bench.json").write_text(
    json.dumps({"rows": [dict(row, img_s=4000.0)]})
  )
  table = gpu_table.main(str(tmp_path))
  assert "| 4,000 |" in table and "cut off" not in table


def test_e2e_run_past_its_bound_is_killed_and_says_so(tmp_path):
  e2e_bench = pytest.importorskip("e2e_bench")
  log = tmp_path / "tune.log"
  # The process is still importing JAX after half a second.
  wall, rc = e2e_bench.run_main(
    "configs/vtab.py", str(tmp_path / "w"), [], str(log), timeout_s=0.5
  )
  assert rc == 124 and wall < 30
  assert "killed after 0 s (--deadline_s)" in log.read_text()


def test_e2e_skips_the_runs_past_its_deadline_and_writes_its_files(tmp_path):
  import json
  import subprocess

  here = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
  out = tmp_path / "e2e"
  proc = subprocess.run(
    [
      sys.executable,
      "e2e_bench.py",
      f"--out={out}",
      "--model=tiny32",
      "--image_size=32",
      "--px=40",
      "--train=20",
      "--test=10",
      "--dtype=float32",
      "--deadline_s=1",  # making the task and backbone outlasts it
    ],
    cwd=here,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert "tune skipped:" in proc.stdout and "final skipped:" in proc.stdout
  assert proc.returncode == 1, proc.stdout + proc.stderr  # runs not done
  report = json.loads((out / "e2e.json").read_text())
  assert report["tune"]["rc"] == 124 and report["final"]["rc"] == 124
  assert report["complete"] is True and "projection" not in report
  assert "skipped: past --deadline_s" in (out / "final.log").read_text()


def test_gpu_table_says_when_the_end_to_end_run_was_cut_off(tmp_path):
  import json

  gpu_table = pytest.importorskip("gpu_table")
  (tmp_path / "e2e").mkdir()
  report = dict(
    task="dtd",
    prompts=10,
    step_img_s=None,
    tune={"rc": 0, "sustained_member_img_per_s": 4649.0},
    final={"rc": None},
    complete=False,
  )
  path = tmp_path / "e2e" / "e2e.json"
  path.write_text(json.dumps(report))
  table = gpu_table.main(str(tmp_path))
  assert "the vmapped grid 4,649 member-img/s. The final run was cut off" in (
    table
  )
  path.write_text(json.dumps(dict(report, complete=True)))
  assert "cut off" not in gpu_table.main(str(tmp_path))
