"""A pure-functional Flax Swin Transformer with Visual Prompt Tuning built in.

The module tree follows timm's `SwinTransformer` (timm >= 0.9 layout, the
one of the ``timm/swin_*`` files on the Hugging Face hub), so a timm
``state_dict`` maps key for key (`vptpc.timm_checkpoint.load_safetensors`)::

  timm key                                  vptpc params key
  patch_embed.proj.{weight,bias}            patch_embed/proj/{kernel,bias}
  patch_embed.norm.{weight,bias}            patch_embed/norm/{scale,bias}
  layers.S.downsample.norm.*   (S >= 1)     layers_S/downsample/norm/*
  layers.S.downsample.reduction.weight      layers_S/downsample/reduction/kernel
  layers.S.blocks.J.norm1.*                 layers_S/blocks_J/norm1/*
  layers.S.blocks.J.attn.qkv.*              layers_S/blocks_J/attn/qkv/*
  layers.S.blocks.J.attn.relative_position_bias_table
                                            layers_S/blocks_J/attn/relative_position_bias_table
  layers.S.blocks.J.attn.proj.*             layers_S/blocks_J/attn/proj/*
  layers.S.blocks.J.norm2.*, .mlp.fc{1,2}.* layers_S/blocks_J/norm2/*, mlp/fc{1,2}/*
  norm.{weight,bias}                        norm/{scale,bias}
  head.fc.{weight,bias}                     head/{kernel,bias} (VPT's new head)

``weight`` becomes ``kernel`` (Linear: transposed; Conv: OIHW -> HWIO) or
``scale`` (LayerNorm). timm puts patch merging at the *start* of stages
1..S-1; Microsoft's original files put it at the end of stages 0..S-2
(`checkpoint` renumbers those). LayerNorm eps is 1e-5 and GELU is exact, as
in torch.

VPT on Swin follows the official VPT code (KMnP/vpt
``src/models/vit_prompt/swin_transformer.py``; docs/references.md, "VPT:
Swin"). Prompts are a pytree passed to `__call__`, apart from the frozen
parameters:

* ``{"input": (n, C0)}``: VPT-Shallow. The prompts are prepended (there is
  no CLS token), carried through every block, and carried through each patch
  merging by concatenating each prompt with itself four times (4 x C) before
  the merging LayerNorm and reduction.
* ``{"encoderblock_0": (k_0, C_0), ..., "encoderblock_{L-1}": ...}``:
  VPT-Deep, one set per block, numbered over all stages (Swin-B: 24 sets for
  depths (2, 2, 18, 2)); block g of stage s has width ``embed_dim * 2**s``.
  ``encoderblock_0`` is the input prompt set that the official code inserts
  after the patch embedding; before every other block the prompt tokens are
  replaced by that block's set. Counts may differ per block (zero included),
  which is what Prompt Condensation produces.

Inside a block the prompts go through the pre-attention LayerNorm with the
image tokens and are copied into every attention window, in front of the
window's tokens. Their rows and columns of the relative-position bias and of
the shifted-window mask are zero, so every window token attends to every
prompt and every prompt attends to the whole window. Each window produces
an output for each prompt; a prompt's output is the mean over the windows
of its image. Prompt tokens then take the residual and the MLP like image
tokens. The head averages all final tokens, prompts included, after the
final LayerNorm.

Which prompt outputs are used, and what that makes exact:

* VPT-Deep: only the **last block's** prompt outputs are used (they enter the
  final LayerNorm and the average pool). Every other block's prompt outputs
  and the prompts merged by each patch merging are discarded, because the
  next block replaces them. So, exactly, blocks 0..L-2 need the prompts only
  as extra keys and values, ``K = LN1(p) W_k + b_k`` and
  ``V = LN1(p) W_v + b_v``, which do not depend on the image: with
  ``kv_only`` they are projected once per batch and shared by every window
  of every image (or once per task, `build_kv_cache`). The last block also
  needs the prompts' queries, attention outputs and MLP; its prompt
  projections are still image-independent and computed once per batch.
* VPT-Shallow: every prompt output is used (carried to the next block and
  through patch merging) and depends on the image after the first block, so
  there is no key/value-only form; ``kv_only`` raises.

Prompt dropout follows the official code: the input prompts
(``encoderblock_0`` / ``input``) get a mask per example, the other deep sets
one mask per step shared by the batch (the official code applies dropout to
the (depth, n, C) parameter before broadcasting it), so their keys/values
stay shareable while training.

One deliberate deviation, documented in the tests: the official code copies
prompts into windows in (window, batch) order while windows are laid out in
(batch, window) order, and averages prompt outputs in the same mismatched
order. With a batch of one image this is exactly what is implemented here;
with more images the official code mixes prompt outputs across images, a
batch-size-dependent artefact we do not reproduce: here prompt outputs are
averaged over the windows of their own image.

The backbone always runs in inference mode (docs/references.md, "VPT: head
and loss").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vptpc.models.vit import HEAD_BIAS_INIT, gelu, prompt_variant

Array = jax.Array

LN_EPS = 1e-5  # torch nn.LayerNorm default, used by Swin
MASK_VALUE = -100.0  # the shifted-window mask value of Swin and timm

# Swin variants (Liu et al. 2021; timm `swin_*_patch4_window7_224`) and a tiny
# test model (32 px: 16 x 16 patches, stages at 16, 8 and 4 tokens a side,
# so stage 0 and 1 have shifted windows and stage 2 one clamped window).
_VARIANTS: dict[str, dict[str, Any]] = {
  "Swin-T": dict(
    patch_size=4,
    embed_dim=96,
    depths=(2, 2, 6, 2),
    num_heads=(3, 6, 12, 24),
    window_size=7,
  ),
  "Swin-S": dict(
    patch_size=4,
    embed_dim=96,
    depths=(2, 2, 18, 2),
    num_heads=(3, 6, 12, 24),
    window_size=7,
  ),
  "Swin-B": dict(
    patch_size=4,
    embed_dim=128,
    depths=(2, 2, 18, 2),
    num_heads=(4, 8, 16, 32),
    window_size=7,
  ),
  "Swin-L": dict(
    patch_size=4,
    embed_dim=192,
    depths=(2, 2, 18, 2),
    num_heads=(6, 12, 24, 48),
    window_size=7,
  ),
  "testing": dict(
    patch_size=2,
    embed_dim=16,
    depths=(2, 2, 2),
    num_heads=(1, 2, 4),
    window_size=4,
  ),
}
_ALIASES = {
  "t": "Swin-T",
  "s": "Swin-S",
  "b": "Swin-B",
  "l": "Swin-L",
  "tiny": "Swin-T",
  "small": "Swin-S",
  "base": "Swin-B",
  "large": "Swin-L",
}
# timm model names -> (variant, overrides).
_TIMM_NAMES = {
  "swin_tiny_patch4_window7_224": ("Swin-T", {}),
  "swin_small_patch4_window7_224": ("Swin-S", {}),
  "swin_base_patch4_window7_224": ("Swin-B", {}),
  "swin_large_patch4_window7_224": ("Swin-L", {}),
  "swin_base_patch4_window12_384": ("Swin-B", {"window_size": 12}),
  "swin_large_patch4_window12_384": ("Swin-L", {"window_size": 12}),
}


def model_names() -> tuple[str, ...]:
  """Returns the names accepted by `get_model_config` (aliases aside)."""
  return tuple(_VARIANTS)


def _resolve(name: str) -> tuple[str, dict[str, Any]]:
  base = name.split(".")[0]  # timm pretrained tags: "...224.ms_in22k"
  if base in _TIMM_NAMES:
    return _TIMM_NAMES[base]
  if name in _VARIANTS:
    return name, {}
  key = name.lower().replace("-", "_")
  key = key.removeprefix("swin_").removeprefix("swin")
  if key in _ALIASES:
    return _ALIASES[key], {}
  if key in _VARIANTS:  # "swin-testing": the test model, named as a Swin
    return key, {}
  raise ValueError(
    f"Unknown Swin variant {name!r}; known: {', '.join(_VARIANTS)} (also "
    f"'swin_b' style aliases and timm names {', '.join(_TIMM_NAMES)})."
  )


def get_model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """Returns the architecture config of a named Swin variant.

  Args:
    name: ``"Swin-T"``, ``"Swin-S"``, ``"Swin-B"``, ``"Swin-L"`` or
      ``"testing"``; also ``"swin_b"``, ``"B"`` and timm names such as
      ``"swin_base_patch4_window7_224.ms_in22k"``.
    **overrides: replaces fields (window_size, num_classes, kv_only, ...).

  Returns:
    A ConfigDict whose items are `SwinTransformer` keyword arguments.

  Raises:
    ValueError: the name is unknown, or an override names no field.
  """
  key, extra = _resolve(name)
  cfg = dict(_VARIANTS[key], mlp_ratio=4.0, num_classes=None)
  cfg.update(extra)
  allowed = set(cfg) | {"prompt_dropout", "kv_only", "kv_shared", "dtype"}
  bad = sorted(set(overrides) - allowed)
  if bad:
    raise ValueError(
      f"Unknown Swin config field(s) {bad}; known: {sorted(allowed)}."
    )
  cfg.update(overrides)
  cfg["depths"] = tuple(cfg["depths"])
  cfg["num_heads"] = tuple(cfg["num_heads"])
  return ml_collections.ConfigDict(cfg)


# --- Static geometry: windows, shifts, relative positions, masks. ---------


def stage_window(
  resolution: tuple[int, int], window_size: int, shifted: bool
) -> tuple[tuple[int, int], tuple[int, int]]:
  """Window and shift of a block at a stage resolution (timm's rule).

  A side no longer than the window is one window and is never shifted;
  for square inputs this is the official rule ``min(H, W) <= window``.

  Returns:
    ((window_h, window_w), (shift_h, shift_w)).
  """
  win = tuple(r if r <= window_size else window_size for r in resolution)
  shift = tuple(
    0 if (r <= window_size or not shifted) else window_size // 2
    for r in resolution
  )
  return win, shift


def relative_position_index(window: tuple[int, int]) -> np.ndarray:
  """(T, T) index into the ``(2h-1)(2w-1)`` bias table, T = h * w."""
  h, w = window
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
  flat = coords.reshape(2, -1)
  rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0)
  rel[:, :, 0] += h - 1
  rel[:, :, 1] += w - 1
  rel[:, :, 0] *= 2 * w - 1
  return rel.sum(-1)


def shift_mask(
  resolution: tuple[int, int],
  window: tuple[int, int],
  shift: tuple[int, int],
) -> np.ndarray:
  """(num_windows, T, T) additive mask of shifted windows (0 or -100).

  Tokens that the cyclic shift brought from different image regions into
  one window do not attend to each other (Swin's SW-MSA mask).
  """
  hh, ww = resolution
  img = np.zeros((hh, ww), np.float32)
  cnt = 0
  for hs in (
    slice(0, -window[0]),
    slice(-window[0], -shift[0]),
    slice(-shift[0], None),
  ):
    for ws in (
      slice(0, -window[1]),
      slice(-window[1], -shift[1]),
      slice(-shift[1], None),
    ):
      img[hs, ws] = cnt
      cnt += 1
  win = _partition_np(img[None, :, :, None], window)[0, :, :, 0]
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, MASK_VALUE, 0.0).astype(np.float32)


def _partition_np(x, window):
  b, h, w, c = x.shape
  x = x.reshape(b, h // window[0], window[0], w // window[1], window[1], c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, window[0] * window[1], c)


def window_partition(x: Array, window: tuple[int, int]) -> Array:
  """(B, H, W, C) -> (B, num_windows, T, C), windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window[0], window[0], w // window[1], window[1], c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, window[0] * window[1], c)


def window_reverse(x: Array, window: tuple[int, int], h: int, w: int) -> Array:
  """Inverse of `window_partition`: (B, num_windows, T, C) -> (B, H, W, C)."""
  b, c = x.shape[0], x.shape[-1]
  x = x.reshape(b, h // window[0], w // window[1], window[0], window[1], c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def stage_resolutions(
  image_size: int | tuple[int, int], patch_size: int, num_stages: int
) -> list[tuple[int, int]]:
  """Token grid of each stage (halved by each patch merging)."""
  hw = (image_size, image_size) if isinstance(image_size, int) else image_size
  r = (hw[0] // patch_size, hw[1] // patch_size)
  out = []
  for _ in range(num_stages):
    out.append(r)
    r = (r[0] // 2, r[1] // 2)
  return out


def block_widths(embed_dim: int, depths: Sequence[int]) -> tuple[int, ...]:
  """Token width of every block in order (``embed_dim * 2**stage``)."""
  return tuple(
    embed_dim * 2**s for s, depth in enumerate(depths) for _ in range(depth)
  )


# --- Attention. -------------------------------------------------------------


def window_attention(
  q: Array,
  k: Array,
  v: Array,
  bias: Array,
  mask: Array | None = None,
  qp: Array | None = None,
  kp: Array | None = None,
  vp: Array | None = None,
  kmask: Array | None = None,
) -> tuple[Array, Array | None]:
  """Window attention with optional prompt keys/values and prompt queries.

  Logits, their softmax and the weighted sums are float32 for any compute
  dtype. Prompt keys have zero relative-position bias and zero mask.

  Args:
    q: (B, nW, T, heads, d) window queries, already scaled.
    k: (B, nW, T, heads, d) window keys.
    v: (B, nW, T, heads, d) window values.
    bias: (heads, T, T) relative-position bias.
    mask: optional (nW, T, T) additive shifted-window mask.
    qp: optional prompt queries (already scaled), (n, heads, d) shared by the
      batch or (B, n, heads, d); they attend to the prompts and the window.
    kp: optional prompt keys, (n, heads, d) or (B, n, heads, d).
    vp: prompt values, shaped like ``kp``.
    kmask: optional bool validity of the prompt keys, (n,) or (B, n):
      False keys (a task's padding when serving several tasks with
      different prompt counts) get no attention from any query.

  Returns:
    (window outputs (B, nW, T, heads, d), prompt outputs per window
    (B, nW, n, heads, d) or None), in ``q``'s dtype.
  """
  f32 = jnp.promote_types(q.dtype, jnp.float32)  # float64 stays float64
  s = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k, preferred_element_type=f32)
  s = s + bias.astype(f32)[None, None]
  if mask is not None:
    s = s + jnp.asarray(mask, f32)[None, :, None]
  n = 0 if kp is None else kp.shape[-3]
  pb = "" if kp is None or kp.ndim == 3 else "b"  # batch axis of prompts?
  if n:
    sp = jnp.einsum(f"bwqhd,{pb}nhd->bwhqn", q, kp, preferred_element_type=f32)
    s = jnp.concatenate([_mask_keys(sp, kmask), s], axis=-1)
  w = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  out = jnp.einsum(
    "bwhqk,bwkhd->bwqhd", w[..., n:], v, preferred_element_type=f32
  )
  if n:
    out = out + jnp.einsum(
      f"bwhqn,{pb}nhd->bwqhd", w[..., :n], vp, preferred_element_type=f32
    )
  out_p = None
  if qp is not None and n:
    qb = "" if qp.ndim == 3 else "b"
    ob = "b" if (qb or pb) else ""
    spp = jnp.einsum(
      f"{qb}nhd,{pb}mhd->{ob}hnm", qp, kp, preferred_element_type=f32
    )
    spx = jnp.einsum(f"{qb}nhd,bwkhd->bwhnk", qp, k, preferred_element_type=f32)
    if not ob:
      spp = spp[None]
    spp = _mask_keys(
      jnp.broadcast_to(spp[:, None], spx.shape[:-1] + (n,)), kmask
    )
    wp = jax.nn.softmax(jnp.concatenate([spp, spx], -1), axis=-1)
    wp = wp.astype(v.dtype)
    out_p = jnp.einsum(
      "bwhnk,bwkhd->bwnhd", wp[..., n:], v, preferred_element_type=f32
    )
    out_p = out_p + jnp.einsum(
      f"bwhnm,{pb}mhd->bwnhd", wp[..., :n], vp, preferred_element_type=f32
    )
    out_p = out_p.astype(q.dtype)
  return out.astype(q.dtype), out_p


def _mask_keys(logits: Array, kmask: Array | None) -> Array:
  """``logits`` (B, nW, heads, queries, n) with invalid prompt keys at -inf.

  Every query also sees its window's tokens, so no softmax row is empty.
  """
  if kmask is None:
    return logits
  m = jnp.asarray(kmask, bool)
  m = m[:, None, None, None, :] if m.ndim == 2 else m
  return jnp.where(m, logits, -jnp.inf)


class Linear(nn.Module):
  """A Dense layer (params ``kernel``, ``bias``) that can apply a column slice.

  The fused ``qkv`` projection uses it to project prompts to keys and values
  only, without computing their queries.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cols: tuple[int, int] | None = None) -> Array:
    """Returns ``x @ kernel[:, a:b] + bias[a:b]`` (all columns if None)."""
    kernel = self.param(
      "kernel",
      nn.initializers.truncated_normal(0.02),
      (x.shape[-1], self.features),
      jnp.float32,
    )
    bias = self.param(
      "bias", nn.initializers.zeros, (self.features,), jnp.float32
    )
    if cols is not None:
      kernel, bias = kernel[:, cols[0] : cols[1]], bias[cols[0] : cols[1]]
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.matmul(x, kernel) + bias


def _dense(features: int, dtype: Any, name: str, use_bias: bool = True):
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=nn.initializers.truncated_normal(0.02),
    name=name,
  )


class WindowAttention(nn.Module):
  """Window multi-head self-attention with relative position bias (W-MSA)."""

  num_heads: int
  window_size: tuple[int, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    prompts: Array | None = None,
    cached: tuple[Array, Array] | None = None,
    mask: np.ndarray | None = None,
    prompt_queries: bool = False,
    prompt_mask: Array | None = None,
  ) -> tuple[Array, Array | None]:
    """Attends within windows, with prompts as extra tokens of every window.

    Args:
      x: (B, nW, T, C) layer-normed window tokens.
      prompts: optional layer-normed prompts, (n, C) shared by the batch or
        (B, n, C).
      cached: optional projected prompt (keys, values), (n, heads, d) or
        (B, n, heads, d), used instead of ``prompts``.
      mask: optional (nW, T, T) shifted-window mask.
      prompt_queries: also compute the prompts' outputs.
      prompt_mask: optional bool (B, n) validity of per-example prompts
        (`window_attention`'s ``kmask``).

    Returns:
      (window outputs (B, nW, T, C), prompt outputs averaged over each
      image's windows (B, n, C) or None), both after the output projection.
    """
    b, nw, t, c = x.shape
    h = self.num_heads
    if c % h:
      raise ValueError(f"Width {c} is not divisible by {h} heads.")
    d = c // h
    scale = d**-0.5
    qkv = Linear(3 * c, dtype=self.dtype, name="qkv")
    wh, ww = self.window_size
    table = self.param(
      "relative_position_bias_table",
      nn.initializers.truncated_normal(0.02),
      ((2 * wh - 1) * (2 * ww - 1), h),
      jnp.float32,
    )
    proj = _dense(c, self.dtype, "proj")
    q, k, v = jnp.moveaxis(qkv(x).reshape(b, nw, t, 3, h, d), 3, 0)
    q = q * jnp.asarray(scale, q.dtype)
    index = relative_position_index(self.window_size).reshape(-1)
    bias = table[index].reshape(t, t, h).transpose(2, 0, 1)
    qp = kp = vp = None
    if cached is not None:
      if prompt_queries:
        raise ValueError(
          "Prompt queries need the prompt tokens, not a key/value cache."
        )
      kp, vp = (a.astype(k.dtype) for a in cached)
    elif prompts is not None:
      lead = prompts.shape[:-1]
      if prompt_queries:
        qp, kp, vp = jnp.moveaxis(qkv(prompts).reshape(*lead, 3, h, d), -3, 0)
        qp = qp * jnp.asarray(scale, qp.dtype)
      else:  # keys and values only: the query columns are never computed
        kp, vp = jnp.moveaxis(
          qkv(prompts, cols=(c, 3 * c)).reshape(*lead, 2, h, d), -3, 0
        )
    if kp is not None and kp.shape[-3] == 0:
      qp = kp = vp = None
    out, out_p = window_attention(q, k, v, bias, mask, qp, kp, vp, prompt_mask)
    out = proj(out.reshape(b, nw, t, c))
    if out_p is not None:
      # Mean over windows before the (affine) projection: the same as the
      # official projection per window followed by the mean.
      out_p = proj(out_p.mean(axis=1).reshape(b, -1, c))
    return out, out_p


class Mlp(nn.Module):
  """Swin MLP: fc1 -> exact GELU -> fc2 (timm names)."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the MLP to tokens (..., C)."""
    c = x.shape[-1]
    x = _dense(self.hidden, self.dtype, "fc1")(x)
    # torch's exact GELU, in its erf form (vit.gelu: faster under XLA than
    # flax's erfc form, the same function to float32 rounding).
    x = gelu(x)
    return _dense(c, self.dtype, "fc2")(x)


class SwinBlock(nn.Module):
  """A Swin block (W-MSA or SW-MSA, then MLP) with optional prompts."""

  num_heads: int
  window_size: tuple[int, int]
  shift_size: tuple[int, int]
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    prompts: Array | None = None,
    cached: tuple[Array, Array] | None = None,
    prompt_queries: bool = False,
    prompt_mask: Array | None = None,
  ) -> tuple[Array, Array | None]:
    """Applies the block.

    Args:
      x: (B, H, W, C) image tokens.
      prompts: optional prompt tokens, (n, C) shared by the batch or
        (B, n, C); they are layer-normed with the image tokens and prepended
        to every window.
      cached: optional projected prompt keys/values (`build_kv_cache`).
      prompt_queries: compute and return the prompt outputs (needed when the
        outputs are used later: VPT-Shallow and the last VPT-Deep block).
        Otherwise prompts act only as keys and values.
      prompt_mask: optional bool (B, n): False prompts (padding) are keys
        no query attends to; their own outputs are computed but meaningless.

    Returns:
      (image tokens (B, H, W, C), prompt outputs (B, n, C) or None).
    """
    b, hh, ww, c = x.shape
    norm1 = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm1")
    y = norm1(x)
    shifted = any(self.shift_size)
    if shifted:
      y = jnp.roll(y, (-self.shift_size[0], -self.shift_size[1]), axis=(1, 2))
    windows = window_partition(y, self.window_size)
    mask = (
      shift_mask((hh, ww), self.window_size, self.shift_size)
      if shifted
      else None
    )
    n = 0
    if prompts is not None:
      n = prompts.shape[-2]
    yp = norm1(prompts) if n else None
    out, out_p = WindowAttention(
      self.num_heads, self.window_size, dtype=self.dtype, name="attn"
    )(windows, yp, cached, mask, prompt_queries and n > 0, prompt_mask)
    out = window_reverse(out, self.window_size, hh, ww)
    if shifted:
      out = jnp.roll(out, self.shift_size, axis=(1, 2))
    x = x + out
    norm2 = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm2")
    mlp = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name="mlp")
    x = x + mlp(norm2(x))
    if not prompt_queries or prompts is None:
      return x, None
    if not n:
      return x, jnp.zeros((b, 0, c), x.dtype)
    p = prompts + out_p  # (n, C) + (B, n, C) broadcasts per image
    return x, p + mlp(norm2(p))


class PatchMerging(nn.Module):
  """Halves the grid: 2 x 2 neighbours concatenated (4C), LN, Linear to 2C.

  Prompts, having no grid position, are concatenated with themselves four
  times (official VPT), then share the LayerNorm and the reduction.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: Array, prompts: Array | None = None
  ) -> tuple[Array, Array | None]:
    """Merges (B, H, W, C) tokens and optional (B, n, C) prompts."""
    b, hh, ww, c = x.shape
    if hh % 2 or ww % 2:
      raise ValueError(f"Patch merging needs an even grid, got {hh}x{ww}.")
    # timm's order: [x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)]
    x = x.reshape(b, hh // 2, 2, ww // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    x = x.reshape(b, hh // 2, ww // 2, 4 * c)
    norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")
    red = _dense(2 * c, self.dtype, "reduction", use_bias=False)
    x = red(norm(x))
    if prompts is not None:
      prompts = red(norm(jnp.concatenate([prompts] * 4, axis=-1)))
    return x, prompts


class PatchEmbed(nn.Module):
  """Patch embedding: a strided conv then LayerNorm (timm ``patch_embed``)."""

  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """(B, H, W, 3) images -> (B, H/p, W/p, C) tokens."""
    p = self.patch_size
    x = nn.Conv(
      self.embed_dim,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      name="proj",
    )(images.astype(self.dtype))
    return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)


class SwinStage(nn.Module):
  """One stage (timm ``layers.S``): optional patch merging, then blocks."""

  depth: int
  num_heads: int
  window_size: int
  resolution: tuple[int, int]
  downsample_first: bool
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  def setup(self):
    """Declares ``downsample`` (stages >= 1) and ``blocks_J``."""
    if self.downsample_first:
      self.downsample = PatchMerging(dtype=self.dtype)
    blocks = []
    for j in range(self.depth):
      win, shift = stage_window(self.resolution, self.window_size, j % 2 == 1)
      blocks.append(
        SwinBlock(
          self.num_heads,
          win,
          shift,
          mlp_ratio=self.mlp_ratio,
          dtype=self.dtype,
        )
      )
    self.blocks = blocks

  def __call__(self, x: Array) -> Array:
    """Runs the stage without prompts (the model calls the parts itself)."""
    if self.downsample_first:
      x, _ = self.downsample(x)
    for blk in self.blocks:
      x, _ = blk(x)
    return x


class SwinTransformer(nn.Module):
  """Swin Transformer with VPT prompts supplied as a separate pytree.

  Attributes:
    patch_size: patch side in pixels (4 for the published models).
    embed_dim: width C0 of stage 0; stage s has width ``C0 * 2**s``.
    depths: blocks per stage.
    num_heads: attention heads per stage.
    window_size: attention window side (clamped per stage to the grid).
    mlp_ratio: MLP width / token width.
    num_classes: head outputs; None builds no head (features only).
    kv_only: run VPT-Deep prompts as keys/values only wherever that is exact
      (every block but the last; see the module docstring). The same
      function as the full path, cheaper by the prompts' queries,
      attention outputs, output projection, MLP and patch merging.
    kv_shared: with ``kv_only``, project prompt keys/values once per batch
      and share them across images (True), or per image (False). Input
      prompts with per-example dropout are always per image.
    prompt_dropout: dropout rate on prompts while training.
    dtype: compute dtype (parameters stay float32).
  """

  patch_size: int = 4
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  num_classes: int | None = None
  kv_only: bool = False
  kv_shared: bool = True
  prompt_dropout: float = 0.0
  dtype: Any = jnp.float32

  @property
  def num_layers(self) -> int:
    """Total number of blocks (= VPT-Deep prompt sets)."""
    return int(sum(self.depths))

  @property
  def num_features(self) -> int:
    """Width of the pooled features (the head's input)."""
    return self.embed_dim * 2 ** (len(self.depths) - 1)

  def prompt_widths(self) -> tuple[int, ...]:
    """Width of each VPT-Deep prompt set, ``encoderblock_0`` first."""
    return block_widths(self.embed_dim, self.depths)

  def _prompt(
    self, p: Array, batch: int, train: bool, per_example: bool
  ) -> Array:
    """Casts prompts; applies dropout when training (see module docstring)."""
    p = p.astype(self.dtype)
    if train and self.prompt_dropout > 0 and p.shape[0] > 0:
      if per_example:
        p = jnp.broadcast_to(p, (batch,) + p.shape)
      keep = 1.0 - self.prompt_dropout
      m = jax.random.bernoulli(self.make_rng("dropout"), keep, p.shape)
      p = jnp.where(m, p / keep, 0).astype(self.dtype)
    return p

  def _check_prompts(self, prompts, variant: str, width0: int) -> None:
    if variant == "deep":
      want = {f"encoderblock_{g}" for g in range(self.num_layers)}
      missing = sorted(want - set(prompts), key=lambda k: int(k[13:]))
      extra = sorted(set(prompts) - want)
      if missing or extra:
        raise ValueError(
          f"Deep prompt tree does not fit a {self.num_layers}-block Swin "
          f"(depths {tuple(self.depths)}): missing {missing}, unexpected "
          f"{extra} (use a (0, C) array for a block without prompts)."
        )
      for g, c in enumerate(self.prompt_widths()):
        p = prompts[f"encoderblock_{g}"]
        if isinstance(p, Mapping):
          continue
        if p.shape[-1] != c:
          raise ValueError(
            f"Prompt set encoderblock_{g} has width {p.shape[-1]}; block "
            f"{g} of this Swin has width {c} (widths double per stage)."
          )
    elif variant == "shallow":
      if self.kv_only:
        raise ValueError(
          "kv_only is exact only for VPT-Deep; shallow prompts are carried "
          "through every block and patch merging, so they must run the "
          "full path."
        )
      if prompts["input"].shape[-1] != width0:
        raise ValueError(
          f"Shallow prompts have width {prompts['input'].shape[-1]}; the "
          f"Swin's stage-0 width is {width0}."
        )

  @nn.compact
  def __call__(
    self,
    images: Array,
    prompts: Mapping[str, Any] | None = None,
    *,
    train: bool = False,
    return_features: bool = False,
  ) -> Array | tuple[Array, Array]:
    """Classifies images.

    Args:
      images: (B, H, W, 3) float images, normalised.
      prompts: a prompt tree (module docstring) or None. With ``kv_only``,
        a deep entry may be a ``{"key", "value"}`` cache
        (`build_kv_cache`) for every block but the last, optionally with a
        ``"mask"`` (B, n) of valid keys. Any deep entry may also be
        ``{"prompts": (B, n, C), "mask": (B, n)}``: per-example prompts
        padded to a common count; padding gets no attention and, in the
        last block, no share of the average pool (`vptpc.serve` batches
        several tasks this way).
      train: enables prompt dropout (needs a ``dropout`` rng).
      return_features: also return the pooled features.

    Returns:
      Logits (B, num_classes), or the pooled features (B, C) without a
      head; with ``return_features`` a tuple (logits, features).
    """
    num_stages = len(self.depths)
    if len(self.num_heads) != num_stages:
      raise ValueError(
        f"num_heads {tuple(self.num_heads)} and depths "
        f"{tuple(self.depths)} differ in length."
      )
    if images.ndim != 4:
      raise ValueError(f"Expected (B, H, W, C) images; got {images.shape}.")
    res = stage_resolutions(images.shape[1:3], self.patch_size, num_stages)
    problems = []
    if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      problems.append(f"patch size {self.patch_size}")
    for s, r in enumerate(res):
      if min(r) == 0:
        problems.append(f"stage {s} has an empty grid {r}")
        continue
      if s + 1 < num_stages and (r[0] % 2 or r[1] % 2):
        problems.append(f"stage {s} grid {r} must be even for patch merging")
      win, _ = stage_window(r, self.window_size, False)
      if r[0] % win[0] or r[1] % win[1]:
        problems.append(f"stage {s} grid {r} is not a multiple of {win}")
    if problems:
      raise ValueError(
        f"Image size {images.shape[1:3]} does not fit this Swin (patch "
        f"{self.patch_size}, window {self.window_size}, {num_stages} "
        f"stages): " + "; ".join(problems) + "."
      )
    b = images.shape[0]
    x = PatchEmbed(
      self.patch_size, self.embed_dim, dtype=self.dtype, name="patch_embed"
    )(images)
    variant = prompt_variant(prompts)
    self._check_prompts(prompts, variant, self.embed_dim)
    collect = self.is_mutable_collection("intermediates")
    full = not self.kv_only
    p = None  # prompt tokens carried between blocks (full path, shallow)
    if variant == "shallow":
      p = self._prompt(prompts["input"], b, train, per_example=True)
      p = jnp.broadcast_to(p, (b,) + p.shape[-2:])
    g = 0
    last_block = self.num_layers - 1
    p_mask = None  # validity of per-example padded prompts in ``p``
    for s in range(num_stages):
      stage = SwinStage(
        self.depths[s],
        self.num_heads[s],
        self.window_size,
        res[s],
        downsample_first=s > 0,
        mlp_ratio=self.mlp_ratio,
        dtype=self.dtype,
        name=f"layers_{s}",
      )
      if s > 0:
        # Deep, full path: the merged prompts are computed as in the
        # official code, then replaced by the next block's set.
        x, p = stage.downsample(x, p)
      for j in range(self.depths[s]):
        blk = stage.blocks[j]
        if collect:
          self.sow(
            "intermediates",
            f"block_input_{g}",
            x.reshape(b, -1, x.shape[-1]),
          )
        if variant == "deep":
          raw = prompts[f"encoderblock_{g}"]
          p_mask = None
          if isinstance(raw, Mapping) and "prompts" in raw:
            # Per-example prompts padded to a common count, with their
            # validity (several tasks in one batch, `vptpc.serve`).
            pg = jnp.asarray(raw["prompts"]).astype(self.dtype)
            p_mask = jnp.asarray(raw["mask"], bool)
            x, p = blk(
              x,
              pg,
              prompt_queries=full or g == last_block,
              prompt_mask=p_mask,
            )
          elif isinstance(raw, Mapping):
            if full or g == last_block:
              raise ValueError(
                "A key/value prompt cache needs kv_only=True and cannot "
                f"stand for the last block ({g}), whose prompt outputs "
                "are used; pass that block's prompts as an array."
              )
            x, p = blk(
              x, cached=(raw["key"], raw["value"]), prompt_mask=raw.get("mask")
            )
          else:
            pg = self._prompt(raw, b, train, per_example=g == 0)
            if full or pg.ndim == 3 or not self.kv_shared:
              pg = jnp.broadcast_to(pg, (b,) + pg.shape[-2:])
            x, p = blk(x, pg, prompt_queries=full or g == last_block)
        elif variant == "shallow":
          x, p = blk(x, p, prompt_queries=True)
        else:
          x, _ = blk(x)
        if collect and p is not None:
          self.sow("intermediates", f"block_prompts_{g}", p)
        g += 1
    tokens = x.reshape(b, -1, x.shape[-1])
    if p is not None:
      tokens = jnp.concatenate([p.astype(tokens.dtype), tokens], axis=1)
    tokens = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(tokens)
    # Official VPT-Swin: the average pool covers every token, prompts too.
    if p is not None and p_mask is not None:
      # ... but not a task's padding prompts.
      w = jnp.concatenate(
        [
          p_mask.astype(jnp.float32),
          jnp.ones((b, tokens.shape[1] - p.shape[1])),
        ],
        axis=1,
      )
      f = (tokens.astype(jnp.float32) * w[..., None]).sum(1)
      features = (f / w.sum(1, keepdims=True)).astype(tokens.dtype)
    else:
      features = tokens.mean(axis=1)
    if self.num_classes is None:
      return (features, features) if return_features else features
    logits = nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
      bias_init=nn.initializers.constant(HEAD_BIAS_INIT),
      name="head",
    )(features.astype(jnp.promote_types(features.dtype, jnp.float32)))
    return (logits, features) if return_features else logits


def create_model(
  name_or_config: str | Mapping[str, Any], **overrides: Any
) -> SwinTransformer:
  """Builds a `SwinTransformer` from a variant name or a config mapping."""
  if isinstance(name_or_config, str):
    cfg = get_model_config(name_or_config, **overrides)
  else:
    cfg = dict(name_or_config)
    cfg.update(overrides)
  cfg = dict(cfg)
  cfg["depths"] = tuple(cfg["depths"])
  cfg["num_heads"] = tuple(cfg["num_heads"])
  return SwinTransformer(**cfg)


def init_params(
  model: SwinTransformer, rng: Array, image_size: int
) -> dict[str, Any]:
  """Initialises the backbone (+ head) parameters.

  Swin has no absolute position embedding, so the shapes depend on the
  image size only where a stage grid is smaller than the window (the
  window, hence its bias table, is clamped to the grid there).
  """
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(model.init)(rng, images)["params"]


def init_bound(model: SwinTransformer) -> float:
  """VPT's Swin prompt init bound ``sqrt(6 / (3 * p * p + C0))``.

  The official code uses the patch size and the stage-0 width for every
  prompt set, whatever its stage: Swin-B gives ``sqrt(6 / 176)``.
  """
  return math.sqrt(
    6.0 / (3 * model.patch_size * model.patch_size + model.embed_dim)
  )


def init_prompts(
  rng: Array,
  model: SwinTransformer,
  *,
  num_prompts: int | Sequence[int],
  variant: str = "deep",
  dtype: Any = jnp.float32,
) -> dict[str, Array]:
  """Initialises a Swin prompt tree as the official VPT code does.

  Args:
    rng: PRNG key.
    model: the Swin (its depths, widths and patch size are used).
    num_prompts: prompts per block (an int, or one count per block for
      ``deep``; zeros allowed), or the shallow count.
    variant: ``"deep"`` (one set per block, widths following the stages)
      or ``"shallow"`` (``{"input": (n, C0)}``).
    dtype: parameter dtype.

  Returns:
    The tree, uniform in +-`init_bound`.

  Raises:
    ValueError: bad variant or counts.
  """
  bound = init_bound(model)

  def draw(key, n, c):
    return jax.random.uniform(key, (n, c), dtype, -bound, bound)

  if variant == "shallow":
    if not isinstance(num_prompts, (int, np.integer)) or num_prompts < 0:
      raise ValueError(
        f"num_prompts for VPT-Shallow must be an int >= 0, got {num_prompts!r}."
      )
    return {"input": draw(rng, int(num_prompts), model.embed_dim)}
  if variant != "deep":
    raise ValueError(f"variant must be 'deep' or 'shallow', got {variant!r}.")
  widths = model.prompt_widths()
  counts = (
    [num_prompts] * len(widths)
    if isinstance(num_prompts, (int, np.integer))
    else list(num_prompts)
  )
  if len(counts) != len(widths) or any(
    not isinstance(c, (int, np.integer)) or c < 0 for c in counts
  ):
    raise ValueError(
      f"num_prompts must be an int or {len(widths)} non-negative ints (one "
      f"per block), got {num_prompts!r}."
    )
  keys = jax.random.split(rng, len(widths))
  return {
    f"encoderblock_{g}": draw(keys[g], int(n), c)
    for g, (n, c) in enumerate(zip(counts, widths, strict=True))
  }


def build_kv_cache(
  model: SwinTransformer,
  backbone: Mapping[str, Any],
  prompts: Mapping[str, Array],
) -> dict[str, Any]:
  """Projects VPT-Deep prompts to keys/values once per task (serving).

  Every block but the last needs its prompts only as keys and values,
  ``LN1(p) W_k + b_k`` and ``LN1(p) W_v + b_v``, which depend only on the
  prompts and frozen weights. The last block's prompt outputs are used by
  the head, so its entry stays the prompt array.

  Args:
    model: the Swin (run it with ``kv_only=True`` on the cache).
    backbone: frozen parameters (``layers_S/blocks_J/...``).
    prompts: a deep prompt tree.

  Returns:
    ``{"encoderblock_g": {"key": (k, H, d), "value": (k, H, d)}}`` for
    every block but the last, whose entry is its (k, C) prompt array.
  """
  if prompt_variant(prompts) != "deep":
    raise ValueError("A key/value cache exists only for VPT-Deep prompts.")
  out: dict[str, Any] = {}
  g = 0
  for s, depth in enumerate(model.depths):
    h = model.num_heads[s]
    for j in range(depth):
      name = f"encoderblock_{g}"
      p = jnp.asarray(prompts[name])
      if g == model.num_layers - 1:
        out[name] = p
        break
      blk = backbone[f"layers_{s}"][f"blocks_{j}"]
      ln = nn.LayerNorm(epsilon=LN_EPS, dtype=model.dtype)
      y = ln.apply({"params": blk["norm1"]}, p.astype(model.dtype))
      c = p.shape[-1]
      kv = Linear(3 * c, dtype=model.dtype).apply(
        {"params": blk["attn"]["qkv"]}, y, cols=(c, 3 * c)
      )
      k, v = jnp.moveaxis(kv.reshape(-1, 2, h, c // h), 1, 0)
      out[name] = {"key": k, "value": v}
      g += 1
  return out
