"""Prompt tuning end to end: a training stage, and the PC pipeline on top.

`train_stage` trains one run in a workdir: resumable checkpoints of the
trainable state (`vptpc.run_checkpoints`), metrics, the exported
``prompts.npz`` and ``results.json``. `train_and_evaluate` adds Prompt
Condensation: the full run, the condensation and the fine-tuning of the
kept prompts, each a stage in its own sub-workdir. A run killed at any
point resumes to the same prompts, bit for bit on CPU
(tests/test_faults.py).

The pieces a stage is made of live where a reader looks for them:
`vptpc.build` (config -> model, backbone, data, state), `vptpc.steps` (the
pure train and eval steps), `vptpc.runner` (the compiled programs),
`vptpc.lifecycle` (preflight, lock, clean-up) and `vptpc.progress` (what a
run prints).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vptpc import (
  build,
  config_util,
  faults,
  flops,
  lifecycle,
  moved,
  parallel,
  progress,
  records,
  run_checkpoints,
  rundir,
  stops,
)
from vptpc import condense as pc
from vptpc import prompts as prompts_lib
from vptpc import runner as runner_lib
from vptpc.data import device as device_data
from vptpc.data import pipeline, sources
from vptpc.metric_writer import MetricWriter
from vptpc.models import vit

# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def _check_finite(metrics: dict[str, float], step: int, workdir: str) -> None:
  if not np.isfinite(metrics["train_loss"]):
    raise FloatingPointError(
      f"Non-finite training loss {metrics['train_loss']} at step {step}. "
      f"Checkpoints in {workdir}/checkpoints are kept as they were. Lower "
      "config.base_lr (a changed run: add --config.overwrite=True, or use "
      "another --workdir) or check the data normalisation."
    )


def _stop_signal(step: int, synced: bool) -> int | None:
  """The signal that stops the run at ``step``, agreed by every process.

  Processes may see a signal at different steps (or only one of them may
  get it); the checkpoint a stop writes needs them all, so they stop
  together. A SIGINT is shared only at steps that wait for the device
  anyway (``synced``: a logged or checkpointed step, the same on every
  process), so the exchange adds no host sync to the others. In a
  multi-process run JAX's preemption service owns SIGTERM and picks the
  step to stop at (`jax.experimental.multihost_utils.reached_preemption_sync_point`,
  which Orbax asks with the same steps); there the data come from the
  host, one step per call.
  """
  signum = stops.pending()
  if jax.process_count() == 1:
    return signum
  if synced:
    every = multihost_utils.process_allgather(np.int32(signum or 0))
    if int(np.max(every)):
      return int(np.max(every))
  if multihost_utils.reached_preemption_sync_point(step):
    return int(signal.SIGTERM)
  return None


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

  Preconditions are checked first, all at once (`vptpc.preflight`); the
  workdir is created only once the data and the backbone are loaded, so a
  run that fails on its inputs writes nothing. A workdir whose stored
  ``config.json`` differs in a key that cannot change mid-run is refused
  (`vptpc.config_util.SAFE_TO_CHANGE`; ``config.overwrite`` starts
  afresh); a finished run with exactly this config is not run again: its
  results are read back and its table printed.

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

  Raises:
    vptpc.preflight.PreflightError: unmet preconditions (all listed).
    vptpc.rundir.WorkdirLocked: another live run holds the workdir.
    FloatingPointError: the training loss became non-finite.
    OSError: a checkpoint could not be written (e.g. a full disk).
  """
  workdir = lifecycle.local_workdir(workdir, config)
  with lifecycle.entry(config, workdir, kind="stage") as run:
    done = rundir.finished(config, workdir, "stage")
    if done is not None and (
      not measure_throughput or "eval_img_per_s" in done
    ):
      if not quiet and jax.process_index() == 0:
        print(
          f"{workdir}: already finished at step {done.get('step')} with this "
          "config; nothing to do (results below; --config.overwrite=True "
          "starts afresh).",
          flush=True,
        )
        progress.print_table(done)
      return done
    with stops.stage(f"while {workdir} was loading its inputs or compiling"):
      s = build.setup(config, init_trainable)
      mode = parallel.resolve_mode(config.parallel, config.batch_size)
      if mode == "pmap":
        parallel.resolve_mode("pmap", config.eval_batch_size)
      run.start()
      return _train_stage(
        config,
        workdir,
        s,
        mode,
        stop_after_steps=stop_after_steps,
        measure_throughput=measure_throughput,
        quiet=quiet,
      )


