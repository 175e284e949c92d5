"""The pure train and eval steps, and the state they carry.

The trainable state is ``TrainState(step, trainable={"prompts", "head"},
opt_state)``; the backbone is a separate ``frozen`` tree that gradients never
touch (gradients are taken with respect to ``trainable`` only).

`train_step(state, frozen, batch, rng)` is one pure function: under `jax.jit`
it has no collectives; under `jax.pmap` (``axis_name`` set) it sums the
masked loss, gradients and counts over devices, so the update equals the
single-device update for the same global batch. `vptpc.runner` compiles and
calls these; `vptpc.train` runs them in a loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from vptpc.models import vit


@flax.struct.dataclass
class TrainState:
  """What trains and what the optimiser needs; nothing of the backbone."""

  step: jax.Array
  trainable: dict[str, Any]  # {"prompts": prompt tree, "head": {...}}
  opt_state: Any


def create_train_state(
  trainable: dict[str, Any], optimizer: optax.GradientTransformation
) -> TrainState:
  """Builds the initial state (step 0) for a trainable tree."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    trainable=trainable,
    opt_state=optimizer.init(trainable),
  )


def _l2(tree) -> jax.Array:
  """Global L2 norm of a pytree."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def _masked_loss_and_correct(logits, labels, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), labels
  )
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return (ce * mask).sum(), (correct * mask).sum()


def make_train_step(
  model: vit.VisionTransformer,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
) -> Callable:
  """Returns the pure ``train_step(state, frozen, batch, rng, axis_name=None)``.

  Args:
    model: the ViT (prompt dropout comes from its ``prompt_dropout``).
    optimizer: from `vptpc.optim.create_optimizer`.
    schedule: the same schedule, to report the LR of each step.

  Returns:
    A function mapping (state, frozen backbone, batch, rng) to
    (new state, metrics). Metrics are global: loss and accuracy over the
    unmasked examples of the whole batch, LR, and gradient/parameter norms.
  """

  def train_step(state, frozen, batch, rng, axis_name=None):
    # A fresh dropout key per step (and per device) from one run key.
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    mask = batch["mask"].astype(jnp.float32)
    count = mask.sum()
    if axis_name is not None:
      count = jax.lax.psum(count, axis_name)
    # Divide by the global count so that summing over devices gives the
    # global mean (a pmean of per-device means would overweight padding).
    denom = jnp.maximum(count, 1.0)

    def loss_fn(trainable):
      logits = model.apply(
        {"params": vit.merge_head(frozen, trainable["head"])},
        batch["image"],
        trainable["prompts"],
        train=True,
        rngs={"dropout": rng},
      )
      loss_sum, correct = _masked_loss_and_correct(logits, batch["label"], mask)
      return loss_sum / denom, correct

    (loss, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.trainable
    )
    if axis_name is not None:
      loss, correct, grads = jax.lax.psum((loss, correct, grads), axis_name)
    updates, opt_state = optimizer.update(
      grads, state.opt_state, state.trainable
    )
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {
      "train_loss": loss,
      "train_accuracy": correct / denom,
      "lr": schedule(state.step),
      "l2_grads": _l2(grads),
      "l2_params": _l2(trainable),
    }
    new_state = state.replace(
      step=state.step + 1, trainable=trainable, opt_state=opt_state
    )
    return new_state, metrics

  return train_step


def make_eval_step(model: vit.VisionTransformer) -> Callable:
  """Returns ``eval_step(trainable, frozen, batch, axis_name=None)``.

  It returns sums (loss, correct, count) over unmasked examples, summed over
  devices under pmap, so every example counts exactly once.
  """

  def eval_step(trainable, frozen, batch, axis_name=None):
    logits = model.apply(
      {"params": vit.merge_head(frozen, trainable["head"])},
      batch["image"],
      trainable["prompts"],
      train=False,
    )
    mask = batch["mask"].astype(jnp.float32)
    loss, correct = _masked_loss_and_correct(logits, batch["label"], mask)
    sums = {"loss": loss, "correct": correct, "count": mask.sum()}
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step
