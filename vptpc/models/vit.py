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
code keeps the encoder in `eval()` while training (vpt.md §3). Only prompt
dropout depends on `train`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array

# Model variants as in vit_jax `configs/models.py`; `testing` is vit_jax's
# tiny test model, `tiny32` the 32-px variant used by the offline suite tests.
_VARIANTS: dict[str, dict[str, Any]] = {
  "Ti/16": dict(
    patch_size=16, hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768
  ),
  "S/16": dict(
    patch_size=16, hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536
  ),
  "B/16": dict(
    patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072
  ),
  "B/32": dict(
    patch_size=32, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072
  ),
  "L/16": dict(
    patch_size=16, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096
  ),
  "H/14": dict(
    patch_size=14, hidden_size=1280, num_layers=32, num_heads=16, mlp_dim=5120
  ),
  "testing": dict(
    patch_size=16, hidden_size=10, num_layers=1, num_heads=2, mlp_dim=10
  ),
  # vptpc's embedded backbone (32 px, 8 x 8 patches): vptpc.pretrain.
  "fractal-S/4": dict(
    patch_size=4, hidden_size=192, num_layers=6, num_heads=3, mlp_dim=768
  ),
  "fractal-Ti/4": dict(
    patch_size=4, hidden_size=128, num_layers=6, num_heads=4, mlp_dim=512
  ),
  "tiny32": dict(
    patch_size=8, hidden_size=32, num_layers=3, num_heads=2, mlp_dim=64
  ),
}

