"""Placing and calling the compiled steps: jit or pmap, host or device data.

`Runner` places the frozen backbone once (in the compute dtype under jit),
places cached splits on the device when they fit (`vptpc.data.device`) and
calls the train and eval steps of `vptpc.steps`, compiled once per process
for every run with the same `vptpc.build.program_key` (the seeds of a final
run share them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from vptpc import parallel
from vptpc.build import Setup
from vptpc.data import device as device_data
from vptpc.data import pipeline
from vptpc.models import registry
from vptpc.steps import TrainState, make_eval_step, make_train_step


def process_rows(batch_size: int) -> tuple[int, int] | None:
  """This process's rows of each global batch (None: single process)."""
  if jax.process_count() == 1:
    return None
  return parallel.process_slice(batch_size)


# Compiled programs of this process by (program key, mode), newest last.
_PROGRAMS: dict[tuple[str, str], dict[str, Callable]] = {}
PROGRAM_CACHE_SIZE = 4


def make_device_steps(
  train_step: Callable, *, normalization: str, image_size: int
) -> Callable:
  """``steps(state, frozen, arrays, plan, rng)``: a plan's steps in one call.

  Each step gathers its batch from the device-resident split
  (`vptpc.data.device.gather`) and runs ``train_step``; the steps run as
  one `jax.lax.scan`, so an epoch needs no host round trip. Returns the
  final state and the metrics of every step, stacked.
  """

  def steps(state, frozen, arrays, plan, rng):
    def body(st, row):
      batch = device_data.gather(
        arrays, row, normalization=normalization, image_size=image_size
      )
      return train_step(st, frozen, batch, rng)

    return jax.lax.scan(body, state, plan)

  return steps


def make_device_eval(
  eval_step: Callable, *, normalization: str, image_size: int
) -> Callable:
  """``evaluate(trainable, frozen, arrays, plan)``: summed eval, one call."""

  def evaluate(trainable, frozen, arrays, plan):
    def body(totals, row):
      batch = device_data.gather(
        arrays, row, normalization=normalization, image_size=image_size
      )
      sums = eval_step(trainable, frozen, batch)
      return jax.tree_util.tree_map(jnp.add, totals, sums), None

    zero = {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")}
    return jax.lax.scan(body, zero, plan)[0]

  return evaluate


def _programs(mode: str, s: Setup) -> dict[str, Callable]:
  """The jitted (or pmapped) steps for ``s``, shared by equal programs."""
  key = (s.program_key, mode)
  if s.program_key and key in _PROGRAMS:
    _PROGRAMS[key] = _PROGRAMS.pop(key)
    return _PROGRAMS[key]
  train_step = make_train_step(s.model, s.optimizer, s.schedule)
  eval_step = make_eval_step(s.model)
  if mode == "pmap":
    progs = {
      "train": parallel.pmap_train_step(train_step),
      "eval": parallel.pmap_eval_step(eval_step),
    }
  else:
    norm = dict(normalization=s.normalization, image_size=s.train.image_size)
    progs = {
      "train": parallel.jit_train_step(train_step),
      "eval": jax.jit(eval_step),
      "train_steps": jax.jit(
        make_device_steps(train_step, **norm), donate_argnums=(0,)
      ),
      "eval_all": jax.jit(make_device_eval(eval_step, **norm)),
    }
  if s.program_key:
    _PROGRAMS[key] = progs
    while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))
  return progs


def local_device() -> jax.Device:
  """The device of jit mode's arrays.

  Placed explicitly (committed): a step's outputs are committed, and an
  uncommitted first input would compile the step a second time.
  """
  return jax.local_devices()[0]


def place_split(s: Setup, split: pipeline.Split, mode: str):
  """``split`` placed on the device, or None where the host path serves.

  The device path needs one process, jit mode and a decoded split within
  ``config.data.device_max_gb``; ``config.data.on_device=never`` keeps
  every split on the host.
  """
  if s.data_on_device == "never" or mode != "jit":
    return None
  if jax.process_count() > 1:
    return None
  size = device_data.nbytes(split)
  if not size or size > s.device_max_gb * 2**30:
    return None
  return device_data.place(split, local_device())


