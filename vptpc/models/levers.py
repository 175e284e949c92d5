"""How a ViT runs fast on each backend: attention kernels and the levers.

`vptpc.models.vit` says what the model computes; this module holds what
only decides how fast it runs: the attention implementations (batched
matmuls on CPU, cuDNN's flash kernel on NVIDIA GPUs, XLA's elsewhere),
cuDNN's length padding and what makes it safe under `jax.vmap`, and the
one options object a `VisionTransformer` takes for them, `Levers` (its
``levers`` field; the config keys ``model.attention_impl``,
``model.cudnn_multiple`` and ``model.kv_stacked``).

Every setting computes the same function as the default, to float
rounding (each has an equality test in ``tests/test_fast_paths.py``).
What each one bought, or still waits to be measured for, is in
docs/performance.md; levers that measured slower or no faster were
removed (fused QKV projections, the GELU's and the LayerNorms' own
backward passes, flax's erfc form of the GELU).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

ATTENTION_IMPLS = ("matmul", "xla", "cudnn")
# A GPU run (jax 0.11.2, an H100) once refused 197 queries and 297 keys in
# training ("Unsupported sequence length Q 197, KV 297"), so queries and keys
# are zero-padded to a multiple of this and masked by length. That message
# is jax's check for a bias (a boolean mask becomes one) in training, in
# every jax source read since (0.10.2; jax-ml/jax); with lengths and no mask
# it does not fire, so ``cudnn_multiple=1`` (no padding) may run: unmeasured.
CUDNN_PAD = 8


@dataclasses.dataclass(frozen=True)
class Levers:
  """How a `VisionTransformer` computes its function; never what it computes.

  Frozen and hashable: it is a Flax module field, so it is part of the
  module's identity (and of jit's cache key). ``None`` for a field means
  its default.

  Attributes:
    attention_impl: ``""`` (the default) picks per backend
      (`resolve_attention_impl`): ``"matmul"`` on CPU, ``"cudnn"`` on
      NVIDIA GPUs in bf16/fp16, ``"xla"`` elsewhere; or one of
      `ATTENTION_IMPLS`. Measured: cuDNN's flash attention took an H200's
      ViT-B/16 train step from 2,857 to 4,254 img/s; on CPU the matmul form
      ran the attention 3.0x faster forward than XLA's.
    cudnn_multiple: with cuDNN attention, the multiple that query and key
      lengths (and the once-padded tokens) are padded to; 0: `CUDNN_PAD`.
      2 pads 197 tokens to 198 and, at an even prompt count, the keys not
      at all; 1 pads nothing and passes cuDNN no lengths. Not yet measured
      on a GPU, so 0 stays the default.
    kv_stacked: on the shared key/value path, every block's prompt keys and
      values in one batched computation before the blocks (`stacked_kv`)
      instead of two small projections inside each block. Not yet measured
      on a GPU, so off by default. Per-block prompt counts that differ, or
      per-image prompts, run per block.
    pad_tokens: pad the token sequence once, before the blocks, to a
      multiple of this (padding is never attended to). 0: cuDNN's multiple
      with cuDNN attention (which pads anyway; an H200 train step went from
      4,329 to 4,399 img/s), else no padding. Only without prompts or on the
      key/value path.
  """

  attention_impl: str = ""
  cudnn_multiple: int = 0
  kv_stacked: bool = False
  pad_tokens: int = 0

  def __post_init__(self):
    """Maps ``None`` to the defaults and checks every field."""
    norm = dict(
      attention_impl=self.attention_impl or "",
      cudnn_multiple=self.cudnn_multiple or 0,
      kv_stacked=bool(self.kv_stacked),
      pad_tokens=self.pad_tokens or 0,
    )
    for name, value in norm.items():
      object.__setattr__(self, name, value)
    if self.attention_impl not in ("",) + ATTENTION_IMPLS:
      raise ValueError(
        f"attention_impl must be one of {ATTENTION_IMPLS} or empty, got "
        f"{self.attention_impl!r}."
      )
    for name in ("cudnn_multiple", "pad_tokens"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}.")


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


def round_up(n: int, m: int) -> int:
  """``n`` rounded up to a multiple of ``m``."""
  return -(-n // m) * m


def token_multiple(levers: Levers, dtype: Any) -> int:
  """The multiple a model pads its token sequence to once, before the blocks.

  cuDNN pads queries and keys to its multiple in every block
  (`_cudnn_attention`); padding the tokens once (a few extra rows through
  every block) replaces those pads and the slices of the outputs.
  """
  if levers.pad_tokens:
    return levers.pad_tokens
  if resolve_attention_impl(levers.attention_impl, dtype) == "cudnn":
    return levers.cudnn_multiple or CUDNN_PAD
  return 1


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

  Queries and keys are padded to a multiple of ``multiple``. Keys from
  ``kv_valid`` on (the padding added here, and tokens the encoder padded
  once for all blocks; None: all keys are valid) are excluded by
  ``key_value_seq_lengths``, and padded query rows are sliced off, so the
  result is attention over the valid keys.
  """
  t, s = q.shape[1], k.shape[1]
  kv_valid = s if kv_valid is None else kv_valid
  tp, sp = round_up(t, multiple), round_up(s, multiple)
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
      padded to (None or 0: `CUDNN_PAD`).

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