_CLIP = dict(pre_norm=True, ln_eps=1e-5)
_DINOV2 = dict(_VARIANTS["B/16"], patch_size=14, layer_scale=True)
# timm's ViT architectures, by timm's model name (without the pretrained
# tag), as its `vision_transformer` model functions define them.
TIMM_ARCHS: dict[str, dict[str, Any]] = {
  "vit_small_patch16_224": dict(_VARIANTS["S/16"]),
  "vit_base_patch16_224": dict(_VARIANTS["B/16"]),
  "vit_large_patch16_224": dict(_VARIANTS["L/16"]),
  "vit_base_patch16_clip_224": dict(_VARIANTS["B/16"], **_CLIP),
  "vit_base_patch16_clip_quickgelu_224": dict(
    _VARIANTS["B/16"], **_CLIP, act="quick_gelu"
  ),
  "vit_base_patch14_dinov2": _DINOV2,
  "vit_base_patch14_reg4_dinov2": dict(
    _DINOV2, num_registers=4, posemb_prefix=False
  ),
  "vit_medium_patch16_gap_240": dict(
    patch_size=16,
    hidden_size=512,
    num_layers=12,
    num_heads=8,
    mlp_dim=2048,
    class_token=False,
    pool="avg",
    qkv_bias=False,
    layer_scale=True,
  ),
}

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP_MEAN_STD = (
  (0.48145466, 0.4578275, 0.40821073),
  (0.26862954, 0.26130258, 0.27577711),
)


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A timm checkpoint: its architecture and preprocessing.

  The preprocessing fields are timm's pretrained config for the name
  (``timm.models.get_pretrained_cfg``).

  Attributes:
    arch: the `TIMM_ARCHS` row.
    pretraining: what the weights were trained on, in words.
    image_size: the input side the weights were trained at.
    mean_std: the per-channel input mean and std.
    interpolation: timm's resize filter for the weights.
    overrides: architecture fields in which these weights differ from
      timm's model of ``arch`` (see `TIMM_WEIGHTS`).
  """

  arch: str
  pretraining: str
  image_size: int = 224
  mean_std: tuple[tuple[float, ...], tuple[float, ...]] = INCEPTION_MEAN_STD
  interpolation: str = "bicubic"
  overrides: tuple[tuple[str, Any], ...] = ()


_IN21K = "supervised, ImageNet-21k"
# Every timm checkpoint vptpc knows, by its hub name (``timm/<name>`` on the
# Hugging Face hub). Two rows depart from timm's model of the name, both to
# follow how the weights were trained and are tuned:
# * MAE pools by averaging the patch outputs into ``fc_norm``, as MAE's own
#   fine-tuning does; timm's model of the name reads the class token. The
#   file's final ``norm`` becomes ``fc_norm``.
# * OpenAI's CLIP was trained with QuickGELU; timm keeps plain GELU for the
#   name and the right activation in ``vit_base_patch16_clip_quickgelu_224``.
TIMM_WEIGHTS: dict[str, Pretrained] = {
  "vit_base_patch16_224.orig_in21k": Pretrained(
    "vit_base_patch16_224", f"{_IN21K} (original ViT; VPT's backbone)"
  ),
  "vit_small_patch16_224.augreg_in21k": Pretrained(
    "vit_small_patch16_224", f"{_IN21K} (AugReg)"
  ),
  "vit_base_patch16_224.augreg_in21k": Pretrained(
    "vit_base_patch16_224", f"{_IN21K} (AugReg)"
  ),
  "vit_large_patch16_224.augreg_in21k": Pretrained(
    "vit_large_patch16_224", f"{_IN21K} (AugReg)"
  ),
  "vit_base_patch16_224.mae": Pretrained(
    "vit_base_patch16_224",
    "self-supervised, MAE on ImageNet-1k",
    mean_std=IMAGENET_MEAN_STD,
    overrides=(("pool", "avg"), ("fc_norm", True)),
  ),
  "vit_base_patch16_clip_224.openai": Pretrained(
    "vit_base_patch16_clip_224",
    "image-text contrastive, CLIP on OpenAI's WIT-400M",
    mean_std=CLIP_MEAN_STD,
    overrides=(("act", "quick_gelu"),),
  ),
  "vit_base_patch16_clip_224.laion2b": Pretrained(
    "vit_base_patch16_clip_224",
    "image-text contrastive, OpenCLIP on LAION-2B",
    mean_std=CLIP_MEAN_STD,
  ),
  "vit_base_patch14_dinov2.lvd142m": Pretrained(
    "vit_base_patch14_dinov2",
    "self-supervised, DINOv2 on LVD-142M",
    image_size=518,
    mean_std=IMAGENET_MEAN_STD,
  ),
  "vit_base_patch14_reg4_dinov2.lvd142m": Pretrained(
    "vit_base_patch14_reg4_dinov2",
    "self-supervised, DINOv2 with 4 registers on LVD-142M",
    image_size=518,
    mean_std=IMAGENET_MEAN_STD,
  ),
  "vit_medium_patch16_gap_240.sw_in12k": Pretrained(
    "vit_medium_patch16_gap_240",
    "supervised, ImageNet-12k (no class token, average pool)",
    image_size=240,
  ),
}


def timm_arch(name: str) -> dict[str, Any] | None:
  """The architecture fields of a timm model name, or None if unknown.

  ``name`` is a `TIMM_WEIGHTS` name (``arch.tag``) or a `TIMM_ARCHS` name.
  """
  if name in TIMM_WEIGHTS:
    w = TIMM_WEIGHTS[name]
    return dict(TIMM_ARCHS[w.arch], **dict(w.overrides))
  if name in TIMM_ARCHS:
    return dict(TIMM_ARCHS[name])
  return None


# VPT's head bias: -log((1 - 0.01) / 0.01), a prior of 1% per class (vpt.md §3).
HEAD_BIAS_INIT = -math.log((1 - 0.01) / 0.01)


def model_names() -> tuple[str, ...]:
  """Returns the names accepted by `get_model_config`.

  vit_jax's variants (``B/16``, ...), then timm's checkpoint names
  (`TIMM_WEIGHTS`) and architecture names (`TIMM_ARCHS`).
  """
  return tuple(_VARIANTS) + tuple(TIMM_WEIGHTS) + tuple(TIMM_ARCHS)


def get_model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """Returns the architecture config of a named ViT variant.

  Args:
    name: one of `model_names()`, e.g. ``"B/16"`` (vit_jax spelling; ``"ViT-B_16"``
      and ``"ViT-B/16"`` are accepted too).
    **overrides: replaces fields (patch_size, hidden_size, num_layers,
      num_heads, mlp_dim, num_classes, ...) to build custom variants.

  Returns:
    A ConfigDict whose items are `VisionTransformer` keyword arguments.

  Raises:
    ValueError: the name is unknown, or an override names no field.
  """
  arch = timm_arch(name.removeprefix("timm/"))
  key = name.removeprefix("ViT-")
  if key not in _VARIANTS:
    key = key.replace("_", "/")
  if arch is None and key not in _VARIANTS:
    raise ValueError(
      f"Unknown ViT variant {name!r}; known: {', '.join(model_names())}."
    )
  cfg = dict(arch if arch is not None else _VARIANTS[key], num_classes=None)
  # Every field of the module is a valid override; a list here fell behind
  # the module once (pad_tokens, gelu_vjp were refused).
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


GELU_FORMS = ("erf", "erfc")
_SQRT_HALF = math.sqrt(0.5)


def gelu(x: Array) -> Array:
  """The exact GELU, x Φ(x), as ``x / 2 (1 + erf(x / sqrt 2))`` in float32.

  The same function as ``nn.gelu(x, approximate=False)`` (which is
  ``x / 2 erfc(-x / sqrt 2)``) to float32 rounding, and PyTorch's form of
  it (``torch.nn.GELU()``, which the official VPT uses); computed in
  float32 and rounded once to ``x``'s dtype. XLA expands erf into one
  rational polynomial and erfc into several branches with an exponential,
  all evaluated: on an H200 the erfc form's fusion was the largest
  elementwise kernel of the bf16 ViT-B/16 forward (2.66 ms of 11.0 per
  batch of 128, ``results/bench_gpu_h200/call5``), and this form ran the
  eval forward 12.8% and the train step 4.7% faster (``call6``). The erfc
  form is more accurate in relative terms where Φ(x) is tiny (x below
  about -4, where the GELU's magnitude is under 2e-4); the absolute
  difference stays within float32 epsilon times the magnitude of x
  everywhere (tested). ``MlpBlock.gelu_form`` picks the form.
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (0.5 * xf * (1.0 + jax.lax.erf(xf * _SQRT_HALF))).astype(x.dtype)


@jax.custom_vjp
def exact_gelu(x: Array) -> Array:
  """`gelu` with its own backward pass, which needs only ``x``.

  Autodiff keeps activation-sized intermediates of the forward pass for
  the backward; this VJP keeps ``x`` alone and recomputes Φ(x) + x φ(x)
  in float32. Whether that is faster depends on the backend
  (``benchmarks/gpu_ablation.py`` measures it as the ``gelu`` lever);
  `MlpBlock.gelu_vjp` turns it on (`own_vjp_default`).
  """
  return gelu(x)


def _exact_gelu_fwd(x):
  return exact_gelu(x), x


def _exact_gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
  return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(g.dtype),)


