"""One compile for a whole hyper-parameter grid: vmapped prompt training.

VPT's protocol tunes 10 base LRs x 4 weight decays per task
(docs/references.md, "VPT: optimiser and schedule"): 40 runs that each
re-read the data and re-compile. Prompts and head live in their own pytree
on a frozen backbone, so the grid's members can be stacked
along a leading axis and one ``jax.vmap``-ped train step trains them all on
one pass of the data, the backbone shared rather than copied. Each member's
base LR and weight decay are part of its optimiser state
(``optax.inject_hyperparams``), so one program serves every member.

Every member starts from the same prompt and head init and sees the same
batches as the separate run with the same seed would, so its result equals
that run's up to float32 rounding (tested). ``config.protocol.vmap=True``
makes ``mode=tune`` use this (`vptpc.protocol.tune`);
``config.protocol.vmap_chunk`` bounds how many members share one job
(memory grows linearly with it). A grid job has no periodic checkpoints:
a killed job restarts, but `vptpc.protocol.tune` writes each finished
job's members to their run directories (``export_dirs``), so a resumed
grid skips the jobs that had finished. A job stopped by SIGINT or SIGTERM
(`vptpc.stops`) writes its stacked state at the end of the current epoch
to ``STOP_FILE`` in its first member's directory and goes on from there.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vptpc import build, faults, npz_checkpoint, optim, records, runner, stops
from vptpc import prompts as prompts_lib
from vptpc import steps as steps_lib
from vptpc.data import device as device_data
from vptpc.data import pipeline
from vptpc.models import registry

# A stopped job's state, in its first member's run directory.
STOP_FILE = "grid_stop.npz"


def grid_optimizer(
  unit_schedule: optax.Schedule,
  *,
  momentum: float,
  prompt_lr_scale: float = 1.0,
  train_head: bool = True,
):
  """VPT's SGD with the base LR and weight decay as injected state.

  ``unit_schedule`` is the LR schedule for ``base_lr = 1``; optax's SGD
  multiplies the momentum trace by the LR last, so scaling its update by
  ``lr_scale`` is the same optimiser as `vptpc.optim.create_optimizer`
  with ``base_lr = lr_scale``.

  Returns:
    ``make(lr_scale=..., weight_decay=...) -> GradientTransformation`` whose
    state carries both values.
  """

  def make(lr_scale, weight_decay):
    return optim.sgd_chain(
      unit_schedule,
      weight_decay=weight_decay,
      momentum=momentum,
      prompt_lr_scale=prompt_lr_scale,
      train_head=train_head,
      lr_scale=lr_scale,
    )

  return optax.inject_hyperparams(make)


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


# Compiled grid programs of this process, newest last: the chunks of a grid
# (same size) share one compile.
_GRID_PROGRAMS: dict[str, dict[str, Any]] = {}


def _grid_programs(config, s, optimizer, unit_schedule) -> dict[str, Any]:
  """The vmapped, jitted grid steps for ``config``, shared across chunks.

  A member's LR and weight decay live in its optimiser state, so they are
  not part of the program (nor of its cache key).
  """
  c = ml_collections.ConfigDict(config.to_dict())
  c.base_lr, c.weight_decay = 0.0, 0.0
  key = build.program_key(c, s.steps_per_epoch)
  if key in _GRID_PROGRAMS:
    _GRID_PROGRAMS[key] = _GRID_PROGRAMS.pop(key)
    return _GRID_PROGRAMS[key]
  step = steps_lib.make_train_step(s.model, optimizer, unit_schedule)
  vstep = jax.vmap(step, in_axes=(0, None, None, None))
  veval = jax.vmap(steps_lib.make_eval_step(s.model), in_axes=(0, None, None))
  norm = dict(
    normalization=config.data.normalize, image_size=s.train.image_size
  )

  def steps(states, frozen, arrays, plan, rng, finite):
    def body(carry, row):
      st, ok = carry
      # One gather per step, shared by every member.
      batch = device_data.gather(arrays, row, **norm)
      st, metrics = vstep(st, frozen, batch, rng)
      return (st, ok & jnp.isfinite(metrics["train_loss"])), None

    return jax.lax.scan(body, (states, finite), plan)[0]

  progs = {
    "step": jax.jit(vstep, donate_argnums=0),
    "eval": jax.jit(veval),
    "steps": jax.jit(steps, donate_argnums=0),
    "eval_all": jax.jit(
      jax.vmap(
        runner.make_device_eval(steps_lib.make_eval_step(s.model), **norm),
        in_axes=(0, None, None, None),
      )
    ),
  }
  _GRID_PROGRAMS[key] = progs
  while len(_GRID_PROGRAMS) > runner.PROGRAM_CACHE_SIZE:
    _GRID_PROGRAMS.pop(next(iter(_GRID_PROGRAMS)))
  return progs


def train_grid(
  config: ml_collections.ConfigDict,
  members: Sequence[tuple[float, float]],
  *,
  export_dirs: Sequence[str] | None = None,
  member_configs: Sequence[ml_collections.ConfigDict] | None = None,
) -> list[dict[str, Any]]:
  """Trains every (base_lr, weight_decay) member in one vmapped job.

  Args:
    config: a training config (its ``base_lr``/``weight_decay`` are
      replaced per member; everything else is shared).
    members: (base_lr, weight_decay) pairs.
    export_dirs: one directory per member: once the job has trained, each
      gets the member's ``config.json`` (from ``member_configs``),
      ``prompts.npz`` and, last, ``results.json`` (what
      `vptpc.protocol.tune` reads back on a resume).
    member_configs: the configs stored with ``export_dirs``.

  Returns:
    Per member: ``base_lr``, ``weight_decay``, ``eval_accuracy`` (NaN if
    the member diverged), ``eval_loss`` and its final ``trainable`` tree
    (its head for the checkpoint's backbone, `vptpc.build.Setup.export_trainable`),
    and the chunk's ``timing`` (training seconds, first epoch with its
    compile, sustained member-images/s after it).
  """
  s = build.setup(config)
  unit = optim.create_lr_schedule(
    base_lr=1.0,
    batch_size=config.batch_size,
    steps_per_epoch=s.steps_per_epoch,
    total_epochs=config.total_epochs,
    warmup_epochs=config.warmup_epochs,
    per_step=config.per_step_schedule,
  )
  make = grid_optimizer(
    unit,
    momentum=config.momentum,
    prompt_lr_scale=config.prompt.lr_scale,
    train_head=config.train_head,
  )
  opts = [make(lr_scale=lr, weight_decay=wd) for lr, wd in members]
  trainable = jax.device_get(s.state.trainable)
  dev = runner.local_device()
  states = jax.device_put(
    _stack([steps_lib.create_train_state(trainable, o) for o in opts]), dev
  )
  progs = _grid_programs(config, s, make(lr_scale=1.0, weight_decay=0.0), unit)
  frozen = jax.device_put(
    registry.cast_backbone(s.model, s.frozen, s.model.dtype), dev
  )
  # The run key of `vptpc.train.train_stage`, so dropout matches separate runs.
  rng = jax.random.fold_in(jax.random.key(config.seed), 2)
  # Kept on the device: a host read per step would sync every step.
  finite = jax.device_put(jnp.ones(len(members), bool), dev)
  dtrain = runner.place_split(s, s.train, "jit")
  deval = runner.place_split(s, s.eval, "jit")
  resume = _stop_path(export_dirs)
  start = 0
  if resume is not None and os.path.exists(resume):
    restored = _restore_stop(resume, members, (states, finite))
    if restored is not None:
      (states, finite), start = restored
      states, finite = jax.device_put((states, finite), dev)
      logging.info("grid: resumed at epoch %d from %s", start, resume)

  def stop_at(epoch):
    """After a signal: the job's state before ``epoch``, then `Stopped`."""
    signum = stops.pending()
    if signum is None:
      return
    n = len(members)
    where = (
      f"in a vmapped grid job of {n} member{'s' if n > 1 else ''} at epoch "
      f"{epoch} of {config.total_epochs}"
    )
    if resume is None:
      raise stops.Stopped(signum, where, "the job starts again")
    _save_stop(resume, members, jax.device_get((states, finite)), epoch)
    raise stops.Stopped(signum, where, f"its state is written to {resume}")

  t_start = t_first = time.perf_counter()
  with stops.deferred():
    for epoch in range(start, config.total_epochs):
      if epoch:
        faults.point("grid_epoch")
      if epoch > start:
        stop_at(epoch)
      if epoch == start + 1:
        # The first epoch holds the compile; later ones are sustained.
        jax.block_until_ready(finite)
        t_first = time.perf_counter()
      if dtrain is not None:
        plan = device_data.epoch_plan(
          dtrain, batch_size=config.batch_size, seed=config.seed, epoch=epoch
        )
        states, finite = progs["steps"](
          states, frozen, dtrain.arrays, plan, rng, finite
        )
        continue
      for batch in pipeline.train_batches(
        s.train,
        batch_size=config.batch_size,
        seed=config.seed,
        epoch=epoch,
        normalization=config.data.normalize,
      ):
        states, metrics = progs["step"](states, frozen, batch, rng)
        finite &= jnp.isfinite(metrics["train_loss"])
    jax.block_until_ready(finite)
    if config.total_epochs > start:
      stop_at(config.total_epochs)
  t_end = time.perf_counter()
  n_img = len(s.train) * len(members)
  timing = {
    "members": len(members),
    "epochs": config.total_epochs,
    "member_images_per_epoch": n_img,
    "first_epoch_s": round(t_first - t_start, 3),
    "train_s": round(t_end - t_start, 3),
    "data": "device" if dtrain is not None else "host",
  }
  if config.total_epochs > 1:
    timing["sustained_member_img_per_s"] = round(
      n_img * (config.total_epochs - 1) / (t_end - t_first), 1
    )
  logging.info("grid chunk: %s", timing)
  if deval is not None:
    plan = device_data.eval_plan(deval, batch_size=config.eval_batch_size)
    totals = progs["eval_all"](states.trainable, frozen, deval.arrays, plan)
  else:
    totals = None
    for batch in pipeline.eval_batches(
      s.eval,
      batch_size=config.eval_batch_size,
      normalization=config.data.normalize,
    ):
      sums = progs["eval"](states.trainable, frozen, batch)
      totals = (
        sums
        if totals is None
        else jax.tree_util.tree_map(jnp.add, totals, sums)
      )
  totals, finite = jax.device_get((totals, finite))
  host = jax.device_get(states.trainable)
  out = []
  for i, (lr, wd) in enumerate(members):
    n = float(totals["count"][i])
    acc = float(totals["correct"][i]) / n if finite[i] else math.nan
    out.append(
      {
        "base_lr": float(lr),
        "weight_decay": float(wd),
        "eval_accuracy": acc,
        "eval_loss": float(totals["loss"][i]) / n,
        "trainable": s.export_trainable(
          jax.tree_util.tree_map(lambda a, i=i: a[i], host)
        ),
        "timing": timing,
      }
    )
    logging.info("grid lr=%s wd=%s eval=%.4f", lr, wd, acc)
  faults.point("grid_epoch")
  if export_dirs is not None:
    _export(s, config, out, export_dirs, member_configs)
  if resume is not None and os.path.exists(resume):
    os.remove(resume)
  return out


