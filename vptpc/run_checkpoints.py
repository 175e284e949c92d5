"""Orbax checkpoints of a run's trainable state, checked before a resume.

Checkpoints (``<workdir>/checkpoints/<step>``) are saved synchronously and
atomically, with the size and hash of every file recorded in
``<workdir>/checkpoints_digest``: `restore` names a damaged latest
checkpoint, moves it aside and falls back to the previous one, and a full
disk fails `save` with the previous checkpoint intact. The trainable state
is prompts, head and optimiser state (KBs to a few MB); the frozen backbone
is never saved here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vptpc import faults, records
from vptpc.steps import TrainState


def manager(workdir: str, config) -> Any:
  """Orbax's manager of ``<workdir>/checkpoints``.

  Saves are synchronous: the trainable state is KBs to a few MB, and a
  save that has returned is on disk (a crash after it loses nothing, a
  failed one raises at once). Each save is atomic (written to a temporary
  directory, renamed into place), so a crash mid-save leaves the previous
  checkpoints as they were.
  """
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


def save(mngr, state: TrainState, rng: jax.Array) -> None:
  """Saves ``state`` and ``rng`` as the checkpoint of ``state.step``.

  Raises:
    OSError: the checkpoint could not be written (a full disk, say); the
      message names the step, and the previous checkpoint is intact.
  """
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
    write_digest(mngr, step)
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
  crash, full = faults.armed("save"), faults.disk_full_now()
  if not crash and not full:
    yield
    return
  # Orbax's private modules, imported only when a fault is armed (the fault
  # tests and sweep), so that a change in Orbax's internals cannot break a
  # normal run.
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


def file_digests(step_dir: str) -> dict[str, list]:
  """``{relative path: [size, sha256]}`` of every file of a checkpoint."""
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


def write_digest(mngr, step: int) -> None:
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
  records.write_json(
    os.path.join(where, f"{step}.json"), file_digests(step_dir)
  )
  keep = {f"{t}.json" for t in mngr.all_steps()}
  for f in os.listdir(where):
    if f.endswith(".json") and f not in keep:
      os.remove(os.path.join(where, f))


def damage(mngr, step: int) -> str | None:
  """What differs from a checkpoint's recorded digest (None: as recorded).

  A checkpoint without a digest (an older vptpc's) is None as well.
  """
  try:
    with open(os.path.join(_digest_dir(mngr), f"{step}.json")) as f:
      want = json.load(f)
  except (OSError, ValueError):
    return None
  step_dir = os.path.join(os.fspath(mngr.directory), str(step))
  have = file_digests(step_dir)
  for rel, (size, digest) in sorted(want.items()):
    if rel not in have:
      return f"{rel} is missing"
    if have[rel][0] != size:
      return f"{rel} has {have[rel][0]} bytes, {size} were written"
    if have[rel][1] != digest:
      return f"{rel} differs from what was written"
  return None


def restore(mngr, template: TrainState, rng: jax.Array, workdir, config):
  """Restores the latest readable checkpoint: (manager, state, rng).

  A checkpoint that fails to restore (truncated, corrupted) is reported
  with a warning naming its step, moved to ``<workdir>/checkpoints_bad/``
  (kept for inspection, out of Orbax's way) and the previous one is tried;
  with none left, training starts from step 0.
  """
  full = {"state": template, "rng": jax.random.key_data(rng)}
  flat, _ = _flat(full)
  abstract = {
    k: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    for k, x in flat.items()
  }
  while (step := mngr.latest_step()) is not None:
    why = damage(mngr, step)
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
        multihost_utils.sync_global_devices(f"vptpc bad checkpoint {step}")
      mngr = manager(workdir, config)
      continue
    tree = _unflat(restored, jax.device_get(full))
    return mngr, tree["state"], jax.random.wrap_key_data(tree["rng"])
  return mngr, template, rng
