"""Fault and bad-input sweep: what a user gets when things go wrong.

  python benchmarks/fault_sweep.py --out=results/fault_sweep

Three tables, every case a real ``python -m vptpc.main`` (or
``python -m vptpc.serve``) process on tiny configs:

* **Bad inputs**: exit status, whether a traceback appeared, whether any
  file was written (the sandbox is listed before and after; the shared
  TFDS data_dir is outside it), the ``error:`` lines and the wall time to
  fail (interpreter and JAX start-up included).
* **Faults**: a run killed with SIGKILL at a named point
  (`vptpc.faults`), a full disk during a save, a corrupted latest
  checkpoint, a second run on a held workdir; each then resumed with the
  same command, and its exported prompts compared bit for bit with an
  uninterrupted run of the same command.
* **Clean stops**: SIGINT and SIGTERM at each stage of a run (`STAGES`:
  training, a checkpoint save, the condensation, the PC fine-tune, a
  vmapped grid, between final seeds), sent by the process itself at a
  named point, and one SIGTERM sent from outside; the exit status (130 or
  143), the one line printed, then the same command's resume, compared bit
  for bit as above.

Writes ``sweep.json`` and ``table.md`` to ``--out`` and prints the tables
(``--only`` re-runs one table and keeps the others).
``tests/test_faults.py`` runs the same fault and stop cases (`FAULTS`,
`stop_cases`), with the references and resumes in-process.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's vptpc, as the CLI runs get
TINY = "configs/tiny.py:epochs=2,parallel=jit"
# 128 training images at batch 64: 2 steps an epoch, a checkpoint every 2.
COMMON = {
  "data.train_split": "train[:128]",
  "data.eval_split": "test[:64]",
  "checkpoint_every_steps": 2,
}
SPLITS = ("train[:128]", "test[:64]")
# Where rows without a ``run_at`` were measured (the sweep's first run).
FIRST_RUN = "b13588e"

FAULTS = [
  {
    "kind": "kill -9 before the first checkpoint",
    "fault": {"VPTPC_FAULT": "train:1"},
    "overrides": {},
    "exports": ["prompts.npz"],
  },
  {
    "kind": "kill -9 during a checkpoint save",
    "fault": {"VPTPC_FAULT": "save:2"},
    "overrides": {},
    "exports": ["prompts.npz"],
  },
  {
    "kind": "kill -9 in the PC fine-tune stage",
    "fault": {"VPTPC_FAULT": "train:4"},
    "overrides": {"condense.keep": 0.5, "condense.ft_epochs": 2},
    "exports": ["full/prompts.npz", "condensed/prompts.npz"],
  },
  {
    "kind": "kill -9 during a vmapped grid",
    "fault": {"VPTPC_FAULT": "grid_epoch:3"},
    "overrides": {
      "protocol.mode": "tune",
      "protocol.vmap": True,
      "protocol.vmap_chunk": 1,
      "protocol.lrs": (1.0, 0.1),
      "protocol.wds": (0.0,),
      "protocol.tune_splits": SPLITS,
    },
    "exports": ["tune/lr1_wd0/prompts.npz", "tune/lr0.1_wd0/prompts.npz"],
  },
  {
    "kind": "kill -9 in protocol final between seeds",
    "fault": {"VPTPC_FAULT": "final_seed:1"},
    "overrides": {
      "protocol.mode": "final",
      "protocol.seeds": (42, 44),
      "protocol.final_splits": SPLITS,
    },
    "exports": ["final/seed42/prompts.npz", "final/seed44/prompts.npz"],
  },
]
# Clean stops (`vptpc.stops`): SIGINT and SIGTERM at each stage of a run.
# The stage's config (the FAULTS case it shares) and where the signal lands.
STAGES = [
  {
    "stage": "training",
    "point": "train:1",
    "case": "kill -9 before the first checkpoint",
  },
  {
    "stage": "a checkpoint save",
    "point": "save:1",
    "case": "kill -9 during a checkpoint save",
  },
  {
    "stage": "condensation (scoring)",
    "point": "condense:1",
    "case": "kill -9 in the PC fine-tune stage",
  },
  {
    "stage": "the PC fine-tune",
    "point": "train:3",
    "case": "kill -9 in the PC fine-tune stage",
  },
  {
    "stage": "a vmapped grid",
    "point": "grid_epoch:1",
    "case": "kill -9 during a vmapped grid",
  },
  {
    "stage": "the final seeds (between seeds)",
    "point": "final_seed:1",
    "case": "kill -9 in protocol final between seeds",
  },
]
SIGNALS = {"INT": 130, "TERM": 143}


def stop_cases() -> list[dict]:
  """Every stage x signal: a FAULTS case with ``VPTPC_FAULT=<point>@<sig>``."""
  by_kind = {c["kind"]: c for c in FAULTS}
  out = []
  for st in STAGES:
    for sig, status in SIGNALS.items():
      base = by_kind[st["case"]]
      out.append(
        {
          **base,
          "kind": f"SIG{sig} during {st['stage']}",
          "fault": {"VPTPC_FAULT": f"{st['point']}@{sig}"},
          "status": status,
        }
      )
  return out


# Faults that end in an error line rather than a kill (sweep only).
MORE_FAULTS = [
  {
    "kind": "disk full during a save",
    "fault": {"VPTPC_FAULT_ENOSPC": "2"},
    "overrides": {},
    "exports": ["prompts.npz"],
  },
  {
    "kind": "corrupted latest checkpoint",
    "fault": {"VPTPC_FAULT": "train:3"},
    "overrides": {"total_epochs": 3},
    "exports": ["prompts.npz"],
    "corrupt": 4,
  },
]


def overrides(case: dict, data_dir: str) -> dict:
  """Every ``--config.`` override of a fault case."""
  return {**COMMON, "data.data_dir": data_dir, **case["overrides"]}


def cli_args(case: dict, data_dir: str, workdir: str) -> list[str]:
  """The ``python -m vptpc.main`` arguments of a fault case."""
  args = [f"--config={TINY}"]
  for k, v in overrides(case, data_dir).items():
    args.append(f"--config.{k}={v}")
  return args + [f"--workdir={workdir}"]


def config_of(case: dict, data_dir: str):
  """The same config in-process (what ``cli_args`` makes the CLI build)."""
  from vptpc import config_util

  c = config_util.load_config(os.path.join(ROOT, TINY))
  for k, v in overrides(case, data_dir).items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def run_cli(args: list[str], env: dict | None = None, module="vptpc.main"):
  """Runs the CLI; returns (returncode, stdout, stderr, seconds)."""
  t0 = time.perf_counter()
  out = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
    timeout=600,
    input="",
  )
  return out.returncode, out.stdout, out.stderr, time.perf_counter() - t0


def same_exports(a: str, b: str, exports: list[str]) -> bool:
  """Whether every array of the exports under ``a`` and ``b`` is identical."""
  for rel in exports:
    pa, pb = os.path.join(a, rel), os.path.join(b, rel)
    if not (os.path.exists(pa) and os.path.exists(pb)):
      return False
    with np.load(pa) as x, np.load(pb) as y:
      keys = [k for k in x.files if k != "__meta__"]
      if sorted(keys) != sorted(k for k in y.files if k != "__meta__"):
        return False
      for k in keys:
        if x[k].dtype != y[k].dtype or not np.array_equal(x[k], y[k]):
          return False
  return True


def corrupt_checkpoint(workdir: str, step: int) -> None:
  """Truncates every data file of checkpoint ``step`` to half its size."""
  for f in glob.glob(
    os.path.join(workdir, "checkpoints", str(step), "**", "*"), recursive=True
  ):
    if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)


def ensure_data(data_dir: str) -> None:
  """Generates vptpc_toy once, so that no case pays (or races) for it."""
  from vptpc.data import sources

  sources.prepare_local("vptpc_toy", data_dir)


def _tb(text: str) -> bool:
  return "Traceback" in text


def fault_rows(tmp: str, data_dir: str) -> list[dict]:
  """Every fault case through the CLI: crash, resume, compare."""
  rows = []
  for case in FAULTS + MORE_FAULTS:
    name = case["kind"].replace(" ", "_").replace("-", "")
    ref, hit = os.path.join(tmp, name, "ref"), os.path.join(tmp, name, "hit")
    rc_ref, *_ = run_cli(cli_args(case, data_dir, ref))
    rc1, _, err1, _ = run_cli(cli_args(case, data_dir, hit), case["fault"])
    note = ""
    if "corrupt" in case:
      corrupt_checkpoint(hit, case["corrupt"])
    rc2, _, err2, _ = run_cli(cli_args(case, data_dir, hit))
    if "corrupt" in case:
      warned = [ln for ln in err2.splitlines() if "is unreadable" in ln]
      note = "warning: " + (
        warned[0].split("] ", 1)[-1][:90] if warned else "NONE"
      )
    elif rc1 == 2:
      errs = [ln for ln in err1.splitlines() if ln.startswith("error:")]
      note = errs[0][:110] if errs else ""
    if "stale lock" in err2:
      note = (note + "; " if note else "") + "stale lock taken over"
    rows.append(
      {
        "kind": case["kind"],
        "fault": " ".join(f"{k}={v}" for k, v in case["fault"].items()),
        "reference_exit": rc_ref,
        "crash_exit": rc1,
        "crash_traceback": _tb(err1),
        "resume_exit": rc2,
        "resume_traceback": _tb(err2),
        "bit_identical": rc_ref == 0
        and rc2 == 0
        and same_exports(ref, hit, case["exports"]),
        "note": note,
      }
    )
    print(rows[-1], flush=True)
  rows.append(lock_row(tmp, data_dir))
  print(rows[-1], flush=True)
  return rows


def _stop_lines(err: str) -> list[str]:
  """The stop lines a run printed (`vptpc.stops.Stopped.line`)."""
  return [ln for ln in err.splitlines() if ln.startswith("stopped ")]


def stop_rows(tmp: str, data_dir: str) -> list[dict]:
  """Every stage x signal through the CLI: stop, resume, compare.

  Plus one SIGTERM sent from outside, as a scheduler would, while the first
  stage trains.
  """
  rows, refs = [], {}
  for case in stop_cases():
    key = repr(sorted(case["overrides"].items()))
    name = case["kind"].replace(" ", "_").replace("(", "").replace(")", "")
    hit = os.path.join(tmp, "stops", name)
    if key not in refs:
      refs[key] = os.path.join(tmp, "stops", f"ref{len(refs)}")
      rc, *_ = run_cli(cli_args(case, data_dir, refs[key]))
      assert rc == 0, case["kind"]
    rc1, _, err1, _ = run_cli(cli_args(case, data_dir, hit), case["fault"])
    rc2, _, err2, _ = run_cli(cli_args(case, data_dir, hit))
    lines = _stop_lines(err1)
    rows.append(
      {
        "kind": case["kind"],
        "fault": f"VPTPC_FAULT={case['fault']['VPTPC_FAULT']}",
        "stop_exit": rc1,
        "expected_exit": case["status"],
        "stop_lines": len(lines),
        "error_lines": sum(ln.startswith("error:") for ln in err1.splitlines()),
        "traceback": _tb(err1) or _tb(err2),
        "resume_exit": rc2,
        "bit_identical": rc2 == 0
        and same_exports(refs[key], hit, case["exports"]),
        "line": lines[0] if lines else "",
        "signal_to_exit_s": None,
        "run_at": _commit(),
      }
    )
    print(rows[-1], flush=True)
  rows.append(external_term_row(tmp, data_dir, refs))
  print(rows[-1], flush=True)
  return rows


def external_term_row(tmp: str, data_dir: str, refs: dict) -> dict:
  """SIGTERM from outside once the first progress line is out; resume."""
  case = {**FAULTS[0], "overrides": {"total_epochs": 6}}
  hit = os.path.join(tmp, "stops", "external")
  ref = os.path.join(tmp, "stops", "external_ref")
  rc, *_ = run_cli(cli_args(case, data_dir, ref))
  proc = subprocess.Popen(
    [sys.executable, "-m", "vptpc.main", *cli_args(case, data_dir, hit)],
    cwd=ROOT,
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT},
  )
  err = []
  for ln in proc.stderr:
    err.append(ln)
    if ln.startswith("step "):
      t0 = time.perf_counter()
      proc.send_signal(signal.SIGTERM)
      break
  err += proc.stderr.readlines()
  proc.wait()
  took = time.perf_counter() - t0
  rc2, _, err2, _ = run_cli(cli_args(case, data_dir, hit))
  lines = _stop_lines("".join(err))
  return {
    "kind": "SIGTERM from outside during training",
    "fault": "kill -TERM <pid> after the first progress line",
    "stop_exit": proc.returncode,
    "expected_exit": 143,
    "stop_lines": len(lines),
    "error_lines": sum(ln.startswith("error:") for ln in err),
    "traceback": _tb("".join(err)) or _tb(err2),
    "resume_exit": rc2,
    "bit_identical": rc == 0
    and rc2 == 0
    and same_exports(ref, hit, case["exports"]),
    "line": lines[0] if lines else "",
    "signal_to_exit_s": round(took, 1),
    "run_at": _commit(),
  }


HOLD = (
  "import sys, time; from vptpc import rundir; rundir.acquire(sys.argv[1]); "
  "print('locked', flush=True); time.sleep(600)"
)


def hold_lock(workdir: str) -> subprocess.Popen:
  """A process that holds ``workdir``'s lock until killed."""
  p = subprocess.Popen(
    [sys.executable, "-c", HOLD, workdir],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT},
  )
  assert p.stdout.readline().strip() == "locked"
  return p


