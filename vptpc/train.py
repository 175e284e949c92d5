"""Prompt tuning end to end: the run loop, its checkpoints, the PC pipeline.

`train_stage` trains one run in a workdir (resumable Orbax checkpoints of
the trainable state, metrics, the exported ``prompts.npz``);
`train_and_evaluate` adds Prompt Condensation on top. The pieces live where
a reader looks for them, and stay importable from here:

* `vptpc.steps`: `TrainState` and the pure `make_train_step` /
  `make_eval_step`;
* `vptpc.build`: `setup` (config -> model, backbone, data, state),
  `load_backbone`, `program_key`, the pre-logit standardisation;
* `vptpc.runner`: `Runner`, the jitted/pmapped and on-device programs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vptpc import parallel
from vptpc import prompts as prompts_lib
from vptpc.build import (
  BACKBONE_CACHE_SIZE,
  Setup,
  build_model,
  head_from_raw,
  head_to_raw,
  load_backbone,
  prelogit_stats,
  program_key,
  setup,
  standardize_prelogits,
  token_pools,
)
from vptpc.data import device as device_data
from vptpc.data import pipeline
from vptpc.metric_writer import MetricWriter
from vptpc.models import vit
from vptpc.runner import (
  PROGRAM_CACHE_SIZE,
  Runner,
  _device,
  _device_split,
  _rows,
  make_device_eval,
  make_device_steps,
)
from vptpc.steps import (
  TrainState,
  create_train_state,
  make_eval_step,
  make_train_step,
)

# Public names, importable from here as before the split.
__all__ = [
  "BACKBONE_CACHE_SIZE",
  "PROGRAM_CACHE_SIZE",
  "Runner",
  "Setup",
  "TrainState",
  "build_model",
  "create_train_state",
  "head_from_raw",
  "head_to_raw",
  "load_backbone",
  "make_device_eval",
  "make_device_steps",
  "make_eval_step",
  "make_train_step",
  "prelogit_stats",
  "program_key",
  "setup",
  "standardize_prelogits",
  "token_pools",
  "train_and_evaluate",
  "train_stage",
  "versions",
  "_device",
  "_device_split",
]


# ---------------------------------------------------------------------------
# Orbax checkpoints of the trainable state.
# ---------------------------------------------------------------------------


def _manager(workdir: str, config) -> Any:
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
    os.path.join(workdir, "checkpoints"),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True
    ),
  )


def _flat(tree: Any) -> tuple[dict[str, Any], Any]:
  """Flattens to ``{path: leaf}`` without zero-size leaves.

  Orbax refuses zero-size arrays, and a condensed layer or a head-only run
  has (0, D) prompt arrays.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat = {jax.tree_util.keystr(p): x for p, x in leaves if np.size(x) > 0}
  return flat, treedef