exact_gelu.defvjp(_exact_gelu_fwd, _exact_gelu_bwd)


def _ln_stats(x: Array, epsilon: float) -> tuple[Array, Array]:
  """Float32 (at least) mean and 1/std over the last axis, as flax has them.

  The variance is flax's fast one, ``E[x^2] - E[x]^2`` clipped at zero.
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mu = xf.mean(-1, keepdims=True)
  mu2 = jax.lax.square(xf).mean(-1, keepdims=True)
  var = jnp.maximum(0.0, mu2 - jax.lax.square(mu))
  return mu, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(
  x: Array, scale: Array, bias: Array, epsilon: float, dtype: Any
) -> Array:
  """LayerNorm over the last axis whose backward pass keeps only ``x``.

  The same function as ``nn.LayerNorm(epsilon, dtype=dtype)`` (statistics
  in float32, flax's fast variance), in the same operations. Autodiff of
  flax's version keeps several float32 activation-sized intermediates (the
  float32 copy of ``x``, ``x - mean``, their product with the scale) for
  the backward; this VJP keeps ``x`` in its own dtype and the per-token
  mean and 1/std, and recomputes the normalised tokens. Whether that is
  faster depends on the backend (``benchmarks/gpu_ablation.py`` measures
  it as the ``ln`` lever); `VisionTransformer.ln_vjp` turns it on
  (`own_vjp_default`).

  Args:
    x: (..., D) tokens.
    scale: (D,) LayerNorm scale.
    bias: (D,) LayerNorm bias.
    epsilon: added to the variance.
    dtype: the output dtype (None: ``x``, scale and bias promoted, as flax).
  """
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _ln_normalize(x, mu, rstd, scale, bias, dtype):
  """The normalisation from the statistics, in flax's operation order."""
  y = (x - mu) * (rstd * scale) + bias
  return y.astype(dtype or jnp.result_type(x, scale, bias))


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  mu, rstd = _ln_stats(x, epsilon)
  y = _ln_normalize(x, mu, rstd, scale, bias, dtype)
  return y, (x, mu, rstd, scale, bias)


