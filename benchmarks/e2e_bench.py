"""The real command, timed: VPT's VTAB-1k protocol as a user runs it.

Makes a VTAB-shaped task in the extracted-VTAB folder layout (``train800``,
``val200``, ``train800val200`` and ``test`` split files over JPEG images of
random smooth pixels, ``--classes`` labels) and a random backbone saved in
Google's ``.npz`` layout, then runs ``python -m vptpc.main
--config=configs/vtab.py:...`` twice, as subprocesses, exactly as a user
would: ``mode=tune`` with the vmapped grid, then ``mode=final``. From what
the runs write (``tune.json``'s per-chunk timing, each seed's
``results.json``) and their wall times it reports:

* sustained training images/s inside the real runs (after each process's
  first epoch, which holds the compile), next to ``--step_img_s``, the
  isolated train-step rate measured by ``vpt_bench.py`` (if given);
* fixed costs per process, per grid chunk and per seed;
* the projected wall time of VPT's full protocol (the 10 x 4 grid x 100
  epochs on train800, then 5 seeds x 100 epochs on train800val200) for one
  task and for all 19 VTAB-1k tasks.

Writes ``e2e.json`` (after the tune run too, so a run cut off in the final
one keeps the tune's part; ``--deadline_s`` bounds both runs) and ``e2e.md``
to ``--out``. On a CPU, shrink it for a dry run::

  python benchmarks/e2e_bench.py --out=/tmp/e2e --model=tiny32 \\
      --image_size=32 --train=120 --test=60 --tune_epochs=2 \\
      --final_epochs=2 --lrs=1:0.1 --wds=0 --seeds=42:44 --dtype=float32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# VPT's protocol (docs/references.md, "VPT: protocol"): 10 LRs x 4 WDs,
# 100 epochs, 5 seeds.
FULL_GRID, FULL_EPOCHS, FULL_SEEDS, VTAB_TASKS = 40, 100, 5, 19
_PLATFORMS = ""  # the caller's JAX_PLATFORMS, for the runs


def time_per_image(step_rates: str):
  """Seconds per image at a prompt count, from ``"prompts:img_s,..."``.

  Piecewise linear between the measured counts (time per image is close
  to linear in the prompt count on the key/value path); beyond the last
  one it goes on at the last segment's slope, but never downwards (more
  prompt keys never make a step faster, so a noisy pair of rates must not
  project a negative time); below the first it is the first's.
  """
  pts = sorted(
    (int(k), 1.0 / float(v))
    for k, v in (x.split(":") for x in step_rates.split(","))
  )

  def t_img(n: int) -> float:
    lo = max([p for p in pts if p[0] <= n] or [pts[0]])
    hi = min([p for p in pts if p[0] >= n] or [pts[-1]])
    if lo != hi:
      return lo[1] + (hi[1] - lo[1]) * (n - lo[0]) / (hi[0] - lo[0])
    if n <= pts[-1][0] or len(pts) < 2:
      return lo[1]
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return y1 + max(y1 - y0, 0.0) * (n - x1) / (x1 - x0)

  return t_img


def _make_image(args):
  """One smooth random RGB image as JPEG bytes (fast to make and decode)."""
  import io

  import numpy as np
  from PIL import Image

  seed, px = args
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (px // 16, px // 16, 3), dtype=np.uint8)
  im = Image.fromarray(small).resize((px, px), Image.Resampling.BILINEAR)
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def make_task(root: str, *, train: int, test: int, px: int, classes: int):
  """Writes the folder layout under ``root``; returns its path."""
  from concurrent.futures import ProcessPoolExecutor

  import numpy as np

  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  n = train + test
  with ProcessPoolExecutor() as ex:
    blobs = list(ex.map(_make_image, [(i, px) for i in range(n)], chunksize=64))
  labels = np.random.default_rng(0).integers(0, classes, n)
  lines = []
  for i, blob in enumerate(blobs):
    rel = f"images/{i:05d}.jpg"
    with open(os.path.join(root, rel), "wb") as f:
      f.write(blob)
    lines.append(f"{rel} {labels[i]}")
  n800 = train * 4 // 5
  splits = {
    "train800": lines[:n800],
    "val200": lines[n800:train],
    "train800val200": lines[:train],
    "test": lines[train:],
  }
  for name, rows in splits.items():
    with open(os.path.join(root, f"{name}.txt"), "w") as f:
      f.write("\n".join(rows) + "\n")
  return root


def make_backbone(path: str, model: str, image_size: int) -> None:
  """A random ViT saved as a vit_jax ``.npz`` (what real checkpoints are)."""
  import jax

  from vptpc import npz_checkpoint
  from vptpc.models import vit

  m = vit.create_model(model)
  params = vit.init_params(m, jax.random.key(0), image_size)
  npz_checkpoint.save_npz(path, jax.device_get(params))


def run_main(
  config: str,
  workdir: str,
  overrides: list[str],
  log: str,
  timeout_s: float | None = None,
):
  """``python -m vptpc.main``; returns (wall seconds, return code).

  Past ``timeout_s`` the run is killed and its return code is 124 (as
  coreutils' ``timeout`` says it), with a last line in its log.
  """
  cmd = [
    sys.executable,
    "-m",
    "vptpc.main",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]
  env = dict(
    os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
  )
  # The runs get the accelerator this process stays off (`main`).
  env.pop("JAX_PLATFORMS", None)
  if _PLATFORMS:
    env["JAX_PLATFORMS"] = _PLATFORMS
  t = time.perf_counter()
  with open(log, "w") as f:
    f.write(" ".join(cmd) + "\n")
    f.flush()
    try:
      rc = subprocess.run(
        cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
      ).returncode
    except subprocess.TimeoutExpired:
      rc = 124
      f.write(f"\n[e2e_bench] killed after {timeout_s:.0f} s (--deadline_s)\n")
  return time.perf_counter() - t, rc


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="results/e2e")
  ap.add_argument("--root", default="", help="work dir ('' -> <out>/work)")
  ap.add_argument(
    "--task", default="dtd", help="registry key (label count, prompts)"
  )
  ap.add_argument("--model", default="B/16")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--px", type=int, default=256, help="stored image side")
  ap.add_argument("--train", type=int, default=1000)
  ap.add_argument("--test", type=int, default=1880)
  ap.add_argument("--classes", type=int, default=47)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--tune_epochs", type=int, default=3)
  ap.add_argument("--final_epochs", type=int, default=5)
  ap.add_argument("--lrs", default="50:25:10:5")
  ap.add_argument("--wds", default="0.01:0.001:0.0001:0")
  ap.add_argument("--vmap_chunk", type=int, default=8)
  ap.add_argument("--seeds", default="42:44")
  ap.add_argument(
    "--step_img_s",
    type=float,
    default=0.0,
    help="isolated train-step img/s (vpt_bench) at this task's prompt count",
  )
  ap.add_argument(
    "--step_rates",
    default="",
    help="isolated kv train-step img/s by prompt count, e.g. 0:7000,10:6500,"
    "100:5000 (vpt_bench): scales the projection to each task's count",
  )
  ap.add_argument(
    "--extra", default="", help="more --config.* overrides, space-separated"
  )
  ap.add_argument(
    "--deadline_s",
    type=float,
    default=0.0,
    help="seconds from the start by which both runs must end (0: none): a "
    "run still going then is killed (rc 124), one that cannot start with "
    "10 s left is skipped; e2e.json is written after the tune run too",
  )
  a = ap.parse_args()
  t_proc = time.perf_counter()

  sys.path.insert(0, ROOT)
  # This process only makes files: keep it off the accelerator, whose
  # memory the runs below need (JAX preallocates most of it).
  global _PLATFORMS
  _PLATFORMS = os.environ.get("JAX_PLATFORMS", "")
  os.environ["JAX_PLATFORMS"] = "cpu"
  from vptpc.data import vtab

  task = vtab.get_task(a.task)
  root = a.root or os.path.join(a.out, "work")
  os.makedirs(a.out, exist_ok=True)
  data_dir = os.path.join(root, "data")
  folder = os.path.join(data_dir, "vptpc_folders", task.key)
  t = time.perf_counter()
  make_task(folder, train=a.train, test=a.test, px=a.px, classes=a.classes)
  t_data = time.perf_counter() - t
  ckpt = os.path.join(root, "backbone.npz")
  t = time.perf_counter()
  make_backbone(ckpt, a.model, a.image_size)
  t_ckpt = time.perf_counter() - t
  print(
    f"made {a.train}+{a.test} images in {t_data:.1f} s, backbone in {t_ckpt:.1f} s",
    flush=True,
  )

  base = (
    f"{ROOT}/configs/vtab.py:task={task.key},source=folder,dtype={a.dtype},"
    f"model={a.model},checkpoint={ckpt},data_dir={data_dir}"
  )
  common = [
    f"--config.data.num_classes={a.classes}",
    f"--config.data.image_size={a.image_size}",
    "--config.progress_bar=False",
    *a.extra.split(),
  ]
  # Fresh run folders: vptpc.main would find an earlier invocation's runs
  # finished (same config) and train nothing, and that would be timed.
  shutil.rmtree(os.path.join(root, "runs"), ignore_errors=True)

  def write(report: dict):
    with open(os.path.join(a.out, "e2e.json"), "w") as f:
      json.dump(report, f, indent=1)

  def run(mode: str, epochs: int, workdir: str, overrides: list[str]):
    """One ``vptpc.main`` run under --deadline_s; (wall s, rc).

    Killed at the deadline, or skipped with under 10 s left: rc 124.
    """
    log = os.path.join(a.out, f"{mode}.log")
    left = None
    if a.deadline_s > 0:
      left = a.deadline_s - (time.perf_counter() - t_proc)
      if left < 10:
        print(f"{mode} skipped: {left:.0f}s left of --deadline_s", flush=True)
        with open(log, "w") as f:
          f.write(f"[e2e_bench] {mode} skipped: past --deadline_s\n")
        return 0.0, 124
    wall, rc = run_main(
      f"{base},mode={mode},epochs={epochs}",
      workdir,
      common + overrides,
      log,
      timeout_s=left,
    )
    print(f"{mode}: rc {rc}, {wall:.1f} s", flush=True)
    return wall, rc

  tune_dir = os.path.join(root, "runs", "tune")
  tune_s, tune_rc = run(
    "tune",
    a.tune_epochs,
    tune_dir,
    [
      "--config.protocol.vmap=True",
      f"--config.protocol.vmap_chunk={a.vmap_chunk}",
      f"--config.protocol.lrs=({','.join(a.lrs.split(':'))},)",
      f"--config.protocol.wds=({','.join(a.wds.split(':'))},)",
    ],
  )

  report = {
    "task": task.key,
    "extra": a.extra,
    "model": a.model,
    "image_size": a.image_size,
    "dtype": a.dtype,
    "prompts": task.num_prompts,
    "train_images": a.train,
    "test_images": a.test,
    "make_data_s": round(t_data, 1),
    "tune": {"wall_s": round(tune_s, 1), "rc": tune_rc},
    "final": {"rc": None},
    "step_img_s": a.step_img_s or None,
    "complete": False,
  }
  n800 = a.train * 4 // 5
  lines = [f"# End to end: `vptpc.main` on a VTAB-shaped {task.key} task", ""]
  if tune_rc == 0:
    with open(os.path.join(tune_dir, "tune.json")) as f:
      chunks = json.load(f).get("chunks", [])
    report["tune"]["chunks"] = chunks
    rates = [
      c["sustained_member_img_per_s"]
      for c in chunks
      if "sustained_member_img_per_s" in c
    ]
    train_total = sum(c["train_s"] for c in chunks)
    # Everything of the process that is not training: start-up, data,
    # checkpoint, compiles' share outside the first epochs, evaluation.
    report["tune"]["outside_training_s"] = round(tune_s - train_total, 1)
    if rates:
      rate = sum(rates) / len(rates)
      report["tune"]["sustained_member_img_per_s"] = round(rate, 1)
      first_extra = [
        c["first_epoch_s"] - c["member_images_per_epoch"] / rate for c in chunks
      ]
      report["tune"]["first_epoch_overhead_s"] = [
        round(x, 1) for x in first_extra
      ]
  write(report)  # the tune run's part, should the final run be cut off

  final_dir = os.path.join(root, "runs", "final")
  final_s, final_rc = run(
    "final",
    a.final_epochs,
    final_dir,
    [f"--config.protocol.seeds=({','.join(a.seeds.split(':'))},)"]
    # A failed tune still leaves the final runs to time (config's LR / WD).
    + (
      [f"--config.protocol.tuned_from={tune_dir}/tune.json"]
      if not tune_rc
      else []
    ),
  )
  report["final"] = {"wall_s": round(final_s, 1), "rc": final_rc}
  if final_rc == 0:
    with open(os.path.join(final_dir, "final.json")) as f:
      fin = json.load(f)
    seeds = fin["seeds"]
    report["final"]["seeds"] = seeds
    rates = [s["train_img_per_s"] for s in seeds if s.get("train_img_per_s")]
    if rates:
      report["final"]["sustained_img_per_s"] = round(sum(rates) / len(rates), 1)
    report["final"]["seed_wall_s"] = [s["wall_s"] for s in seeds]
  # Projection of VPT's full protocol from the measured rates and costs.
  tr, fi = report["tune"], report["final"]
  if "sustained_member_img_per_s" in tr and "sustained_img_per_s" in fi:
    n_chunks = -(-FULL_GRID // a.vmap_chunk)
    chunk_over = max(
      tr["first_epoch_overhead_s"][1:] or tr["first_epoch_overhead_s"]
    )
    first_over = tr["first_epoch_overhead_s"][0]
    tune_proj = (
      FULL_GRID * FULL_EPOCHS * n800 / tr["sustained_member_img_per_s"]
      + first_over
      + (n_chunks - 1) * chunk_over
      + tr["outside_training_s"]
    )
    # Per seed: training at the sustained rate plus what else the seed cost
    # (measured: its wall time minus its images at that rate).
    rate = fi["sustained_img_per_s"]
    per_seed_over = [
      s["wall_s"] - a.final_epochs * a.train / rate for s in fi["seeds"]
    ]
    final_proj = (
      FULL_SEEDS * FULL_EPOCHS * a.train / rate
      + per_seed_over[0]
      + (FULL_SEEDS - 1)
      * (per_seed_over[-1] if len(per_seed_over) > 1 else per_seed_over[0])
      + (final_s - sum(s["wall_s"] for s in fi["seeds"]))
    )
    train_s = (
      FULL_GRID * FULL_EPOCHS * n800 / tr["sustained_member_img_per_s"]
      + FULL_SEEDS * FULL_EPOCHS * a.train / rate
    )
    fixed_s = tune_proj + final_proj - train_s
    proj = {
      "tune_min": round(tune_proj / 60, 1),
      "final_min": round(final_proj / 60, 1),
      "task_min": round((tune_proj + final_proj) / 60, 1),
      "vtab19_h": round(VTAB_TASKS * (tune_proj + final_proj) / 3600, 2),
      "assumes": f"{FULL_GRID} grid points x {FULL_EPOCHS} epochs on {n800} "
      f"images in chunks of {a.vmap_chunk}, then {FULL_SEEDS} seeds x "
      f"{FULL_EPOCHS} epochs on {a.train}",
    }
    if a.step_rates:
      # Time per image is close to linear in the prompt count on the
      # key/value path: interpolate the isolated step's, scale training.
      t_img = time_per_image(a.step_rates)
      total = sum(
        fixed_s + train_s * t_img(t.num_prompts) / t_img(task.num_prompts)
        for t in vtab.VTAB.values()
      )
      proj["vtab19_h"] = round(total / 3600, 2)
      proj["assumes"] += (
        "; the 19 tasks at their registry prompt counts, training time "
        "scaled by the isolated step's time per image at each count"
      )
    else:
      proj["assumes"] += (
        f"; every task like this one ({task.num_prompts} prompts)"
      )
    report["projection"] = proj
  lines += [
    f"Model {a.model} at {a.image_size} px, {a.dtype}, {task.num_prompts} prompts/layer "
    f"(the registry's {task.key}), {a.train} train / {a.test} test JPEGs at {a.px} px.",
    "",
    "| run | wall s | sustained train img/s | per chunk / seed |",
    "|---|---|---|---|",
  ]
  if "chunks" in tr:
    lines.append(
      f"| tune ({sum(c['members'] for c in tr['chunks'])} members, chunks of {a.vmap_chunk}, {a.tune_epochs} epochs) | "
      f"{tr['wall_s']} | {tr.get('sustained_member_img_per_s', '–')} member-img/s | "
      f"first epochs {[c['first_epoch_s'] for c in tr['chunks']]} s, trains {[c['train_s'] for c in tr['chunks']]} s |"
    )
  if "seeds" in fi:
    lines.append(
      f"| final ({len(fi['seeds'])} seeds, {a.final_epochs} epochs) | {fi['wall_s']} | "
      f"{fi.get('sustained_img_per_s', '–')} | seed wall {fi['seed_wall_s']} s |"
    )
  if a.step_img_s and "sustained_img_per_s" in fi:
    report["final"]["fraction_of_step_rate"] = round(
      fi["sustained_img_per_s"] / a.step_img_s, 3
    )
    lines += [
      "",
      f"Sustained final-run training rate / isolated step rate: {fi['sustained_img_per_s']} / {a.step_img_s} = {report['final']['fraction_of_step_rate']:.2f}.",
    ]
  if "projection" in report:
    p = report["projection"]
    lines += [
      "",
      f"Projected VPT protocol: tune {p['tune_min']} min + final {p['final_min']} min = "
      f"**{p['task_min']} min per task**, **{p['vtab19_h']} h for the 19 VTAB-1k tasks** ({p['assumes']}).",
    ]
  report["complete"] = True
  write(report)
  with open(os.path.join(a.out, "e2e.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(json.dumps(report))
  if tune_rc or final_rc:
    sys.exit(1)


if __name__ == "__main__":
  main()