def _unflat(flat: dict[str, Any], template: Any) -> Any:
  """Inverse of `_flat`; zero-size leaves come from ``template``."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  return jax.tree_util.tree_unflatten(
    treedef,
    [flat.get(jax.tree_util.keystr(p), x) for p, x in leaves],
  )


def _save(mngr, state: TrainState, rng: jax.Array) -> None:
  import orbax.checkpoint as ocp

  host = jax.device_get(state)
  # Host numpy, not device arrays: in a multi-process run Orbax refuses
  # process-local device arrays, and every process holds the same values.
  tree = {"state": host, "rng": np.asarray(jax.random.key_data(rng))}
  flat, _ = _flat(jax.tree_util.tree_map(np.asarray, tree))
  mngr.save(int(host.step), args=ocp.args.StandardSave(flat))


def _restore(mngr, template: TrainState, rng: jax.Array):
  import orbax.checkpoint as ocp

  step = mngr.latest_step()
  full = {"state": template, "rng": jax.random.key_data(rng)}
  flat, _ = _flat(full)
  abstract = {
    k: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    for k, x in flat.items()
  }
  restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  tree = _unflat(restored, jax.device_get(full))
  return tree["state"], jax.random.wrap_key_data(tree["rng"])


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
  """Package versions and the git SHA, for ``versions.json``."""
  import importlib.metadata as md

  out: dict[str, str | None] = {}
  for pkg in (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "ml-collections",
    "vptpc",
  ):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out["git_sha"] = subprocess.run(
      ["git", "rev-parse", "HEAD"],
      cwd=here,
      capture_output=True,
      text=True,
      timeout=5,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    out["git_sha"] = None
  return out


def _write_json(path: str, obj: Any) -> None:
  # Outputs are process 0's; the others would write the same file.
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _check_finite(metrics: dict[str, float], step: int, workdir: str) -> None:
  if not np.isfinite(metrics["train_loss"]):
    raise FloatingPointError(
      f"Non-finite training loss {metrics['train_loss']} at step {step}. "
      f"Checkpoints in {workdir}/checkpoints are kept as they were; lower "
      "config.base_lr or check the data normalisation."
    )


def train_stage(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  init_trainable: dict[str, Any] | None = None,
  stop_after_steps: int | None = None,
  measure_throughput: bool = False,
  quiet: bool = False,
) -> dict[str, Any]:
  """Trains prompts + head on ``config``, checkpointing into ``workdir``.

  Resumes automatically from the latest checkpoint in ``workdir``. At the end
  it evaluates on ``config.data.eval_split``, exports the prompts and head to
  ``<workdir>/prompts.npz`` (`vptpc.prompts.save_prompts`) and writes
  ``results.json``.

  Args:
    config: see `vptpc.config_util.base_config`.
    workdir: output directory (created).
    init_trainable: start from these prompts + head (see `setup`).
    stop_after_steps: stop (after checkpointing) once this global step is
      reached, as if the job were preempted; for tests and manual resumes.
    measure_throughput: also time a second (compiled) pass over the eval
      split and report ``eval_img_per_s``.
    quiet: do not print the final table.

  Returns:
    The results dict (also in ``results.json``).
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "config.json"), config.to_dict())
  _write_json(os.path.join(workdir, "versions.json"), versions())

  s = setup(config, init_trainable)
  # The resolved dataset version and split sizes: VTAB-1k subsets depend
  # on the version (vtab.md).
  _write_json(
    os.path.join(workdir, "data.json"),
    {"train": s.train.info, "eval": s.eval.info},
  )
  mode = parallel.resolve_mode(config.parallel, config.batch_size)
  if mode == "pmap":
    parallel.resolve_mode("pmap", config.eval_batch_size)
  counts = prompts_lib.count_prompts(s.state.trainable["prompts"])
  logging.info(
    "Devices: %s (%s). Trainable: %d prompt params (%d tokens) + %d head.",
    jax.local_device_count(),
    mode,
    counts["params"],
    counts["tokens"],
    vit.count_params(s.state.trainable["head"]),
  )
  rng = jax.random.fold_in(jax.random.key(config.seed), 2)
  mngr = _manager(workdir, config)
  state = s.state
  if mngr.latest_step() is not None:
    state, rng = _restore(mngr, state, rng)
    logging.info("Resumed from step %d in %s", int(state.step), workdir)
  elif config.eval_only:
    raise FileNotFoundError(
      f"config.eval_only is set but {workdir}/checkpoints has no checkpoint."
    )

  runner = Runner(mode, s)
  start = int(state.step)
  writer = MetricWriter(
    workdir, enabled=jax.process_index() == 0, resume_step=start
  )
  state = runner.place_state(state)
  try:
    if not config.eval_only:
      state = _train_loop(
        config,
        s,
        runner,
        state,
        rng,
        start,
        mngr,
        writer,
        workdir,
        stop_after_steps,
      )
    host = jax.device_get(runner.host_state(state))
    step = int(host.step)
    if stop_after_steps is not None and step < s.total_steps:
      return {"stopped_at_step": step}
    ev = runner.evaluate(state, s.eval, config)
    if measure_throughput:
      t0 = time.perf_counter()
      runner.evaluate(state, s.eval, config)
      ev["img_per_s"] = len(s.eval) / (time.perf_counter() - t0)
  finally:
    mngr.wait_until_finished()
    mngr.close()
  writer.write(step, {f"eval_{k}": v for k, v in ev.items()})
  writer.close()
  export = os.path.join(workdir, "prompts.npz")
  results = {
    "step": step,
    "epochs": step / s.steps_per_epoch,
    "eval_split": config.data.eval_split,
    "eval_accuracy": ev["accuracy"],
    "eval_loss": ev["loss"],
    "eval_examples": ev["num_examples"],
    "prompts_per_layer": list(
      prompts_lib.prompts_per_layer(host.trainable["prompts"])
    ),
    "trainable_params": vit.count_params(host.trainable),
    "export": export,
  }
  if measure_throughput:
    results["eval_img_per_s"] = ev["img_per_s"]
  if s.train_img_per_s is not None:
    results["train_img_per_s"] = round(s.train_img_per_s, 1)
  if jax.process_index() == 0:
    exported = s.export_trainable(host.trainable)
    prompts_lib.save_prompts(
      export,
      exported["prompts"],
      exported["head"],
      backbone=jax.device_get(
        s.frozen if s.checkpoint_backbone is None else s.checkpoint_backbone
      ),
      metadata={
        "dataset": config.data.name,
        "eval_accuracy": ev["accuracy"],
        "step": step,
        "model": config.model.name,
      },
    )
  _write_json(os.path.join(workdir, "results.json"), results)
  if jax.process_count() > 1:
    # Later stages (condensation) read the export on every process.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"vptpc export {workdir}")
  if not quiet and jax.process_index() == 0:
    _print_table(results)
  return results


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  stop_after_steps: int | None = None,
) -> dict[str, Any]:
  """Trains, evaluates and (with ``config.condense.keep > 0``) condenses.

  Without condensation this is `train_stage` in ``workdir``. With it, the
  Prompt Condensation pipeline runs, each stage resumable:

  1. train VPT-Deep with the full prompt count in ``<workdir>/full``;
  2. score every prompt on the training split (`vptpc.condense`), keep the
     top ``keep`` fraction, optionally re-project;
  3. fine-tune the kept prompts (and the head, ``condense.ft_head``) in
     ``<workdir>/condensed``; evaluate both models.

  ``<workdir>/results.json`` then holds both accuracies, the per-layer
  prompt counts, GFLOPs per image (PC's naive count and the key/value-only
  count) and the measured eval images/s of both models.

  Args:
    config: see `vptpc.config_util.base_config`.
    workdir: output directory.
    stop_after_steps: see `train_stage` (applies to the first stage).

  Returns:
    The results dict.
  """
  if config.condense.keep <= 0:
    return train_stage(config, workdir, stop_after_steps=stop_after_steps)
  return _condense_pipeline(config, workdir, stop_after_steps)


