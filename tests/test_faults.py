"""Faults survived, each resumed to prompts bit-identical to no fault.

kill -9 at five points, SIGINT and SIGTERM at every stage, a damaged
checkpoint, a full disk, two runs on one workdir; the comparison is with an
uninterrupted run (CPU, jit).

The fault cases are `benchmarks/fault_sweep.py`'s (``FAULTS``), which
also runs them end to end through the CLI for the figures; here the
crashed runs are CLI processes killed by `vptpc.faults`, and the
references and resumes run in-process (jit on one CPU device gives the
same bits in both).
"""

import errno
import importlib.util
import logging
import os
import signal
import subprocess
import sys

import pytest
from test_train import ROOT

from vptpc import faults, lifecycle, preflight, protocol, rundir, stops, train


def _sweep():
  spec = importlib.util.spec_from_file_location(
    "fault_sweep", os.path.join(ROOT, "benchmarks", "fault_sweep.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


fs = _sweep()


def _key(case):
  return repr(sorted(case["overrides"].items()))


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_dir):
  """One uninterrupted run per config of `FAULTS`, shared by the tests."""
  fs.ensure_data(data_dir)
  refs = {}
  for i, case in enumerate(fs.FAULTS):
    if _key(case) not in refs:
      refs[_key(case)] = str(tmp_path_factory.mktemp(f"ref{i}"))
      protocol.run(fs.config_of(case, data_dir), refs[_key(case)])
  return refs


def test_kill_9_at_five_points_resumes_bit_identically(
  tmp_path, data_dir, references
):
  refs = references
  for i, case in enumerate(fs.FAULTS):
    hit = str(tmp_path / f"hit{i}")
    # Eight CPU devices as in this process: the crashed run then reads the
    # programs this process compiled from the persistent compilation cache.
    out = subprocess.run(
      [sys.executable, "-m", "vptpc.main", *fs.cli_args(case, data_dir, hit)],
      cwd=ROOT,
      env={**os.environ, **case["fault"], "VPTPC_CPU_DEVICES": "8"},
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert out.returncode == -signal.SIGKILL, (case["kind"], out.stderr[-3000:])
    assert os.path.exists(os.path.join(hit, rundir.LOCK))  # left by kill -9
    protocol.run(fs.config_of(case, data_dir), hit)
    ref = refs[repr(sorted(case["overrides"].items()))]
    assert fs.same_exports(ref, hit, case["exports"]), case["kind"]
    assert not os.path.exists(os.path.join(hit, rundir.LOCK))
  # The grid resumed at its second chunk: the first one's result was kept.
  assert (tmp_path / "hit3" / "tune" / "lr1_wd0" / "results.json").exists()


@pytest.mark.parametrize("signame", ["INT", "TERM"])
def test_a_signal_at_every_stage_stops_cleanly_and_resumes_bit_identically(
  tmp_path, data_dir, references, monkeypatch, signame
):
  # In-process: the signal reaches this process's handlers (`stops`).
  cases = [c for c in fs.stop_cases() if c["kind"].startswith(f"SIG{signame}")]
  assert len(cases) == len(fs.STAGES)
  for i, case in enumerate(cases):
    hit = str(tmp_path / f"hit{i}")
    faults._hits.clear()
    monkeypatch.setenv(faults.ENV, case["fault"][faults.ENV])
    with pytest.raises(stops.Stopped) as e:
      protocol.run(fs.config_of(case, data_dir), hit)
    monkeypatch.delenv(faults.ENV)
    assert e.value.exit_status == case["status"], case["kind"]
    assert e.value.line().startswith(f"stopped by SIG{signame} "), e.value
    assert "Run the same command to resume." in e.value.line()
    assert not os.path.exists(os.path.join(hit, rundir.LOCK)), case["kind"]
    if case["fault"][faults.ENV].startswith(("train", "save")):
      # The step the signal came at has its checkpoint.
      assert "checkpoint at step" in e.value.kept, e.value.line()
    if case["fault"][faults.ENV].startswith("grid"):
      # The grid job kept its state at the epoch it stopped at.
      assert "state is written" in e.value.kept, e.value.line()
    protocol.run(fs.config_of(case, data_dir), hit)
    assert fs.same_exports(references[_key(case)], hit, case["exports"]), case[
      "kind"
    ]
  # Handlers are put back once the runs are over.
  assert signal.getsignal(signal.SIGTERM) is not stops._handler


def test_the_cli_prints_one_line_and_exits_128_plus_the_signal(
  tmp_path, data_dir
):
  # SIGINT here; SIGTERM's 143 through the CLI is tests/test_distributed.py's.
  signame, status = "INT", 130
  fs.ensure_data(data_dir)
  case = fs.FAULTS[0]
  w = str(tmp_path / "w")
  out = subprocess.run(
    [sys.executable, "-m", "vptpc.main", *fs.cli_args(case, data_dir, w)],
    cwd=ROOT,
    env={
      **os.environ,
      faults.ENV: f"train:1@{signame}",
      "VPTPC_CPU_DEVICES": "8",
    },
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == status, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  lines = [ln for ln in out.stderr.splitlines() if ln.startswith("stopped")]
  assert lines == [
    f"stopped by SIG{signame} in training at step 2 of 4 ({w}); its "
    "checkpoint at step 2 is written. Run the same command to resume."
  ]
  assert not os.path.exists(os.path.join(w, rundir.LOCK))
  assert os.listdir(os.path.join(w, "checkpoints")) == ["2"]


def test_a_second_signal_stops_at_once(tmp_path):
  script = (
    "import os, signal, time\n"
    "from vptpc import stops\n"
    "with stops.handling(), stops.deferred():\n"
    "  os.kill(os.getpid(), signal.SIGTERM)\n"
    "  assert stops.pending() == signal.SIGTERM\n"
    "  os.kill(os.getpid(), signal.SIGINT)\n"
    "  time.sleep(5)\n"
    "print('not reached')\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True
  )
  assert out.returncode == 130, out.stderr
  assert "not reached" not in out.stdout
  assert out.stderr.startswith("stopped at once by a second SIGINT")


def test_a_signal_outside_a_loop_raises_at_once_with_the_stage():
  with stops.handling():
    with pytest.raises(stops.Stopped) as e:
      with stops.stage("while testing"):
        os.kill(os.getpid(), signal.SIGTERM)
  assert e.value.exit_status == 143
  assert e.value.line() == (
    "stopped by SIGTERM while testing. Run the same command to resume."
  )
  assert stops.pending() is None


def _case(name):
  return next(c for c in fs.MORE_FAULTS if c["kind"] == name)


def test_damaged_latest_checkpoint_is_named_and_the_previous_used(
  tmp_path, data_dir, caplog
):
  case = _case("corrupted latest checkpoint")  # 3 epochs of 2 steps
  ref, hit = str(tmp_path / "ref"), str(tmp_path / "hit")
  train.train_and_evaluate(fs.config_of(case, data_dir), ref)
  part = train.train_and_evaluate(
    fs.config_of(case, data_dir), hit, stop_after_steps=4
  )
  assert part == {"stopped_at_step": 4}
  fs.corrupt_checkpoint(hit, 4)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(fs.config_of(case, data_dir), hit)
  warned = [
    r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()
  ]
  assert len(warned) == 1, caplog.text
  assert "Checkpoint step 4" in warned[0] and "step 2 is used" in warned[0]
  assert os.path.isdir(os.path.join(hit, "checkpoints_bad", "4"))
  assert fs.same_exports(ref, hit, case["exports"])


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(
  tmp_path, data_dir, monkeypatch
):
  from orbax.checkpoint._src.path import async_path

  case = _case("disk full during a save")  # 2 epochs of 2 steps
  ref, hit = str(tmp_path / "ref"), str(tmp_path / "hit")
  train.train_and_evaluate(fs.config_of(case, data_dir), ref)
  train.train_and_evaluate(
    fs.config_of(case, data_dir), hit, stop_after_steps=2
  )

  async def full(path, *a, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

  monkeypatch.setattr(async_path, "write_text", full)
  with pytest.raises(OSError) as e:
    train.train_and_evaluate(fs.config_of(case, data_dir), hit)
  assert e.value.errno == errno.ENOSPC
  msg = str(e.value)
  assert "checkpoint step 4" in msg and "(step 2) is intact" in msg
  monkeypatch.undo()
  steps = sorted(
    int(d) for d in os.listdir(os.path.join(hit, "checkpoints")) if d.isdigit()
  )
  assert steps == [2]
  train.train_and_evaluate(fs.config_of(case, data_dir), hit)
  assert fs.same_exports(ref, hit, case["exports"])


def test_a_second_run_on_the_same_workdir_refuses(tmp_path, data_dir, caplog):
  c = fs.config_of(fs.FAULTS[0], data_dir)
  w = str(tmp_path / "w")
  os.makedirs(w)
  holder = fs.hold_lock(w)
  try:
    with pytest.raises(preflight.PreflightError) as e:
      train.train_and_evaluate(c, w)
    msg = str(e.value)
    assert f"pid {holder.pid} on host" in msg and "in use" in msg
    with pytest.raises(rundir.WorkdirLocked, match=f"pid {holder.pid}"):
      rundir.acquire(w)
    assert sorted(os.listdir(w)) == [rundir.LOCK]  # nothing else written
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The holder died without cleaning up: its lock is taken over, named.
  with caplog.at_level(logging.WARNING):
    rundir.acquire(w)
  assert f"stale lock of pid {holder.pid}" in caplog.text
  assert rundir.read_lock(w)["pid"] == os.getpid()
  rundir.release(w)
  assert not os.path.exists(os.path.join(w, rundir.LOCK))


def test_the_lock_is_also_a_lease_for_filesystems_without_shared_flock(
  tmp_path, monkeypatch, caplog
):
  import json
  import time

  w = tmp_path / "w"
  w.mkdir()
  lock = w / rundir.LOCK
  # Another host's live record, though its flock did not reach us (as on
  # NFS mounted nolock): refused, named, the record left alone.
  other = {"pid": 4242, "host": "other-host", "since": time.time()}
  lock.write_text(json.dumps(other))
  with pytest.raises(rundir.WorkdirLocked, match="other-host.*touched"):
    rundir.acquire(str(w))
  assert rundir.holder(str(w))["host"] == "other-host"  # preflight's view
  assert json.loads(lock.read_text()) == other
  # Its heartbeat stopped LEASE_S ago: a dead run's, taken over.
  old = time.time() - rundir.LEASE_S - 5
  os.utime(lock, (old, old))
  assert rundir.holder(str(w)) is None
  monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
  with caplog.at_level(logging.WARNING):
    rundir.acquire(str(w))
  try:
    assert "stale lock of pid 4242 on host other-host" in caplog.text
    rec = json.loads(lock.read_text())
    assert rec["pid"] == os.getpid() and rec["token"]
    os.utime(lock, (old, old))
    time.sleep(0.3)
    assert time.time() - os.stat(lock).st_mtime < 1  # the heartbeat
  finally:
    rundir.release(str(w))
  assert not lock.exists()
  # Read back after writing: another host's record landed after ours.
  monkeypatch.setattr(
    rundir, "_read_back", lambda p: {"pid": 7, "host": "h2", "token": "x"}
  )
  with pytest.raises(rundir.WorkdirLocked, match="pid 7 on host h2"):
    rundir.acquire(str(w))
  assert os.path.realpath(w) not in rundir._HELD


def test_a_url_workdir_or_checkpoint_is_refused_up_front(tmp_path, monkeypatch):
  from test_train import tiny_config

  monkeypatch.chdir(tmp_path)
  c = tiny_config()
  c.data.data_dir = str(tmp_path / "tfds")
  c.model.checkpoint_path = "gs://b/ViT-B_16.npz"
  with pytest.raises(preflight.PreflightError) as e:
    protocol.run(c, "gs://bucket/runs/x")
  text = "\n".join(e.value.problems)
  assert e.value.problems[0].startswith("--workdir=gs://bucket/runs/x is a")
  assert "local directory named 'gs:'" in text and "gcsfuse" in text
  assert "checkpoint_path='gs://b/ViT-B_16.npz' is a URL" in text
  assert os.listdir(tmp_path) == []  # no ./gs:/bucket/runs/x
  # A URL data_dir is named too (the readers open local files), and the
  # suite and pretraining commands refuse a URL workdir the same way.
  c.data.data_dir = "gs://b/tfds"
  with pytest.raises(preflight.PreflightError) as e:
    protocol.run(c, str(tmp_path / "w"))
  assert any(
    "config.data.data_dir=gs://b/tfds is a URL" in p for p in e.value.problems
  )

  with pytest.raises(preflight.PreflightError, match="--workdir=gs://b/s is a"):
    lifecycle.local_workdir("gs://b/s")
  assert os.listdir(tmp_path) == []
