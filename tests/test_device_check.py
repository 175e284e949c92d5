"""The GPU script's deadlines, on the CPU.

`benchmarks/device_check.sh` must end (table and packed files written)
before the device tool's per-command limit however slow a stage is: each
stage's timeout is cut to what is left of TOTAL_S, and a stage with too
little left is skipped. Inside its stage, `benchmarks/gpu_ablation.py`
skips the phases that would pass its own deadline and keeps its rows on
disk after every phase, so a timeout never takes the measured rows with
it (tiny test model).
"""

import os
import re
import subprocess
import sys
import tarfile

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(tmp_path, **env):
  out = tmp_path / "out"
  full = dict(
    os.environ,
    OUT=str(out),
    DRY="1",
    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
  )
  full.update({k: str(v) for k, v in env.items()})
  proc = subprocess.run(
    ["bash", "benchmarks/device_check.sh", "none"],
    cwd=ROOT,
    env=full,
    capture_output=True,
    text=True,
    timeout=120,
  )
  return proc, out


def test_stages_past_the_deadline_are_skipped_and_the_files_still_written(
  tmp_path,
):
  proc, out = _run(tmp_path, STAGES="bench e2e", TOTAL_S=25, TABLE_S=20)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  log = (out / "log.txt").read_text()
  assert "vpt_bench skipped:" in log and "e2e skipped:" in log
  assert (out / "table.md").exists()
  with tarfile.open(out / "runs.tgz") as tar:
    assert tar.getnames()


def test_a_stage_timeout_is_cut_to_what_is_left(tmp_path):
  # FLAGS_S asks for 60 s, but only TOTAL_S - TABLE_S = 20 s are left; the
  # unknown flag makes the stage's process fail at once.
  proc, out = _run(
    tmp_path,
    STAGES="flags",
    TOTAL_S=1000,
    TABLE_S=980,
    MIN_STAGE_S=1,
    FLAGS_S=60,
    FLAG_SETS="--xla_vptpc_no_such_flag=1",
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  log = (out / "log.txt").read_text()
  bound = re.search(r"flags\[0\] \((\d+)s\)", log)
  assert bound, log
  assert 1 <= int(bound.group(1)) <= 20
  # The set's failure is reported as its row, and the run goes on to the table.
  assert re.search(r'"set": 0, .*"rc": [1-9]', log), log
  assert (out / "table.md").exists()


def _ablation(out, *args):
  """`gpu_ablation.py` on the tiny test model, as the CPU dry run calls it."""
  return subprocess.Popen(
    [
      sys.executable,
      "gpu_ablation.py",
      f"--out={out}",
      "--model=testing",
      "--image_size=32",
      "--batch=4",
      "--prompts=3",
      "--iters=2",
      "--eval_variants=",
      *args,
    ],
    cwd=os.path.join(ROOT, "benchmarks"),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _variants_of(path):
  import json

  with open(path) as f:
    saved = json.load(f)
  return saved, [r["variant"] for r in saved["rows"] if r["what"] == "train"]


def test_the_ablation_skips_what_would_pass_its_deadline(tmp_path):
  # Set-up alone (imports, the float32 reference) outlasts 1 s: only the
  # default runs, every later phase says it was skipped, the files are
  # written.
  proc = _ablation(
    tmp_path,
    "--variants=auto:1,auto:1:kv_stacked=1,auto:1:cudnn_multiple=2",
    "--combine_margin=-1",
    "--profile=-1",
    "--profile_eval=0",
    "--deadline_s=1",
  )
  log, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, log
  for phase in ("variant 1 and later", "the timing rounds", "the profile"):
    assert f"{phase} skipped:" in log, log
  saved, variants = _variants_of(tmp_path / "ablation.json")
  assert variants == [0] and saved["complete"] is True
  assert (tmp_path / "ablation.md").exists()


def test_a_killed_ablation_keeps_the_rows_it_measured(tmp_path):
  import signal

  proc = _ablation(
    tmp_path,
    "--variants=" + ",".join(["auto:1", "auto:1:kv_stacked=1"] * 4),
  )
  lines = []
  for line in proc.stdout:  # the second variant's row: the first is saved
    lines.append(line)
    if line.startswith('{"variant": 1,'):
      break
  proc.send_signal(signal.SIGTERM)  # what `timeout` sends
  proc.communicate(timeout=60)
  assert proc.returncode != 0, "".join(lines)
  saved, variants = _variants_of(tmp_path / "ablation.json")
  assert variants[0] == 0 and saved["complete"] is False, variants
