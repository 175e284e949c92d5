"""Tests for the Flax Swin and VPT on Swin (official semantics).

The semantics: docs/references.md, "VPT: Swin".
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from vptpc import condense, flops
from vptpc import prompts as pr
from vptpc.models import swin, vit

TINY = dict(
  patch_size=2,
  embed_dim=16,
  depths=(2, 2, 2),
  num_heads=(1, 2, 4),
  window_size=4,
)
IMAGE = 32  # grids 16, 8, 4: shifted windows in stages 0-1, clamped in 2
# Two stages (4 blocks, both with shifted windows): smaller compiles for the
# tests that need gradients or several programs.
TWO = dict(depths=(2, 2), num_heads=(1, 2))


# A dozen small programs compile here (conftest.fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")


@functools.cache
def fwd(**fields):
  """A jitted ``apply`` of the tiny Swin (one compile per field set/shape)."""
  model = swin.SwinTransformer(**{**TINY, "num_classes": 5, **fields})

  def run(params, imgs, prompts):
    return model.apply(
      {"params": params}, imgs, prompts, mutable=["intermediates"]
    )

  return jax.jit(run)


@functools.cache
def tiny_params(**fields):
  """Random, not-small weights (every path matters numerically)."""
  model = swin.SwinTransformer(**{**TINY, "num_classes": 5, **fields})
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3))
  )["params"]
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
    lambda a: rng.normal(scale=0.3, size=a.shape).astype(np.float32), shapes
  )


def images(b, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, IMAGE, IMAGE, 3)).astype(np.float32)


def test_param_counts_match_timm():
  # timm 1.0.31 `sum(p.numel())` with 1000 classes (and without the head).
  want = {
    "Swin-T": (28_288_354, 27_519_354),
    "Swin-B": (87_768_224, 86_743_224),
    "Swin-L": (196_532_476, 194_995_476),
    "swin_base_patch4_window12_384": (87_903_584, 86_878_584),
  }
  for name, (total, backbone) in want.items():
    model = swin.create_model(name, num_classes=1000)
    size = 384 if "384" in name else 224
    shapes = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, size, size, 3))
    )["params"]
    assert vit.count_params(shapes) == total, name
    assert vit.count_params(vit.split_head(shapes)[0]) == backbone, name


def test_named_variants_and_errors():
  cfg = swin.get_model_config("swin_b")
  assert (cfg.embed_dim, cfg.depths, cfg.window_size) == (
    128,
    (2, 2, 18, 2),
    7,
  )
  assert swin.get_model_config("Swin-L").num_heads == (6, 12, 24, 48)
  cfg = swin.get_model_config("swin_base_patch4_window7_224.ms_in22k")
  assert cfg.embed_dim == 128
  with pytest.raises(ValueError, match="swin_z"):
    swin.get_model_config("swin_z")
  with pytest.raises(ValueError, match="window_sise"):
    swin.get_model_config("B", window_sise=3)
  m = swin.create_model("Swin-B")
  assert m.num_layers == 24 and m.num_features == 1024
  widths = m.prompt_widths()
  assert widths[:2] == (128, 128) and widths[4] == 512 and widths[-1] == 1024


def test_init_follows_official_bound():
  m = swin.create_model("Swin-B")
  assert swin.init_bound(m) == pytest.approx(np.sqrt(6 / (3 * 4 * 4 + 128)))
  p = swin.init_prompts(jax.random.key(0), m, num_prompts=10)
  assert len(p) == 24
  assert p["encoderblock_0"].shape == (10, 128)
  assert p["encoderblock_23"].shape == (10, 1024)
  bound = swin.init_bound(m)
  assert float(jnp.abs(p["encoderblock_5"]).max()) <= bound
  assert float(jnp.abs(p["encoderblock_5"]).max()) > 0.9 * bound
  s = swin.init_prompts(jax.random.key(0), m, num_prompts=5, variant="shallow")
  assert s["input"].shape == (5, 128)
  c = pr.count_prompts(p)
  assert c["tokens"] == 240
  assert c["params"] == 10 * sum(widths for widths in m.prompt_widths())
  with pytest.raises(ValueError, match="24 non-negative"):
    swin.init_prompts(jax.random.key(0), m, num_prompts=(1, 2))


# --- A plain NumPy re-statement of the official VPT-Swin forward. --------
# Written from KMnP/vpt `vit_prompt/swin_transformer.py` semantics, loop per
# image and per window, in the official sequence layout [prompts, patches].


def _ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _lin(x, p):
  return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def _mlp(x, p):
  y = _lin(x, p["fc1"])
  return _lin(0.5 * y * (1 + erf(y / np.sqrt(2))), p["fc2"])


def _rel_bias(table, ws, heads):
  t = ws * ws
  out = np.zeros((heads, t, t))
  for a in range(t):
    for b in range(t):
      di, dj = a // ws - b // ws, a % ws - b % ws
      out[:, a, b] = table[(di + ws - 1) * (2 * ws - 1) + (dj + ws - 1)]
  return out


def _region_mask(res, ws, shift):
  """(nW, T, T) -100/0 mask of the official SW-MSA (row-major windows)."""
  label = np.zeros((res, res))
  cuts = [0, res - ws, res - shift, res]
  cnt = 0
  for i in range(3):
    for j in range(3):
      label[cuts[i] : cuts[i + 1], cuts[j] : cuts[j + 1]] = cnt
      cnt += 1
  masks = []
  for wi in range(res // ws):
    for wj in range(res // ws):
      lab = label[wi * ws : (wi + 1) * ws, wj * ws : (wj + 1) * ws].reshape(-1)
      masks.append(np.where(lab[None, :] != lab[:, None], -100.0, 0.0))
  return np.stack(masks)


def _attend(tokens, p, bias, heads):
  """One window: tokens (N, C), bias (heads, N, N) already padded."""
  n, c = tokens.shape
  d = c // heads
  qkv = _lin(tokens, p["qkv"]).reshape(n, 3, heads, d)
  q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
  logits = np.einsum("qhd,khd->hqk", q * d**-0.5, k) + bias
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return _lin(np.einsum("hqk,khd->qhd", w, v).reshape(n, c), p["proj"])


def _block(seq, n, res, p, heads, window, shifted, official_order):
  bsz, _, c = seq.shape
  ws = min(window, res)
  shift = window // 2 if (shifted and res > window) else 0
  y = _ln(seq, p["norm1"])
  yp, yx = y[:, :n], y[:, n:].reshape(bsz, res, res, c)
  yx = np.roll(yx, (-shift, -shift), axis=(1, 2))
  bias = _rel_bias(p["attn"]["relative_position_bias_table"], ws, heads)
  nw = (res // ws) ** 2
  mask = _region_mask(res, ws, shift) if shift else np.zeros((nw, 1, 1))
  t = ws * ws
  padded = np.zeros((heads, n + t, n + t))
  padded[:, n:, n:] = bias
  out = np.zeros_like(yx)
  p_sum = np.zeros((bsz, n, c))
  for b in range(bsz):
    for w in range(nw):
      wi, wj = divmod(w, res // ws)
      sl = (b, slice(wi * ws, (wi + 1) * ws), slice(wj * ws, (wj + 1) * ws))
      # Official: window index b*nW + w takes the prompts of image
      # (b*nW + w) % B and gives its prompt outputs to that image.
      src = (b * nw + w) % bsz if official_order else b
      m = np.zeros((n + t, n + t))
      m[n:, n:] = mask[w]
      tok = np.concatenate([yp[src], yx[sl].reshape(t, c)])
      o = _attend(tok, p["attn"], padded + m, heads)
      p_sum[src] += o[:n]
      out[sl] = o[n:].reshape(ws, ws, c)
  out = np.roll(out, (shift, shift), axis=(1, 2)).reshape(bsz, -1, c)
  seq = seq + np.concatenate([p_sum / nw, out], 1)
  return seq + _mlp(_ln(seq, p["norm2"]), p["mlp"])


def _merge(seq, n, res, p):
  bsz, _, c = seq.shape
  prm, x = seq[:, :n], seq[:, n:].reshape(bsz, res, res, c)
  x = np.concatenate(
    [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
    -1,
  ).reshape(bsz, -1, 4 * c)
  seq = np.concatenate([np.concatenate([prm] * 4, -1), x], 1)
  return _lin(_ln(seq, p["norm"]), p["reduction"])


def numpy_vpt_swin(params, imgs, prompts, cfg, official_order=False):
  """Returns (logits, [prompt outputs of each block (B, n, C)])."""
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  prompts = {k: np.asarray(v, np.float64) for k, v in (prompts or {}).items()}
  x = np.asarray(imgs, np.float64)
  bsz, size = x.shape[0], x.shape[1]
  ps = cfg["patch_size"]
  g_ = size // ps
  pe = params["patch_embed"]
  patches = x.reshape(bsz, g_, ps, g_, ps, 3).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(bsz, g_ * g_, -1) @ pe["proj"]["kernel"].reshape(
    ps * ps * 3, -1
  )
  x = _ln(x + pe["proj"]["bias"], pe["norm"])
  deep = "encoderblock_0" in prompts
  first = prompts.get("input", prompts.get("encoderblock_0"))
  if first is None:
    first = np.zeros((0, x.shape[-1]))
  seq = np.concatenate([np.broadcast_to(first, (bsz,) + first.shape), x], 1)
  n = first.shape[0]
  res, g, outs = g_, 0, []
  for s, depth in enumerate(cfg["depths"]):
    stage = params[f"layers_{s}"]
    if s > 0:
      seq = _merge(seq, n, res, stage["downsample"])
      res //= 2
    for j in range(depth):
      if deep and g > 0:
        new = prompts[f"encoderblock_{g}"]
        seq = np.concatenate(
          [np.broadcast_to(new, (bsz,) + new.shape), seq[:, n:]], 1
        )
        n = new.shape[0]
      seq = _block(
        seq,
        n,
        res,
        stage[f"blocks_{j}"],
        cfg["num_heads"][s],
        cfg["window_size"],
        j % 2 == 1,
        official_order,
      )
      outs.append(seq[:, :n])
      g += 1
  feats = _ln(seq, params["norm"]).mean(1)
  return feats @ params["head"]["kernel"] + params["head"]["bias"], outs


def _to64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _big(tree, scale=10.0):
  return {k: v * scale for k, v in tree.items()}  # prompts that matter


@pytest.mark.parametrize("kv_only", [False, True])
def test_vpt_deep_matches_numpy_official_prompt_by_prompt(kv_only):
  params = tiny_params()
  model = swin.SwinTransformer(**TINY, num_classes=5)
  counts = (3, 0, 2, 4, 1, 3)  # ragged, one block without prompts
  p = _big(swin.init_prompts(jax.random.key(1), model, num_prompts=counts))
  imgs = images(2)
  want, want_p = numpy_vpt_swin(params, imgs, p, TINY)
  # float64 pins the semantics far below 1e-5 (float32 rounding of values
  # around 10 is itself a few 1e-6).
  with jax.enable_x64(True):
    got, inter = fwd(kv_only=kv_only, dtype=jnp.float64)(
      _to64(params), imgs.astype(np.float64), _to64(p)
    )
    got, inter = np.asarray(got), jax.device_get(inter["intermediates"])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  # The prompt outputs of every block (the full path computes them all; the
  # key/value path only the last block's, the only ones used).
  for g in range(6) if not kv_only else [5]:
    (out,) = inter[f"block_prompts_{g}"]
    assert out.shape == (2, counts[g], 16 * 2 ** (g // 2))
    np.testing.assert_allclose(out, want_p[g], rtol=0, atol=1e-5)
  if kv_only:
    assert "block_prompts_4" not in inter
  # (float32 paths are checked against the same reference below.)
  # And the prompts matter.
  plain, _ = numpy_vpt_swin(params, imgs, None, TINY)
  assert np.abs(plain - want).max() > 1e-2


def test_vpt_shallow_matches_numpy_official_prompt_by_prompt():
  params = tiny_params()
  model = swin.SwinTransformer(**TINY, num_classes=5)
  p = _big(
    swin.init_prompts(
      jax.random.key(2), model, num_prompts=3, variant="shallow"
    )
  )
  imgs = images(2, seed=1)
  want, want_p = numpy_vpt_swin(params, imgs, p, TINY)
  with jax.enable_x64(True):
    got, inter = fwd(dtype=jnp.float64)(
      _to64(params), imgs.astype(np.float64), _to64(p)
    )
    got, inter = np.asarray(got), jax.device_get(inter["intermediates"])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  for g in range(6):
    (out,) = inter[f"block_prompts_{g}"]
    # Widths follow the stages: merged prompts are 4x-concatenated.
    assert out.shape == (2, 3, 16 * 2 ** (g // 2))
    np.testing.assert_allclose(out, want_p[g], rtol=0, atol=1e-5)
  got32, _ = fwd()(params, imgs, p)
  np.testing.assert_allclose(np.asarray(got32), want, rtol=0, atol=1e-5)
  kv = model.clone(kv_only=True)
  with pytest.raises(ValueError, match="kv_only"):
    kv.apply({"params": params}, imgs, p)


def test_official_window_batch_order_is_matched_for_one_image():
  # The official code pairs windows and prompts in mismatched orders (see
  # the module docstring). For one image that is exactly our semantics; for
  # more it mixes prompt outputs across images, which we do not reproduce.
  params = tiny_params()
  model = swin.SwinTransformer(**TINY, num_classes=5)
  p = _big(
    swin.init_prompts(
      jax.random.key(3), model, num_prompts=3, variant="shallow"
    )
  )
  one = images(1, seed=2)
  a, _ = numpy_vpt_swin(params, one, p, TINY, official_order=True)
  b, _ = numpy_vpt_swin(params, one, p, TINY)
  np.testing.assert_array_equal(a, b)
  two = images(2, seed=2)
  a, _ = numpy_vpt_swin(params, two, p, TINY, official_order=True)
  b, _ = numpy_vpt_swin(params, two, p, TINY)
  assert np.abs(a - b).max() > 1e-6  # batch-size artefact of the original
  got, _ = fwd()(params, two, p)
  np.testing.assert_allclose(np.asarray(got), b, rtol=0, atol=1e-5)
  # Ours does not depend on the batch: swapping the images swaps the rows.
  swapped, _ = fwd()(params, two[::-1], p)
  np.testing.assert_allclose(
    np.asarray(swapped)[::-1], np.asarray(got), atol=1e-6
  )


def test_prompt_paths_and_kv_cache_agree_in_forward_and_gradients():
  # Three blocks: shifted windows in block 1, patch merging, last block 2.
  two = dict(depths=(2, 1), num_heads=(1, 2))
  cfg = {**TINY, **two}
  params = tiny_params(**two)
  frozen, head = vit.split_head(params)
  imgs = jnp.asarray(images(4, seed=3))
  labels = jnp.array([0, 1, 2, 3])
  ref = swin.SwinTransformer(**cfg, num_classes=5)
  p = _big(
    swin.init_prompts(jax.random.key(4), ref, num_prompts=(2, 0, 3)), 3.0
  )

  def loss(trainable, model):
    logits = model.apply(
      {"params": vit.merge_head(frozen, trainable["head"])},
      imgs,
      trainable["prompts"],
    )
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels
    ).mean()

  results = {}
  for path in ("full", "kv"):
    m = ref.clone(**vit.path_overrides(path))
    vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    results[path] = vg({"prompts": p, "head": head}, m)
  (ref_loss, ref_grad), (val, grad) = results["full"], results["kv"]
  np.testing.assert_allclose(float(val), float(ref_loss), rtol=1e-5)
  for a, b in zip(
    jax.tree_util.tree_leaves(grad),
    jax.tree_util.tree_leaves(ref_grad),
    strict=True,
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  for k in ("encoderblock_0", "encoderblock_2"):
    assert float(jnp.abs(ref_grad["prompts"][k]).sum()) > 0
  want, _ = numpy_vpt_swin(params, imgs, p, cfg)
  # Keys/values projected per image, and from a per-task cache: keys/values
  # for blocks 0..1, the last block's prompt tokens.
  per_image, _ = fwd(**two, **vit.path_overrides("kv_per_image"))(
    params, imgs, p
  )
  np.testing.assert_allclose(np.asarray(per_image), want, atol=1e-5)
  kv = ref.clone(kv_only=True)
  cache = swin.build_kv_cache(kv, frozen, p)
  assert cache["encoderblock_0"]["value"].shape == (2, 1, 16)
  assert cache["encoderblock_1"]["key"].shape == (0, 1, 16)
  assert cache["encoderblock_2"].shape == (3, 32)
  got, _ = fwd(**two, kv_only=True)(params, imgs, cache)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  with pytest.raises(ValueError, match="kv_only"):
    ref.apply({"params": params}, imgs, cache)


def test_kv_path_with_prompt_dropout_equals_full():
  params = tiny_params(**TWO)
  imgs = jnp.asarray(images(3, seed=4))
  ref = swin.SwinTransformer(
    **{**TINY, **TWO}, num_classes=5, prompt_dropout=0.5
  )
  p = swin.init_prompts(jax.random.key(5), ref, num_prompts=3)

  def train_fwd(kv_only):
    m = ref.clone(kv_only=kv_only)
    return jax.jit(
      lambda rng: m.apply(
        {"params": params}, imgs, p, train=True, rngs={"dropout": rng}
      )
    )

  full, kv = train_fwd(False), train_fwd(True)
  a, b = full(jax.random.key(7)), kv(jax.random.key(7))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  assert np.abs(np.asarray(a - full(jax.random.key(8)))).max() > 1e-4


def test_bfloat16_compute_stays_close_to_float32():
  params = tiny_params(**TWO)
  imgs = images(2, seed=5)
  model = swin.SwinTransformer(**{**TINY, **TWO}, num_classes=5)
  p = swin.init_prompts(jax.random.key(6), model, num_prompts=2)
  want, _ = numpy_vpt_swin(params, imgs, p, {**TINY, **TWO})
  got, _ = fwd(**TWO, kv_only=True, dtype=jnp.bfloat16)(params, imgs, p)
  # Parameters stay float32 (the same tree serves both); the logits are
  # float32 from the head.
  rel = np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)
  assert float(rel) < 2e-2, float(rel)


def test_prompt_tree_and_image_errors_are_named():
  params = tiny_params()
  model = swin.SwinTransformer(**TINY, num_classes=5)
  imgs = jnp.ones((1, IMAGE, IMAGE, 3))
  p = swin.init_prompts(jax.random.key(0), model, num_prompts=1)
  del p["encoderblock_5"]
  with pytest.raises(ValueError, match="encoderblock_5"):
    model.apply({"params": params}, imgs, p)
  p = swin.init_prompts(jax.random.key(0), model, num_prompts=1)
  p["encoderblock_2"] = jnp.zeros((1, 16))
  with pytest.raises(ValueError, match="encoderblock_2 has width 16.*32"):
    model.apply({"params": params}, imgs, p)
  with pytest.raises(ValueError, match="not a multiple of"):
    model.apply({"params": params}, jnp.ones((1, 40, 40, 3)))


def test_condense_on_swin_gives_ragged_stage_counts_and_exact_logits():
  params = tiny_params(**TWO)
  frozen, head = vit.split_head(params)
  cfg = {**TINY, **TWO}
  model = swin.SwinTransformer(**cfg, num_classes=5, kv_only=True)
  prompts = _big(swin.init_prompts(jax.random.key(8), model, num_prompts=4))
  rng = np.random.default_rng(3)
  batch = {
    "image": images(4, seed=6),
    "label": rng.integers(0, 5, 4).astype(np.int32),
    "mask": np.ones(4, bool),
  }
  scores = condense.importance_scores(model, frozen, head, prompts, [batch])
  assert [len(scores[f"encoderblock_{g}"]) for g in range(4)] == [4] * 4
  small, idx = condense.condense(prompts, scores, keep=7)
  counts = pr.prompts_per_layer(small)
  assert sum(counts) == 7 and len(set(counts)) > 1  # ragged
  for g in range(4):  # widths still follow the stages
    assert small[f"encoderblock_{g}"].shape[-1] == model.prompt_widths()[g]
  fwd = jax.jit(lambda p, x: model.apply({"params": params}, x, p))
  got = np.asarray(fwd(small, batch["image"]))
  want, _ = numpy_vpt_swin(params, batch["image"], small, cfg)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  per_layer, _ = condense.condense(prompts, scores, keep=0.5, scope="per_layer")
  assert pr.prompts_per_layer(per_layer) == (2,) * 4


def test_prompt_files_record_and_check_the_swin_backbone(tmp_path):
  params = tiny_params()
  frozen, head = vit.split_head(params)
  model = swin.SwinTransformer(**TINY, num_classes=5)
  p = swin.init_prompts(
    jax.random.key(9), model, num_prompts=(1, 2, 0, 3, 1, 2)
  )
  small = pr.gather_prompts(p, [[0], [1], [], [2, 0], [], [1]])
  assert pr.prompts_per_layer(small) == (1, 1, 0, 2, 0, 1)
  pr.save_prompts(tmp_path / "t.npz", small, head, backbone=frozen)
  loaded, h, meta = pr.load_prompts(tmp_path / "t.npz", backbone=frozen)
  assert meta["backbone"]["arch"] == "swin"
  assert meta["backbone"]["widths"] == [16, 16, 32, 32, 64, 64]
  for k in small:
    np.testing.assert_array_equal(loaded[k], small[k])
  np.testing.assert_array_equal(h["kernel"], head["kernel"])
  other = jax.tree_util.tree_map(lambda a: a + 1.0, frozen)
  with pytest.raises(pr.PromptFileError, match="fingerprint"):
    pr.load_prompts(tmp_path / "t.npz", backbone=other)
  two = vit.split_head(tiny_params(**TWO))[0]
  with pytest.raises(pr.PromptFileError, match="6 prompt layers vs 4"):
    pr.load_prompts(tmp_path / "t.npz", backbone=two, check_fingerprint=False)
  bad = dict(small, encoderblock_3=jnp.zeros((2, 16)))
  pr.save_prompts(tmp_path / "b.npz", bad)
  with pytest.raises(pr.PromptFileError, match="encoderblock_3 width 16"):
    pr.load_prompts(tmp_path / "b.npz", backbone=frozen)


def test_swin_gmacs():
  b = dict(embed_dim=128, depths=(2, 2, 18, 2), window_size=7, image_size=224)
  # Swin-B at 224 px: 15.4 GFLOPs (multiply-accumulates) as published.
  for count in flops.SWIN_COUNTS:
    assert flops.swin_gmacs(**b, count=count) == pytest.approx(15.43, abs=5e-3)
  naive, full, kv = (
    flops.swin_gmacs(**b, prompts_per_layer=50, count=c)
    for c in ("naive", "full", "kv")
  )
  assert kv < full < naive
  dims = flops.swin_dims(swin.create_model("swin_b"), 224)
  assert flops.swin_gmacs(**dims, prompts_per_layer=50) == naive
  # By hand: 8 px, patch 2 (4 x 4 grid), width 4, windows 2 x 2, two blocks
  # with one prompt each: patch 768, per block 3072 (QKV, out, MLP) + 640
  # (image attention); prompts naive 544, full 352 per block; kv 32 (K/V)
  # in block 0 and the full 352 in the last block.
  t = dict(embed_dim=4, depths=(2,), window_size=2, image_size=8, patch_size=2)
  want = {"naive": 9280, "full": 8896, "kv": 8576}
  for count, macs in want.items():
    got = flops.swin_gmacs(**t, prompts_per_layer=1, count=count)
    assert got == pytest.approx(macs / 1e9, rel=1e-12), count
  with pytest.raises(ValueError, match="VPT-Deep"):
    flops.swin_gmacs(**t, variant="shallow", count="kv")
  with pytest.raises(ValueError, match="3 entries for 2 blocks"):
    flops.swin_gmacs(**t, prompts_per_layer=(1, 2, 3))
