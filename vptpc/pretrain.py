"""Pretrains vptpc's small embedded ViT on FractalDB-style images.

  python -m vptpc.pretrain --config=configs/pretrain.py --workdir=runs/pretrain

Data: `vptpc.data.fractals` (one random IFS per class, per-instance jitter,
random pose, colour and position; an auxiliary 4 x 4 position target and,
with ``orientation_bins``, a binned full-circle rotation target; with
``axis_bins``, the object's binned principal axis).
A second stage (``init_from``) continues from a backbone; ``hog_bins`` adds
a MaskFeat-style target on patch tokens (`hog_targets`).
Model: the ``config.model`` variant (``fractal-Ti/4``) of `vptpc.models.vit`
trained end to end (AdamW, warmup + cosine). The result is written in Google's vit_jax `.npz`
layout (``<workdir>/backbone.npz``, class head included, auxiliary heads
dropped), so `vptpc.checkpoint.load_pretrained` is what reads it, and a JSON
record of the run (``model_card.json``) with the upstream accuracy.

Everything is seeded: the class codes, the rendered pool and the batch order,
so the command rebuilds the same data; the weights match up to floating-point
reduction order on another device.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from vptpc import checkpoint, lifecycle, npz_checkpoint, preflight, records
from vptpc.data import fractals
from vptpc.data.preprocessing import normalize
from vptpc.models import vit


def _define_flags():
  """Defines ``--config`` and ``--workdir`` when run as a program.

  Not at import time, so importing this module beside another entry point
  (as the tests do) does not define the flags twice.
  """
  config_flags.DEFINE_config_file("config", None, "Pretrain config.")
  flags.DEFINE_string("workdir", None, "Output directory.")


def aux_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Auxiliary targets of a pretraining config and their class counts."""
  sizes = {"position": fractals.POSITION_GRID**2}
  if config.get("orientation_bins", 0) > 0:
    sizes["orientation"] = config.orientation_bins
  if config.get("axis_bins", 0) > 0:
    sizes["axis"] = config.axis_bins
  return sizes


