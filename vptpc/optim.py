"""The VPT optimiser recipe in optax: SGD, coupled L2 and warmup-cosine.

Behavioural reference: the official PyTorch VPT (docs/references.md, "VPT:
optimiser and schedule"). Summary:

* LR = ``base_lr * batch_size / 256`` times a warmup-cosine multiplier that
  the official trainer steps once per *epoch*, so the LR is constant within an
  epoch and epoch 0 runs at LR 0 (momentum still accumulates).
* SGD with momentum 0.9, no dampening, no Nesterov.
* Coupled L2 weight decay (added to the gradient before momentum) on every
  trainable leaf except the head bias.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax


def _check_int(name: str, value: Any, minimum: int) -> None:
  """Raises ValueError unless `value` is an int (not bool) >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")


def _check_epochs(warmup_epochs: Any, total_epochs: Any) -> None:
  """Validates the epoch counts shared by the schedule functions."""
  _check_int("warmup_epochs", warmup_epochs, 0)
  _check_int("total_epochs", total_epochs, 1)
  if total_epochs <= warmup_epochs:
    raise ValueError(
      f"total_epochs ({total_epochs}) must be greater than warmup_epochs "
      f"({warmup_epochs})."
    )


def vpt_lr_multiplier(
  epoch: jax.typing.ArrayLike, warmup_epochs: int, total_epochs: int
) -> jax.Array:
  """Returns the warmup-cosine LR multiplier of the official VPT trainer.

  The multiplier is ``epoch / warmup_epochs`` during warmup and
  ``0.5 * (1 + cos(pi * (epoch - warmup_epochs) / (total_epochs -
  warmup_epochs)))`` afterwards, as in the official
  ``WarmupCosineSchedule``. Epoch 0 therefore gives 0 whenever
  ``warmup_epochs > 0``. From `total_epochs` on it stays at 0, whereas the
  official cosine would rise again; no in-range epoch is affected. It is
  traceable, so `epoch` may be a (fractional) array under ``jax.jit``.

  Args:
    epoch: The epoch, an int or float scalar or array.
    warmup_epochs: Number of linear-warmup epochs (>= 0).
    total_epochs: Total number of epochs (> `warmup_epochs`).

  Returns:
    A float array with the shape of `epoch`.

  Raises:
    ValueError: If the epoch counts are invalid.
  """
  _check_epochs(warmup_epochs, total_epochs)
  e = jnp.asarray(epoch).astype(jnp.result_type(float))
  # max(.., 1) keeps warmup_epochs=0 free of a 0/0 in the untaken branch.
  warmup = e / max(warmup_epochs, 1)
  progress = (e - warmup_epochs) / (total_epochs - warmup_epochs)
  # Clamped so that extra steps (e.g. a miscounted steps_per_epoch) get LR 0
  # instead of a rising LR.
  progress = jnp.minimum(progress, 1.0)
  cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
  return jnp.where(e < warmup_epochs, warmup, cosine)


def create_lr_schedule(
  *,
  base_lr: float,
  batch_size: int,
  steps_per_epoch: int,
  total_epochs: int,
  warmup_epochs: int,
  per_step: bool = False,
) -> optax.Schedule:
  """Creates the VPT learning-rate schedule as a function of the step.

  ``lr(step) = base_lr * batch_size / 256 * vpt_lr_multiplier(epoch)``.

  Args:
    base_lr: Base learning rate before linear batch scaling (>= 0).
    batch_size: The global batch size, independent of the device count (> 0).
    steps_per_epoch: Optimiser steps per epoch (> 0).
    total_epochs: Total number of epochs (> `warmup_epochs`).
    warmup_epochs: Number of linear-warmup epochs (>= 0).
    per_step: If False (official behaviour), ``epoch = step //
      steps_per_epoch`` so the LR is constant within an epoch. If True, the
      fractional epoch ``step / steps_per_epoch`` is used, which varies the LR
      smoothly within each epoch.

  Returns:
    An optax schedule mapping the step count to the learning rate.

  Raises:
    ValueError: If an argument is invalid; the message names it.
  """
  if (
    isinstance(base_lr, bool)
    or not isinstance(base_lr, numbers.Real)
    or not math.isfinite(base_lr)
    or base_lr < 0
  ):
    raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}.")
  _check_int("batch_size", batch_size, 1)
  _check_int("steps_per_epoch", steps_per_epoch, 1)
  _check_epochs(warmup_epochs, total_epochs)
  # VPT scales linearly with the global batch (tune_vtab.py;
  # docs/references.md, "VPT: optimiser and schedule").
  peak_lr = float(base_lr) * batch_size / 256.0

  def schedule(step: jax.typing.ArrayLike) -> jax.Array:
    step = jnp.asarray(step)
    if per_step:
      epoch = step / steps_per_epoch
    else:
      # The official trainer calls scheduler.step() once per epoch.
      epoch = step // steps_per_epoch
    return peak_lr * vpt_lr_multiplier(epoch, warmup_epochs, total_epochs)

  return schedule