def _condense_pipeline(config, workdir, stop_after_steps):
  import functools

  from vptpc import condense as pc
  from vptpc import flops

  workdir = os.path.abspath(workdir)
  cc = config.condense
  full = train_stage(
    config,
    os.path.join(workdir, "full"),
    stop_after_steps=stop_after_steps,
    measure_throughput=True,
    quiet=True,
  )
  if "stopped_at_step" in full:
    return full
  model = build_model(config)
  frozen, _ = load_backbone(config, model)
  prompts, head, _ = prompts_lib.load_prompts(full["export"], backbone=frozen)
  # Scores on the un-augmented training images.
  train_split = pipeline.split_from_config(config, "train", augment=False)

  def batches():
    return pipeline.eval_batches(
      train_split,
      batch_size=config.eval_batch_size,
      normalization=config.data.normalize,
    )

  scores = pc.importance_scores(
    model,
    frozen,
    head,
    prompts,
    batches(),
    score_fn=cc.score_fn,
    aggregation=cc.aggregation,
    seed=config.seed,
  )
  reproject_fn = None
  if cc.reproject == "distill":
    reproject_fn = functools.partial(
      pc.distill,
      model,
      frozen,
      prompts,
      [b["image"] for b in batches()],
      steps=cc.distill_steps,
      lr=cc.distill_lr,
    )
  kept, idx = pc.condense(
    prompts,
    scores,
    keep=float(cc.keep),
    scope=cc.scope,
    reproject=cc.reproject,
    reproject_fn=reproject_fn,
  )
  ft = ml_collections.ConfigDict(config.to_dict())
  if cc.ft_epochs > 0:
    ft.total_epochs = cc.ft_epochs
    ft.warmup_epochs = min(config.warmup_epochs, cc.ft_epochs - 1)
  if cc.ft_base_lr > 0:
    ft.base_lr = cc.ft_base_lr
  ft.train_head = cc.ft_head
  cond = train_stage(
    ft,
    os.path.join(workdir, "condensed"),
    init_trainable={"prompts": kept, "head": head},
    measure_throughput=True,
    quiet=True,
  )
  dims = flops.model_dims(model, config.data.image_size)

  def summary(r):
    per_layer = r["prompts_per_layer"]
    return {
      "eval_accuracy": r["eval_accuracy"],
      "prompts_per_layer": per_layer,
      "prompts_total": sum(per_layer),
      "gflops_naive": flops.vit_gmacs(**dims, prompts_per_layer=per_layer),
      "gflops_kv": flops.vit_gmacs(
        **dims, prompts_per_layer=per_layer, count="kv"
      ),
      "eval_img_per_s": r["eval_img_per_s"],
      "trainable_params": r["trainable_params"],
    }

  results = {
    "eval_split": config.data.eval_split,
    "full": summary(full),
    "condensed": summary(cond),
    "keep": cc.keep,
    "seed": config.seed,
    "kept_indices": {k: v.tolist() for k, v in idx.items()},
    "scores": {k: v.tolist() for k, v in scores.items()},
    "condense_config": cc.to_dict(),
  }
  results["speedup_eval"] = (
    results["condensed"]["eval_img_per_s"] / results["full"]["eval_img_per_s"]
  )
  _write_json(os.path.join(workdir, "results.json"), results)
  _print_condense_table(results)
  return results