def _layer_norm_bwd(epsilon, dtype, res, g):
  del epsilon, dtype
  x, mu, rstd, scale, bias = res
  xhat = (x.astype(mu.dtype) - mu) * rstd
  gf = g.astype(mu.dtype)
  gy = gf * scale.astype(mu.dtype)
  dx = rstd * (
    gy - gy.mean(-1, keepdims=True) - xhat * (gy * xhat).mean(-1, keepdims=True)
  )
  rows = tuple(range(x.ndim - 1))
  return (
    dx.astype(x.dtype),
    (gf * xhat).sum(rows).astype(scale.dtype),
    gf.sum(rows).astype(bias.dtype),
  )


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """``nn.LayerNorm`` over the last axis, computed by `layer_norm`.

  The same parameters (``scale``, ``bias``, float32) and function; only
  the backward pass keeps less.
  """

  epsilon: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Normalises ``x`` (..., D) over its last axis."""
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    return layer_norm(x, scale, bias, self.epsilon, self.dtype)


# Where each own-VJP lever is on by default (`own_vjp_default`), measured on
# an H200 (bf16 ViT-B/16 train step at 100 prompts, batch 128, 3 interleaved
# rounds, ``benchmarks/gpu_ablation.py`` in ``results/bench_gpu_h200/call5``):
# the LayerNorms' VJP 4,316 img/s against 4,303 with autodiff (the same
# speed; it keeps 36 MB less per image), the GELU's 4,149 (slower: the
# backward recomputes the erfc form's polynomials, which cost more than the
# memory they save); with `gelu`'s erf form (call6) the GELU's 4,492
# against autodiff's 4,518. TPU and CPU keep autodiff (on the 2-core CPU an
# S/16 step ran 7.8 img/s with autodiff, 7.4-7.5 with either lever).
OWN_VJP_BACKENDS = {"gelu": (), "ln": ("gpu",)}


def own_vjp_default(value: bool | None, lever: str = "ln") -> bool:
  """Whether `exact_gelu` / `layer_norm` replace autodiff for a field value.

  None picks per backend and lever from `OWN_VJP_BACKENDS`. The two compute
  the same function and gradients as autodiff
  (``tests/test_fast_paths.py``); they differ in what the forward pass
  keeps for the backward: ``jax.ad_checkpoint.print_saved_residuals`` of a
  bf16 ViT-B/16 train step at 100 prompts keeps 95 MB per image with
  autodiff, 68 with the GELU's VJP, 59 with the LayerNorms', 32 with both
  (``benchmarks/saved_residuals.py``; weights and the attention's own
  residuals aside).

  Args:
    value: the module field (True/False force the lever; None: default).
    lever: ``"gelu"`` or ``"ln"``.
  """
  if value is not None:
    return bool(value)
  return jax.default_backend() in OWN_VJP_BACKENDS[lever]


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's GELU approximation, ``x sigmoid(1.702 x)``, in float32."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (xf * jax.nn.sigmoid(1.702 * xf)).astype(x.dtype)


# The MLP's activation (`MlpBlock.act`): the exact GELU, or OpenAI CLIP's
# QuickGELU, which its image towers were trained with.
ACTIVATIONS = ("gelu", "quick_gelu")


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> exact GELU (or CLIP's QuickGELU) -> Dense.

  ``gelu_form`` is how the exact GELU is computed (`GELU_FORMS`): ``"erf"``
  (`gelu`, the default, PyTorch's form) or ``"erfc"`` (``nn.gelu``); the
  same function to float32 rounding. ``gelu_vjp`` uses `exact_gelu`'s own
  backward pass (erf form only; None: `own_vjp_default`).
  """

  mlp_dim: int
  dtype: Any = jnp.float32
  gelu_vjp: bool | None = None
  gelu_form: str = "erf"
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
    if self.gelu_form not in GELU_FORMS:
      raise ValueError(
        f"gelu_form={self.gelu_form!r}; expected one of {GELU_FORMS}."
      )
    if self.act == "quick_gelu":
      x = quick_gelu(x)
    elif own_vjp_default(self.gelu_vjp, "gelu"):
      if self.gelu_form != "erf":
        raise ValueError("gelu_vjp needs gelu_form='erf' (exact_gelu's form).")
      x = exact_gelu(x)
    elif self.gelu_form == "erf":
      x = gelu(x)
    else:
      x = nn.gelu(x, approximate=False)
    return nn.Dense(
      d, dtype=self.dtype, kernel_init=init, bias_init=bias_init, name="Dense_1"
    )(x)


ATTENTION_IMPLS = ("matmul", "xla", "cudnn")
# A GPU run (jax 0.11.2, an H100) once refused 197 queries and 297 keys in
# training ("Unsupported sequence length Q 197, KV 297"), so queries and keys
# are zero-padded to a multiple of this and masked by length. That message
# is jax's check for a bias (a boolean mask becomes one) in training, in
# every jax source read since (0.10.2; jax-ml/jax); with lengths and no mask
# it does not fire, so ``cudnn_multiple=1`` (no padding) may run: unmeasured.
CUDNN_PAD = 8


def resolve_attention_impl(implementation: str | None, dtype: Any) -> str:
  """The attention implementation a model runs for a config value.

  None or ``""`` picks per backend: ``"matmul"`` on CPU (fastest there,
  ``benchmarks/profile_forward.py``), ``"cudnn"`` on an NVIDIA GPU when the
  compute dtype is bfloat16 or float16 (fused flash attention; cuDNN has no
  float32 kernel), and XLA's own everywhere else, TPU included, so no
  backend is handed a kernel it lacks.
  """
  if implementation:
    if implementation not in ATTENTION_IMPLS:
      raise ValueError(
        f"attention_impl must be one of {ATTENTION_IMPLS} or empty, got "
        f"{implementation!r}."
      )
    return implementation
  backend = jax.default_backend()
  if backend == "cpu":
    return "matmul"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend == "gpu" and half and _is_nvidia():
    return "cudnn"
  return "xla"


