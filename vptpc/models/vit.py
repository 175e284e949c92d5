"""A pure-functional Flax ViT with Visual Prompt Tuning (VPT) built in.

The module tree and parameter names match Google's vit_jax `.npz` files
(`ViT-B_16.npz` from ImageNet-21k and the augreg files) exactly, so
`vptpc.checkpoint.load_pretrained` maps keys one to one::

  embedding/{kernel,bias}                      patch conv
  cls                                          class token
  Transformer/posembed_input/pos_embedding     (1, 1 + N, D)
  Transformer/encoderblock_{i}/LayerNorm_0
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value,out}
  Transformer/encoderblock_{i}/LayerNorm_2
  Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}
  Transformer/encoder_norm
  head                                         (only when num_classes is set)

Prompts are not Flax parameters: they are passed to `__call__` as their own
pytree (see `vptpc.prompts`), so the frozen backbone and the trainable prompts
never share a tree. The prompt tree's keys say which VPT variant runs:

* ``{"input": (n, D)}`` is VPT-Shallow: prompts inserted once after the
  position embedding and carried through every block.
* ``{"encoderblock_0": (k_0, D), ..., "encoderblock_{L-1}": (k_{L-1}, D)}`` is
  VPT-Deep: before block l the previous block's prompt outputs are replaced by
  the layer-l prompts. Counts may differ per layer (zero included), which is
  what Prompt Condensation produces; shapes are static, so `jit` specialises.

The backbone always runs in inference mode (no dropout), as the official VPT
code keeps the encoder in `eval()` while training (docs/references.md, "VPT:
head and loss"). Only prompt dropout depends on `train`.

How the attention runs on each backend, and every other option that
changes only the speed, is the model's one ``levers`` field
(`vptpc.models.levers.Levers`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vptpc import moved
from vptpc.models import levers as levers_lib
from vptpc.models import vit_variants
from vptpc.models.levers import Levers

Array = jax.Array

# VPT's head bias: -log((1 - 0.01) / 0.01), a prior of 1% per class
# (docs/references.md, "VPT: head and loss").
HEAD_BIAS_INIT = -math.log((1 - 0.01) / 0.01)


def model_names() -> tuple[str, ...]:
  """Returns the names accepted by `get_model_config`.

  vit_jax's variants (``B/16``, ...), then timm's checkpoint names and
  architecture names (`vptpc.models.vit_variants`).
  """
  return vit_variants.names()


def get_model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """Returns the architecture config of a named ViT variant.

  Args:
    name: one of `model_names()`, e.g. ``"B/16"`` (vit_jax spelling; ``"ViT-B_16"``
      and ``"ViT-B/16"`` are accepted too).
    **overrides: replaces fields (patch_size, hidden_size, num_layers,
      num_heads, mlp_dim, num_classes, levers, ...) to build custom
      variants.

  Returns:
    A ConfigDict whose items are `VisionTransformer` keyword arguments.

  Raises:
    ValueError: the name is unknown, or an override names no field.
  """
  overrides = levers_lib.from_former_fields(
    overrides, "vptpc.models.vit.get_model_config"
  )
  arch = vit_variants.arch(name)
  if arch is None:
    raise ValueError(
      f"Unknown ViT variant {name!r}; known: {', '.join(model_names())}."
    )
  cfg = dict(arch, num_classes=None)
  # Every field of the module is a valid override, so the two never drift.
  allowed = {
    f.name
    for f in dataclasses.fields(VisionTransformer)
    if f.name not in ("parent", "name")
  }
  bad = sorted(set(overrides) - allowed)
  if bad:
    raise ValueError(
      f"Unknown ViT config field(s) {bad}; known: {sorted(allowed)}."
    )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


_SQRT_HALF = math.sqrt(0.5)


def gelu(x: Array) -> Array:
  """The exact GELU, x Φ(x), as ``x / 2 (1 + erf(x / sqrt 2))`` in float32.

  The same function as ``nn.gelu(x, approximate=False)`` (which is
  ``x / 2 erfc(-x / sqrt 2)``) to float32 rounding, and PyTorch's form of
  it (``torch.nn.GELU()``, which the official VPT uses); computed in
  float32 and rounded once to ``x``'s dtype. XLA expands erf into one
  rational polynomial and erfc into several branches with an exponential,
  all evaluated: on an H200 this form ran the bf16 eval forward 12.8% and
  the train step 4.7% faster (docs/performance.md). The erfc form is more
  accurate in relative terms where Φ(x) is tiny (x below about -4, where
  the GELU's magnitude is under 2e-4); the absolute difference stays
  within float32 epsilon times the magnitude of x everywhere (tested).
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (0.5 * xf * (1.0 + jax.lax.erf(xf * _SQRT_HALF))).astype(x.dtype)


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's GELU approximation, ``x sigmoid(1.702 x)``, in float32."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (xf * jax.nn.sigmoid(1.702 * xf)).astype(x.dtype)


# The MLP's activation (`MlpBlock.act`): the exact GELU, or OpenAI CLIP's
# QuickGELU, which its image towers were trained with.
ACTIVATIONS = ("gelu", "quick_gelu")


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> exact GELU (or CLIP's QuickGELU) -> Dense."""

  mlp_dim: int
  dtype: Any = jnp.float32
  act: str = "gelu"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the MLP to tokens ``x`` of shape (..., D)."""
    d = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    bias_init = nn.initializers.normal(stddev=1e-6)
    x = nn.Dense(
      self.mlp_dim,
      dtype=self.dtype,
      kernel_init=init,
      bias_init=bias_init,
      name="Dense_0",
    )(x)
    if self.act not in ACTIVATIONS:
      raise ValueError(f"act={self.act!r}; expected one of {ACTIVATIONS}.")
    # torch's GELU (used by the official VPT) is exact; flax defaults to tanh.
    x = quick_gelu(x) if self.act == "quick_gelu" else gelu(x)
    return nn.Dense(
      d, dtype=self.dtype, kernel_init=init, bias_init=bias_init, name="Dense_1"
    )(x)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention with vit_jax parameter names.

  Extra keys and values (the key/value-only prompt path) can be supplied as
  unprojected tokens in ``kv_extra``; they are projected with the same
  ``key``/``value`` kernels and attended to by every query but never act as
  queries themselves. ``levers`` picks the attention kernel
  (`vptpc.models.levers.attention`).
  """

  num_heads: int
  dtype: Any = jnp.float32
  levers: Levers = Levers()
  qkv_bias: bool = True

  @nn.compact
  def __call__(
    self,
    x: Array,
    kv_extra: Array | None = None,
    kv_insert_at: int = 1,
    kv_cached: tuple[Array, Array] | None = None,
    kv_mask: Array | None = None,
    num_queries: int | None = None,
    valid: int | None = None,
  ) -> Array:
    """Attends from every token of ``x`` to ``x`` (plus ``kv_extra``).

    Args:
      x: (B, T, D) tokens (already layer-normed).
      kv_extra: optional (k, D) or (B, k, D) layer-normed prompt tokens that
        act only as keys and values.
      kv_cached: optional already-projected prompt (keys, values), each
        (k, heads, head_dim) (`build_kv_cache`), or (B, k, heads, head_dim)
        per example (multi-task serving, `vptpc.serve`); used instead of
        ``kv_extra``.
      kv_mask: optional (B, k) bool, False for padded per-example prompt
        keys (they get no attention).
      kv_insert_at: where the extra keys go in the key sequence. Attention is
        permutation-invariant over keys; inserting them where the full path
        has its prompts keeps the float summation order, hence bitwise-close
        results.
      num_queries: only the first ``num_queries`` tokens query (all tokens
        are still keys and values); None: all of them.
      valid: only the first ``valid`` tokens of ``x`` are real; the rest are
        padding at the end (never attended to). None: all are real.

    Returns:
      (B, T, D) attention output after the output projection ((B,
      num_queries, D) with ``num_queries``).
    """
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(
        f"hidden_size {d} is not divisible by num_heads {self.num_heads}."
      )
    head_dim = d // self.num_heads

    def proj(name):
      return nn.DenseGeneral(
        (self.num_heads, head_dim),
        dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        use_bias=self.qkv_bias,
        name=name,
      )

    query, key, value = proj("query"), proj("key"), proj("value")
    xq = x if num_queries is None else x[:, :num_queries]
    q = query(xq)
    k, v = key(x), value(x)
    kp = vp = None
    if kv_cached is not None and kv_cached[0].shape[-3] > 0:
      kp, vp = (t.astype(k.dtype) for t in kv_cached)
    elif kv_extra is not None and kv_extra.shape[-2] > 0:
      # Image-independent prompts (k, D) are projected once and broadcast,
      # which is what makes the key/value path cheap (docs/references.md,
      # "VPT: prompts").
      kp, vp = key(kv_extra), value(kv_extra)
    if kp is not None:
      shape = (x.shape[0],) + kp.shape[-3:]
      kp, vp = jnp.broadcast_to(kp, shape), jnp.broadcast_to(vp, shape)
      i = kv_insert_at
      k = jnp.concatenate([k[:, :i], kp, k[:, i:]], axis=1)
      v = jnp.concatenate([v[:, :i], vp, v[:, i:]], axis=1)
    mask = None
    t = x.shape[1]
    valid = t if valid is None else valid
    n_kp = 0 if kp is None else kp.shape[1]
    if kp is not None and kv_mask is not None:
      b = x.shape[0]  # keys: all T tokens + the prompts, padding last
      keep = jnp.concatenate(
        [
          jnp.ones((b, kv_insert_at), bool),
          kv_mask.astype(bool),
          jnp.ones((b, valid - kv_insert_at), bool),
          jnp.zeros((b, t - valid), bool),
        ],
        axis=1,
      )
      mask = keep[:, None, None, :]  # (B, heads, queries, keys) broadcast
    if self.is_mutable_collection("intermediates"):
      # For vptpc.analysis only: the fused kernel below never materialises
      # the weights, so they are recomputed when a caller asks for them.
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(
        jnp.asarray(head_dim, q.dtype)
      )
      if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
      self.sow("intermediates", "attention_weights", jax.nn.softmax(logits))
    kv_valid = None if valid == t else valid + n_kp
    impl, multiple = self.levers.attention_impl, self.levers.cudnn_multiple
    out = levers_lib.attention(q, k, v, mask, impl, kv_valid, multiple)
    return nn.DenseGeneral(
      d,
      axis=(-2, -1),
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      name="out",
    )(out)


class LayerScale(nn.Module):
  """Per-channel scale of a residual branch (DINOv2's ``ls1``/``ls2``)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Multiplies ``x`` (..., D) by the learned (D,) ``gamma``."""
    gamma = self.param(
      "gamma", nn.initializers.constant(1e-5), (x.shape[-1],), jnp.float32
    )
    return x * gamma.astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block (LayerNorm eps 1e-6 unless ``ln_eps`` says)."""

  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  levers: Levers = Levers()
  act: str = "gelu"
  layer_scale: bool = False
  ln_eps: float = 1e-6
  qkv_bias: bool = True
  num_prefix: int = 1

  @nn.compact
  def __call__(
    self,
    x: Array,
    kv_prompts: Array | None = None,
    kv_cached: tuple[Array, Array] | None = None,
    kv_mask: Array | None = None,
    cls_only: bool = False,
    valid: int | None = None,
  ) -> Array:
    """Applies the block.

    Args:
      x: (B, T, D) tokens.
      kv_prompts: optional (k, D) or (B, k, D) prompts that enter only as
        keys/values (the exact key/value-only form of VPT-Deep).
      kv_cached: optional precomputed prompt (keys, values) of this block.
      kv_mask: optional (B, k) validity of per-example cached keys.
      cls_only: compute only the class token's output (the last block of a
        classifier: no other output is read). Every token is still a key
        and value, so the class token is exactly what the full block gives.
      valid: the number of real tokens; the rest of ``x`` is padding at
        the end, never attended to (None: all real).

    Returns:
      (B, T, D) tokens ((B, 1, D) with ``cls_only``).
    """
    ln1 = nn.LayerNorm(
      epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_0"
    )
    y = ln1(x)
    extra = None if kv_prompts is None else ln1(kv_prompts)
    y = MultiHeadDotProductAttention(
      self.num_heads,
      dtype=self.dtype,
      levers=self.levers,
      qkv_bias=self.qkv_bias,
      name="MultiHeadDotProductAttention_1",
    )(
      y,
      extra,
      kv_insert_at=self.num_prefix,
      kv_cached=kv_cached,
      kv_mask=kv_mask,
      num_queries=1 if cls_only else None,
      valid=valid,
    )
    if self.layer_scale:
      y = LayerScale(name="ls1")(y)
    x = (x[:, :1] if cls_only else x) + y
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_2")(
      x
    )
    y = MlpBlock(
      self.mlp_dim, dtype=self.dtype, act=self.act, name="MlpBlock_3"
    )(y)
    if self.layer_scale:
      y = LayerScale(name="ls2")(y)
    return x + y


class PatchEmbedding(nn.Module):
  """Non-overlapping patches to tokens, as one matmul.

  The parameters are those of vit_jax's ``nn.Conv`` with stride = kernel
  (``kernel`` (p, p, C, D), ``bias`` (D,)), so checkpoints load unchanged,
  and the function is the same up to float summation order. On an H200
  the convolution ran as a slow implicit-GEMM kernel (about 38 TFLOP/s);
  as a reshape and a matmul it is an ordinary GEMM. On XLA:CPU the two
  took the same time.
  """

  features: int
  patch_size: int
  dtype: Any = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """(B, H, W, C) images to (B, H/p, W/p, features) patch embeddings."""
    p = self.patch_size
    b, h, w, c = images.shape
    kernel = self.param(
      "kernel",
      nn.initializers.lecun_normal(),
      (p, p, c, self.features),
      jnp.float32,
    )
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,))
    else:  # CLIP's patch embedding has none
      bias = jnp.zeros((self.features,), jnp.float32)
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, h // p, w // p, p * p * c)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.dot(x, kernel.reshape(p * p * c, self.features))
    return y + bias if self.use_bias else y


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding (vit_jax name `pos_embedding`)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Adds the (1, T, D) embedding to ``x`` of shape (B, T, D)."""
    pe = self.param(
      "pos_embedding",
      nn.initializers.normal(stddev=0.02),
      (1,) + x.shape[1:],
      jnp.float32,
    )
    return x + pe.astype(x.dtype)


def prompt_variant(prompts: Mapping[str, Array] | None) -> str:
  """Returns ``"none"``, ``"shallow"`` or ``"deep"`` for a prompt tree.

  Raises:
    ValueError: the tree mixes ``input`` and ``encoderblock_*`` keys or has
      other keys.
  """
  if not prompts:
    return "none"
  keys = set(prompts)
  if keys == {"input"}:
    return "shallow"
  if all(k.startswith("encoderblock_") for k in keys):
    return "deep"
  raise ValueError(
    "A prompt tree holds either {'input'} (VPT-Shallow) or "
    f"'encoderblock_<i>' keys (VPT-Deep); got {sorted(keys)}."
  )


class Encoder(nn.Module):
  """The transformer stack with prompt insertion (vit_jax name `Transformer`)."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  kv_only: bool = False
  kv_shared: bool = True
  prompt_dropout: float = 0.0
  dtype: Any = jnp.float32
  levers: Levers = Levers()
  act: str = "gelu"
  layer_scale: bool = False
  ln_eps: float = 1e-6
  qkv_bias: bool = True
  num_prefix: int = 1
  posemb_prefix: bool = True
  pre_norm: bool = False
  final_norm: bool = True

  def _token_multiple(self, variant: str) -> int:
    """The multiple the token sequence is padded to once, for every block.

    `vptpc.models.levers.token_multiple`, where the sequence keeps its
    length through the blocks (no prompts, or the key/value path) and no
    analysis reads the tokens; else 1.
    """
    if self.is_mutable_collection("intermediates"):
      return 1
    if variant not in ("none", "deep") or (
      variant == "deep" and not self.kv_only
    ):
      return 1
    return levers_lib.token_multiple(self.levers, self.dtype)

  def _prompt(self, p: Array, batch: int, train: bool) -> Array:
    """Casts one layer's prompts and applies per-example dropout if training.

    The official code broadcasts prompts to the batch before its dropout, so
    each example gets its own mask (docs/references.md, "VPT: prompts").
    Without dropout the prompts stay (k, D) so the key/value path can
    project them once per batch.
    """
    p = p.astype(self.dtype)
    if train and self.prompt_dropout > 0 and p.shape[0] > 0:
      p = jnp.broadcast_to(p, (batch,) + p.shape)
      keep = 1.0 - self.prompt_dropout
      mask = jax.random.bernoulli(self.make_rng("dropout"), keep, p.shape)
      p = jnp.where(mask, p / keep, 0).astype(self.dtype)
    return p

  @nn.compact
  def __call__(
    self,
    x: Array,
    prompts: Mapping[str, Array] | None = None,
    *,
    train: bool = False,
    cls_only: bool = False,
  ) -> Array:
    """Runs the blocks on ``[prefix, patches]`` tokens with prompts inserted.

    The prefix is the class token and any register tokens
    (``num_prefix`` of them, possibly none); prompts go right after it.

    Args:
      x: (B, num_prefix + N, D) prefix and patch tokens (no prompts yet).
      prompts: a prompt tree (see module docstring) or None.
      train: enables prompt dropout.
      cls_only: the last block computes only the class token's output
        (exact for it; what a classifier reads). Ignored while
        intermediates are collected, so analyses see every token.

    Returns:
      (B, num_prefix + N, D) encoded prefix and patch tokens after
      `encoder_norm` (none with ``final_norm=False``; prompt outputs are
      dropped); (B, 1, D) with ``cls_only``.
    """
    b = x.shape[0]
    n = self.num_prefix
    if self.posemb_prefix:
      x = AddPositionEmbs(name="posembed_input")(x)
    else:
      # The position embedding covers the patches only (DINOv2 with
      # registers, timm's ``no_embed_class``).
      x = jnp.concatenate(
        [x[:, :n], AddPositionEmbs(name="posembed_input")(x[:, n:])], axis=1
      )
    if self.pre_norm:
      # CLIP's ``norm_pre``; prompts enter after it, as block inputs.
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm_pre")(
        x
      )
    variant = prompt_variant(prompts)
    if variant == "deep":
      missing = [
        f"encoderblock_{i}"
        for i in range(self.num_layers)
        if f"encoderblock_{i}" not in prompts
      ]
      extra = sorted(
        set(prompts) - {f"encoderblock_{i}" for i in range(self.num_layers)}
      )
      if missing or extra:
        raise ValueError(
          f"Deep prompt tree does not fit a {self.num_layers}-block ViT: "
          f"missing {missing}, unexpected {extra} (use a (0, D) array for a "
          "layer without prompts)."
        )
    if variant == "shallow" and self.kv_only:
      raise ValueError(
        "kv_only is exact only for VPT-Deep; shallow prompts are carried "
        "through the blocks, so they must run the full path."
      )

    def fit(p):
      if p.shape[-1] != x.shape[-1]:
        raise ValueError(
          f"Prompt width {p.shape[-1]} does not match the ViT width "
          f"{x.shape[-1]}."
        )
      return jnp.broadcast_to(p, (b,) + p.shape[-2:])

    valid = x.shape[1]
    padded = levers_lib.round_up(valid, self._token_multiple(variant))
    if padded != valid:
      x = jnp.pad(x, ((0, 0), (0, padded - valid), (0, 0)))
    block_valid = None if padded == valid else valid
    n_prev = 0
    if variant == "shallow":
      p = self._prompt(prompts["input"], b, train)
      x = jnp.concatenate([x[:, :n], fit(p), x[:, n:]], axis=1)
    cls_only = cls_only and not self.is_mutable_collection("intermediates")
    stacked = None
    if (
      self.levers.kv_stacked
      and variant == "deep"
      and self.kv_only
      and self.kv_shared
      and not (train and self.prompt_dropout > 0)
      and not self.is_initializing()
      and not self.is_mutable_collection("intermediates")
    ):
      # Shared prompts only: per-image ones (dropout, kv_shared=False) run
      # per block, and draw their dropout masks there as without the lever.
      stacked = levers_lib.stacked_kv(
        self.variables["params"], prompts, ln_eps=self.ln_eps, dtype=self.dtype
      )
    for i in range(self.num_layers):
      last = cls_only and i == self.num_layers - 1
      if self.is_mutable_collection("intermediates"):
        # Each block's image tokens (class token and prompts excluded), for
        # prompts initialised from tokens (`prompts.init_prompts_from_tokens`).
        self.sow("intermediates", f"block_input_{i}", x[:, n + n_prev :])
      block = Encoder1DBlock(
        mlp_dim=self.mlp_dim,
        num_heads=self.num_heads,
        dtype=self.dtype,
        levers=self.levers,
        act=self.act,
        layer_scale=self.layer_scale,
        ln_eps=self.ln_eps,
        qkv_bias=self.qkv_bias,
        num_prefix=n,
        name=f"encoderblock_{i}",
      )
      if stacked is not None:
        x = block(x, kv_cached=stacked[i], cls_only=last, valid=block_valid)
        continue
      if variant == "deep":
        p = prompts[f"encoderblock_{i}"]
        if isinstance(p, Mapping):  # a key/value cache (build_kv_cache)
          if not self.kv_only:
            raise ValueError(
              "A key/value prompt cache needs kv_only=True (the cache holds "
              "projected keys/values, not prompt tokens)."
            )
          x = block(
            x,
            kv_cached=(p["key"], p["value"]),
            kv_mask=p.get("mask"),
            cls_only=last,
            valid=block_valid,
          )
          continue
        p = self._prompt(p, b, train)
        if self.kv_only:
          # Shared: one projection per step for the whole batch; per image
          # (kv_shared=False, or forced by per-example dropout): B copies.
          per_image = p.ndim == 3 or not self.kv_shared
          x = block(
            x,
            kv_prompts=fit(p) if per_image else p,
            cls_only=last,
            valid=block_valid,
          )
          continue
        # Replace the previous block's prompt outputs (discarded) by this
        # layer's prompts; sequence length may change when counts are ragged.
        x = jnp.concatenate([x[:, :n], fit(p), x[:, n + n_prev :]], axis=1)
        n_prev = p.shape[-2]
      x = block(x, cls_only=last, valid=block_valid)
    if cls_only:
      pass  # only the class token is left
    elif padded != valid:
      x = x[:, :valid]
    elif variant == "deep" and not self.kv_only:
      x = jnp.concatenate([x[:, :n], x[:, n + n_prev :]], axis=1)
    elif variant == "shallow":
      k = prompts["input"].shape[-2]
      x = jnp.concatenate([x[:, :n], x[:, n + k :]], axis=1)
    if not self.final_norm:
      return x
    return nn.LayerNorm(
      epsilon=self.ln_eps, dtype=self.dtype, name="encoder_norm"
    )(x)


class VisionTransformer(nn.Module):
  """ViT with VPT prompts supplied as a separate pytree.

  Attributes:
    patch_size: square patch side in pixels.
    hidden_size: token width D.
    num_layers: number of transformer blocks L.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    num_classes: head outputs; None builds no head (features only).
    kv_only: run VPT-Deep prompts as extra keys/values only. Exactly equal to
      the full path (prompt outputs are discarded before every block) and
      cheaper by the prompts' query, output and MLP work
      (docs/references.md, "VPT: prompts").
    kv_shared: with ``kv_only``, project each layer's prompts to keys and
      values once per batch and share them across images (True), or per
      image (False; what per-example prompt dropout needs anyway). Both are
      exact; at inference a per-task cache (`build_kv_cache`, passed in
      place of the prompt tree) skips even the per-batch projection.
    prompt_dropout: dropout rate on prompts while training (official VPT: 0.0
      default, 0.1 for Deep in its demo).
    dtype: compute dtype (parameters stay float32).
    levers: how the same function is computed on each backend (the
      attention kernel, cuDNN's padding, ...): `vptpc.models.levers.Levers`.
    class_token: a learned class token first in the sequence
      (``cls_token``); False for ViTs that pool by averaging only.
    num_registers: learned register tokens after the class token
      (``reg_token``, DINOv2 with registers). Prompts go after them.
    posemb_prefix: the position embedding has rows for the class and
      register tokens (True) or for the patches only (``no_embed_class``).
    pre_norm: a LayerNorm after the position embedding (CLIP's
      ``norm_pre``); its patch embedding then has no bias.
    pool: ``"token"`` (the class token's output) or ``"avg"`` (the mean of
      the patch outputs: class, register and prompt outputs excluded).
    fc_norm: with ``pool="avg"``, the LayerNorm is applied to the pooled
      features (``fc_norm``, MAE) instead of to every token before pooling.
    act: ``"gelu"`` or ``"quick_gelu"`` (OpenAI CLIP), `ACTIVATIONS`.
    layer_scale: per-channel scales of both residual branches (``ls1``,
      ``ls2``: DINOv2).
    ln_eps: every LayerNorm's epsilon (1e-6; CLIP's 1e-5).
    qkv_bias: the query/key/value projections have biases.
  """

  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  num_classes: int | None = None
  kv_only: bool = False
  kv_shared: bool = True
  prompt_dropout: float = 0.0
  dtype: Any = jnp.float32
  levers: Levers = Levers()
  class_token: bool = True
  num_registers: int = 0
  posemb_prefix: bool = True
  pre_norm: bool = False
  pool: str = "token"
  fc_norm: bool = False
  act: str = "gelu"
  layer_scale: bool = False
  ln_eps: float = 1e-6
  qkv_bias: bool = True

  @property
  def num_prefix(self) -> int:
    """Tokens before the prompts and patches: class and register tokens."""
    return int(self.class_token) + self.num_registers

  @nn.compact
  def __call__(
    self,
    images: Array,
    prompts: Mapping[str, Array] | None = None,
    *,
    train: bool = False,
    return_features: bool = False,
  ) -> Array | tuple[Array, Array]:
    """Classifies images.

    Args:
      images: (B, H, W, 3) float images, normalised.
      prompts: prompt tree or None (plain ViT).
      train: enables prompt dropout (needs a ``dropout`` rng). The backbone
        itself always runs in inference mode.
      return_features: also return the class-token features.

    Returns:
      Logits (B, num_classes), or the class-token features (B, D) when the
      model has no head; with ``return_features`` a tuple (logits, features).
    """
    p = self.patch_size
    if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
      raise ValueError(
        f"Expected (B, H, W, C) images with H and W divisible by the patch "
        f"size {p}; got shape {images.shape}."
      )
    if self.pool not in POOLS:
      raise ValueError(f"pool={self.pool!r}; expected one of {POOLS}.")
    if self.pool == "token" and not self.class_token:
      raise ValueError("pool='token' needs class_token=True.")
    x = PatchEmbedding(
      self.hidden_size,
      p,
      dtype=self.dtype,
      use_bias=not self.pre_norm,
      name="embedding",
    )(images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    prefix = []
    if self.class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
      prefix.append(cls)
    if self.num_registers:
      reg = self.param(
        "reg_token",
        nn.initializers.normal(1e-6),
        (1, self.num_registers, d),
        jnp.float32,
      )
      prefix.append(reg)
    x = jnp.concatenate(
      [jnp.broadcast_to(t.astype(x.dtype), (b,) + t.shape[1:]) for t in prefix]
      + [x],
      axis=1,
    )
    x = Encoder(
      num_layers=self.num_layers,
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      kv_only=self.kv_only,
      kv_shared=self.kv_shared,
      prompt_dropout=self.prompt_dropout,
      dtype=self.dtype,
      levers=self.levers,
      act=self.act,
      layer_scale=self.layer_scale,
      ln_eps=self.ln_eps,
      qkv_bias=self.qkv_bias,
      num_prefix=self.num_prefix,
      posemb_prefix=self.posemb_prefix,
      pre_norm=self.pre_norm,
      final_norm=not self.fc_norm,
      name="Transformer",
    )(x, prompts, train=train, cls_only=self.pool == "token")
    if self.pool == "token":
      features = x[:, 0]
    else:
      features = x[:, self.num_prefix :].mean(axis=1)
    if self.fc_norm:
      features = nn.LayerNorm(
        epsilon=self.ln_eps, dtype=self.dtype, name="fc_norm"
      )(features)
    if self.num_classes is None:
      return (features, features) if return_features else features
    # VPT's head: kaiming normal fan_out and a 1%-prior bias
    # (docs/references.md, "VPT: head and loss").
    logits = nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
      bias_init=nn.initializers.constant(HEAD_BIAS_INIT),
      name="head",
    )(features.astype(jnp.float32))
    return (logits, features) if return_features else logits


PROMPT_PATHS = ("full", "kv", "kv_per_image")
# `VisionTransformer.pool`: the class token, or the mean of patch outputs.
POOLS = ("token", "avg")


def path_overrides(path: str) -> dict[str, bool]:
  """Model fields for a VPT-Deep prompt path (``config.model.prompt_path``).

  ``full``: prompts are tokens through every block (the official forward);
  ``kv``: key/value-only with keys/values projected once per batch and
  shared; ``kv_per_image``: key/value-only, projected per image. All three
  compute the same function (tested).
  """
  if path not in PROMPT_PATHS:
    raise ValueError(
      f"prompt path must be one of {PROMPT_PATHS}, got {path!r}."
    )
  return {"kv_only": path != "full", "kv_shared": path == "kv"}


def build_kv_cache(
  backbone: Mapping[str, Any],
  prompts: Mapping[str, Array],
  num_heads: int,
  dtype: Any = jnp.float32,
  ln_eps: float = 1e-6,
) -> dict[str, dict[str, Array]]:
  """Projects VPT-Deep prompts to each block's keys and values, once per task.

  The keys/values of a deep prompt, ``LN1(p) W_k + b_k`` and
  ``LN1(p) W_v + b_v``, depend only on the prompt and the frozen weights
  (docs/references.md, "VPT: prompts"), so for serving they are computed
  once and passed to the model in place of the prompt tree
  (``model.apply(params, x, cache)`` with ``kv_only=True``); the per-image
  cost of the prompts is then only the attention columns they add. Uses the model's own LayerNorm and
  projection modules, so the result equals the ``kv`` path's up to float
  rounding.

  Args:
    backbone: frozen ViT parameters (``Transformer/encoderblock_i/...``).
    prompts: a deep prompt tree ``{"encoderblock_i": (k_i, D)}``.
    num_heads: attention heads of the ViT.
    dtype: compute dtype of the model.
    ln_eps: the model's LayerNorm epsilon (`VisionTransformer.ln_eps`).

  Returns:
    ``{"encoderblock_i": {"key": (k_i, H, D/H), "value": (k_i, H, D/H)}}``.
  """
  if prompt_variant(prompts) != "deep":
    raise ValueError("A key/value cache exists only for VPT-Deep prompts.")
  out = {}
  for name, p in prompts.items():
    blk = backbone["Transformer"][name]
    ln = nn.LayerNorm(epsilon=ln_eps, dtype=dtype)
    x = ln.apply({"params": blk["LayerNorm_0"]}, p.astype(dtype))
    att = blk["MultiHeadDotProductAttention_1"]
    d = p.shape[-1]
    proj = nn.DenseGeneral(
      (num_heads, d // num_heads), dtype=dtype, use_bias="bias" in att["key"]
    )
    out[name] = {
      "key": proj.apply({"params": att["key"]}, x),
      "value": proj.apply({"params": att["value"]}, x),
    }
  return out


def create_model(name_or_config: str | Mapping[str, Any], **overrides):
  """Builds a `VisionTransformer` from a variant name or a config mapping.

  Args:
    name_or_config: a name from `model_names()` or a mapping of
      `VisionTransformer` keyword arguments (e.g. `get_model_config(...)`).
    **overrides: field overrides (num_classes, kv_only, levers, ...).

  Returns:
    The (unbound) Flax module.
  """
  where = "vptpc.models.vit.create_model"
  overrides = levers_lib.from_former_fields(overrides, where)
  if isinstance(name_or_config, str):
    cfg = get_model_config(name_or_config, **overrides)
  else:
    cfg = levers_lib.from_former_fields(dict(name_or_config), where)
    cfg.update(overrides)
  return VisionTransformer(**cfg)


def init_params(
  model: VisionTransformer, rng: Array, image_size: int
) -> dict[str, Any]:
  """Initialises the backbone (+ head) parameters for a given image size.

  Args:
    model: the module.
    rng: PRNG key.
    image_size: square input side; fixes the position-embedding length.

  Returns:
    The ``params`` collection as a nested dict.
  """
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(model.init)(rng, images)["params"]


def split_head(params: Mapping[str, Any]) -> tuple[dict, dict | None]:
  """Splits ``params`` into (backbone, head) so only the head is trainable."""
  params = dict(params)
  head = params.pop("head", None)
  return params, head


def merge_head(backbone: Mapping[str, Any], head: Mapping | None) -> dict:
  """Inverse of `split_head`: the params tree `VisionTransformer` expects."""
  params = dict(backbone)
  if head is not None:
    params["head"] = head
  return params


def count_params(tree: Any) -> int:
  """Counts the scalars in a pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# LayerNorms outside the blocks (applied in float32 whatever the dtype).
_NORMS = ("encoder_norm", "norm_pre", "fc_norm")


def cast_backbone(params: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
  """The frozen backbone with its matmul/conv weights stored in ``dtype``.

  A model with compute ``dtype`` casts every Dense/Conv kernel and bias,
  the class token and the position embedding to ``dtype`` on each call
  anyway, so storing them cast once computes the same function bit for
  bit while saving a float32 read and a cast per weight per step.
  LayerNorm parameters stay float32: LayerNorm applies them in float32.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return dict(params)

  def cast(path, x):
    names = [getattr(k, "key", str(k)) for k in path]
    if any(n.startswith("LayerNorm") or n in _NORMS for n in names):
      return x
    return jnp.asarray(x, dtype)

  return jax.tree_util.tree_map_with_path(cast, dict(params))


# Former names of this module, now where they belong: the speed levers in
# `vptpc.models.levers`, timm's tables in `vptpc.models.vit_variants`.
_MOVED = dict.fromkeys(
  ("ATTENTION_IMPLS", "CUDNN_PAD", "attention", "resolve_attention_impl"),
  "vptpc.models.levers",
) | dict.fromkeys(
  ("TIMM_ARCHS", "TIMM_WEIGHTS", "Pretrained", "timm_arch")
  + ("IMAGENET_MEAN_STD", "INCEPTION_MEAN_STD", "CLIP_MEAN_STD"),
  "vptpc.models.vit_variants",
)


__getattr__ = moved.forwarder(__name__, _MOVED)