def _stop_path(export_dirs: Sequence[str] | None) -> str | None:
  """Where a stopped grid job keeps its state: its first member's folder."""
  if not export_dirs or jax.process_index() != 0:
    return None
  return os.path.join(export_dirs[0], STOP_FILE)


def _save_stop(path, members, tree, epoch: int) -> None:
  """Writes a stopped job's stacked state (atomically) for `_restore_stop`."""
  leaves = jax.tree_util.tree_leaves(tree)
  arrays = {f"leaf{i:04d}": np.asarray(a) for i, a in enumerate(leaves)}
  d = os.path.dirname(path)
  os.makedirs(d, exist_ok=True)
  fd, tmp = npz_checkpoint.temp_file(d, ".npz.tmp")
  with os.fdopen(fd, "wb") as f:
    np.savez(f, members=np.asarray(members, np.float64), epoch=epoch, **arrays)
  os.replace(tmp, path)


def _restore_stop(path, members, like):
  """``(tree, epoch)`` from `_save_stop` for these members, else None."""
  try:
    with np.load(path) as f:
      data = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    logging.warning("grid: ignoring %s (%s); the job starts again.", path, e)
    return None
  leaves, treedef = jax.tree_util.tree_flatten(like)
  stored = [data.get(f"leaf{i:04d}") for i in range(len(leaves))]
  same = (
    np.array_equal(data.get("members"), np.asarray(members, np.float64))
    and len(data) == len(leaves) + 2
    and all(
      a is not None and a.shape == b.shape and a.dtype == b.dtype
      for a, b in zip(stored, leaves, strict=True)
    )
  )
  if not same:
    logging.warning(
      "grid: %s belongs to another job; the job starts again.", path
    )
    return None
  return jax.tree_util.tree_unflatten(treedef, stored), int(data["epoch"])