def _train_stage(
  config, workdir, s, mode, *, stop_after_steps, measure_throughput, quiet
) -> dict[str, Any]:
  # The resolved dataset version and split sizes: VTAB-1k subsets depend
  # on the version (docs/references.md, "VTAB-1k: splits").
  records.write_json(
    os.path.join(workdir, "data.json"),
    {"train": s.train.info, "eval": s.eval.info},
  )
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
  mngr = run_checkpoints.manager(workdir, config)
  state = s.state
  if mngr.latest_step() is not None:
    mngr, state, rng = run_checkpoints.restore(
      mngr, state, rng, workdir, config
    )
    if int(state.step):
      logging.info("Resumed from step %d in %s", int(state.step), workdir)
  if config.eval_only and not int(state.step):
    mngr.close()
    raise FileNotFoundError(
      f"config.eval_only is set but {workdir}/checkpoints has no checkpoint."
    )

  runner = runner_lib.Runner(mode, s)
  start = int(state.step)
  writer = MetricWriter(
    workdir, enabled=jax.process_index() == 0, resume_step=start
  )
  state = runner.place_state(state)
  try:
    if not config.eval_only:
      # A signal lets the current step (or scanned epoch) finish, which
      # then writes its checkpoint and stops (`stops`).
      with stops.deferred():
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
    with stops.stage(
      f"while {workdir} was evaluating after its last step (its "
      f"checkpoint at step {step} is kept)"
    ):
      ev = runner.evaluate(state, s.eval, config)
      if measure_throughput:
        t0 = time.perf_counter()
        runner.evaluate(state, s.eval, config)
        ev["img_per_s"] = len(s.eval) / (time.perf_counter() - t0)
  except sources.DataError as e:
    # A split too large to cache decodes each batch as it comes, so a
    # corrupt example surfaces here, mid-run; say what survives and how to
    # go on, in the one error line main prints.
    mngr.wait_until_finished()
    latest = mngr.latest_step()
    raise sources.DataError(
      f"{e} Found mid-run: that split is decoded per batch (larger than "
      "config.data.cache_max_gb). The checkpoints in "
      f"{workdir}/checkpoints are kept as they were (latest: "
      f"{'none' if latest is None else f'step {latest}'}): replace or remove "
      "the file and run the same command to resume."
    ) from e
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
  records.write_json(os.path.join(workdir, "results.json"), results)
  if jax.process_count() > 1:
    # Later stages (condensation) read the export on every process.
    multihost_utils.sync_global_devices(f"vptpc export {workdir}")
  if not quiet and jax.process_index() == 0:
    progress.print_table(results)
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
  workdir = lifecycle.local_workdir(workdir, config)
  with lifecycle.entry(config, workdir, kind="pc") as run:
    done = rundir.finished(config, workdir, "pc")
    if done is not None and "condensed" in done:
      if jax.process_index() == 0:
        print(
          f"{workdir}: already finished with this config; nothing to do "
          "(results below; --config.overwrite=True starts afresh).",
          flush=True,
        )
        progress.print_condense_table(done)
      return done
    run.start(store_config=False)
    return _condense_pipeline(config, workdir, stop_after_steps, run)


def _condense_pipeline(config, workdir, stop_after_steps, run):
  """The three stages of `train_and_evaluate` with condensation."""
  full = train_stage(
    config,
    os.path.join(workdir, "full"),
    stop_after_steps=stop_after_steps,
    measure_throughput=True,
    quiet=True,
  )
  if "stopped_at_step" in full:
    return full
  with stops.stage(
    f"while condensing the prompts of {workdir}/full (the full model is "
    "finished and kept; the condensation starts again)"
  ):
    kept, head, idx, scores = _condense(config, workdir, run, full)
  ft = config_util.finetune_config(config)
  cond = train_stage(
    ft,
    os.path.join(workdir, "condensed"),
    init_trainable={"prompts": kept, "head": head},
    measure_throughput=True,
    quiet=True,
  )
  return _summaries(
    config, workdir, full, cond, idx, scores, build.build_model(config)
  )