def lock_row(tmp: str, data_dir: str) -> dict:
  """Two runs on one workdir: the second refuses; a dead holder's is taken."""
  case = FAULTS[0]
  ref = os.path.join(tmp, "lock", "ref")
  hit = os.path.join(tmp, "lock", "hit")
  run_cli(cli_args(case, data_dir, ref))
  holder = hold_lock(hit)
  before = _listing(hit)
  rc1, _, err1, _ = run_cli(cli_args(case, data_dir, hit))
  unchanged = _listing(hit) == before
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  rc2, _, err2, _ = run_cli(cli_args(case, data_dir, hit))
  errs = [ln for ln in err1.splitlines() if ln.startswith("error:")]
  return {
    "kind": "second run on a held workdir",
    "fault": "a live process holds the lock",
    "reference_exit": 0,
    "crash_exit": rc1,
    "crash_traceback": _tb(err1),
    "resume_exit": rc2,
    "resume_traceback": _tb(err2),
    "bit_identical": rc2 == 0 and same_exports(ref, hit, case["exports"]),
    "note": (errs[0][:100] if errs else "")
    + ("; workdir untouched" if unchanged else "; WORKDIR CHANGED")
    + ("; stale lock taken over" if "stale lock" in err2 else ""),
  }


def _listing(path: str) -> dict:
  out = {}
  for d, _, fs in os.walk(path):
    for f in fs:
      p = os.path.join(d, f)
      out[os.path.relpath(p, path)] = os.path.getsize(p)
  return out