def hog_targets(images: jax.Array, patch: int, bins: int) -> jax.Array:
  """Per-patch histograms of gradient orientation, (B, N, bins).

  MaskFeat's target (Wei et al., CVPR 2022) in its simplest form: central
  differences of the grey image, orientation modulo 180 degrees split
  linearly between the two nearest of ``bins`` bins, weighted by gradient
  magnitude and summed over each ``patch`` x ``patch`` patch, then scaled
  so that the patches' mean squared norm is 1 per image. Computed from
  the (flipped) batch inside the step, so flips need no bookkeeping.
  """
  grey = images.mean(-1)
  gy, gx = jnp.gradient(grey, axis=(1, 2))
  mag = jnp.sqrt(gx**2 + gy**2)
  pos = (jnp.arctan2(gy, gx) % jnp.pi) / jnp.pi * bins - 0.5
  lo = jnp.floor(pos)
  frac = pos - lo
  lo = lo.astype(jnp.int32) % bins
  hist = (
    jax.nn.one_hot(lo, bins) * ((1 - frac) * mag)[..., None]
    + jax.nn.one_hot((lo + 1) % bins, bins) * (frac * mag)[..., None]
  )
  b, h, w, _ = hist.shape
  hist = hist.reshape(b, h // patch, patch, w // patch, patch, bins).sum((2, 4))
  hist = hist.reshape(b, -1, bins)
  # Normalised per image, not per patch as MaskFeat does: at 32 px most
  # patches are background whose per-patch-normalised histograms are pure
  # noise (the first run, per patch, explained 4% of the target's variance).
  rms = jnp.sqrt(jnp.mean(jnp.sum(hist**2, -1), -1))[:, None, None]
  return hist / (rms + 1e-6)


def _loss(params, model, batch, weights, hog_block=None):
  """Class + weighted auxiliary losses; returns (loss, metrics).

  Every auxiliary head (``params["aux_heads"][name]``) is linear on the
  class-token features, like the class head, so what it asks for has to be
  linearly readable there, which is also what a linear probe reads. Targets
  of -1 are ignored; ``batch["class_weight"]`` (if present) leaves images
  out of the class loss. ``params["hog_head"]`` (if present) is linear on
  the patch tokens at the input of block ``hog_block`` and regresses
  `hog_targets` (squared error), so the tokens that VPT-Deep's prompts
  attend to carry local orientation, not only the class token.
  """
  variables = {"params": params["vit"]}
  hog = "hog_head" in params
  if hog:
    # Collecting intermediates also sows every block's attention and runs the
    # last block on all tokens: on one CPU core the HOG runs trained at 100-105
    # images/s against 121 without (results/pretrain_stage2/).
    (logits, feats), state = model.apply(
      variables, batch["image"], return_features=True, mutable=["intermediates"]
    )
    sown = state["intermediates"]["Transformer"]
    tokens = sown[f"block_input_{hog_block}"][0]
  else:
    logits, feats = model.apply(variables, batch["image"], return_features=True)
  ce = optax.softmax_cross_entropy_with_integer_labels
  cw = batch.get("class_weight", jnp.ones(logits.shape[:1]))
  cn = jnp.maximum(cw.sum(), 1.0)
  l_cls = (ce(logits, batch["label"]) * cw).sum() / cn
  metrics = {
    "loss_class": l_cls,
    "accuracy": ((logits.argmax(-1) == batch["label"]) * cw).sum() / cn,
  }
  loss = l_cls
  for name, head in params["aux_heads"].items():
    aux_logits = feats @ head["kernel"] + head["bias"]
    t = batch[name]
    valid = (t >= 0).astype(jnp.float32)
    vn = jnp.maximum(valid.sum(), 1.0)
    l_aux = (ce(aux_logits, jnp.maximum(t, 0)) * valid).sum() / vn
    metrics[f"loss_{name}"] = l_aux
    metrics[f"{name}_accuracy"] = (
      (aux_logits.argmax(-1) == t) * valid
    ).sum() / vn
    loss = loss + weights[name] * l_aux
  if hog:
    head = params["hog_head"]
    target = hog_targets(
      batch["image"], model.patch_size, head["bias"].shape[0]
    )
    pred = tokens @ head["kernel"] + head["bias"]
    l_hog = jnp.mean(jnp.sum((pred - target) ** 2, -1))
    metrics["loss_hog"] = l_hog
    # 1 - this over the target's variance: how much of it the tokens explain.
    metrics["hog_r2"] = 1.0 - l_hog / jnp.mean(
      jnp.sum((target - target.mean((0, 1))) ** 2, -1)
    )
    loss = loss + weights["hog"] * l_hog
  return loss, metrics


def make_batch(
  images, labels, targets, idx, flip, norm, orientation_bins=0, axis_bins=0
):
  """Gathers a batch; horizontal flips mirror the auxiliary targets too.

  A flip maps a rotation by theta of a shape to a rotation by -theta of its
  mirror image, so orientation bin k of ``orientation_bins`` becomes
  ``orientation_bins - 1 - k``; likewise for the principal axis (-1, ignore,
  stays). Rotated instances (``targets["rotated"]``) get class weight 0.
  """
  img = images[idx]
  img = np.where(flip[:, None, None, None], img[:, :, ::-1], img)
  batch = {"image": normalize(img, norm), "label": labels[idx]}
  for name, t in targets.items():
    t = t[idx]
    if name == "position":
      g = fractals.POSITION_GRID
      t = np.where(flip, (t // g) * g + (g - 1 - t % g), t)
    elif name == "orientation":
      t = np.where(flip, orientation_bins - 1 - t, t)
    elif name == "axis":
      t = np.where(flip & (t >= 0), axis_bins - 1 - t, t)
    elif name == "rotated":
      batch["class_weight"] = (1 - t).astype(np.float32)
      continue
    batch[name] = t
  return batch


def evaluate(metrics_fn, params, data, batch_size, norm) -> dict[str, float]:
  """Accuracy of both heads on held-out data (no flips).

  Args:
    metrics_fn: jitted ``(params, batch) -> metrics``, compiled once and
      shared by every call.
    params: model and auxiliary-head params.
    data: (images, labels, targets), as `make_batch` takes them.
    batch_size: evaluation batch.
    norm: input normalisation.
  """
  images, labels, targets = data
  tot = {}
  n = 0
  for s in range(0, len(labels) - batch_size + 1, batch_size):
    idx = np.arange(s, s + batch_size)
    m = jax.device_get(
      metrics_fn(
        params,
        make_batch(
          images, labels, targets, idx, np.zeros(batch_size, bool), norm
        ),
      )
    )
    for k, v in m.items():
      tot[k] = tot.get(k, 0.0) + float(v) * batch_size
    n += batch_size
  return {k: v / n for k, v in tot.items()}


def _check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first out-of-range second-stage key."""
  layers = vit.get_model_config(config.model).num_layers
  if (
    config.get("hog_bins", 0) > 0
    and not 0 <= config.get("hog_block", 3) < layers
  ):
    raise ValueError(
      f"hog_block={config.hog_block} is not a block of {config.model} "
      f"(0..{layers - 1})."
    )
  if not 0.0 <= config.get("rotate_fraction", 0.0) <= 1.0:
    raise ValueError(
      f"rotate_fraction={config.rotate_fraction} must be in [0, 1]."
    )
  if config.get("aux_weight", 1.0) < 0:
    raise ValueError(
      f"position_weight={config.aux_weight} must be >= 0 (0 = class labels "
      "only)."
    )
  for key in ("hog_bins", "axis_bins", "orientation_bins"):
    if config.get(key, 0) < 0:
      raise ValueError(f"{key}={config.get(key)} must be >= 0 (0 = off).")


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the pretraining and writes ``backbone.npz`` + ``model_card.json``.

  Args:
    config: see ``configs/pretrain.py``.
    workdir: output directory.

  Returns:
    The model-card record.
  """
  _check(config)
  # A URL would become a local "gs:" directory: refused before any work.
  workdir = lifecycle.local_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  codes = fractals.make_class_codes(config.num_classes, config.class_seed)
  t = time.time()
  sizes = aux_sizes(config)
  kw = dict(
    size=config.image_size,
    max_rotation=config.max_rotation,
    orientation_bins=sizes.get("orientation", 0),
    rotate_fraction=config.get("rotate_fraction", 0.0),
    axis_bins=sizes.get("axis", 0),
  )
  train_data = fractals.make_dataset(
    codes, config.per_class, config.data_seed, **kw
  )
  held_out = fractals.make_dataset(
    codes, config.held_out_per_class, config.data_seed + 1, **kw
  )
  gen_s = time.time() - t
  logging.info(
    "Rendered %d + %d images in %.0fs.",
    len(train_data[1]),
    len(held_out[1]),
    gen_s,
  )

  model = vit.create_model(config.model, num_classes=config.num_classes)
  rng = jax.random.key(config.seed)
  vit_params = vit.init_params(model, rng, config.image_size)
  # From-scratch training starts the class head at zero (vit_jax), not at
  # VPT's prompt-tuning head init.
  vit_params["head"] = jax.tree_util.tree_map(
    jnp.zeros_like, vit_params["head"]
  )
  if config.get("init_from"):
    # A second stage: continue from a backbone (its class head included
    # when it has config.num_classes outputs); new auxiliary heads at zero.
    vit_params = checkpoint.load_pretrained(config.init_from, vit_params)
  params = {
    "vit": vit_params,
    "aux_heads": {
      name: {
        "kernel": jnp.zeros((model.hidden_size, n)),
        "bias": jnp.zeros((n,)),
      }
      for name, n in sizes.items()
    },
  }
  hog_bins = config.get("hog_bins", 0)
  if hog_bins > 0:
    params["hog_head"] = {
      "kernel": jnp.zeros((model.hidden_size, hog_bins)),
      "bias": jnp.zeros((hog_bins,)),
    }
  hog_block = config.get("hog_block", 3)
  weights = {
    "position": config.aux_weight,
    "orientation": config.get("orientation_weight", 1.0),
    "axis": config.get("axis_weight", 1.0),
    "hog": config.get("hog_weight", 1.0),
  }
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, config.lr, config.warmup_steps, config.steps, end_value=0.0
  )

  def decay_mask(p):
    # Weight decay on matrices only (not biases, norms, cls, posemb).
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2 and x.shape[0] > 1, p)

  opt = optax.chain(
    optax.clip_by_global_norm(config.grad_clip),
    optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask),
  )
  opt_state = opt.init(params)

  @jax.jit
  def step_fn(params, opt_state, batch):
    (loss, m), g = jax.value_and_grad(_loss, has_aux=True)(
      params, model, batch, weights, hog_block
    )
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, dict(m, loss=loss)

  images, labels, targets = train_data
  n = len(labels)
  order_rng = np.random.default_rng(config.seed)
  log = []
  t = time.time()
  seen = 0
  for step in range(1, config.steps + 1):
    idx = order_rng.integers(0, n, config.batch_size)
    flip = order_rng.random(config.batch_size) < 0.5
    batch = make_batch(
      images,
      labels,
      targets,
      idx,
      flip,
      config.normalize,
      orientation_bins=sizes.get("orientation", 0),
      axis_bins=sizes.get("axis", 0),
    )
    params, opt_state, m = step_fn(params, opt_state, batch)
    seen += config.batch_size
    if step % config.log_every == 0 or step == config.steps:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(f"Non-finite pretraining loss at step {step}.")
      m.update(
        step=step, img_per_s=seen / (time.time() - t), lr=float(schedule(step))
      )
      log.append(m)
      logging.info("%s", json.dumps(m))
  train_s = time.time() - t
  metrics_fn = jax.jit(lambda p, b: _loss(p, model, b, weights, hog_block)[1])
  ev = evaluate(metrics_fn, params, held_out, 250, config.normalize)
  train_acc = evaluate(
    metrics_fn,
    params,
    (
      train_data[0][:5000],
      train_data[1][:5000],
      {k: v[:5000] for k, v in targets.items()},
    ),
    250,
    config.normalize,
  )
  out = os.path.join(workdir, "backbone.npz")
  npz_checkpoint.save_npz(out, jax.device_get(params["vit"]))
  dev = jax.devices()[0]
  card = {
    "model": config.model,
    "architecture": dict(vit.get_model_config(config.model)),
    "parameters_backbone": vit.count_params(vit.split_head(params["vit"])[0]),
    "generator": "FractalDB-style IFS (vptpc.data.fractals), class + "
    + " + ".join(
      f"{k} ({n}-way{'' if weights[k] else ', weight 0: scored, not trained'})"
      for k, n in sizes.items()
    )
    + (
      f" + patch HOG ({hog_bins} bins, block {hog_block} input)"
      if hog_bins
      else ""
    )
    + " targets"
    + (
      f", continued from {config.init_from}" if config.get("init_from") else ""
    ),
    "num_classes": config.num_classes,
    "train_images_rendered": int(n),
    "held_out_images": int(len(held_out[1])),
    "images_seen": int(config.steps * config.batch_size),
    "steps": config.steps,
    "batch_size": config.batch_size,
    "config": config.to_dict(),
    "upstream_held_out": ev,
    "upstream_train_subset": train_acc,
    "device": f"{dev.platform}:{dev.device_kind}",
    "train_seconds": round(train_s, 1),
    "render_seconds": round(gen_s, 1),
    "total_seconds": round(time.time() - t_start, 1),
    "versions": records.versions(),
    "log": log,
  }
  with open(os.path.join(workdir, "model_card.json"), "w") as f:
    json.dump(card, f, indent=2)
  logging.info("Held-out accuracy: %s", ev)
  return card


def main(argv):
  """Entry point."""
  del argv
  try:
    card = pretrain(flags.FLAGS.config, flags.FLAGS.workdir)
  except preflight.PreflightError as e:
    preflight.exit_with(e.problems)
  print(
    json.dumps({k: card[k] for k in ("upstream_held_out", "train_seconds")})
  )


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
