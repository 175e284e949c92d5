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

Checkpoints (Orbax, ``<workdir>/checkpoints/<step>``) are saved
synchronously and atomically, with the size and hash of every file recorded
in ``<workdir>/checkpoints_digest``: a resume names a damaged latest
checkpoint and falls back to the previous one, a full disk fails the save
with the previous checkpoint intact, and a run killed at any point resumes
to the same prompts, bit for bit on CPU (tests/test_faults.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vptpc import config_util, parallel
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
  """Orbax's manager of ``<workdir>/checkpoints``.

  Saves are synchronous: the trainable state is KBs to a few MB, and a
  save that has returned is on disk (a crash after it loses nothing, a
  failed one raises at once). Each save is atomic (written to a temporary
  directory, renamed into place), so a crash mid-save leaves the previous
  checkpoints as they were.
  """
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
    os.path.join(workdir, "checkpoints"),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      create=True,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=True,
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
  """Saves ``state`` and ``rng`` as the checkpoint of ``state.step``.

  Raises:
    OSError: the checkpoint could not be written (a full disk, say); the
      message names the step, and the previous checkpoint is intact.
  """
  import orbax.checkpoint as ocp

  host = jax.device_get(state)
  # Host numpy, not device arrays: in a multi-process run Orbax refuses
  # process-local device arrays, and every process holds the same values.
  tree = {"state": host, "rng": np.asarray(jax.random.key_data(rng))}
  flat, _ = _flat(jax.tree_util.tree_map(np.asarray, tree))
  step = int(host.step)
  previous = mngr.latest_step()
  try:
    with _injected_faults():
      mngr.save(step, args=ocp.args.StandardSave(flat))
    _write_digest(mngr, step)
  except OSError as e:
    where = os.fspath(mngr.directory)
    kept = (
      f"the previous checkpoint (step {previous}) is intact"
      if previous is not None
      else "no earlier checkpoint exists"
    )
    raise OSError(
      e.errno,
      f"Could not write checkpoint step {step} in {where} "
      f"({e.strerror or e}); {kept}. Free space (or fix the directory) and "
      "run the same command to resume",
    ) from e


@contextlib.contextmanager
def _injected_faults():
  """`vptpc.faults`' ``save`` crash and simulated full disk, when armed.

  Both hook Orbax where it writes a checkpoint's last files: the crash
  comes after every file of the step is written and before its temporary
  directory is renamed into place; the full disk fails the metadata write.
  """
  from vptpc import faults

  crash, full = faults.armed("save"), faults.disk_full_now()
  if not crash and not full:
    yield
    return
  from orbax.checkpoint._src.path import async_path, atomicity

  cls = atomicity.AtomicRenameTemporaryPath
  finalize, write_text = cls.finalize, async_path.write_text

  async def crashing_finalize(self):
    faults.point("save")
    return await finalize(self)

  async def full_write_text(path, text, *a, **kw):
    raise faults.disk_full_error(os.fspath(path))

  if crash:
    cls.finalize = crashing_finalize
  if full:
    async_path.write_text = full_write_text
  try:
    yield
  finally:
    cls.finalize, async_path.write_text = finalize, write_text


def _digest_dir(mngr) -> str:
  """``<workdir>/checkpoints_digest``: one JSON per checkpoint step."""
  return os.path.join(os.path.dirname(os.fspath(mngr.directory)), DIGESTS)


DIGESTS = "checkpoints_digest"


def _file_digests(step_dir: str) -> dict[str, list]:
  """``{relative path: [size, sha256]}`` of every file of a checkpoint."""
  import hashlib

  out = {}
  for d, _, files in os.walk(step_dir):
    for f in files:
      path = os.path.join(d, f)
      with open(path, "rb") as fh:
        data = fh.read()
      out[os.path.relpath(path, step_dir)] = [
        len(data),
        hashlib.sha256(data).hexdigest(),
      ]
  return out


def _write_digest(mngr, step: int) -> None:
  """Records the sizes and hashes of a saved checkpoint's files.

  Orbax's files carry no end-to-end check a restore could be asked for
  first, and a failed restore leaves TensorStore callbacks printing
  tracebacks; checking these digests first names the damaged file and
  step instead. Digests of steps Orbax has deleted are dropped.
  """
  if jax.process_index() != 0:
    return
  where = _digest_dir(mngr)
  os.makedirs(where, exist_ok=True)
  step_dir = os.path.join(os.fspath(mngr.directory), str(step))
  _write_json(os.path.join(where, f"{step}.json"), _file_digests(step_dir))
  keep = {f"{t}.json" for t in mngr.all_steps()}
  for f in os.listdir(where):
    if f.endswith(".json") and f not in keep:
      os.remove(os.path.join(where, f))


def _damage(mngr, step: int) -> str | None:
  """What differs from a checkpoint's recorded digest (None: as recorded).

  A checkpoint without a digest (an older vptpc's) is None as well.
  """
  try:
    with open(os.path.join(_digest_dir(mngr), f"{step}.json")) as f:
      want = json.load(f)
  except (OSError, ValueError):
    return None
  step_dir = os.path.join(os.fspath(mngr.directory), str(step))
  have = _file_digests(step_dir)
  for rel, (size, digest) in sorted(want.items()):
    if rel not in have:
      return f"{rel} is missing"
    if have[rel][0] != size:
      return f"{rel} has {have[rel][0]} bytes, {size} were written"
    if have[rel][1] != digest:
      return f"{rel} differs from what was written"
  return None


def _restore(mngr, template: TrainState, rng: jax.Array, workdir, config):
  """Restores the latest readable checkpoint: (manager, state, rng).

  A checkpoint that fails to restore (truncated, corrupted) is reported
  with a warning naming its step, moved to ``<workdir>/checkpoints_bad/``
  (kept for inspection, out of Orbax's way) and the previous one is tried;
  with none left, training starts from step 0.
  """
  import orbax.checkpoint as ocp

  full = {"state": template, "rng": jax.random.key_data(rng)}
  flat, _ = _flat(full)
  abstract = {
    k: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    for k, x in flat.items()
  }
  while (step := mngr.latest_step()) is not None:
    why = _damage(mngr, step)
    if why is None:
      try:
        restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # Orbax and TensorStore raise many types.
        why = f"{type(e).__name__}: " + (
          str(e).splitlines()[0][:300] if str(e) else ""
        )
    if why is not None:
      steps = sorted(mngr.all_steps())
      earlier = [t for t in steps if t < step]
      bad = os.path.join(workdir, "checkpoints_bad", str(step))
      logging.warning(
        "Checkpoint step %d in %s/checkpoints is unreadable (%s); it is "
        "moved to %s and %s.",
        step,
        workdir,
        why,
        bad,
        f"step {earlier[-1]} is used instead"
        if earlier
        else "training starts from step 0",
      )
      mngr.close()
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(bad), exist_ok=True)
        if os.path.exists(bad):
          shutil.rmtree(bad)
        os.rename(os.path.join(workdir, "checkpoints", str(step)), bad)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"vptpc bad checkpoint {step}")
      mngr = _manager(workdir, config)
      continue
    tree = _unflat(restored, jax.device_get(full))
    return mngr, tree["state"], jax.random.wrap_key_data(tree["rng"])
  return mngr, template, rng


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
      f"Checkpoints in {workdir}/checkpoints are kept as they were. Lower "
      "config.base_lr (a changed run: add --config.overwrite=True, or use "
      "another --workdir) or check the data normalisation."
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
  from vptpc import rundir

  workdir = rundir.local_workdir(workdir, config)
  with rundir.entry(config, workdir, kind="stage") as run:
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
        _print_table(done)
      return done
    s = setup(config, init_trainable)
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
  # on the version (vtab.md).
  _write_json(
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
  mngr = _manager(workdir, config)
  state = s.state
  if mngr.latest_step() is not None:
    mngr, state, rng = _restore(mngr, state, rng, workdir, config)
    if int(state.step):
      logging.info("Resumed from step %d in %s", int(state.step), workdir)
  if config.eval_only and not int(state.step):
    mngr.close()
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
  except pipeline.DataError as e:
    # A split too large to cache decodes each batch as it comes, so a
    # corrupt example surfaces here, mid-run; say what survives and how to
    # go on, in the one error line main prints.
    mngr.wait_until_finished()
    latest = mngr.latest_step()
    raise pipeline.DataError(
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
  from vptpc import rundir

  workdir = rundir.local_workdir(workdir, config)
  with rundir.entry(config, workdir, kind="pc") as run:
    done = rundir.finished(config, workdir, "pc")
    if done is not None and "condensed" in done:
      if jax.process_index() == 0:
        print(
          f"{workdir}: already finished with this config; nothing to do "
          "(results below; --config.overwrite=True starts afresh).",
          flush=True,
        )
        _print_condense_table(done)
      return done
    run.start(store_config=False)
    return _condense_pipeline(config, workdir, stop_after_steps, run)


def _condense_pipeline(config, workdir, stop_after_steps, run):
  import functools

  from vptpc import condense as pc
  from vptpc import faults, flops

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
  faults.point("condense")
  # From here on the condense settings shape the run: they are stored (and
  # compared on a resume) in the top-level config.json.
  run.store_config()
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
  ft = config_util.finetune_config(config)
  cond = train_stage(
    ft,
    os.path.join(workdir, "condensed"),
    init_trainable={"prompts": kept, "head": head},
    measure_throughput=True,
    quiet=True,
  )

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
  from vptpc import faults

  spe, total = s.steps_per_epoch, s.total_steps
  bar = None
  if config.progress_bar and jax.process_index() == 0:
    if _interactive():
      from tqdm import tqdm

      bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    else:
      bar = ProgressLines(total, start)
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
    faults.point("train")
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


def _interactive() -> bool:
  """Whether a progress bar can redraw: stdout and stderr are terminals."""
  return sys.stdout.isatty() and sys.stderr.isatty()


class ProgressLines:
  """The progress bar's stand-in for logs and pipes: a line now and then.

  A redrawing bar written to a file is one unreadable line of carriage
  returns; this prints ``step 130/1300 (10%) loss ... lr ... img/s ... eta
  ...`` to stderr at every tenth of the run (and at most every 30 s, at
  least every 5 min), and at the last step. Same interface as the tqdm
  calls `_train_loop` makes.
  """

  def __init__(self, total: int, initial: int = 0, out=None):
    """Starts counting at ``initial`` of ``total`` steps."""
    self.total, self.n = total, initial
    self.out = out or sys.stderr
    self.postfix: dict[str, str] = {}
    self._t0 = self._last_t = time.perf_counter()
    self._n1, self._last_t0 = initial, self._t0
    self._last_tenth = initial * 10 // max(total, 1)

  def set_postfix(self, **kw) -> None:
    """Remembers the latest metrics for the next line."""
    self.postfix = {k: str(v) for k, v in kw.items()}

  def update(self, n: int) -> None:
    """Advances ``n`` steps; prints a line when one is due."""
    self.n += n
    now = time.perf_counter()
    tenth = self.n * 10 // max(self.total, 1)
    due = (tenth > self._last_tenth and now - self._last_t >= 30) or (
      now - self._last_t >= 300
    )
    if self.n >= self.total or due or self._last_t == self._t0:
      self._line(now)
      self._last_tenth, self._last_t = tenth, now

  def _line(self, now: float) -> None:
    parts = [
      f"step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"
    ]
    parts += [f"{k} {v}" for k, v in self.postfix.items()]
    if self._last_t != self._t0 and self.n < self.total:
      # From the second line on: the first update holds the compile.
      rate = (self.n - self._n1) / max(now - self._last_t0, 1e-9)
      parts.append(f"eta {(self.total - self.n) / max(rate, 1e-9):.0f}s")
    else:
      self._n1, self._last_t0 = self.n, now
    print(" ".join(parts), file=self.out, flush=True)

  def close(self) -> None:
    """Nothing to tear down (tqdm's interface)."""


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