def _is_nvidia() -> bool:
  """Whether the default GPU backend is CUDA (cuDNN exists there only)."""
  try:
    return "cuda" in jax.devices()[0].client.platform_version.lower()
  except Exception:  # noqa: BLE001 - any failure means "do not assume".
    return False


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@jax.custom_jvp
def _tie_batching(q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
  """Returns q, k, v unchanged, but batched alike under `jax.vmap`.

  cuDNN's attention primitive has a batching rule that folds the mapped
  axis into the batch axis of every operand, so it fails (a reshape error
  at trace time) when only some of them are mapped: in the vmapped grid
  (`vptpc.sweep`) the images are shared by the members, so block 0's
  queries are not mapped while its keys (which hold each member's prompts)
  are, and lengths made with ``jnp.full`` are never mapped. Selecting
  between two equal values with a condition computed from all three makes
  each output depend on all of them, hence mapped alike. Outside vmap XLA
  folds ``select(c, x, x)`` to ``x``, and the custom JVP passes tangents
  through untouched, so the backward pass gains no operation either.
  """
  tie = sum(x[:, 0, 0, 0].astype(jnp.float32) for x in (q, k, v))
  c = (tie == tie)[:, None, None, None]  # any value: both branches agree
  return jnp.where(c, q, q), jnp.where(c, k, k), jnp.where(c, v, v)


@_tie_batching.defjvp
def _tie_batching_jvp(primals, tangents):
  return _tie_batching(*primals), tangents


@jax.custom_vjp
def _tie_cotangent(out: Array) -> Array:
  """Identity whose cotangent is batched like ``out`` under `jax.vmap`.

  The backward half of `_tie_batching`: a cotangent that does not depend on
  the mapped values (``sum(out)``'s ones) would reach cuDNN's backward
  primitive unmapped next to mapped operands.
  """
  return out


def _tie_cotangent_fwd(out):
  return out, jax.lax.stop_gradient(out[:, 0, 0, 0])


def _tie_cotangent_bwd(first, g):
  c = (first == first)[:, None, None, None]
  return (jnp.where(c, g, g),)


_tie_cotangent.defvjp(_tie_cotangent_fwd, _tie_cotangent_bwd)


def _lengths(x: Array, n: int) -> Array:
  """(B,) int32 lengths equal to ``n``, batched like ``x`` under vmap."""
  first = jax.lax.stop_gradient(x[:, 0, 0, 0])
  return jnp.where(first == first, n, n).astype(jnp.int32)


def _cudnn_attention(
  q: Array,
  k: Array,
  v: Array,
  kv_valid: int | None = None,
  multiple: int = CUDNN_PAD,
) -> Array:
  """Flash attention (cuDNN) at any sequence length, by padding + lengths.

  Queries and keys are padded to a multiple of ``multiple`` (`CUDNN_PAD`
  unless a model sets ``cudnn_multiple``). Keys from
  ``kv_valid`` on (the padding added here, and tokens the encoder padded
  once for all blocks; None: all keys are valid) are excluded by
  ``key_value_seq_lengths``, and padded query rows are sliced off, so the
  result is attention over the valid keys.
  """
  t, s = q.shape[1], k.shape[1]
  kv_valid = s if kv_valid is None else kv_valid
  tp, sp = _round_up(t, multiple), _round_up(s, multiple)
  kw = {}
  if (tp, sp, kv_valid) != (t, s, s):

    def pad(x, n):
      return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))

    q, k, v = _tie_batching(pad(q, tp), pad(k, sp), pad(v, sp))
    kw = dict(
      query_seq_lengths=_lengths(q, t),
      key_value_seq_lengths=_lengths(q, kv_valid),
    )
  else:
    q, k, v = _tie_batching(q, k, v)
  out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw)
  out = _tie_cotangent(out)
  return out[:, :t] if tp != t else out