def _condense(config, workdir, run, full):
  """Scores the full run's prompts, keeps the best, re-projects them.

  Returns:
    (kept prompts, the full run's head, kept indices, scores).
  """
  cc = config.condense
  faults.point("condense")
  # From here on the condense settings shape the run: they are stored (and
  # compared on a resume) in the top-level config.json.
  run.store_config()
  model = build.build_model(config)
  frozen, _ = build.load_backbone(config, model)
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
  return kept, head, idx, scores


def _summaries(config, workdir, full, cond, idx, scores, model):
  """The PC run's results: both models, the kept prompts, the speed-up."""
  cc = config.condense

  def summary(r):
    per_layer = r["prompts_per_layer"]
    # `vit_gmacs` or `swin_gmacs`, by the model's family.
    gmacs = functools.partial(
      flops.model_gmacs, model, config.data.image_size, per_layer
    )
    return {
      "eval_accuracy": r["eval_accuracy"],
      "prompts_per_layer": per_layer,
      "prompts_total": sum(per_layer),
      "gflops_naive": gmacs(count="naive"),
      "gflops_kv": gmacs(count="kv"),
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
  records.write_json(os.path.join(workdir, "results.json"), results)
  progress.print_condense_table(results)
  return results


def _train_loop(
  config, s, runner, state, rng, start, mngr, writer, workdir, stop_after
):
  spe, total = s.steps_per_epoch, s.total_steps
  bar = None
  if config.progress_bar and jax.process_index() == 0:
    bar = progress.bar(total, start)
  step = start
  clock = {
    "t0": time.perf_counter(),
    "seen": 0,
    "t_first": None,
    "after": 0,
    "saved": start,  # the step of the latest checkpoint
  }

  def after(prev, state, metrics, seen, stacked):
    """Logging, finiteness and checkpoints for the steps (prev, step]."""
    clock["seen"] += seen
    if clock["t_first"] is None:
      # The first call holds the compile: the sustained rate starts after.
      jax.block_until_ready(metrics)
      clock["t_first"] = time.perf_counter()
    else:
      clock["after"] += seen
    # The first step too: its loss is the starting point (ln C from a
    # zero head) that the later ones are read against.
    logged = [
      t
      for t in range(prev + 1, step + 1)
      if t % config.log_every_steps == 0 or t in (1, total, stop_after)
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
    faults.point("train")
    # With a scanned epoch, a checkpoint due inside it is written at its end.
    due = any(
      t % config.checkpoint_every_steps == 0 for t in range(prev + 1, step + 1)
    )
    if due or step == total or step == stop_after:
      run_checkpoints.save(mngr, runner.host_state(state), rng)
      clock["saved"] = step
    stop_here(step, state, synced=bool(logged) or clock["saved"] == step)

  def stop_here(step, state, synced=True):
    """After a signal: a checkpoint at ``step``, then `stops.Stopped`."""
    signum = _stop_signal(step, synced)
    if signum is None:
      return
    if clock["saved"] != step:
      run_checkpoints.save(mngr, runner.host_state(state), rng)
    if bar is not None:
      bar.close()
    raise stops.Stopped(
      signum,
      f"in training at step {step} of {total} ({workdir})",
      f"its checkpoint at step {step} is written",
    )

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
        rows=runner_lib.process_rows(config.batch_size),
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
        stop_here(step, state)
  if bar is not None:
    bar.close()
  jax.block_until_ready(state)
  if clock["after"]:
    s.train_img_per_s = clock["after"] / (
      time.perf_counter() - clock["t_first"]
    )
  return state


# Names this module re-exported before they lived only where they are
# defined: the name, its module.
_MOVED = {
  **{
    n: "vptpc.build"
    for n in (
      "BACKBONE_CACHE_SIZE",
      "Setup",
      "build_model",
      "head_from_raw",
      "head_to_raw",
      "load_backbone",
      "prelogit_stats",
      "program_key",
      "setup",
      "standardize_prelogits",
      "token_pools",
    )
  },
  **{
    n: "vptpc.runner"
    for n in (
      "PROGRAM_CACHE_SIZE",
      "Runner",
      "make_device_eval",
      "make_device_steps",
    )
  },
  **{
    n: "vptpc.steps"
    for n in (
      "TrainState",
      "create_train_state",
      "make_eval_step",
      "make_train_step",
    )
  },
  "versions": "vptpc.records",
  "ProgressLines": "vptpc.progress",
}


__getattr__ = moved.forwarder(__name__, _MOVED)
