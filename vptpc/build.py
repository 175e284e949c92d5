"""Building a run from a config: model, backbone, data, initial state.

`setup` turns a config into a `Setup`: the model (a ViT or a Swin, chosen
by ``config.model.name``: `vptpc.models.registry`), the frozen backbone (read
once per process, `load_backbone`), the decoded splits, the initial prompts
and head, the optimiser and schedule, and `program_key`, what the compiled
steps depend on. With ``config.model.prelogit_norm="standardize"`` the
frozen pre-logits are standardised (`prelogit_stats`,
`standardize_prelogits`) and heads are converted on export
(`head_to_raw`, `head_from_raw`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vptpc import checkpoint, config_util, hub, optim
from vptpc import prompts as prompts_lib
from vptpc.data import pipeline
from vptpc.models import registry, swin, vit
from vptpc.models.levers import Levers
from vptpc.steps import TrainState, create_train_state

# ``config.model.head_init``: VPT's head init, or kernel and bias zero.
HEAD_INITS = ("vpt", "zeros")
# ``config.model.prelogit_norm``: raw pre-logits, or standardised with the
# frozen backbone's statistics (`prelogit_stats`, `standardize_prelogits`).
PRELOGIT_NORMS = ("none", "standardize")


@dataclasses.dataclass
class Setup:
  """Everything a run needs that is derived from the config."""

  model: vit.VisionTransformer | swin.SwinTransformer
  frozen: dict[str, Any]
  state: TrainState
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  train: pipeline.Split
  eval: pipeline.Split
  steps_per_epoch: int
  total_steps: int
  # The backbone as its checkpoint holds it; `frozen` differs from it only
  # with ``config.model.prelogit_norm = "standardize"``.
  checkpoint_backbone: dict[str, Any] | None = None
  # (mean, std) of the pre-logits folded into `frozen`, or None.
  prelogit_stats: tuple[np.ndarray, np.ndarray] | None = None
  # What the compiled steps depend on (`program_key`); runs with equal keys
  # (the seeds of a final run) share their compiled programs.
  program_key: str = ""
  # Where batches come from: "device" (splits placed on the accelerator,
  # `vptpc.data.device`) or "host"; and whether an epoch is one lax.scan.
  data_on_device: str = "auto"
  device_max_gb: float = 4.0
  scan_steps: bool = True
  normalization: str = "imagenet"
  # Training images/s after the first step or scanned epoch (which holds
  # the compile), set by the loop.
  train_img_per_s: float | None = None

  def export_trainable(self, trainable: dict[str, Any]) -> dict[str, Any]:
    """``trainable`` with its head for `checkpoint_backbone` (raw features).

    What is saved with the prompts: exports work with the checkpoint's
    backbone whether or not the run standardised the pre-logits.
    """
    if self.prelogit_stats is None:
      return trainable
    return dict(
      trainable, head=head_to_raw(trainable["head"], *self.prelogit_stats)
    )


def build_model(
  config: ml_collections.ConfigDict,
) -> vit.VisionTransformer | swin.SwinTransformer:
  """Creates the ViT or Swin described by ``config.model`` / ``config.prompt``.

  The family follows from ``config.model.name``
  (`vptpc.models.registry.model_family`: names starting with ``swin`` are
  Swins, ``swin-testing`` the tiny test Swin; all others ViTs). The
  ViT-only keys ``attention_impl``, ``cudnn_multiple`` and ``kv_stacked``
  are the model's `vptpc.models.levers.Levers` and must keep their
  defaults for a Swin (an error names them otherwise). The removed
  levers' keys (`config_util.REMOVED_MODEL_KEYS`) warn when set.

  Raises:
    ValueError: an unknown ``config.model.name`` (named, with the known
      names) or a ViT-only key set for a Swin.
  """
  config_util.warn_removed_keys(config)
  return registry.create_model(
    config.model.name,
    num_classes=config.data.num_classes,
    kv_only=config.model.kv_only,
    kv_shared=config.model.get("kv_shared", True),
    prompt_dropout=config.prompt.dropout,
    dtype=jnp.dtype(config.model.dtype),
    levers=Levers(
      attention_impl=config.model.get("attention_impl", ""),
      cudnn_multiple=config.model.get("cudnn_multiple", 0),
      kv_stacked=config.model.get("kv_stacked", False),
    ),
    **config_util.parse_arch(config.model.get("arch", "")),
  )


# Config keys that never reach a compiled step: the seed (the rng is an
# argument), bookkeeping, and where data and weights come from.
_NOT_IN_PROGRAM = (
  "seed",
  "protocol",
  "condense",
  "log_every_steps",
  "eval_every_epochs",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "eval_only",
  "progress_bar",
  "parallel",
  "overwrite",
)


def program_key(config: ml_collections.ConfigDict, steps_per_epoch: int) -> str:
  """What the jitted train and eval steps of a run are a function of.

  The whole config except `_NOT_IN_PROGRAM`, the checkpoint path, the
  removed levers' keys and the data's location and split names, plus the
  steps per epoch (the LR schedule's unit). Shapes (prompt counts, batch)
  are not in it: jit specialises on them by itself.
  """
  d = config.to_dict()
  for k in _NOT_IN_PROGRAM:
    d.pop(k, None)
  skip = ("checkpoint_path", "init_seed", "prelogit_norm_images")
  d["model"] = {
    k: v
    for k, v in d["model"].items()
    if k not in skip and k not in config_util.REMOVED_MODEL_KEYS
  }
  d["data"] = {
    k: d["data"].get(k) for k in ("normalize", "image_size", "num_classes")
  }
  return json.dumps([d, steps_per_epoch], sort_keys=True, default=str)


# Checkpoints read in this process, newest last (`load_backbone`): the seeds
# of a final run and the chunks of a grid share one read.
_BACKBONES: dict[str, dict[str, Any]] = {}
BACKBONE_CACHE_SIZE = 2
# Jitted initialisers per (model, image size): one compile per process.
_INIT_FNS: dict[Any, Callable] = {}


def _init_fn(model: Any, size: int, part: str) -> Callable:
  """``rng -> params`` (``part="all"``) or ``rng -> head`` (``"head"``).

  The head comes out of the full ``model.init`` (Flax draws each
  parameter's key in creation order, so only the full init reproduces it);
  returning only the head lets XLA drop the rest of the initialisation.
  """
  key = (model, size, part)
  if key not in _INIT_FNS:
    images = jnp.zeros((1, size, size, 3), jnp.float32)

    def init(rng):
      params = model.init(rng, images)["params"]
      return params if part == "all" else params.get("head")

    _INIT_FNS[key] = jax.jit(init)
  return _INIT_FNS[key]


def _read_backbone(path: str, template: dict[str, Any]) -> dict[str, Any]:
  """`checkpoint.load_pretrained`, cached per process by path and mtime."""
  st = os.stat(path) if os.path.exists(path) else None
  shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), template)
  key = json.dumps(
    [
      os.path.abspath(path),
      st and (st.st_mtime_ns, st.st_size),
      jax.tree_util.tree_leaves_with_path(shapes).__repr__(),
    ]
  )
  if key in _BACKBONES:
    _BACKBONES[key] = _BACKBONES.pop(key)
    return _BACKBONES[key]
  t0 = time.perf_counter()
  backbone = checkpoint.load_pretrained(path, template)
  logging.info("Read %s in %.1f s.", path, time.perf_counter() - t0)
  _BACKBONES[key] = backbone
  while len(_BACKBONES) > BACKBONE_CACHE_SIZE:
    _BACKBONES.pop(next(iter(_BACKBONES)))
  return backbone


def load_backbone(
  config: ml_collections.ConfigDict, model: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Returns (frozen backbone, freshly initialised head).

  The head always comes from ``config.seed``, with VPT's init, or all zeros
  when ``config.model.head_init`` is ``zeros``; the backbone from
  ``config.model.checkpoint_path`` (a vit_jax ``.npz`` for a ViT, or a timm
  ``.safetensors`` for a ViT or a Swin: `vptpc.checkpoint.load_pretrained`),
  or, when that is empty, from a random init with ``config.model.init_seed``.

  A checkpoint is read once per process (kept, keyed by its path, size and
  modification time); its template comes from `jax.eval_shape`, so no
  initialisation of the backbone is compiled or run for it.

  Raises:
    ValueError: an unknown ``config.model.head_init`` (named).
  """
  size = config.data.image_size
  rng = jax.random.key(config.seed)
  head_init = config.model.get("head_init", "vpt")
  if head_init not in HEAD_INITS:
    raise ValueError(
      f"config.model.head_init must be one of {', '.join(HEAD_INITS)}, got "
      f"{head_init!r}."
    )
  t0 = time.perf_counter()
  head = _init_fn(model, size, "head")(rng)
  if head_init == "zeros":
    head = jax.tree.map(jnp.zeros_like, head)
  if config.model.checkpoint_path:
    shapes = jax.eval_shape(_init_fn(model, size, "all"), rng)
    template, _ = vit.split_head(shapes)
    backbone = _read_backbone(
      hub.local_path(config.model.checkpoint_path), template
    )
    logging.info(
      "Backbone loaded from %s (%.1f s with the head's init).",
      config.model.checkpoint_path,
      time.perf_counter() - t0,
    )
  else:
    logging.warning(
      "config.model.checkpoint_path is empty: the backbone is RANDOM "
      "(seed %d). Use a pretrained checkpoint for real runs.",
      config.model.init_seed,
    )
    rand = _init_fn(model, size, "all")(jax.random.key(config.model.init_seed))
    backbone = vit.split_head(rand)[0]
  return backbone, head


# `setup`'s cache of `prelogit_stats`, keyed by the model and data configs.
_PRELOGIT_STATS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def prelogit_stats(
  model: Any,
  params: dict[str, Any],
  split: pipeline.Split,
  config: ml_collections.ConfigDict,
) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and std of the frozen pre-logits on training images.

  The features the head reads (ViT: the class token after ``encoder_norm``;
  Swin: the average pool after ``norm``), without prompts, on the
  first ``config.model.prelogit_norm_images`` images of ``split`` (in
  order, un-augmented), accumulated in float64. The std is floored at 1e-6
  so that a constant feature does not divide by zero.
  """
  n_max = min(int(config.model.get("prelogit_norm_images", 1000)), len(split))
  # Params as an argument, not a closure: closed-over arrays would be
  # embedded in the compiled program as constants (350 MB for ViT-B).
  fwd = jax.jit(
    lambda p, x: model.apply({"params": p}, x, None, return_features=True)[1]
  )
  width = registry.feature_width(model)
  total = np.zeros(width)
  total_sq = np.zeros(width)
  n = 0
  for batch in pipeline.eval_batches(
    split,
    batch_size=config.eval_batch_size,
    normalization=config.data.normalize,
  ):
    take = min(int(batch["mask"].sum()), n_max - n)
    if take <= 0:
      break
    f = np.asarray(fwd(params, batch["image"]), np.float64)[:take]
    total += f.sum(0)
    total_sq += (f * f).sum(0)
    n += take
  mean = total / n
  std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
  return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def standardize_prelogits(
  backbone: dict[str, Any], mean: np.ndarray, std: np.ndarray
) -> dict[str, Any]:
  """Folds ``(features - mean) / std`` into the backbone's final LayerNorm.

  ViT: ``Transformer/encoder_norm``; Swin: ``norm``
  (`vptpc.models.registry.final_norm_path`). LayerNorm ends in
  ``scale * x_hat + bias``, so dividing both by ``std`` and shifting the
  bias by ``-mean / std`` standardises the pre-logits exactly, with no
  change to the model code or its shapes. Swin averages the normalised
  tokens after the norm; the mean of an affine map is the affine map of
  the mean, so the fold is exact there too.
  """
  path = registry.final_norm_path(backbone)
  node = backbone
  for k in path:
    node = node[k]
  new_norm = {
    "scale": jnp.asarray(node["scale"] / std, node["scale"].dtype),
    "bias": jnp.asarray((node["bias"] - mean) / std, node["bias"].dtype),
  }

  def replace(tree, keys):
    if len(keys) == 1:
      return dict(tree, **{keys[0]: new_norm})
    return dict(tree, **{keys[0]: replace(tree[keys[0]], keys[1:])})

  return replace(backbone, path)


def head_to_raw(
  head: dict[str, Any], mean: np.ndarray, std: np.ndarray
) -> dict[str, Any]:
  """A head on standardised pre-logits as the same map on raw ones.

  ``((f - mean) / std) @ W + b == f @ (W / std) + (b - (mean / std) @ W)``.
  """
  w = jnp.asarray(head["kernel"])
  return {
    "kernel": w / std[:, None],
    "bias": jnp.asarray(head["bias"]) - (mean / std) @ w,
  }


def head_from_raw(
  head: dict[str, Any], mean: np.ndarray, std: np.ndarray
) -> dict[str, Any]:
  """The inverse of `head_to_raw`."""
  w = jnp.asarray(head["kernel"])
  return {
    "kernel": w * std[:, None],
    "bias": jnp.asarray(head["bias"]) + mean @ w,
  }


def token_pools(
  model: Any,
  params: dict[str, Any],
  split: pipeline.Split,
  config: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
  """Each block's input patch tokens on the first training images.

  Returns ``{"encoderblock_i": (N_i, D_i), "input": (N_0, D_0)}`` with
  N_i = ``config.prompt.init_images`` x block i's tokens: the pools that
  `vptpc.prompts.init_prompts_from_tokens` draws prompts from. A ViT's
  blocks all have width D (class token included in the pool); a Swin's
  width D_i and token count follow block i's stage (the ``block_input_i``
  intermediates it sows at the top level).
  """
  batch = next(
    pipeline.eval_batches(
      split,
      batch_size=min(config.prompt.init_images, len(split)),
      normalization=config.data.normalize,
    )
  )
  n = int(batch["mask"].sum())
  # jit: an eager forward dispatches every op on its own, which for a Swin
  # (window partitions, shifts, merges) takes several times its compile.
  fwd = jax.jit(
    lambda p, x: model.apply({"params": p}, x, None, mutable=["intermediates"])
  )
  _, inter = fwd(params, jnp.asarray(batch["image"][:n]))
  found = inter["intermediates"]
  found = registry.family_of(model).intermediates(found)
  pools = {}
  for i in range(model.num_layers):
    x = found[f"block_input_{i}"][0]
    pools[f"encoderblock_{i}"] = x.reshape(-1, x.shape[-1])
  pools["input"] = pools["encoderblock_0"]
  return pools


def setup(
  config: ml_collections.ConfigDict,
  init_trainable: dict[str, Any] | None = None,
) -> Setup:
  """Builds model, data, backbone, initial state and optimiser.

  Args:
    config: the run config.
    init_trainable: start from these ``{"prompts", "head"}`` (e.g. condensed
      prompts to fine-tune) instead of a fresh init.

  Raises:
    ValueError: a bad config value (named), missing data or checkpoint.
  """
  config_util.validate(config)
  train_split = pipeline.split_from_config(config, "train")
  eval_split = pipeline.split_from_config(config, "eval")
  model = build_model(config)
  frozen, head = load_backbone(config, model)
  prompt_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  if config.prompt.get("init", "vpt") == "tokens" and init_trainable is None:
    prompts = prompts_lib.init_prompts_from_tokens(
      prompt_rng,
      token_pools(model, vit.merge_head(frozen, head), train_split, config),
      num_prompts=config.prompt.num_prompts,
      variant=config.prompt.variant,
    )
  else:
    # VPT's uniform init; Swin: the official Swin bound, per-stage widths.
    prompts = registry.init_prompts(
      prompt_rng,
      model,
      num_prompts=config.prompt.num_prompts,
      variant=config.prompt.variant,
    )
  spe = pipeline.steps_per_epoch(len(train_split), config.batch_size)
  schedule = optim.create_lr_schedule(
    base_lr=config.base_lr,
    batch_size=config.batch_size,
    steps_per_epoch=spe,
    total_epochs=config.total_epochs,
    warmup_epochs=config.warmup_epochs,
    per_step=config.per_step_schedule,
  )
  optimizer = optim.create_optimizer(
    schedule,
    weight_decay=config.weight_decay,
    momentum=config.momentum,
    prompt_lr_scale=config.prompt.lr_scale,
    train_head=config.train_head,
  )
  trainable = {"prompts": prompts, "head": head}
  if init_trainable is not None:
    trainable = jax.tree_util.tree_map(jnp.asarray, dict(init_trainable))
  checkpoint_backbone, stats = frozen, None
  if config.model.get("prelogit_norm", "none") == "standardize":
    # Cached per process: a suite's runs share a task's training images.
    # The checkpoint's mtime is in the key, so a checkpoint rewritten in
    # place (a notebook re-running pretraining) is not read stale.
    ckpt = config.model.checkpoint_path
    key = json.dumps(
      [
        config.model.to_dict(),
        config.data.to_dict(),
        config.eval_batch_size,
        os.stat(ckpt).st_mtime_ns if ckpt and os.path.exists(ckpt) else 0,
      ],
      sort_keys=True,
      default=str,
    )
    if key not in _PRELOGIT_STATS:
      _PRELOGIT_STATS[key] = prelogit_stats(
        model, vit.merge_head(frozen, head), train_split, config
      )
    stats = _PRELOGIT_STATS[key]
    frozen = standardize_prelogits(frozen, *stats)
    if init_trainable is not None:
      # Given heads (e.g. a condensed export) read raw pre-logits.
      trainable["head"] = head_from_raw(trainable["head"], *stats)
  state = create_train_state(trainable, optimizer)
  return Setup(
    model=model,
    frozen=frozen,
    state=state,
    optimizer=optimizer,
    schedule=schedule,
    train=train_split,
    eval=eval_split,
    steps_per_epoch=spe,
    total_steps=spe * config.total_epochs,
    checkpoint_backbone=checkpoint_backbone,
    prelogit_stats=stats,
    program_key=program_key(config, spe),
    data_on_device=config.data.get("on_device", "auto"),
    device_max_gb=config.data.get("device_max_gb", 4.0),
    scan_steps=config.get("scan_steps", True),
    normalization=config.data.normalize,
  )