def stacked_kv(
  params: Mapping[str, Any],
  prompts: Mapping[str, Any],
  *,
  ln_eps: float,
  dtype: Any,
) -> list[tuple[Array, Array]] | None:
  """Every block's prompt keys and values, computed for all blocks at once.

  The same function as each block's ``LN1(p) W_k + b_k`` and
  ``LN1(p) W_v + b_v`` (``nn.LayerNorm``'s statistics in float32), as one
  LayerNorm over the stacked (L, k, D) prompts and one batched matmul each
  for the keys and the values, instead of L small ones of each in the
  forward pass and again in the backward pass: kernels of a few
  microseconds each are bounded by launch latency on a GPU, not by their
  work (`Levers.kv_stacked`).

  Args:
    params: the ViT encoder's parameters (``encoderblock_i``, ...).
    prompts: a VPT-Deep prompt tree, ``{"encoderblock_i": (k, D)}``.
    ln_eps: the blocks' LayerNorm epsilon.
    dtype: the compute dtype.

  Returns:
    One (keys, values) pair per block, each (k, heads, head_dim); None
    unless every block has shared (k, D) prompts of one count k > 0 and
    the blocks' width (caches, per-image or ragged prompts run per block,
    and so does a wrong width, which the block names).
  """
  ps = [prompts[f"encoderblock_{i}"] for i in range(len(prompts))]
  blocks = [params[f"encoderblock_{i}"] for i in range(len(prompts))]
  width = blocks[0]["LayerNorm_0"]["scale"].shape[-1]
  if (
    any(isinstance(p, Mapping) or p.ndim != 2 for p in ps)
    or {p.shape for p in ps} != {(ps[0].shape[0], width)}
    or not ps[0].shape[0]
  ):
    return None

  def stack(*path):
    out = []
    for b in blocks:
      for name in path:
        b = b[name]
      out.append(b)
    return jnp.stack(out)

  x = jnp.stack([p.astype(dtype) for p in ps])
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  # flax's LayerNorm: the fast variance, then its order of operations.
  mu = xf.mean(-1, keepdims=True)
  mu2 = jax.lax.square(xf).mean(-1, keepdims=True)
  var = jnp.maximum(0.0, mu2 - jax.lax.square(mu))
  scale = stack("LayerNorm_0", "scale")[:, None]
  bias = stack("LayerNorm_0", "bias")[:, None]
  y = (x - mu) * (jax.lax.rsqrt(var + ln_eps) * scale) + bias
  y = y.astype(dtype)
  kv = []
  for name in ("key", "value"):
    att = ("MultiHeadDotProductAttention_1", name)
    w = stack(*att, "kernel")
    has_bias = "bias" in blocks[0][att[0]][name]
    b = stack(*att, "bias") if has_bias else jnp.zeros_like(w[:, 0])
    yy, w, b = nn.dtypes.promote_dtype(y, w, b, dtype=dtype)
    kv.append(jnp.einsum("lkd,ldhe->lkhe", yy, w) + b[:, None])
  return [(kv[0][i], kv[1][i]) for i in range(len(blocks))]


# Former `VisionTransformer` fields: the levers (now `Levers` fields), and
# the levers that were removed because they measured no faster.
_FORMER = ("attention_impl", "cudnn_multiple", "kv_stacked", "pad_tokens")
REMOVED = ("fuse_qkv", "gelu_vjp", "ln_vjp", "gelu_form")


def from_former_fields(fields: Mapping[str, Any], caller: str) -> dict:
  """``fields`` with former lever fields moved into ``levers=Levers(...)``.

  For functions that take model fields as keyword arguments
  (``create_model``, ``get_model_config``): a former lever field warns
  (DeprecationWarning, naming the new spelling) and joins ``levers``; a
  removed lever warns and is dropped.

  Args:
    fields: model fields by name.
    caller: the function's public name, for the warning.
  """
  out = dict(fields)
  moved = {k: out.pop(k) for k in _FORMER if k in out}
  gone = [k for k in REMOVED if k in out]
  for k in gone:
    del out[k]
  if gone:
    verb, pron = ("was", "it") if len(gone) == 1 else ("were", "them")
    warnings.warn(
      f"{caller}: {', '.join(gone)} {verb} removed (measured no faster, "
      f"docs/performance.md) and has no effect: drop {pron}.",
      DeprecationWarning,
      stacklevel=3,
    )
  if moved:
    if moved.get("pad_tokens") == 0:  # formerly no padding; 0 is now auto
      moved["pad_tokens"] = 1
    spelled = ", ".join(f"{k}={v!r}" for k, v in moved.items())
    warnings.warn(
      f"{caller}({spelled}) is deprecated: pass "
      f"levers=Levers({spelled}) (vptpc.models.levers.Levers).",
      DeprecationWarning,
      stacklevel=3,
    )
    out["levers"] = dataclasses.replace(out.get("levers") or Levers(), **moved)
  return out