def _export(s, config, out, dirs, configs) -> None:
  """Writes each member's run directory (see `train_grid`)."""
  if jax.process_index() != 0:
    return
  backbone = jax.device_get(
    s.frozen if s.checkpoint_backbone is None else s.checkpoint_backbone
  )
  for i, (r, d) in enumerate(zip(out, dirs, strict=True)):
    os.makedirs(d, exist_ok=True)
    c = configs[i] if configs is not None else config
    records.write_json(os.path.join(d, "config.json"), c.to_dict())
    export = os.path.join(d, "prompts.npz")
    prompts_lib.save_prompts(
      export,
      r["trainable"]["prompts"],
      r["trainable"]["head"],
      backbone=backbone,
      metadata={
        "dataset": config.data.name,
        "eval_accuracy": r["eval_accuracy"],
        "step": s.total_steps,
        "model": config.model.name,
      },
    )
    res = {
      k: v for k, v in r.items() if k not in ("trainable",) and k != "timing"
    }
    res.update(
      step=s.total_steps,
      epochs=config.total_epochs,
      eval_split=config.data.eval_split,
      export=export,
      vmapped=True,
      timing=r["timing"],
    )
    records.write_json(os.path.join(d, "results.json"), res)


def train_grid_chunked(
  config: ml_collections.ConfigDict,
  members: Sequence[tuple[float, float]],
  chunk: int = 0,
) -> list[dict[str, Any]]:
  """`train_grid` over chunks of at most ``chunk`` members (0: all)."""
  chunk = chunk or len(members)
  out = []
  for i in range(0, len(members), chunk):
    out += train_grid(config, members[i : i + chunk])
  return out
