"""Prompt Condensation (PC) as a JAX transform on the prompt pytree.

Kim et al., "Do We Really Need a Large Number of Visual Prompts?"
(arXiv:2305.17223). The paper's method section could not be checked
(docs/references.md, "PC: what is verified"): what is verified is the claim
(about 70% fewer prompts at the same accuracy on VTAB-1k and FGVC) and, from
a secondary summary, that the scoring is gradient-based, global across
layers, and that only the kept prompts are fine-tuned. Everything else here
is a reconstruction, and every choice is a knob with the default documented
as an assumption:

1. `importance_scores`: a multiplicative mask ``m`` (one entry per layer and
   prompt, all ones) scales the prompts, ``p' = m * p``; the gradient
   ``dL/dm_{l,j} = sum_d p_{l,j,d} dL/dp_{l,j,d}`` is the first-order Taylor
   estimate of the loss change when prompt (l, j) is zeroed. It is taken
   with the backbone in inference mode and prompt dropout off, per batch,
   and aggregated over the training set (``abs_of_sum`` default: the absolute
   value of the mean of the signed per-batch terms, E2VPT's recipe per
   layer).
2. `select`: global top-k over all (layer, prompt) pairs (default; counts per
   layer become ragged, zero allowed) or the same fraction in every layer;
   ties go to the lower flat index.
3. `condense`: gathers the kept prompts (static per-layer shapes, so the
   result runs under `jit` after one compile) and optionally re-projects
   them (``reproject``):

   * ``none``: the kept prompts' trained values (the reconstruction's
     default, docs/references.md, "PC: reconstruction");
   * ``distill``: a few Adam steps on the kept prompts only, minimising the
     squared distance between the condensed and the full model's class-token
     features on training images. Why this form: what the discarded prompts
     contributed reaches the classifier only through the class token, and in
     VPT-Deep a layer's prompts act only as extra keys/values, so their
     removal changes every later layer's attention output in a way no closed
     form per layer captures once layers interact; fitting the kept prompts
     to the full model's output is the least-squares re-projection of the
     whole stack, starting from plain pruning, so it can only move towards
     the full model's features on the fitted data. It costs a handful of
     forward/backward passes, far less than fine-tuning.
   * ``merge``: each discarded prompt is folded into the kept prompt of the
     same layer it is most similar to (cosine), as an importance-weighted
     mean (weights ``abs(score)``), in the spirit of token merging (Bolya
     et al., ToMe, 2023). Closed form and data-free, but only approximate: a
     layer's prompts enter attention through LayerNorm and a softmax, so a
     mean of two prompts is not the sum of their contributions. Discarded
     prompts of a layer that keeps none are dropped.

Subtlety (docs/references.md, "PC: reconstruction"): the Taylor term
estimates *zeroing* a prompt vector, which in this architecture is not
removing the token (LN(0) = beta still yields a key/value); scores rank
prompts, and `condense` removes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vptpc import prompts as prompts_lib
from vptpc.models import vit

SCORE_FNS = ("taylor", "taylor_abs", "grad_norm", "random")
AGGREGATIONS = ("abs_of_sum", "sum_of_abs")
SCOPES = ("global", "per_layer")
REPROJECTIONS = ("none", "distill", "merge")


def _masked_ce(logits, labels, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), labels
  )
  return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_score_step(model: vit.VisionTransformer) -> Callable:
  """Returns ``step(frozen, head, prompts, batch) -> (taylor, abs, gnorm)``.

  Each output maps layer keys to (k_l,) per-prompt terms of one batch: the
  signed Taylor term ``sum_d p dL/dp``, its absolute form
  ``sum_d |p dL/dp|``, and the gradient norm ``||dL/dp||``.
  """

  def loss(mask, prompts, frozen, head, batch):
    scaled = {k: prompts[k] * mask[k][:, None] for k in prompts}
    logits = model.apply(
      {"params": vit.merge_head(frozen, head)},
      batch["image"],
      scaled,
      train=False,  # backbone inference mode; no prompt dropout
    )
    return _masked_ce(logits, batch["label"], batch["mask"].astype(jnp.float32))

  def step(frozen, head, prompts, batch):
    mask = {k: jnp.ones(v.shape[:1], jnp.float32) for k, v in prompts.items()}
    g_mask, g_p = jax.grad(loss, argnums=(0, 1))(
      mask, prompts, frozen, head, batch
    )
    t_abs = {k: jnp.abs(prompts[k] * g_p[k]).sum(-1) for k in prompts}
    gnorm = {k: jnp.sqrt((g_p[k] ** 2).sum(-1)) for k in prompts}
    return g_mask, t_abs, gnorm

  return step


def importance_scores(
  model: vit.VisionTransformer,
  frozen: Mapping[str, Any],
  head: Mapping[str, Any],
  prompts: Mapping[str, jax.Array],
  batches: Iterable[Mapping[str, np.ndarray]],
  *,
  score_fn: str = "taylor",
  aggregation: str = "abs_of_sum",
  seed: int = 0,
) -> dict[str, np.ndarray]:
  """Scores every prompt by its estimated effect on the task loss.

  Args:
    model: the ViT (its ``prompt_dropout`` is ignored: scoring runs in
      inference mode).
    frozen: backbone params.
    head: trained head params.
    prompts: trained prompt tree.
    batches: training batches (``image``, ``label``, ``mask``), one pass.
    score_fn: ``taylor`` (signed ``sum_d p dL/dp``, default), ``taylor_abs``
      (``sum_d |p dL/dp|``), ``grad_norm`` (``||dL/dp||``), ``random``.
    aggregation: for ``taylor``: ``abs_of_sum`` (``abs(mean over batches)``,
      default) or ``sum_of_abs`` (mean of ``abs(per-batch term)``). The other score
      functions are non-negative per batch and are averaged.
    seed: for ``random``.

  Returns:
    ``{layer key: (k_l,) float64 scores}``, larger = more important.

  Raises:
    ValueError: an unknown knob value (named).
  """
  if score_fn not in SCORE_FNS:
    raise ValueError(f"score_fn must be one of {SCORE_FNS}, got {score_fn!r}.")
  if aggregation not in AGGREGATIONS:
    raise ValueError(
      f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}."
    )
  if score_fn == "random":
    rng = np.random.default_rng(seed)
    return {k: rng.random(v.shape[0]) for k, v in prompts.items()}
  step = jax.jit(make_score_step(model))
  sums: dict[str, np.ndarray] = {
    k: np.zeros(v.shape[0]) for k, v in prompts.items()
  }
  n = 0
  for batch in batches:
    g_mask, t_abs, gnorm = jax.device_get(step(frozen, head, prompts, batch))
    for k in sums:
      if score_fn == "taylor":
        term = g_mask[k] if aggregation == "abs_of_sum" else np.abs(g_mask[k])
      elif score_fn == "taylor_abs":
        term = t_abs[k]
      else:
        term = gnorm[k]
      sums[k] += np.asarray(term, np.float64)
    n += 1
  if n == 0:
    raise ValueError("importance_scores got no batches.")
  return {k: np.abs(v / n) for k, v in sums.items()}


def select(
  scores: Mapping[str, np.ndarray],
  keep: float | int,
  *,
  scope: str = "global",
) -> dict[str, np.ndarray]:
  """Chooses which prompts to keep.

  Args:
    scores: per-layer scores (larger = keep).
    keep: a fraction in (0, 1] of all prompts, or an int count.
    scope: ``global`` (top-k over every layer and prompt, default) or
      ``per_layer`` (the same fraction, rounded, in every layer).

  Returns:
    ``{layer key: sorted int indices}``; layers may get none.

  Raises:
    ValueError: bad ``keep`` or ``scope``.
  """
  keys = prompts_lib.layer_keys(scores)
  sizes = [len(scores[k]) for k in keys]
  total = sum(sizes)
  if isinstance(keep, float):
    if not 0.0 < keep <= 1.0:
      raise ValueError(f"keep fraction must be in (0, 1], got {keep}.")
    k_total = int(round(keep * total))
  else:
    k_total = int(keep)
  if not 0 <= k_total <= total:
    raise ValueError(f"keep count {k_total} is outside [0, {total}].")
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}.")
  if scope == "per_layer":
    frac = k_total / total if total else 0.0
    out = {}
    for k in keys:
      s = np.asarray(scores[k])
      n = int(round(frac * len(s)))
      out[k] = np.sort(np.argsort(-s, kind="stable")[:n])
    return out
  flat = np.concatenate([np.asarray(scores[k], np.float64) for k in keys])
  order = np.argsort(-flat, kind="stable")[:k_total]  # ties: lower index
  layer_of = np.repeat(np.arange(len(keys)), sizes)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  out = {k: [] for k in keys}
  for f in order:
    li = layer_of[f]
    out[keys[li]].append(f - offsets[li])
  return {k: np.sort(np.asarray(v, np.int64)) for k, v in out.items()}


def distill(
  model: vit.VisionTransformer,
  frozen: Mapping[str, Any],
  full_prompts: Mapping[str, jax.Array],
  images: Iterable[np.ndarray],
  kept_prompts: Mapping[str, jax.Array],
  *,
  steps: int = 50,
  lr: float = 1e-2,
) -> dict[str, jax.Array]:
  """Fits the kept prompts to the full model's class-token features.

  Adam on ``kept_prompts`` only, minimising the mean squared difference
  between the condensed and the full model's features (the backbone is
  frozen, inference mode). ``images`` are cycled for ``steps`` steps.

  Returns:
    The re-projected prompt tree (same shapes as ``kept_prompts``).
  """
  feat_model = model.clone(num_classes=None)
  params = {"params": vit.split_head(frozen)[0]}
  images = list(images)
  targets = [
    feat_model.apply(params, x, full_prompts) for x in images
  ]  # computed once

  def loss(p, x, t):
    return jnp.mean((feat_model.apply(params, x, p) - t) ** 2)

  opt = optax.adam(lr)

  @jax.jit
  def step(p, s, x, t):
    g = jax.grad(loss)(p, x, t)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = dict(kept_prompts)
  s = opt.init(p)
  for i in range(steps):
    j = i % len(images)
    p, s = step(p, s, images[j], targets[j])
  return p


def merge(
  prompts: Mapping[str, jax.Array],
  scores: Mapping[str, np.ndarray],
  keep_idx: Mapping[str, np.ndarray],
) -> dict[str, jax.Array]:
  """Folds every discarded prompt into its most similar kept prompt.

  Per layer: each discarded prompt joins the kept prompt with the highest
  cosine similarity (ties to the lower kept index); each kept prompt becomes
  the ``abs(score)``-weighted mean of itself and the prompts that joined it (equal
  weights if all of a group's scores are 0).

  Args:
    prompts: the full prompt tree.
    scores: per-layer scores (as from `importance_scores`).
    keep_idx: per-layer kept indices (as from `select`).

  Returns:
    The merged prompt tree, shaped like ``gather_prompts(prompts, keep_idx)``.
  """
  out = {}
  for k in prompts_lib.layer_keys(prompts):
    p = np.asarray(prompts[k], np.float64)
    kept = np.asarray(keep_idx.get(k, []), np.int64)
    if kept.size == 0:
      out[k] = jnp.zeros((0, p.shape[-1]), jnp.asarray(prompts[k]).dtype)
      continue
    w = np.abs(np.asarray(scores[k], np.float64))
    unit = p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
    dropped = np.setdiff1d(np.arange(len(p)), kept)
    owner = (
      np.argmax(unit[dropped] @ unit[kept].T, axis=-1)
      if len(dropped)
      else np.zeros(0, np.int64)
    )
    merged = []
    for slot, i in enumerate(kept):
      group = np.concatenate([[i], dropped[owner == slot]])
      gw = w[group]
      gw = (
        gw / gw.sum() if gw.sum() > 0 else np.full(len(group), 1 / len(group))
      )
      merged.append(gw @ p[group])
    out[k] = jnp.asarray(np.stack(merged), jnp.asarray(prompts[k]).dtype)
  return out


def condense(
  prompts: Mapping[str, jax.Array],
  scores: Mapping[str, np.ndarray],
  *,
  keep: float | int,
  scope: str = "global",
  reproject: str = "none",
  reproject_fn: Callable | None = None,
) -> tuple[dict[str, jax.Array], dict[str, np.ndarray]]:
  """Prunes (and optionally re-projects) a prompt tree.

  Args:
    prompts: the trained prompt tree.
    scores: from `importance_scores`.
    keep: fraction or count (see `select`).
    scope: ``global`` or ``per_layer``.
    reproject: ``none``, ``distill`` or ``merge``.
    reproject_fn: for ``distill``, ``fn(kept_prompts) -> prompts``, e.g.
      ``functools.partial(distill, model, frozen, prompts, images)`` (kept
      apart so that this function stays a pure map of its inputs).

  Returns:
    (condensed prompt tree, kept indices per layer).

  Raises:
    ValueError: unknown ``reproject`` or a missing ``reproject_fn``.
  """
  if reproject not in REPROJECTIONS:
    raise ValueError(
      f"reproject must be one of {REPROJECTIONS}, got {reproject!r}."
    )
  idx = select(scores, keep, scope=scope)
  kept = prompts_lib.gather_prompts(prompts, idx)
  if reproject == "distill":
    if reproject_fn is None:
      raise ValueError("reproject='distill' needs reproject_fn.")
    kept = reproject_fn(kept)
  elif reproject == "merge":
    kept = merge(prompts, scores, idx)
  return kept, idx