# ------------------------------------------------------------- bad inputs


def _folder(root: str, labels, *, missing=(), corrupt=()) -> None:
  from PIL import Image

  os.makedirs(os.path.join(root, "images"))
  rng = np.random.default_rng(0)
  lines = []
  for i, lab in enumerate(labels):
    rel = f"images/{i}.png"
    if i in corrupt:
      with open(os.path.join(root, rel), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image")
    elif i not in missing:
      arr = rng.integers(0, 255, (40, 40, 3), np.uint8)
      Image.fromarray(arr).save(os.path.join(root, rel))
    lines.append(f"{rel} {lab}\n")
  for s in ("train", "test"):
    with open(os.path.join(root, f"{s}.txt"), "w") as f:
      f.writelines(lines)


def _folder_args(root: str, w: str, classes: int = 4) -> list[str]:
  return [
    f"--config={TINY}",
    "--config.data.source=folder",
    f"--config.data.folder={root}",
    "--config.data.train_split=train",
    "--config.data.eval_split=test",
    f"--config.data.num_classes={classes}",
    f"--workdir={w}",
  ]


def _serve_setup(box: str) -> list[str]:
  """A prompts file for the embedded backbone, and request lines."""
  import jax
  from PIL import Image

  from vptpc import assets, checkpoint, prompts
  from vptpc.models import vit

  model = vit.create_model(assets.DEFAULT_MODEL, num_classes=None)
  template = vit.split_head(vit.init_params(model, jax.random.key(0), 32))[0]
  backbone = checkpoint.load_pretrained(assets.path(), template)
  p = prompts.init_prompts(
    jax.random.key(0),
    num_prompts=2,
    hidden_size=model.hidden_size,
    patch_size=model.patch_size,
    num_layers=model.num_layers,
  )
  head = {
    "kernel": np.zeros((model.hidden_size, 3), np.float32),
    "bias": np.zeros(3, np.float32),
  }
  prompts.save_prompts(os.path.join(box, "t.npz"), p, head, backbone=backbone)
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(
    os.path.join(box, "ok.png")
  )
  with open(os.path.join(box, "bad.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not an image")
  with open(os.path.join(box, "bad_prompts.npz"), "wb") as f:
    f.write(os.urandom(2048))
  return [f"--task=t={os.path.join(box, 't.npz')}"]


def _tiny32_shapes() -> dict:
  """vit_jax keys and shapes of the ``tiny32`` backbone (no init run)."""
  import jax

  from vptpc import npz_checkpoint
  from vptpc.models import vit

  model = vit.create_model("tiny32", num_classes=None)
  shapes = jax.eval_shape(
    lambda r: vit.init_params(model, r, 32), jax.random.key(0)
  )
  flat = npz_checkpoint.flatten(vit.split_head(shapes)[0])
  return {k: v.shape for k, v in flat.items()}


def _jpeg_folder(root: str, n_train: int, n_test: int) -> str:
  """48-px JPEG folder dataset (4 classes); returns test image 5's path."""
  from PIL import Image

  os.makedirs(os.path.join(root, "images"))
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("test", n_test)):
    lines = []
    for i in range(n):
      rel = f"images/{split}{i}.jpg"
      arr = rng.integers(0, 255, (48, 48, 3), np.uint8)
      Image.fromarray(arr).save(os.path.join(root, rel))
      lines.append(f"{rel} {i % 4}\n")
    with open(os.path.join(root, f"{split}.txt"), "w") as f:
      f.writelines(lines)
  return os.path.join(root, "images", "test5.jpg")


# (file, good bytes) of the images a case corrupted, for `_fix_and_resume`.
_FIXES: list[tuple[str, bytes]] = []


def _fix_and_resume(args, env, module) -> str:
  """Restores the corrupted image and runs the same command again."""
  for path, good in _FIXES:
    with open(path, "wb") as f:
      f.write(good)
  _FIXES.clear()
  rc, _, err, took = run_cli(args, env, module)
  return f"fixed, same command: exit {rc}, traceback {_tb(err)}, {took:.1f} s"


def bad_cases(data_dir: str) -> list[dict]:
  """(kind, precondition?, setup(box) -> (args, env, module, stdin))."""
  asset = os.path.join(ROOT, "vptpc", "assets", "fractal_vit_ti4.npz")

  def tiny(*extra, w="w"):
    return lambda box: (
      [
        f"--config={TINY}",
        f"--config.data.data_dir={data_dir}",
        *extra,
        f"--workdir={os.path.join(box, w)}",
      ],
      {},
      "vptpc.main",
      "",
    )

  def random_ckpt(box):
    with open(os.path.join(box, "random.npz"), "wb") as f:
      f.write(np.random.default_rng(0).bytes(5000))
    return tiny(f"--config.model.checkpoint_path={box}/random.npz")(box)

  def truncated_ckpt(box):
    data = open(asset, "rb").read()
    with open(os.path.join(box, "cut.npz"), "wb") as f:
      f.write(data[: len(data) // 2])
    return tiny(f"--config.model.checkpoint_path={box}/cut.npz")(box)

  def workdir_file(box):
    open(os.path.join(box, "afile"), "w").close()
    return tiny(w="afile")(box)

  def changed(box):
    w = os.path.join(box, "w")
    rc, *_ = run_cli(
      [
        f"--config={TINY}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.train_split=train[:64]",
        f"--workdir={w}",
      ]
    )
    assert rc == 0
    return tiny(
      "--config.data.train_split=train[:64]",
      "--config.base_lr=0.5",
      "--config.prompt.num_prompts=8",
    )(box)

  def held(box):
    w = os.path.join(box, "w")
    os.makedirs(w)
    box_holder = hold_lock(w)
    _HOLDERS.append(box_holder)
    return tiny()(box)

  def folder(labels, classes=4, **kw):
    def setup(box):
      root = os.path.join(box, "data")
      _folder(root, labels, **kw)
      return _folder_args(root, os.path.join(box, "w"), classes), {}, None, ""

    return setup

  def serve(lines_of, prompts_ok=True):
    def setup(box):
      args = _serve_setup(box)
      if not prompts_ok:
        args = [f"--task=t={os.path.join(box, 'bad_prompts.npz')}"]
      return args, {}, "vptpc.serve", "\n".join(lines_of(box)) + "\n"

    return setup

  def cpu8(box):
    args, *_ = tiny(
      "--config.batch_size=12",
      "--config.parallel=pmap",
      "--config.eval_batch_size=20",
    )(box)
    return args, {"VPTPC_CPU_DEVICES": "8"}, "vptpc.main", ""

  asset_model = "fractal-Ti/4"  # vptpc.assets.DEFAULT_MODEL

  def asset_run(box, *extra, fault=None):
    """A tiny run on a copy of the embedded backbone; its CLI arguments."""
    ckpt = os.path.join(box, "ckpt.npz")
    if not os.path.exists(ckpt):
      shutil.copy(asset, ckpt)
    args = [
      f"--config={TINY}",
      f"--config.data.data_dir={data_dir}",
      f"--config.model.name={asset_model}",
      f"--config.model.checkpoint_path={ckpt}",
      "--config.data.train_split=train[:64]",
      "--config.total_epochs=1",
      "--config.warmup_epochs=0",
      *extra,
      f"--workdir={os.path.join(box, 'w')}",
    ]
    return args

  def replace_backbone(box, same_shapes):
    """Replaces ckpt.npz in place: other weights, or a narrower model."""
    from vptpc import npz_checkpoint

    ckpt = os.path.join(box, "ckpt.npz")
    if same_shapes:
      flat = npz_checkpoint.read_npz(ckpt)
      flat["cls"] = flat["cls"] + 1.0  # e.g. another pretraining's file
      npz_checkpoint.save_npz(ckpt, npz_checkpoint.unflatten(flat))
      return
    rng = np.random.default_rng(0)
    flat = {  # tiny32's shapes: width 32, 3 blocks
      k: rng.standard_normal(v).astype(np.float32)
      for k, v in _tiny32_shapes().items()
    }
    npz_checkpoint.save_npz(ckpt, npz_checkpoint.unflatten(flat))

  def pc_backbone_replaced(box):
    pc = ("--config.condense.keep=0.5", "--config.condense.ft_epochs=1")
    rc, _, err, _ = run_cli(asset_run(box, *pc), {"VPTPC_FAULT": "condense:1"})
    assert rc == -9 and os.path.exists(
      os.path.join(box, "w", "full", "prompts.npz")
    ), (rc, err[-2000:])
    replace_backbone(box, same_shapes=True)
    return asset_run(box, *pc), {}, "vptpc.main", ""

  def eval_only_backbone_replaced(box):
    rc, _, err, _ = run_cli(asset_run(box))
    assert rc == 0, err[-2000:]
    replace_backbone(box, same_shapes=False)
    return (
      asset_run(box, "--config.eval_only=True"),
      {},
      "vptpc.main",
      "",
    )

  def uncached(corrupt_how):
    """A folder dataset whose test split is decoded per batch."""

    def setup(box):
      root = os.path.join(box, "data")
      victim = _jpeg_folder(root, 64, 128)
      good = open(victim, "rb").read()
      with open(victim, "wb") as f:
        if corrupt_how == "truncated":
          f.write(good[: len(good) // 2])
        else:
          f.write(b"\x89PNG\r\n\x1a\n not an image")
      _FIXES.append((victim, good))
      args = _folder_args(root, os.path.join(box, "w"))
      args[-1:-1] = [
        f"--config.data.cache_max_gb={300_000 / 2**30}",
        "--config.data.on_device=never",
        "--config.total_epochs=1",
        "--config.warmup_epochs=0",
      ]
      return args, {}, None, ""

    return setup

  def class_folders(classes, empty=()):
    """configs/folder.py on class folders; ``empty``: train/ folders left so."""

    def setup(box):
      from PIL import Image

      root = os.path.join(box, "data")
      for split in ("train", "test"):
        for c in classes:
          os.makedirs(os.path.join(root, split, c))
          if split == "train" and c in empty:
            continue
          for i in range(4):
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(
              os.path.join(root, split, c, f"{i}.png")
            )
      args = [f"--config=configs/folder.py:root={root}", f"--workdir={box}/w"]
      return args, {}, "vptpc.main", ""

    return setup

  def export_of(prompts):
    """``python -m vptpc.export`` of ``prompts`` into ``box/out``."""
    return lambda box: [f"--prompts={prompts}", f"--output={box}/out/t.onnx"]

  def pc_run_folder(box):
    """A condensation run's folder: full/ and condensed/ prompts files."""
    _serve_setup(box)
    for stage in ("full", "condensed"):
      os.makedirs(os.path.join(box, "run", stage))
      shutil.copy(
        os.path.join(box, "t.npz"),
        os.path.join(box, "run", stage, "prompts.npz"),
      )
    return export_of(os.path.join(box, "run"))(box), {}, "vptpc.export", ""

  def random_init_run(box):
    """A finished configs/tiny.py run (a random-init backbone), exported."""
    w = os.path.join(box, "w")
    rc, _, err, _ = run_cli(
      [
        f"--config={TINY}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.train_split=train[:64]",
        "--config.total_epochs=1",
        "--config.warmup_epochs=0",
        f"--workdir={w}",
      ]
    )
    assert rc == 0, err[-2000:]
    return export_of(w)(box), {}, "vptpc.export", ""

  return [
    {
      "kind": "prompts file for another backbone: PC resume, checkpoint "
      "replaced (same shapes, other weights)",
      "pre": True,
      "setup": pc_backbone_replaced,
    },
    {
      "kind": "prompts file for another backbone: eval_only, checkpoint "
      "replaced (width 32, 3 blocks vs 128, 6)",
      "pre": True,
      "setup": eval_only_backbone_replaced,
    },
    {
      "kind": "folder: corrupt image (not an image) in an uncached split",
      "pre": True,
      "setup": uncached("garbage"),
    },
    {
      "kind": "folder: truncated JPEG in an uncached split (mid-run; then "
      "fixed and resumed)",
      "pre": False,
      "setup": uncached("truncated"),
      "after": _fix_and_resume,
    },
    {
      "kind": "workdir is a gs:// URL",
      "pre": True,
      "setup": lambda box: (
        [
          f"--config={TINY}",
          f"--config.data.data_dir={data_dir}",
          "--workdir=gs://my-bucket/runs/x",
        ],
        {},
        "vptpc.main",
        "",
      ),
    },
    {
      "kind": "config file missing",
      "pre": True,
      "setup": lambda box: (
        ["--config=configs/nope.py", f"--workdir={box}/w"],
        {},
        "vptpc.main",
        "",
      ),
    },
    {
      "kind": "config argument badly typed",
      "pre": True,
      "setup": tiny("--config.total_epochs=x"),
    },
    {
      "kind": "config key unknown",
      "pre": True,
      "setup": tiny("--config.modle.name=x"),
    },
    {
      "kind": "config values invalid (2 keys)",
      "pre": True,
      "setup": tiny(
        "--config.data.normalize=zscore", "--config.warmup_epochs=9"
      ),
    },
    {
      "kind": "workdir not writable (/proc)",
      "pre": True,
      "setup": lambda box: (
        [f"--config={TINY}", "--workdir=/proc/forbidden"],
        {},
        "vptpc.main",
        "",
      ),
    },
    {"kind": "workdir is a file", "pre": True, "setup": workdir_file},
    {
      "kind": "checkpoint missing",
      "pre": True,
      "setup": tiny("--config.model.checkpoint_path=/nope/ViT-B_16.npz"),
    },
    {"kind": "checkpoint random bytes", "pre": True, "setup": random_ckpt},
    {"kind": "checkpoint truncated", "pre": True, "setup": truncated_ckpt},
    {
      "kind": "VTAB task: no data, no weights",
      "pre": True,
      "setup": lambda box: (
        [
          f"--config=configs/vtab.py:task=dtd,data_dir={box}/tfds",
          f"--workdir={box}/w",
        ],
        {},
        "vptpc.main",
        "",
      ),
    },
    {
      "kind": "split name typo",
      "pre": True,
      "setup": tiny("--config.data.eval_split=tset"),
    },
    {
      "kind": "batch does not divide over 8 devices",
      "pre": True,
      "setup": cpu8,
    },
    {
      "kind": "eval_only without a checkpoint",
      "pre": True,
      "setup": tiny("--config.eval_only=True"),
    },
    {
      "kind": "protocol.tuned_from missing",
      "pre": True,
      "setup": tiny(
        "--config.protocol.mode=final",
        "--config.protocol.tuned_from=/nope.json",
      ),
    },
    {
      "kind": "config changed on resume (2 keys)",
      "pre": True,
      "setup": changed,
    },
    {"kind": "workdir held by a live run", "pre": True, "setup": held},
    {
      "kind": "folder: image missing",
      "pre": True,
      "setup": folder([0, 1, 2, 3], missing=(1,)),
    },
    {
      "kind": "folder: label out of range",
      "pre": True,
      "setup": folder([0, 1, 2, 7]),
    },
    {
      "kind": "folder: corrupt image",
      "pre": True,  # since verify_images (was found when decoding)
      "setup": folder([0, 1, 2, 3], corrupt=(2,)),
    },
    {
      "kind": "non-finite loss",
      "pre": False,
      "setup": tiny(
        "--config.base_lr=1e30",
        "--config.warmup_epochs=0",
        "--config.log_every_steps=1",
        "--config.data.train_split=train[:128]",
      ),
    },
    {
      "kind": "serve: prompts file corrupt",
      "pre": True,
      "setup": serve(lambda box: [f"t {box}/ok.png"], prompts_ok=False),
    },
    {
      "kind": "serve: bad path + corrupt image lines",
      "pre": False,
      "setup": serve(
        lambda box: [
          f"t {box}/ok.png",
          f"t {box}/missing.png",
          f"t {box}/bad.png",
          f"t {box}/ok.png",
        ]
      ),
    },
    {
      "kind": "config value not finite (base_lr=nan)",
      "pre": True,
      "setup": tiny("--config.base_lr=nan"),
    },
    {
      "kind": "image size not a multiple of the patch (30 px, patch 4)",
      "pre": True,
      "setup": tiny(
        f"--config.model.name={asset_model}", "--config.data.image_size=30"
      ),
    },
    {
      "kind": "folder: class folder in train/ without images (1 of 3)",
      "pre": True,
      "setup": class_folders(("cat", "dog", "owl"), empty=("dog",)),
    },
    {
      "kind": "folder: a single class",
      "pre": True,
      "setup": class_folders(("cat",)),
    },
    {
      "kind": "export: --prompts is a condensation run's folder",
      "pre": True,
      "setup": pc_run_folder,
    },
    {
      "kind": "export: a run on a random-init backbone (configs/tiny.py)",
      "pre": True,
      "setup": random_init_run,
    },
  ]


_HOLDERS: list[subprocess.Popen] = []


def _selected(kind: str, cases: list[str]) -> bool:
  """Whether ``kind`` matches one of the ``--cases`` substrings (or none)."""
  return not cases or any(c.lower() in kind.lower() for c in cases)


def bad_rows(tmp: str, data_dir: str, cases: list[str] = ()) -> list[dict]:
  """The bad-input cases through the CLI, each in its own sandbox.

  Args:
    tmp: the sweep's scratch directory.
    data_dir: the shared TFDS data_dir.
    cases: substrings of the kinds to run (default: all).
  """
  rows = []
  for i, case in enumerate(bad_cases(data_dir)):
    if not _selected(case["kind"], cases):
      continue
    box = os.path.join(tmp, f"bad{i:02d}")
    os.makedirs(box)
    args, env, module, stdin = case["setup"](box)
    module = module or "vptpc.main"
    before = _listing(box)
    t0 = time.perf_counter()
    out = subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env={**os.environ, "PYTHONPATH": ROOT, **env},
      timeout=600,
      input=stdin,
    )
    took = time.perf_counter() - t0
    for h in _HOLDERS:
      h.send_signal(signal.SIGKILL)
      h.wait()
    _HOLDERS.clear()
    after = _listing(box)
    written = sorted(set(after) - set(before)) + sorted(
      k for k in before if k in after and after[k] != before[k]
    )
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    note = case["after"](args, env, module) if "after" in case else ""
    rows.append(
      {
        "kind": case["kind"],
        "precondition": case["pre"],
        "exit": out.returncode,
        "traceback": _tb(out.stderr),
        "written": written,
        "error_lines": len(errors),
        "first_error": errors[0][:160] if errors else "",
        "served_lines": len(out.stdout.splitlines())
        if module == "vptpc.serve"
        else None,
        "seconds": round(took, 2),
        "note": note,
        "run_at": _commit(),
      }
    )
    print(rows[-1], flush=True)
  return rows


def _commit() -> str:
  """This checkout's short commit, ``+dirty`` with uncommitted changes."""
  sha = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  ).stdout.strip()
  dirty = subprocess.run(
    ["git", "status", "--porcelain", "--untracked-files=no"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  ).stdout.strip()
  return sha + ("+dirty" if dirty else "")


def preflight_seconds(data_dir: str) -> float:
  """In-process time of the preflight on the VTAB case (no data, weights)."""
  from vptpc import config_util, preflight

  c = config_util.load_config(
    os.path.join(ROOT, "configs/vtab.py:task=dtd,data_dir=/nonexistent")
  )
  t0 = time.perf_counter()
  try:
    preflight.check(c, tempfile.mkdtemp())
  except preflight.PreflightError:
    pass
  return time.perf_counter() - t0


def stops_markdown(rows: list[dict]) -> list[str]:
  """The clean-stop table's lines."""
  yn = {True: "yes", False: "no"}
  lines = [
    "",
    "### Clean stops",
    "",
    "| kind | injected | exit (expected) | stop lines | error lines "
    "| traceback | resume exit | bit-identical | signal to exit (s) | line |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    took = r.get("signal_to_exit_s")
    lines.append(
      f"| {r['kind']} | `{r['fault']}` | {r['stop_exit']} "
      f"({r['expected_exit']}) | {r['stop_lines']} | {r['error_lines']} | "
      f"{yn[r['traceback']]} | {r['resume_exit']} | "
      f"{yn[r['bit_identical']]} | {'' if took is None else took} | "
      f"{r['line'].replace('|', '/')} |"
    )
  return lines


def markdown(bad: list[dict], faults: list[dict], stops=()) -> str:
  """The tables as Markdown."""
  yn = {True: "yes", False: "no"}
  lines = [
    "### Bad inputs",
    "",
    "| kind | exit | traceback | files written | error lines | time to fail (s) "
    "| first error line | run at |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in bad:
    written = ", ".join(r["written"])[:60] if r["written"] else "no"
    extra = ""
    if r["served_lines"] is not None:
      extra = f" ({r['served_lines']} lines served)"
    first = r["first_error"].replace("|", "/")
    if r.get("note"):
      first += f" **then:** {r['note']}"
    lines.append(
      f"| {r['kind']}{'' if r['precondition'] else ' *'} | {r['exit']} | "
      f"{yn[r['traceback']]} | {written} | {r['error_lines']}{extra} | "
      f"{r['seconds']:.1f} | {first} | {r.get('run_at', FIRST_RUN)} |"
    )
  lines += [
    "",
    "\\* not a precondition: found while decoding or training.",
    "",
    "### Faults",
    "",
    "| kind | injected | crash exit | resume exit | traceback | bit-identical "
    "| note |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in faults:
    tb = yn[r["crash_traceback"] or r["resume_traceback"]]
    lines.append(
      f"| {r['kind']} | `{r['fault']}` | {r['crash_exit']} | "
      f"{r['resume_exit']} | {tb} | {yn[r['bit_identical']]} | "
      f"{r['note'].replace('|', '/')} |"
    )
  if stops:
    lines += stops_markdown(stops)
  return "\n".join(lines) + "\n"


def main() -> None:
  """Runs both sweeps and writes ``sweep.json`` and ``table.md``."""
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="results/fault_sweep")
  ap.add_argument(
    "--only", default="", help="bad | faults | stops (default: all)"
  )
  ap.add_argument(
    "--cases",
    default="",
    help="comma-separated substrings of bad-input kinds to run (e.g. "
    "'another backbone,uncached'); their rows replace or join those in "
    "--out/sweep.json, the other rows are kept as they are",
  )
  a = ap.parse_args()
  cases = [c for c in a.cases.split(",") if c.strip()]
  tmp = tempfile.mkdtemp(prefix="vptpc-fault-sweep-")
  data_dir = os.path.join(tmp, "tfds")
  ensure_data(data_dir)
  t0 = time.perf_counter()
  bad = bad_rows(tmp, data_dir, cases) if a.only in ("", "bad") else []
  faults = (
    fault_rows(tmp, data_dir) if a.only in ("", "faults") and not cases else []
  )
  stops = (
    stop_rows(tmp, data_dir) if a.only in ("", "stops") and not cases else []
  )
  pre_s = preflight_seconds(data_dir)
  os.makedirs(a.out, exist_ok=True)
  record = {
    "bad_inputs": bad,
    "faults": faults,
    "stops": stops,
    "preflight_in_process_s": round(pre_s, 3),
    "wall_s": round(time.perf_counter() - t0, 1),
  }
  if cases:  # a partial re-run: merge into the stored rows
    with open(os.path.join(a.out, "sweep.json")) as f:
      old = json.load(f)
    new = {r["kind"]: r for r in bad}
    merged = [new.pop(r["kind"], r) for r in old["bad_inputs"]]
    record = dict(
      old,
      bad_inputs=merged + list(new.values()),
      partial_reruns=old.get("partial_reruns", [])
      + [{"cases": cases, "run_at": _commit(), "wall_s": record["wall_s"]}],
    )
    bad, faults = record["bad_inputs"], record["faults"]
  elif a.only and os.path.exists(os.path.join(a.out, "sweep.json")):
    # One table re-run: the others are kept as they were.
    with open(os.path.join(a.out, "sweep.json")) as f:
      old = json.load(f)
    for k in ("bad_inputs", "faults", "stops"):
      if not record[k]:
        record[k] = old.get(k, [])
  bad, faults = record["bad_inputs"], record["faults"]
  stops = record.get("stops", [])
  md = markdown(bad, faults, stops)
  with open(os.path.join(a.out, "table.md"), "w") as f:
    f.write(md)
  with open(os.path.join(a.out, "sweep.json"), "w") as f:
    json.dump(record, f, indent=1)
  print(md)
  print(
    f"preflight in-process: {pre_s:.3f} s; sweep {time.perf_counter() - t0:.0f} s"
  )
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