class Runner:
  """Places state, backbone and data, and calls the jitted or pmapped steps.

  In jit mode the frozen backbone is kept on the device in the compute
  dtype (`vptpc.models.registry.cast_backbone`: the same function, without a
  per-step cast), and cached splits are placed on the device
  (`vptpc.data.device`) unless ``config.data.on_device=never``.
  """

  def __init__(self, mode: str, s: Setup):
    """Compiles nothing yet; places the frozen backbone (and data) once."""
    self.mode = mode
    self.sync = parallel.needs_sync(mode)
    self.scan_steps = s.scan_steps
    progs = _programs(mode, s)
    self._train, self._eval = progs["train"], progs["eval"]
    self._train_steps = progs.get("train_steps")
    self._eval_all = progs.get("eval_all")
    if mode == "pmap":
      self.frozen = parallel.replicate(s.frozen)
    else:
      self.frozen = jax.device_put(
        registry.cast_backbone(s.model, s.frozen, s.model.dtype), local_device()
      )
    self.dtrain = place_split(s, s.train, mode)
    self.deval = place_split(s, s.eval, mode)
    self._deval_of = s.eval
    logging.info(
      "Data: train on the %s, eval on the %s%s.",
      "device" if self.dtrain else "host",
      "device" if self.deval else "host",
      " (one lax.scan per epoch)" if self.dtrain and self.scan_steps else "",
    )

  def place_state(self, state: TrainState) -> TrainState:
    """Puts a host/unreplicated state where the step expects it."""
    if self.mode == "pmap":
      return parallel.replicate(jax.device_get(state))
    return jax.device_put(state, local_device())

  def host_state(self, state: TrainState) -> TrainState:
    """Returns one unreplicated copy (for checkpoints and export)."""
    return parallel.unreplicate(state) if self.mode == "pmap" else state

  def train_step(self, state, batch, rng):
    """Runs one step; returns (state, metrics on the host's view)."""
    if self.mode == "pmap":
      state, metrics = self._train(
        state, self.frozen, parallel.shard_batch(batch), rng
      )
      metrics = parallel.unreplicate(metrics)
    else:
      state, metrics = self._train(state, self.frozen, batch, rng)
    if self.sync:
      jax.block_until_ready(metrics)
    return state, metrics

  def train_steps(self, state, plan, rng):
    """Runs a plan's steps on the device split; metrics are stacked."""
    return self._train_steps(state, self.frozen, self.dtrain.arrays, plan, rng)

  def evaluate(self, state, split: pipeline.Split, config) -> dict[str, float]:
    """Top-1 accuracy and mean loss over every example of ``split``."""
    trainable = state.trainable
    if self.deval is not None and split is self._deval_of:
      plan = device_data.eval_plan(
        self.deval, batch_size=config.eval_batch_size
      )
      totals = self._eval_all(trainable, self.frozen, self.deval.arrays, plan)
      return _accuracy_of(jax.device_get(totals), len(split))
    totals = None
    for batch in pipeline.eval_batches(
      split,
      batch_size=config.eval_batch_size,
      normalization=config.data.normalize,
      rows=process_rows(config.eval_batch_size),
    ):
      if self.mode == "pmap":
        sums = parallel.unreplicate(
          self._eval(trainable, self.frozen, parallel.shard_batch(batch))
        )
      else:
        sums = self._eval(trainable, self.frozen, batch)
      if self.sync:
        jax.block_until_ready(sums)
      # Summed on the device; one host transfer at the end.
      totals = (
        sums
        if totals is None
        else jax.tree_util.tree_map(jnp.add, totals, sums)
      )
    return _accuracy_of(jax.device_get(totals), len(split))


def _accuracy_of(totals: dict[str, Any], n_split: int) -> dict[str, float]:
  totals = {k: float(v) for k, v in totals.items()}
  n = totals["count"]
  assert int(n) == n_split, (n, n_split)
  return {
    "accuracy": totals["correct"] / n,
    "loss": totals["loss"] / n,
    "num_examples": int(n),
  }
