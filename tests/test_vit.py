"""Tests for the Flax ViT and the VPT forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import IMAGE_SIZE, TINY
from scipy.special import erf

from vptpc import prompts as pr
from vptpc.models import levers, vit


def test_vit_b16_param_count():
  # Published in vit_jax models_test.py (docs/references.md, "VPT: backbone").
  model = vit.create_model("B/16", num_classes=1000)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3))
  )["params"]
  assert vit.count_params(shapes) == 86_567_656
  backbone, head = vit.split_head(shapes)
  assert vit.count_params(backbone) == 85_798_656
  assert head["kernel"].shape == (768, 1000)


def test_vit_testing_param_count():
  # vit_jax's `testing` config has 21,390 parameters with a 1000-class head.
  model = vit.create_model("testing", num_classes=1000)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3))
  )["params"]
  assert vit.count_params(shapes) == 21_390


@pytest.mark.parametrize(
  "name,width,depth", [("Ti/16", 192, 12), ("ViT-L_16", 1024, 24)]
)
def test_named_variants(name, width, depth):
  cfg = vit.get_model_config(name)
  assert (cfg.hidden_size, cfg.num_layers) == (width, depth)


def test_unknown_variant_and_field():
  with pytest.raises(ValueError, match="Z/99"):
    vit.get_model_config("Z/99")
  with pytest.raises(ValueError, match="hidden_sise"):
    vit.get_model_config("B/16", hidden_sise=3)


def test_head_init_follows_vpt(tiny_params):
  bias = np.asarray(tiny_params["head"]["bias"])
  np.testing.assert_allclose(bias, -np.log(99.0), rtol=1e-6)
  # kaiming normal fan_out: std sqrt(2 / C); with C = 5 the sample std of
  # 160 draws is within 25% of 0.632 with overwhelming probability.
  std = float(np.std(np.asarray(tiny_params["head"]["kernel"])))
  assert 0.47 < std < 0.79


# --- An independent NumPy reference of the official VPT-Deep forward. ---


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _block(x, p, heads):
  b, t, d = x.shape
  hd = d // heads
  a = p["MultiHeadDotProductAttention_1"]
  y = _ln(x, p["LayerNorm_0"])
  q, k, v = (
    (y @ a[n]["kernel"].reshape(d, d) + a[n]["bias"].reshape(d)).reshape(
      b, t, heads, hd
    )
    for n in ("query", "key", "value")
  )
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, d)
  x = x + o @ a["out"]["kernel"].reshape(d, d) + a["out"]["bias"]
  m = p["MlpBlock_3"]
  y = _ln(x, p["LayerNorm_2"]) @ m["Dense_0"]["kernel"] + m["Dense_0"]["bias"]
  y = 0.5 * y * (1 + erf(y / np.sqrt(2)))  # exact GELU
  return x + y @ m["Dense_1"]["kernel"] + m["Dense_1"]["bias"]


def numpy_vpt_deep(params, images, deep_prompts, heads, patch):
  """The official forward: [cls, prompts, patches]; replace before blocks."""
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  images = np.asarray(images, np.float64)
  b, h, w, c = images.shape
  gh, gw = h // patch, w // patch
  patches = images.reshape(b, gh, patch, gw, patch, c).transpose(
    0, 1, 3, 2, 4, 5
  )
  patches = patches.reshape(b, gh * gw, patch * patch * c)
  k = params["embedding"]["kernel"].reshape(patch * patch * c, -1)
  x = patches @ k + params["embedding"]["bias"]
  cls = np.broadcast_to(params["cls"], (b, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1)
  x = x + params["Transformer"]["posembed_input"]["pos_embedding"]
  n_prev = 0
  for i, p in enumerate(deep_prompts):
    p = np.broadcast_to(np.asarray(p, np.float64), (b,) + p.shape)
    x = np.concatenate([x[:, :1], p, x[:, 1 + n_prev :]], 1)
    n_prev = p.shape[1]
    x = _block(x, params["Transformer"][f"encoderblock_{i}"], heads)
  x = _ln(x, params["Transformer"]["encoder_norm"])
  return x[:, 0] @ params["head"]["kernel"] + params["head"]["bias"]


@pytest.mark.parametrize("kv_only", [False, True])
def test_numpy_reference_forward_matches_deep_vpt(tiny_params, kv_only):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  # Random, not-small weights so every path matters numerically.
  params = jax.tree_util.tree_map(
    lambda a: rng.normal(scale=0.3, size=a.shape).astype(np.float32),
    tiny_params,
  )
  p = pr.init_prompts(
    jax.random.key(1),
    num_prompts=(4, 0, 2),
    hidden_size=32,
    patch_size=8,
    num_layers=3,
  )
  p = {k: v * 10 for k, v in p.items()}  # prompts large enough to matter
  model = vit.VisionTransformer(**TINY, num_classes=5, kv_only=kv_only)
  got = model.apply({"params": params}, images, p)
  want = numpy_vpt_deep(
    params, images, [p[k] for k in pr.layer_keys(p)], heads=2, patch=8
  )
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  no_prompts = model.apply({"params": params}, images, None)
  assert np.abs(np.asarray(no_prompts) - want).max() > 1e-2


def test_kv_only_equals_full_deep(tiny_params):
  images = jax.random.normal(jax.random.key(2), (3, IMAGE_SIZE, IMAGE_SIZE, 3))
  p = pr.init_prompts(
    jax.random.key(3), num_prompts=6, hidden_size=32, patch_size=8, num_layers=3
  )
  full = vit.VisionTransformer(**TINY, num_classes=5)
  kv = vit.VisionTransformer(**TINY, num_classes=5, kv_only=True)
  a, fa = full.apply({"params": tiny_params}, images, p, return_features=True)
  b, fb = kv.apply({"params": tiny_params}, images, p, return_features=True)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(fa), np.asarray(fb), atol=1e-5, rtol=0)


def test_kv_only_with_prompt_dropout_equals_full(tiny_params):
  images = jax.random.normal(jax.random.key(2), (3, IMAGE_SIZE, IMAGE_SIZE, 3))
  p = pr.init_prompts(
    jax.random.key(3), num_prompts=6, hidden_size=32, patch_size=8, num_layers=3
  )
  rngs = {"dropout": jax.random.key(7)}
  outs = []
  for kv_only in (False, True):
    m = vit.VisionTransformer(
      **TINY, num_classes=5, kv_only=kv_only, prompt_dropout=0.5
    )
    outs.append(
      m.apply({"params": tiny_params}, images, p, train=True, rngs=rngs)
    )
  np.testing.assert_allclose(*map(np.asarray, outs), atol=1e-5, rtol=0)
  # Dropout changed something compared with inference.
  m = vit.VisionTransformer(**TINY, num_classes=5, prompt_dropout=0.5)
  ref = m.apply({"params": tiny_params}, images, p)
  assert np.abs(np.asarray(outs[0]) - np.asarray(ref)).max() > 1e-4


def test_prompt_paths_and_kv_cache_agree_in_forward_and_gradients(
  tiny_params,
):
  images = jax.random.normal(jax.random.key(2), (4, IMAGE_SIZE, IMAGE_SIZE, 3))
  labels = jnp.array([0, 1, 2, 3])
  p = pr.init_prompts(
    jax.random.key(3),
    num_prompts=(4, 0, 7),
    hidden_size=32,
    patch_size=8,
    num_layers=3,
  )
  p = jax.tree_util.tree_map(lambda a: a * 10, p)  # make prompts matter
  frozen, head = vit.split_head(tiny_params)

  def loss(trainable, model):
    params = vit.merge_head(frozen, trainable["head"])
    logits = model.apply({"params": params}, images, trainable["prompts"])
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels
    ).mean()

  results = {}
  for path in vit.PROMPT_PATHS:
    m = vit.VisionTransformer(**TINY, num_classes=5, **vit.path_overrides(path))
    vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    results[path] = vg({"prompts": p, "head": head}, m)
  ref_loss, ref_grad = results["full"]
  for path in ("kv", "kv_per_image"):
    val, grad = results[path]
    np.testing.assert_allclose(float(val), float(ref_loss), rtol=1e-5)
    for a, b in zip(
      jax.tree_util.tree_leaves(grad),
      jax.tree_util.tree_leaves(ref_grad),
      strict=True,
    ):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert float(jnp.abs(ref_grad["prompts"]["encoderblock_2"]).sum()) > 0
  # The per-task cache gives the same logits as the prompts themselves.
  kv = vit.VisionTransformer(**TINY, num_classes=5, kv_only=True)
  cache = vit.build_kv_cache(frozen, p, TINY["num_heads"])
  assert cache["encoderblock_1"]["key"].shape == (0, 2, 16)
  assert cache["encoderblock_2"]["value"].shape == (7, 2, 16)
  want = kv.apply({"params": tiny_params}, images, p)
  got = jax.jit(lambda c, x: kv.apply({"params": tiny_params}, x, c))(
    cache, images
  )
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
  full = vit.VisionTransformer(**TINY, num_classes=5)
  with pytest.raises(ValueError, match="kv_only"):
    full.apply({"params": tiny_params}, images, cache)
  with pytest.raises(ValueError, match="prompt path"):
    vit.path_overrides("fast")


def test_bfloat16_compute_stays_close_to_float32(tiny_params):
  images = jax.random.normal(jax.random.key(2), (4, IMAGE_SIZE, IMAGE_SIZE, 3))
  p = pr.init_prompts(
    jax.random.key(3), num_prompts=3, hidden_size=32, patch_size=8, num_layers=3
  )
  f32 = vit.VisionTransformer(**TINY, num_classes=5, kv_only=True)
  b16 = f32.clone(dtype=jnp.bfloat16)
  _, a = f32.apply({"params": tiny_params}, images, p, return_features=True)
  _, b = b16.apply({"params": tiny_params}, images, p, return_features=True)
  assert b.dtype == jnp.bfloat16
  # Parameters stay float32: the same tree serves both.
  rel = jnp.linalg.norm(b.astype(jnp.float32) - a) / jnp.linalg.norm(a)
  assert float(rel) < 1e-2, float(rel)


def test_ragged_prompt_counts_under_jit(tiny_params):
  model = vit.VisionTransformer(**TINY, num_classes=5)
  images = jnp.ones((2, IMAGE_SIZE, IMAGE_SIZE, 3))
  full = pr.init_prompts(
    jax.random.key(4), num_prompts=5, hidden_size=32, patch_size=8, num_layers=3
  )
  small = pr.gather_prompts(full, [[0, 3], [], [4, 1, 2]])
  assert pr.prompts_per_layer(small) == (2, 0, 3)
  fwd = jax.jit(lambda p, x: model.apply({"params": tiny_params}, x, p))
  out = fwd(small, images)
  assert out.shape == (2, 5) and bool(jnp.all(jnp.isfinite(out)))
  # Gradients flow to a ragged tree, and only to the prompts that exist.
  grads = jax.jit(jax.grad(lambda p: fwd(p, images).sum()))(small)
  assert grads["encoderblock_1"].shape == (0, 32)
  assert float(jnp.abs(grads["encoderblock_2"]).sum()) > 0
  # Same result without jit.
  eager = model.apply({"params": tiny_params}, images, small)
  np.testing.assert_allclose(np.asarray(out), np.asarray(eager), atol=1e-5)


def test_shallow_prompts_change_output_and_reject_kv_only(tiny_params):
  images = jnp.ones((2, IMAGE_SIZE, IMAGE_SIZE, 3))
  p = pr.init_prompts(
    jax.random.key(5),
    num_prompts=4,
    hidden_size=32,
    patch_size=8,
    variant="shallow",
  )
  model = vit.VisionTransformer(**TINY, num_classes=5)
  a = model.apply({"params": tiny_params}, images, p)
  b = model.apply({"params": tiny_params}, images, None)
  assert np.abs(np.asarray(a - b)).max() > 1e-5
  kv = vit.VisionTransformer(**TINY, num_classes=5, kv_only=True)
  with pytest.raises(ValueError, match="kv_only"):
    kv.apply({"params": tiny_params}, images, p)


def test_deep_tree_must_cover_every_block(tiny_params):
  model = vit.VisionTransformer(**TINY, num_classes=5)
  p = {
    "encoderblock_0": jnp.zeros((2, 32)),
    "encoderblock_1": jnp.zeros((2, 32)),
  }
  with pytest.raises(ValueError, match="encoderblock_2"):
    model.apply({"params": tiny_params}, jnp.ones((1, 32, 32, 3)), p)


def test_bad_image_shape_is_named(tiny_params):
  model = vit.VisionTransformer(**TINY, num_classes=5)
  with pytest.raises(ValueError, match="divisible by the patch size 8"):
    model.apply({"params": tiny_params}, jnp.ones((1, 30, 30, 3)))


@pytest.mark.parametrize("masked", [False, True])
def test_matmul_attention_equals_xla_in_forward_and_gradients(masked):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (2, 5, 2, 8))
  k = jax.random.normal(ks[1], (2, 7, 2, 8))
  v = jax.random.normal(ks[2], (2, 7, 2, 8))
  mask = None
  if masked:  # the second example's keys 1..3 are padding (vptpc.serve)
    keep = jnp.ones((2, 7), bool).at[1, 1:4].set(False)
    mask = keep[:, None, None, :]
  w = jax.random.normal(ks[3], (2, 5, 2, 8))

  def loss(impl, q, k, v):
    return (levers.attention(q, k, v, mask, impl) * w).sum()

  for a, b in zip(
    jax.grad(lambda *x: loss("matmul", *x), argnums=(0, 1, 2))(q, k, v),
    jax.grad(lambda *x: loss("xla", *x), argnums=(0, 1, 2))(q, k, v),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    levers.attention(q, k, v, mask, "matmul"),
    jax.nn.dot_product_attention(q, k, v, mask=mask),
    rtol=1e-5,
    atol=1e-6,
  )
  half = levers.attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)), mask)
  assert half.dtype == jnp.bfloat16
  ref = levers.attention(q, k, v, mask, "xla")
  rel = jnp.linalg.norm(half.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
  assert rel < 1e-2
