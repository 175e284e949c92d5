"""The GPU script's whole-run deadline, on the CPU, without running a model.

`benchmarks/device_check.sh` must end (table and packed files written)
before the device tool's per-command limit however slow a stage is: each
stage's timeout is cut to what is left of TOTAL_S, and a stage with too
little left is skipped.
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