def _key_name(entry: Any) -> Any:
  """Returns the plain key of one key-path entry (dict, attribute or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def weight_decay_mask(params: Any) -> Any:
  """Marks the leaves that receive weight decay.

  VPT applies weight decay to every trainable parameter except the head bias.

  Args:
    params: The trainable pytree, e.g. ``{"prompts": {...}, "head":
      {"kernel": ..., "bias": ...}}``.

  Returns:
    A pytree of Python bools with the structure of `params`: False at the leaf
    whose path is exactly ``("head", "bias")``, True elsewhere.
  """

  def decayed(path: tuple[Any, ...], _: Any) -> bool:
    return tuple(_key_name(p) for p in path) != ("head", "bias")

  return jax.tree_util.tree_map_with_path(decayed, params)


def create_optimizer(
  schedule: optax.ScalarOrSchedule,
  *,
  weight_decay: float,
  momentum: float = 0.9,
  prompt_lr_scale: float = 1.0,
  train_head: bool = True,
) -> optax.GradientTransformation:
  """Creates VPT's SGD with coupled L2 weight decay.

  Matches ``torch.optim.SGD(momentum=momentum, weight_decay=weight_decay)``
  without dampening or Nesterov: ``buf = momentum * buf + (g + wd * p)`` and
  ``p -= lr * buf``. Torch seeds the buffer with the first ``g + wd * p``,
  which equals optax's trace started from zeros. Because the trace is taken
  before the LR is applied, epoch 0 (LR 0) still accumulates momentum, as in
  the official trainer.

  Args:
    schedule: The learning rate, a float or an optax schedule.
    weight_decay: Coupled L2 coefficient (>= 0); the head bias is excluded.
    momentum: Momentum coefficient (>= 0).
    prompt_lr_scale: multiplies the LR of the ``prompts`` subtree. 1.0 is
      the official recipe (one LR for prompts and head). Not in the paper:
      on small backbones whose features are far from unit scale, the head
      needs a much larger LR than the prompts can take, so the knob exists.
    train_head: False freezes the head (its updates are zeroed), e.g. to
      fine-tune only condensed prompts.

  Returns:
    An optax gradient transformation.

  Raises:
    ValueError: If `weight_decay` or `momentum` is negative.
  """
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
  if momentum < 0:
    raise ValueError(f"momentum must be >= 0, got {momentum!r}.")
  return sgd_chain(
    schedule,
    weight_decay=weight_decay,
    momentum=momentum,
    prompt_lr_scale=prompt_lr_scale,
    train_head=train_head,
  )


def sgd_chain(
  schedule: optax.ScalarOrSchedule,
  *,
  weight_decay: Any,
  momentum: float,
  prompt_lr_scale: float = 1.0,
  train_head: bool = True,
  lr_scale: Any = None,
) -> optax.GradientTransformation:
  """`create_optimizer`'s chain without the checks, for traced values.

  ``weight_decay`` and ``lr_scale`` may be arrays (``inject_hyperparams``,
  `vptpc.sweep`); ``lr_scale`` multiplies the final update, which is the
  same as multiplying the LR because optax's SGD applies the LR last.
  """
  parts = [
    # Coupled (L2) decay must precede the momentum trace to match torch SGD.
    optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
    optax.sgd(schedule, momentum=momentum),
  ]
  if lr_scale is not None:
    parts.append(optax.scale(lr_scale))
  if prompt_lr_scale != 1.0:
    # Scaling the final SGD update of a subtree is a per-group LR.
    parts.append(
      optax.masked(
        optax.scale(prompt_lr_scale),
        lambda p: {k: k == "prompts" for k in p},
      )
    )
  if not train_head:
    parts.append(
      optax.masked(optax.set_to_zero(), lambda p: {k: k == "head" for k in p})
    )
  return optax.chain(*parts)
