"""Runs the mini-VTAB suite: methods x tasks x seeds, into one results table.

  python -m vptpc.suite --config=configs/suite.py --workdir=runs/suite

Methods (all on the embedded fractal-pretrained backbone except ``scratch``):

* ``linear``: a linear probe - the head alone on the frozen backbone, trained
  with VPT's recipe (VPT with zero prompts);
* ``shallow``: VPT-Shallow; ``deep``: VPT-Deep;
* ``scratch``: the same ViT architecture randomly initialised and trained end
  to end (AdamW) on the same 1,000 images - the "no pretraining" baseline.

Every run writes its own workdir (``<workdir>/<task>/<method>/seed<k>``); a
finished run is not repeated, so an interrupted suite resumes. The table
(``results.md``, ``results.csv``, ``runs.csv``) gives test top-1 mean ± std
over seeds.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from vptpc import lifecycle, preflight, stops, sweep, train
from vptpc.data import minivtab, pipeline, sources
from vptpc.models import vit


def _define_flags():
  """Defines ``--config`` and ``--workdir`` when run as a program.

  Not at import time, so importing this module beside another entry point
  (as the tests do) does not define the flags twice.
  """
  config_flags.DEFINE_config_file("config", None, "Suite config.")
  flags.DEFINE_string("workdir", None, "Output directory.")


METHODS = ("linear", "shallow", "deep", "scratch")


def train_scratch(
  task: str,
  *,
  seed: int,
  epochs: int,
  lr: float,
  weight_decay: float,
  batch_size: int,
  data_dir: str | None,
  smoke: bool = False,
) -> dict[str, Any]:
  """Trains the embedded architecture from random init on one task.

  AdamW with warmup + cosine over ``epochs`` on train800val200, evaluated on
  test; the same data, batches and preprocessing as the VPT runs.

  Returns:
    ``{"eval_accuracy", "trainable_params", "step"}``.
  """
  c = minivtab.task_config(task, seed=seed, smoke=smoke)
  model = vit.create_model(c.model.name, num_classes=c.data.num_classes)
  kw = dict(
    image_size=c.data.image_size,
    data_dir=data_dir,
    num_classes=c.data.num_classes,
  )
  tr = pipeline.load_split(c.data.name, c.data.train_split, **kw)
  te = pipeline.load_split(c.data.name, c.data.eval_split, **kw)
  params = vit.init_params(model, jax.random.key(seed), c.data.image_size)
  spe = pipeline.steps_per_epoch(len(tr), batch_size)
  total = spe * epochs
  sched = optax.warmup_cosine_decay_schedule(
    0.0, lr, max(1, total // 10), total, end_value=0.0
  )
  opt = optax.adamw(
    sched,
    weight_decay=weight_decay,
    mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p),
  )
  opt_state = opt.init(params)

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["image"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    m = batch["mask"].astype(jnp.float32)
    return (ce * m).sum() / jnp.maximum(m.sum(), 1.0)

  @jax.jit
  def step(p, s, batch):
    g = jax.grad(loss_fn)(p, batch)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  @jax.jit
  def correct(p, batch):
    logits = model.apply({"params": p}, batch["image"])
    return ((logits.argmax(-1) == batch["label"]) & batch["mask"]).sum()

  for epoch in range(epochs):
    for batch in pipeline.train_batches(
      tr,
      batch_size=batch_size,
      seed=seed,
      epoch=epoch,
      normalization=c.data.normalize,
    ):
      params, opt_state = step(params, opt_state, batch)
  n_correct = sum(
    int(correct(params, b))
    for b in pipeline.eval_batches(
      te, batch_size=256, normalization=c.data.normalize
    )
  )
  return {
    "eval_accuracy": n_correct / len(te),
    "trainable_params": vit.count_params(params),
    "step": total,
  }


def _grid(m: ml_collections.ConfigDict) -> list[tuple[int, float, float]]:
  """A method's (prompt count, LR, prompt LR scale) candidates.

  ``select_points`` lists them explicitly; otherwise they are the product
  of ``select_prompts``, ``select_prompt_lr_scale`` and ``select_lr``. One
  point means no search. The prompt LR scale only matters with prompts, so
  a linear probe's points all carry the first scale.
  """
  if m.get("select_points"):
    return [(int(n), float(lr), float(s)) for n, lr, s in m.select_points]
  counts = tuple(m.get("select_prompts", ())) or (m.get("num_prompts", 0),)
  lrs = tuple(m.get("select_lr", ())) or (m.lr,)
  scales = tuple(m.get("select_prompt_lr_scale", ())) or (
    m.get("prompt_lr_scale", minivtab.PROMPT_LR_SCALE),
  )
  return [
    (int(n), float(lr), float(s))
    for n in counts
    for s in (scales if n else scales[:1])
    for lr in lrs
  ]


def _grid_key(n: int, lr: float, scale: float) -> str:
  """Names one grid point in ``runs.csv`` and in the selection workdirs.

  The prompt LR scale is named only where it differs from the default, so
  the names of earlier suites' points still read back.
  """
  key = f"p{n}_lr{lr:g}"
  return key if scale == minivtab.PROMPT_LR_SCALE else f"{key}_ps{scale:g}"


def _vpt_config(
  config: ml_collections.ConfigDict,
  task: str,
  method: str,
  m: ml_collections.ConfigDict,
  seed: int,
) -> ml_collections.ConfigDict:
  """The training config of one VPT-recipe run (linear, shallow or deep)."""
  c = minivtab.task_config(
    task,
    variant="shallow" if method == "shallow" else "deep",
    num_prompts=m.num_prompts,
    mode=m.get("mode", "final"),
    seed=seed,
    epochs=m.epochs,
    base_lr=m.lr,
    weight_decay=m.weight_decay,
    batch_size=config.batch_size,
    prompt_lr_scale=m.get("prompt_lr_scale", minivtab.PROMPT_LR_SCALE),
    head_init=config.get("head_init", "vpt"),
    prelogit_norm=config.get("prelogit_norm", "none"),
    smoke=config.smoke,
    backbone=config.get("backbone", ""),
  )
  c.data.data_dir = config.data_dir
  c.progress_bar = False
  return c


def select_hparams(
  config: ml_collections.ConfigDict, task: str, method: str, workdir: str
) -> dict[str, Any]:
  """Chooses a VPT method's prompt count and LRs for one task on val200.

  VPT's protocol (docs/references.md, "VPT: protocol"): the prompt length
  and the learning rate are per-task hyperparameters picked on the
  validation split. Every point of
  the method's `_grid` (its ``select_points``, or else the
  ``select_prompts`` x ``select_prompt_lr_scale`` x ``select_lr`` product,
  a missing axis being the method's fixed ``num_prompts`` /
  ``prompt_lr_scale`` / ``lr``) is trained on train800 and evaluated on
  val200 with the first suite seed; the best val accuracy wins, ties to
  fewer prompts, then to the smaller LR, then to the smaller prompt scale.
  A diverged point scores -1.

  The LRs of one prompt count and scale train together as one vmapped job
  (`vptpc.sweep.train_grid`: one compile and one pass over the data, each
  member equal to its separate run up to float32 rounding; for the linear
  probe the frozen backbone's forward is shared by the members). Each point's
  accuracy is kept in ``<workdir>/select_<point>/suite_result.json``, so an
  interrupted selection resumes.

  Returns:
    A dict of the chosen ``num_prompts``, ``lr`` and ``prompt_lr_scale``,
    and ``val_accuracy``, each point's validation accuracy by point.
  """
  m = config.methods[method]
  grid = _grid(m)
  scores = {}
  # One vmapped job per (prompt count, prompt LR scale): its LRs.
  for n, scale in dict.fromkeys((k, s) for k, _, s in grid):
    lrs = [lr for k, lr, s in grid if (k, s) == (n, scale)]
    done = {}
    for lr in lrs:
      f = os.path.join(
        workdir, f"select_{_grid_key(n, lr, scale)}", "suite_result.json"
      )
      if os.path.exists(f):
        with open(f) as fh:
          done[lr] = json.load(fh)["test_accuracy"]
    todo = [lr for lr in lrs if lr not in done]
    if todo:
      t0 = time.time()
      sub = ml_collections.ConfigDict(
        dict(m.to_dict(), num_prompts=n, prompt_lr_scale=scale)
      )
      sub.mode = "tune"
      c = _vpt_config(config, task, method, sub, config.seeds[0])
      res = sweep.train_grid(c, [(lr, m.weight_decay) for lr in todo])
      for lr, r in zip(todo, res, strict=True):
        acc = r["eval_accuracy"]  # the eval split here is val200
        acc = -1.0 if not np.isfinite(acc) else acc
        d = os.path.join(workdir, f"select_{_grid_key(n, lr, scale)}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "suite_result.json"), "w") as fh:
          json.dump(
            {
              "task": task,
              "method": method,
              "num_prompts": n,
              "lr": lr,
              "prompt_lr_scale": scale,
              "test_accuracy": acc,
              "split": c.data.eval_split,
              "seconds_grid_job": round(time.time() - t0, 1),
            },
            fh,
          )
        done[lr] = acc
    scores.update({(n, lr, scale): done[lr] for lr in lrs})
  # Ties: fewer prompts, then the smaller LR, then the smaller prompt scale.
  n, lr, scale = max(scores, key=lambda k: (scores[k], -k[0], -k[1], -k[2]))
  return {
    "num_prompts": n,
    "lr": lr,
    "prompt_lr_scale": scale,
    "val_accuracy": {_grid_key(*k): v for k, v in scores.items()},
  }


def run_one(
  config: ml_collections.ConfigDict,
  task: str,
  method: str,
  seed: int,
  workdir: str,
) -> dict[str, Any]:
  """Runs (or reads back) one method on one task with one seed.

  A method with more than one (prompt count, LR, prompt LR scale)
  candidate is first tuned on val200 by `select_hparams`.
  """
  done = os.path.join(workdir, "suite_result.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  m = ml_collections.ConfigDict(config.methods[method].to_dict())
  selected = None
  grid = _grid(m)  # scratch: one point, its fixed LR
  if len(grid) == 1:
    m.num_prompts, m.lr, m.prompt_lr_scale = grid[0]
  else:
    selected = select_hparams(config, task, method, os.path.dirname(workdir))
    m.num_prompts, m.lr = selected["num_prompts"], selected["lr"]
    m.prompt_lr_scale = selected["prompt_lr_scale"]
  data_dir = config.data_dir or None
  t0 = time.time()
  if method == "scratch":
    res = train_scratch(
      task,
      seed=seed,
      epochs=m.epochs,
      lr=m.lr,
      weight_decay=m.weight_decay,
      batch_size=config.batch_size,
      data_dir=data_dir,
      smoke=config.smoke,
    )
  else:
    c = _vpt_config(config, task, method, m, seed)
    if m.get("keep", 0.0) > 0:
      c.condense.keep = m.keep
      c.condense.score_fn = m.get("score_fn", "taylor")
      c.condense.ft_epochs = m.get("ft_epochs", -1)
      share = m.get("share_full", "")
      full_dir = os.path.join(workdir, "full")
      if share and not os.path.exists(full_dir):
        # Condensation methods start from the same trained full model:
        # reuse that method's run instead of training it again.
        os.symlink(os.path.join("..", "..", share, f"seed{seed}"), full_dir)
    res = train.train_and_evaluate(c, workdir)
  extra = {}
  if "condensed" in res:
    cond = res["condensed"]
    extra = {
      "prompts_total": cond["prompts_total"],
      "full_test_accuracy": res["full"]["eval_accuracy"],
      "gflops_naive": round(cond["gflops_naive"], 5),
      "eval_speedup": round(res["speedup_eval"], 3),
    }
    res = cond
  out = {
    "task": task,
    "method": method,
    "seed": seed,
    "test_accuracy": res["eval_accuracy"],
    "trainable_params": res["trainable_params"],
    "seconds": round(time.time() - t0, 1),
    **extra,
  }
  if selected is not None:
    out["num_prompts"] = selected["num_prompts"]
    out["lr"] = selected["lr"]
    out["prompt_lr_scale"] = selected["prompt_lr_scale"]
    out["val200_grid"] = json.dumps(selected["val_accuracy"])
  with open(done, "w") as f:
    json.dump(out, f)
  return out


def summarize(rows: list[dict[str, Any]], methods, tasks) -> str:
  """Markdown table: test top-1 (%) mean ± std over seeds, per task."""
  header = "| task | " + " | ".join(methods) + " |"
  lines = [header, "|" + "---|" * (len(methods) + 1)]
  means = {m: [] for m in methods}
  for t in tasks:
    cells = []
    for m in methods:
      acc = [
        100 * r["test_accuracy"]
        for r in rows
        if r["task"] == t and r["method"] == m
      ]
      if acc:
        means[m].append(np.mean(acc))
        cells.append(f"{np.mean(acc):.1f} ± {np.std(acc):.1f} (n={len(acc)})")
      else:
        cells.append("–")
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  avg = [
    f"{np.mean(v):.1f}" if len(v) == len(tasks) else "–" for v in means.values()
  ]
  lines.append("| **mean over tasks** | " + " | ".join(avg) + " |")
  return "\n".join(lines)


def _worker(config_dict: dict, workdir: str, tasks: list, cpu: int) -> None:
  """One suite worker process: its tasks on one pinned, single-thread CPU.

  Runs in a fresh (spawned) interpreter, so the XLA flags set here take
  effect before its backend starts.
  """
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  )
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {cpu})
  config = ml_collections.ConfigDict(config_dict)
  config.tasks = tuple(tasks)
  config.workers = 1
  try:
    _run_all(config, workdir)
  except stops.Stopped as e:
    # A Ctrl-C or a scheduler's SIGTERM reaches the whole process group:
    # the worker has written its checkpoint and the parent prints the line.
    sys.exit(e.exit_status)


def _run_in_workers(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Spreads the tasks over ``config.workers`` single-thread processes.

  On these 2-core machines the small ViT's steps use two threads poorly:
  two pinned single-thread processes did 1.38x the training throughput of
  one two-thread process (fractal-Ti/4, batch 64, 3 deep prompts). The
  datasets are prepared first, here, so workers never race to build one.
  """
  for task in config.tasks:
    sources.prepare_local(
      minivtab.TASKS[task].tfds_name,
      config.data_dir or sources.default_data_dir(),
    )
  n = min(config.workers, len(config.tasks))
  cpus = list(range(n))
  if hasattr(os, "sched_getaffinity"):
    cpus = sorted(os.sched_getaffinity(0))
  ctx = multiprocessing.get_context("spawn")
  procs = [
    ctx.Process(
      target=_worker,
      args=(
        config.to_dict(),
        workdir,
        list(config.tasks[i::n]),
        cpus[i % len(cpus)],
      ),
    )
    for i in range(n)
  ]
  for p in procs:
    p.start()
  for p in procs:
    p.join()
  bad = [p.exitcode for p in procs if p.exitcode]
  if bad:
    raise RuntimeError(
      f"A suite worker failed (exit codes {bad}); finished runs are kept in "
      f"{workdir} and a rerun resumes from them."
    )


def _run_all(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or reads back) every (seed, task, method); returns the rows."""
  rows = []
  # Seeds outermost: an interrupted suite still covers every task.
  for seed in config.seeds:
    for task in config.tasks:
      for method in config.method_order:
        r = run_one(
          config,
          task,
          method,
          seed,
          os.path.join(workdir, task, method, f"seed{seed}"),
        )
        rows.append(r)
        logging.info("%s", json.dumps(r))
        print(json.dumps(r), flush=True)
  return rows


def run_suite(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Runs every (task, method, seed) and writes the tables.

  With ``config.workers > 1`` the tasks are spread over that many worker
  processes first (`_run_in_workers`); the tables are then built here from
  their finished runs.

  Returns:
    The Markdown table.
  """
  # A URL would become a local "gs:" directory: refused before any work.
  workdir = lifecycle.local_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  if config.get("workers", 1) > 1 and len(config.tasks) > 1:
    _run_in_workers(config, workdir)
  rows = _run_all(config, workdir)
  table = summarize(rows, list(config.method_order), list(config.tasks))
  with open(os.path.join(workdir, "runs.csv"), "w", newline="") as f:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["task", "method", "mean_accuracy", "std_accuracy", "seeds"])
    for t in config.tasks:
      for m in config.method_order:
        acc = [
          r["test_accuracy"]
          for r in rows
          if r["task"] == t and r["method"] == m
        ]
        w.writerow(
          [t, m, f"{np.mean(acc):.4f}", f"{np.std(acc):.4f}", len(acc)]
        )

  def method_desc(m):
    mc = config.methods[m]
    grid = _grid(mc)
    if len(grid) == 1:
      ((n, lr, _),) = grid
      return f"{m}: {mc.epochs} epochs, lr {lr}" + (
        f", {n} prompts" if n else ""
      )
    chosen = {
      r["task"]: _grid_key(
        r["num_prompts"],
        r["lr"],
        r.get("prompt_lr_scale", minivtab.PROMPT_LR_SCALE),
      )
      for r in rows
      if r["method"] == m
    }
    points = "/".join(_grid_key(*k) for k in grid)
    return (
      f"{m}: {mc.epochs} epochs, prompts and lr chosen per task on val200 "
      f"from {points} ({', '.join(f'{t} {k}' for t, k in chosen.items())})"
    )

  desc = "; ".join(method_desc(m) for m in config.method_order)
  text = (
    "Mini-VTAB test top-1 (%), mean ± std over seeds "
    f"{list(config.seeds)}; train800val200 -> test; "
    f"VPT heads init {config.get('head_init', 'vpt')}, pre-logits "
    f"{config.get('prelogit_norm', 'none')}; {desc}. "
    f"Wall time {time.time() - t0:.0f} s.\n\n{table}\n"
  )
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  print(text, flush=True)
  return text


def main(argv):
  """Entry point."""
  del argv
  try:
    with stops.handling():
      run_suite(flags.FLAGS.config, flags.FLAGS.workdir)
  except preflight.PreflightError as e:
    preflight.exit_with(e.problems)
  except stops.Stopped as e:
    # Finished runs are kept and the one it stopped in has its checkpoint.
    print(e.line(), file=sys.stderr, flush=True)
    sys.exit(e.exit_status)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