def attention(
  q: Array,
  k: Array,
  v: Array,
  mask: Array | None = None,
  implementation: str | None = None,
  kv_valid: int | None = None,
  cudnn_multiple: int | None = None,
) -> Array:
  """Scaled dot-product attention, (B, T, heads, d) layout in and out.

  ``implementation`` (`resolve_attention_impl` picks one for None):

  * ``"matmul"``: batched matmuls in (B, heads, T, d) layout with the
    softmax normalisation deferred until after the AV product (exact: the
    max shift and the division commute with AV). On XLA:CPU, at ViT-B/16
    shapes with 100 prompt keys, it ran 3.0x faster forward and 1.7x
    faster forward + backward than `jax.nn.dot_product_attention`
    (``benchmarks/profile_forward.py`` times both).
  * ``"xla"``: `jax.nn.dot_product_attention` as XLA compiles it.
  * ``"cudnn"``: cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16),
    with queries and keys padded to a multiple of `CUDNN_PAD` and masked
    by length, since cuDNN refuses ViT's odd lengths (197 queries) in
    training. A boolean ``mask`` (per-example padded prompts when serving)
    falls back to ``"xla"``.

  Logits, exponentials and their sums are float32 for any compute dtype.

  Args:
    q: (B, T, heads, d) queries.
    k: (B, S, heads, d) keys.
    v: (B, S, heads, d) values.
    mask: optional bool, broadcastable to (B, heads, T, S); False keys get
      no attention.
    implementation: None, ``"matmul"``, ``"xla"`` or ``"cudnn"``.
    kv_valid: only the first ``kv_valid`` keys are attended to (the rest
      are padding, e.g. tokens the encoder padded once for every block);
      None: all of them.
    cudnn_multiple: with cuDNN, the multiple query and key lengths are
      padded to (None: `CUDNN_PAD`).

  Returns:
    (B, T, heads, d) in ``q``'s dtype.
  """
  implementation = resolve_attention_impl(implementation, q.dtype)
  if implementation == "cudnn" and mask is None:
    return _cudnn_attention(q, k, v, kv_valid, cudnn_multiple or CUDNN_PAD)
  s_len = k.shape[1]
  if kv_valid is not None and kv_valid < s_len:
    valid = (jnp.arange(s_len) < kv_valid)[None, None, None, :]
    mask = valid if mask is None else jnp.logical_and(mask, valid)
  if implementation != "matmul":
    return jax.nn.dot_product_attention(
      q, k, v, mask=mask, implementation="xla"
    )
  scale = 1.0 / math.sqrt(q.shape[-1])
  qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
  kh, vh = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
  s = jnp.matmul(qh, kh, preferred_element_type=jnp.float32)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  # Softmax is shift-invariant, so the max carries no gradient.
  s = s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True))
  e = jnp.exp(s)
  o = jnp.matmul(e.astype(v.dtype), vh, preferred_element_type=jnp.float32)
  o = o / e.sum(axis=-1, keepdims=True)
  return o.astype(q.dtype).transpose(0, 2, 1, 3)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention with vit_jax parameter names.

  Extra keys and values (the key/value-only prompt path) can be supplied as
  unprojected tokens in ``kv_extra``; they are projected with the same
  ``key``/``value`` kernels and attended to by every query but never act as
  queries themselves.
  """

  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  fuse_qkv: bool = False
  cudnn_multiple: int | None = None
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
    if self.fuse_qkv:
      # One matmul against the stacked kernels instead of three: the same
      # dot products, in one wider GEMM (and one in the backward pass).
      if self.is_initializing():
        query(xq), key(x), value(x)
      mods = ([query] if num_queries is None else []) + [key, value]
      w = jnp.stack([m.variables["params"]["kernel"] for m in mods], 1)
      bias = jnp.stack(
        [
          m.variables["params"].get("bias", jnp.zeros(w.shape[2:], w.dtype))
          for m in mods
        ]
      )

      def fused(t):
        t, wt, bt = nn.dtypes.promote_dtype(t, w, bias, dtype=self.dtype)
        out = jnp.einsum("...d,dshe->s...he", t, wt) + bt.reshape(
          (len(mods),) + (1,) * (t.ndim - 1) + bt.shape[1:]
        )
        return list(out)

      outs = fused(x)
      if num_queries is None:
        q, k, v = outs
      else:
        q, (k, v) = query(xq), outs
    else:
      q = query(xq)
      k, v = key(x), value(x)
    kp = vp = None
    if kv_cached is not None and kv_cached[0].shape[-3] > 0:
      kp, vp = (t.astype(k.dtype) for t in kv_cached)
    elif kv_extra is not None and kv_extra.shape[-2] > 0:
      # Image-independent prompts (k, D) are projected once and broadcast,
      # which is what makes the key/value path cheap (vpt.md §2).
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
    out = attention(
      q, k, v, mask, self.attention_impl, kv_valid, self.cudnn_multiple
    )
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
  attention_impl: str | None = None
  fuse_qkv: bool = False
  gelu_vjp: bool | None = None
  ln_vjp: bool | None = None
  gelu_form: str = "erf"
  cudnn_multiple: int | None = None
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
    norm = LayerNorm if own_vjp_default(self.ln_vjp, "ln") else nn.LayerNorm
    ln1 = norm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_0")
    y = ln1(x)
    extra = None if kv_prompts is None else ln1(kv_prompts)
    y = MultiHeadDotProductAttention(
      self.num_heads,
      dtype=self.dtype,
      attention_impl=self.attention_impl,
      fuse_qkv=self.fuse_qkv,
      cudnn_multiple=self.cudnn_multiple,
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
    y = norm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_2")(x)
    y = MlpBlock(
      self.mlp_dim,
      dtype=self.dtype,
      gelu_vjp=self.gelu_vjp,
      gelu_form=self.gelu_form,
      act=self.act,
      name="MlpBlock_3",
    )(y)
    if self.layer_scale:
      y = LayerScale(name="ls2")(y)
    return x + y


class PatchEmbedding(nn.Module):
  """Non-overlapping patches to tokens, as one matmul.

  The parameters are those of vit_jax's ``nn.Conv`` with stride = kernel
  (``kernel`` (p, p, C, D), ``bias`` (D,)), so checkpoints load unchanged,
  and the function is the same up to float summation order. On an H200
  the convolution ran as an sm80 implicit-GEMM kernel at about 38 TFLOP/s
  (0.79 ms of a 28 ms train step, ``results/bench_gpu_h200``); as a
  reshape and a matmul it is an ordinary GEMM. On XLA:CPU the two took
  the same time (B/16, batch 32).
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
  attention_impl: str | None = None
  fuse_qkv: bool = False
  pad_tokens: int | None = None
  gelu_vjp: bool | None = None
  ln_vjp: bool | None = None
  gelu_form: str = "erf"
  cudnn_multiple: int | None = None
  kv_stacked: bool = False
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

    cuDNN pads queries and keys to ``cudnn_multiple`` (`_cudnn_attention`);
    doing it once on the tokens (a few extra rows through every block) replaces
    per-block pads of q, k, v and the slice of the output. Only where the
    sequence keeps its length through the blocks (no prompts or the
    key/value path) and no analysis reads the tokens.
    """
    if self.is_mutable_collection("intermediates"):
      return 1
    if variant not in ("none", "deep") or (
      variant == "deep" and not self.kv_only
    ):
      return 1
    if self.pad_tokens is not None:
      return max(1, self.pad_tokens)
    impl = resolve_attention_impl(self.attention_impl, self.dtype)
    return (self.cudnn_multiple or CUDNN_PAD) if impl == "cudnn" else 1

  def _stacked_kv(self, prompts: list[Array]) -> list[tuple[Array, Array]]:
    """Every block's prompt keys and values, computed for all blocks at once.

    The same function as each block's ``LN1(p) W_k + b_k`` and
    ``LN1(p) W_v + b_v`` (`build_kv_cache`), as one LayerNorm over the
    stacked (L, k, D) prompts and one batched matmul each for the keys and
    the values, instead of L small ones of each in the forward pass and
    again in the backward pass. Kernels of a few microseconds each are
    bounded by launch latency on a GPU, not by their work.

    Args:
      prompts: one (k, D) array per block, in the compute dtype.

    Returns:
      One (keys, values) pair per block, each (k, heads, head_dim).
    """
    params = self.variables["params"]
    blocks = [params[f"encoderblock_{i}"] for i in range(self.num_layers)]

    def stack(path):
      return jnp.stack(
        [functools.reduce(operator.getitem, path, b) for b in blocks]
      )

    x = jnp.stack(prompts)
    mu, rstd = _ln_stats(x, self.ln_eps)
    scale = stack(("LayerNorm_0", "scale"))[:, None]
    bias = stack(("LayerNorm_0", "bias"))[:, None]
    y = _ln_normalize(x, mu, rstd, scale, bias, self.dtype)
    kv = []
    for name in ("key", "value"):
      att = ("MultiHeadDotProductAttention_1", name)
      w = stack(att + ("kernel",))
      b = stack(att + ("bias",)) if self.qkv_bias else jnp.zeros_like(w[:, 0])
      yy, w, b = nn.dtypes.promote_dtype(y, w, b, dtype=self.dtype)
      kv.append(jnp.einsum("lkd,ldhe->lkhe", yy, w) + b[:, None])
    return [(kv[0][i], kv[1][i]) for i in range(self.num_layers)]

  def _prompt(self, p: Array, batch: int, train: bool) -> Array:
    """Casts one layer's prompts and applies per-example dropout if training.

    The official code broadcasts prompts to the batch before its dropout, so
    each example gets its own mask (vpt.md §2). Without dropout the prompts
    stay (k, D) so the key/value path can project them once per batch.
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
    padded = _round_up(valid, self._token_multiple(variant))
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
      variant == "deep"
      and self.kv_only
      and self.kv_stacked
      and not self.is_initializing()
      and not self.is_mutable_collection("intermediates")
      and self.kv_shared
      and not (train and self.prompt_dropout > 0)
    ):
      # Shared (k, D) prompts of one count > 0 in every block; per-image
      # prompts (dropout, kv_shared=False), caches or ragged counts run per
      # block (and draw their dropout masks there, as without the lever).
      ps = [prompts[f"encoderblock_{i}"] for i in range(self.num_layers)]
      if (
        all(not isinstance(p, Mapping) and p.ndim == 2 for p in ps)
        and len({p.shape[0] for p in ps}) == 1
        and ps[0].shape[0] > 0
      ):
        for p in ps:
          fit(p)  # the width check, with its error message
        stacked = self._stacked_kv([p.astype(self.dtype) for p in ps])
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
        attention_impl=self.attention_impl,
        fuse_qkv=self.fuse_qkv,
        gelu_vjp=self.gelu_vjp,
        ln_vjp=self.ln_vjp,
        gelu_form=self.gelu_form,
        cudnn_multiple=self.cudnn_multiple,
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
      cheaper by the prompts' query, output and MLP work (vpt.md §2).
    kv_shared: with ``kv_only``, project each layer's prompts to keys and
      values once per batch and share them across images (True), or per
      image (False; what per-example prompt dropout needs anyway). Both are
      exact; at inference a per-task cache (`build_kv_cache`, passed in
      place of the prompt tree) skips even the per-batch projection.
    prompt_dropout: dropout rate on prompts while training (official VPT: 0.0
      default, 0.1 for Deep in its demo).
    dtype: compute dtype (parameters stay float32).
    attention_impl: see `attention` and `resolve_attention_impl`: None
      (the default: ``"matmul"`` on CPU, ``"cudnn"`` on NVIDIA GPUs in
      bf16/fp16, XLA's elsewhere), ``"matmul"``, ``"xla"`` or ``"cudnn"``.
    fuse_qkv: compute the query, key and value projections as one matmul
      against the three stacked kernels (same parameters and names; the
      same function up to float summation order).
    pad_tokens: pad the token sequence once, before the blocks, to a
      multiple of this (padding is never attended to, so the function is
      unchanged). None: ``cudnn_multiple`` with cuDNN attention (which
      needs the padding anyway), else none. Only without prompts or on the
      key/value path.
    gelu_vjp: the MLP's exact GELU with its own backward pass (`exact_gelu`:
      the same function, fewer activations kept for the backward). None
      (the default): `own_vjp_default`, on for GPUs only.
    ln_vjp: the blocks' LayerNorms with their own backward pass
      (`layer_norm`: the same function and parameters, only the input and
      per-token statistics kept for the backward). None:
      `own_vjp_default`, on for GPUs only.
    gelu_form: how the MLP computes the exact GELU, ``"erf"`` (`gelu`,
      the default) or ``"erfc"`` (``nn.gelu``); see `MlpBlock`.
    cudnn_multiple: with cuDNN attention, the multiple that query and key
      lengths (and the once-padded tokens) are padded to. None:
      `CUDNN_PAD` (8). 2 pads 197 tokens to 198 and, at an even prompt
      count, the keys not at all; 1 pads nothing and passes cuDNN no
      lengths. The refusal that made 8 the default came from jax's even-
      length check, which (see `CUDNN_PAD`) applies only with a bias. Not
      yet measured on a GPU: whether cuDNN accepts 1 or 2 in training and
      runs as fast at such lengths is what ``benchmarks/gpu_ablation.py``
      measures, so 8 stays the default.
    kv_stacked: on the shared key/value path, compute every block's prompt
      keys and values before the blocks in one batched computation
      (`Encoder._stacked_kv`) instead of inside each block. The same
      function up to float summation order; fewer, larger kernels. Off by
      default until measured on a GPU (``gpu_ablation.py``). Per-block
      prompt counts that differ, or per-image prompts, run per block.
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
  attention_impl: str | None = None
  fuse_qkv: bool = False
  pad_tokens: int | None = None
  gelu_vjp: bool | None = None
  ln_vjp: bool | None = None
  gelu_form: str = "erf"
  cudnn_multiple: int | None = None
  kv_stacked: bool = False
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
      attention_impl=self.attention_impl,
      fuse_qkv=self.fuse_qkv,
      pad_tokens=self.pad_tokens,
      gelu_vjp=self.gelu_vjp,
      ln_vjp=self.ln_vjp,
      gelu_form=self.gelu_form,
      cudnn_multiple=self.cudnn_multiple,
      kv_stacked=self.kv_stacked,
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
    # VPT's head: kaiming normal fan_out and a 1%-prior bias (vpt.md §3).
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
  (vpt.md §2), so for serving they are computed once and passed to the
  model in place of the prompt tree (``model.apply(params, x, cache)``
  with ``kv_only=True``); the per-image cost of the prompts is then only
  the attention columns they add. Uses the model's own LayerNorm and
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
    **overrides: field overrides (num_classes, kv_only, ...).

  Returns:
    The (unbound) Flax module.
  """
  if isinstance(name_or_config, str):
    cfg = get_model_config(name_or_config, **overrides)
  else:
    cfg = dict(name_or_config)
    cfg.update(overrides)
  return VisionTransformer(**dict(cfg))


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
