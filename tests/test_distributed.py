"""Two processes x 2 CPU devices train like one process x 4 devices.

Also when a SIGTERM reaches one of them mid-run and they resume.
"""

import os
import re
import socket
import subprocess
import sys

import numpy as np

from vptpc import prompts as pr
from vptpc.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240  # every wait is bounded; a hang fails the test, not the suite


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _cmd(workdir, data_dir):
  return [
    sys.executable,
    "-m",
    "vptpc.main",
    "--config=configs/tiny.py:epochs=2,parallel=pmap",
    f"--config.data.data_dir={data_dir}",
    "--config.data.train_split=train[:256]",
    "--config.data.eval_split=test[:100]",
    "--config.checkpoint_every_steps=3",
    "--config.progress_bar=False",
    f"--workdir={workdir}",
  ]


def _run_all(procs, status=0):
  try:
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == status, err[-3000:]
  return outs


def _two_processes(workdir, data_dir, fault_on_1="", status=0):
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(
      os.environ,
      VPTPC_DISTRIBUTED="1",
      VPTPC_COORDINATOR=f"localhost:{port}",
      VPTPC_NUM_PROCESSES="2",
      VPTPC_PROCESS_ID=str(i),
      VPTPC_CPU_DEVICES="2",
    )
    if i == 1 and fault_on_1:
      env["VPTPC_FAULT"] = fault_on_1
    procs.append(
      subprocess.Popen(
        _cmd(workdir, data_dir),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  return _run_all(procs, status)


def test_two_processes_match_one_process_with_four_devices(tmp_path, data_dir):
  sources.prepare_local("vptpc_toy", data_dir)
  ref = subprocess.Popen(
    _cmd(tmp_path / "ref", data_dir),
    cwd=ROOT,
    env=dict(os.environ, VPTPC_CPU_DEVICES="4"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  _run_all([ref])
  # SIGTERM reaches process 1 alone, after its second step: JAX's
  # preemption service picks a step both reach, and both stop there with
  # its checkpoint; the next run goes on from it.
  outs = _two_processes(
    tmp_path / "mp", data_dir, fault_on_1="train:2@TERM", status=143
  )
  where = [
    re.search(r"stopped by SIGTERM in training at step (\d+) of 8", err)
    for _, err in outs
  ]
  assert all(where), [err[-2000:] for _, err in outs]
  step = {m.group(1) for m in where}
  assert len(step) == 1 and int(next(iter(step))) < 8, step
  assert next(iter(step)) in os.listdir(tmp_path / "mp" / "checkpoints")
  _two_processes(tmp_path / "mp", data_dir)
  a, ha, _ = pr.load_prompts(tmp_path / "ref" / "prompts.npz")
  b, hb, _ = pr.load_prompts(tmp_path / "mp" / "prompts.npz")
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ha["kernel"], hb["kernel"], rtol=1e-5, atol=1e-6)
  import json

  ra = json.loads((tmp_path / "ref" / "results.json").read_text())
  rb = json.loads((tmp_path / "mp" / "results.json").read_text())
  assert ra["eval_examples"] == rb["eval_examples"] == 100
  assert ra["eval_accuracy"] == rb["eval_accuracy"]
  # Only process 0 wrote outputs; both resumed from the shared checkpoints.
  assert (tmp_path / "mp" / "checkpoints").is_dir()
  _two_processes(tmp_path / "mp", data_dir)
  rc = json.loads((tmp_path / "mp" / "results.json").read_text())
  assert rc["step"] == rb["step"] and rc["eval_accuracy"] == rb["eval_accuracy"]