def _print_condense_table(r: dict[str, Any]) -> None:
  f, c = r["full"], r["condensed"]
  rows = [
    ("", "full", "condensed"),
    (
      "eval top-1",
      f"{100 * f['eval_accuracy']:.2f}%",
      f"{100 * c['eval_accuracy']:.2f}%",
    ),
    ("prompts", str(f["prompts_total"]), str(c["prompts_total"])),
    (
      "prompts/layer",
      ",".join(map(str, f["prompts_per_layer"])),
      ",".join(map(str, c["prompts_per_layer"])),
    ),
    ("GFLOPs naive", f"{f['gflops_naive']:.4f}", f"{c['gflops_naive']:.4f}"),
    ("GFLOPs K/V", f"{f['gflops_kv']:.4f}", f"{c['gflops_kv']:.4f}"),
    (
      "eval img/s",
      f"{f['eval_img_per_s']:.1f}",
      f"{c['eval_img_per_s']:.1f}",
    ),
  ]
  w0 = max(len(x[0]) for x in rows)
  w1 = max(len(x[1]) for x in rows)
  print(
    "\n".join(f"{a:<{w0}}  {b:>{w1}}  {cc}" for a, b, cc in rows), flush=True
  )


def _train_loop(
  config, s, runner, state, rng, start, mngr, writer, workdir, stop_after
):
  spe, total = s.steps_per_epoch, s.total_steps
  bar = None
  if config.progress_bar and jax.process_index() == 0:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
  step = start
  clock = {"t0": time.perf_counter(), "seen": 0, "t_first": None, "after": 0}

  def after(prev, state, metrics, seen, stacked):
    """Logging, finiteness and checkpoints for the steps (prev, step]."""
    clock["seen"] += seen
    if clock["t_first"] is None:
      # The first call holds the compile: the sustained rate starts after.
      jax.block_until_ready(metrics)
      clock["t_first"] = time.perf_counter()
    else:
      clock["after"] += seen
    logged = [
      t
      for t in range(prev + 1, step + 1)
      if t % config.log_every_steps == 0 or t == total or t == stop_after
    ]
    if logged:
      host = jax.device_get(metrics)
      for t in logged:
        m = {
          k: float(v[t - prev - 1] if stacked else v) for k, v in host.items()
        }
        _check_finite(m, t, workdir)
        m["img_per_s"] = clock["seen"] / (time.perf_counter() - clock["t0"])
        m["epoch"] = t / spe
        writer.write(t, m)
        if bar is not None:
          bar.set_postfix(
            loss=f"{m['train_loss']:.4f}",
            lr=f"{m['lr']:.4g}",
            img_s=f"{m['img_per_s']:.1f}",
          )
      clock["t0"], clock["seen"] = time.perf_counter(), 0
    if bar is not None:
      bar.update(step - prev)
    # With a scanned epoch, a checkpoint due inside it is written at its end.
    due = any(
      t % config.checkpoint_every_steps == 0 for t in range(prev + 1, step + 1)
    )
    if due or step == total or step == stop_after:
      _save(mngr, runner.host_state(state), rng)

  for epoch in range(start // spe, config.total_epochs):
    first = step - epoch * spe
    last = spe if stop_after is None else min(spe, stop_after - epoch * spe)
    if runner.dtrain is not None:
      if runner.scan_steps:
        chunks = [(first, last)]
      else:
        chunks = [(i, i + 1) for i in range(first, last)]
      for a, b in chunks:
        plan = device_data.epoch_plan(
          runner.dtrain,
          batch_size=config.batch_size,
          seed=config.seed,
          epoch=epoch,
          start_step=a,
          stop_step=b,
        )
        state, metrics = runner.train_steps(state, plan, rng)
        prev, step = step, step + (b - a)
        after(prev, state, metrics, int(plan["mask"].sum()), True)
    else:
      for batch in pipeline.train_batches(
        s.train,
        batch_size=config.batch_size,
        seed=config.seed,
        epoch=epoch,
        normalization=config.data.normalize,
        start_step=first,
        rows=_rows(config.batch_size),
      ):
        state, metrics = runner.train_step(state, batch, rng)
        prev, step = step, step + 1
        after(prev, state, metrics, int(batch["mask"].sum()), False)
        if step == stop_after:
          break
    if step == stop_after:
      break
    if config.eval_every_epochs and (epoch + 1) % config.eval_every_epochs == 0:
      if epoch + 1 < config.total_epochs:
        ev = runner.evaluate(state, s.eval, config)
        writer.write(step, {f"eval_{k}": v for k, v in ev.items()})
  if bar is not None:
    bar.close()
  jax.block_until_ready(state)
  if clock["after"]:
    s.train_img_per_s = clock["after"] / (
      time.perf_counter() - clock["t_first"]
    )
  return state


def _print_table(results: dict[str, Any]) -> None:
  rows = [
    ("step", results["step"]),
    ("epochs", f"{results['epochs']:.2f}"),
    ("eval split", results["eval_split"]),
    ("eval examples", results["eval_examples"]),
    ("eval top-1", f"{100 * results['eval_accuracy']:.2f}%"),
    ("eval loss", f"{results['eval_loss']:.4f}"),
    ("prompts/layer", ",".join(map(str, results["prompts_per_layer"]))),
    ("trainable params", f"{results['trainable_params']:,}"),
    ("export", results["export"]),
  ]
  w = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{w}}  {v}" for k, v in rows), flush=True)
