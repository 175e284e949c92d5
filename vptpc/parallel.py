"""Thin wrappers that run one pure step under `jax.jit` or `jax.pmap`.

The step functions in `vptpc.train` are written once, with an optional
``axis_name``; this module only reshapes, places, calls and unreplicates.
Since JAX 0.8 `jax.pmap` is built on jit + shard_map and is in maintenance
mode (docs/references.md, "Design conventions"), so the pmap wrapper is
kept deliberately thin, places arrays with `jax.device_put` on a 1-D mesh of
the local devices (no deprecated ``device_put_replicated``/
``flax.jax_utils``), and saves checkpoints from one unreplicated copy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"
# ``config.parallel``: `resolve_mode` turns ``auto`` into jit or pmap.
MODES = ("auto", "jit", "pmap")


def resolve_mode(mode: str, batch_size: int) -> str:
  """Returns ``"jit"`` or ``"pmap"`` for a config value.

  Args:
    mode: ``"auto"`` (pmap when more than one local device), ``"jit"`` or
      ``"pmap"``.
    batch_size: the global batch, which pmap splits evenly.

  Raises:
    ValueError: unknown mode, or a batch that does not split over devices.
  """
  n = jax.device_count()  # global: all processes' devices
  if mode not in MODES:
    raise ValueError(
      f"config.parallel must be one of {', '.join(MODES)}; got {mode!r}."
    )
  if jax.process_count() > 1:
    # Every process runs the pmapped step on its local devices; the psum
    # inside spans all processes' devices.
    if mode == "jit":
      raise ValueError(
        "config.parallel=jit runs on one device; a multi-process run needs "
        "auto or pmap."
      )
    mode = "pmap"
  if mode == "auto":
    mode = "pmap" if n > 1 else "jit"
  if mode == "pmap" and batch_size % n:
    raise ValueError(
      f"config.batch_size={batch_size} is not divisible by the {n} "
      "devices; the global batch is fixed by the config, so pick one that "
      "divides evenly (or config.parallel=jit)."
    )
  return mode


def process_slice(batch_size: int) -> tuple[int, int]:
  """This process's [start, end) rows of every global batch.

  Every process draws the same global batches (same seed and order) and
  keeps its contiguous share, so the global batch, and the result, do not
  depend on how many processes run it.
  """
  per = batch_size // jax.process_count()
  i = jax.process_index()
  return i * per, (i + 1) * per


def needs_sync(mode: str) -> bool:
  """Whether to wait on every step: CPU collectives deadlock when queued.

  On a 2-core host, several queued collective-bearing steps deadlock XLA's
  CPU rendezvous (docs/references.md, "Platform notes"); waiting on each
  step avoids it and costs nothing on a CPU anyway. Accelerators keep
  asynchronous dispatch.
  """
  return mode == "pmap" and jax.devices()[0].platform == "cpu"


@functools.cache
def _mesh() -> Mesh:
  return Mesh(np.asarray(jax.local_devices()), (AXIS,))


def replicate(tree: Any) -> Any:
  """Places one copy of ``tree`` per local device, stacked on axis 0."""
  n = jax.local_device_count()
  sharding = NamedSharding(_mesh(), P(AXIS))
  return jax.tree_util.tree_map(
    lambda x: jax.device_put(
      np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding
    ),
    tree,
  )


def unreplicate(tree: Any) -> Any:
  """Returns the first device's copy of a replicated tree."""
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def shard_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Reshapes a global batch to (devices, per_device, ...) and places it."""
  n = jax.local_device_count()
  sharding = NamedSharding(_mesh(), P(AXIS))
  return jax.tree_util.tree_map(
    lambda x: jax.device_put(x.reshape((n, -1) + x.shape[1:]), sharding), batch
  )


def jit_train_step(train_step: Callable) -> Callable:
  """``train_step(state, frozen, batch, rng)`` under jit; state is donated."""
  return jax.jit(train_step, donate_argnums=(0,))


def pmap_train_step(train_step: Callable) -> Callable:
  """The same step under pmap over the local devices.

  State, frozen backbone and batch are mapped on axis 0 (the backbone is
  replicated once by the caller and never donated); the rng is shared and
  folded with the device index inside the step.
  """
  return jax.pmap(
    functools.partial(train_step, axis_name=AXIS),
    axis_name=AXIS,
    in_axes=(0, 0, 0, None),
    donate_argnums=(0,),
  )


def pmap_eval_step(eval_step: Callable) -> Callable:
  """``eval_step(trainable, frozen, batch)`` under pmap (sums psum'ed)."""
  return jax.pmap(functools.partial(eval_step, axis_name=AXIS), axis_name=AXIS)
