"""Every fast path computes what the plain path computes.

The model's levers (`vptpc.models.levers`: cuDNN attention's padding, the
stacked prompt keys and values; the bf16-resident backbone), the on-device
data path (same batches, same order, same crops;
same final prompts), the scanned epoch, and the per-process caches that let
seeds and grid chunks share reads and compiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SIZE, TINY
from flax import linen as nn
from PIL import Image
from test_train import tiny_config

from vptpc import build, checkpoint, npz_checkpoint, runner, sweep, train
from vptpc import prompts as pr
from vptpc.data import device as device_data
from vptpc.data import pipeline
from vptpc.models import levers, vit
from vptpc.models.levers import Levers


def _prompts(n=3, layers=3, width=32):
  return pr.init_prompts(
    jax.random.key(1),
    num_prompts=n,
    hidden_size=width,
    patch_size=8,
    num_layers=layers,
  )


def _images(b=4):
  return jax.random.normal(jax.random.key(2), (b, IMAGE_SIZE, IMAGE_SIZE, 3))


# ----------------------------------------------------------------- model


def test_bf16_resident_backbone_is_bit_identical(tiny_params):
  model = vit.VisionTransformer(
    **TINY, num_classes=5, kv_only=True, dtype=jnp.bfloat16
  )
  frozen, head = vit.split_head(tiny_params)
  cast = vit.cast_backbone(frozen, jnp.bfloat16)
  p, x = _prompts(), _images()
  a = model.apply({"params": tiny_params}, x, p)
  b = model.apply({"params": vit.merge_head(cast, head)}, x, p)
  np.testing.assert_array_equal(a, b)
  enc = cast["Transformer"]
  # LayerNorms stay float32 (applied in float32); matmul weights are bf16.
  assert enc["encoder_norm"]["scale"].dtype == jnp.float32
  assert enc["encoderblock_0"]["LayerNorm_0"]["scale"].dtype == jnp.float32
  mlp = enc["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert mlp.dtype == jnp.bfloat16
  assert vit.cast_backbone(frozen, jnp.float32) == frozen


def test_cudnn_padding_and_lengths_give_exact_attention(monkeypatch):
  # cuDNN exists only on NVIDIA GPUs; the padding and length masking around
  # it are checked here through XLA's implementation of the same call.
  real = jax.nn.dot_product_attention
  seen = {}

  def xla_instead(q, k, v, **kw):
    seen.update(kw, shapes=(q.shape, k.shape))
    kw["implementation"] = "xla"
    return real(q, k, v, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 11, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 11, 2, 8)), jnp.float32)
  want = levers.attention(q, k, v, implementation="matmul")
  got = levers.attention(q, k, v, implementation="cudnn")
  assert seen["shapes"] == ((2, 8, 2, 8), (2, 16, 2, 8))  # padded to 8
  np.testing.assert_array_equal(seen["query_seq_lengths"], [5, 5])
  np.testing.assert_array_equal(seen["key_value_seq_lengths"], [11, 11])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def loss(impl):
    return lambda q, k, v: (
      levers.attention(q, k, v, implementation=impl) ** 2
    ).sum()

  ga = jax.grad(loss("matmul"), argnums=(0, 1, 2))(q, k, v)
  gb = jax.grad(loss("cudnn"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ga, gb, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _xla_for_cudnn(monkeypatch):
  """Runs ``implementation="cudnn"`` calls through XLA's (CPU has no cuDNN)."""
  real = jax.nn.dot_product_attention
  seen = []

  def xla_instead(q, k, v, **kw):
    seen.append((q.shape, k.shape, kw.get("key_value_seq_lengths"), sorted(kw)))
    kw["implementation"] = "xla"
    return real(q, k, v, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
  return seen


@pytest.mark.parametrize("n_prompts", [0, 3])
@pytest.mark.parametrize("impl", ["matmul", "xla", "cudnn"])
def test_tokens_padded_once_equal_the_unpadded_model(
  tiny_params, monkeypatch, impl, n_prompts
):
  seen = _xla_for_cudnn(monkeypatch)
  plain = vit.VisionTransformer(
    **TINY, num_classes=5, kv_only=True, levers=Levers("matmul", pad_tokens=1)
  )
  padded = vit.VisionTransformer(
    **TINY, num_classes=5, kv_only=True, levers=Levers(impl, pad_tokens=8)
  )
  p = _prompts(n=n_prompts) if n_prompts else None
  x = _images()
  a = plain.apply({"params": tiny_params}, x, p)
  b = padded.apply({"params": tiny_params}, x, p)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  if impl == "cudnn":
    # 17 tokens padded once to 24: no query pads in the first two blocks,
    # keys 24 + prompts padded to 8, the valid length excluding both pads.
    assert seen[0][0][1] == 24
    assert seen[0][1][1] == _round8(24 + n_prompts)
    np.testing.assert_array_equal(seen[0][2], [17 + n_prompts] * 4)
  if not n_prompts:
    return

  _assert_prompt_grads_equal(plain, padded, tiny_params, x, p)


def _assert_prompt_grads_equal(model_a, model_b, params, x, p):
  """Both models' prompt gradients agree to float32 rounding."""

  def grads(model):
    def f(q):
      return (model.apply({"params": params}, x, q) ** 2).sum()

    # One compile, not one per operation: eager autodiff of these models
    # dominated this file's time.
    return jax.jit(jax.grad(f))(p)

  ga, gb = grads(model_a), grads(model_b)
  for k in ga:  # float32 rounding, relative to the gradient's scale
    scale = float(np.abs(ga[k]).max())
    np.testing.assert_allclose(ga[k], gb[k], rtol=1e-4, atol=1e-6 * scale)


def _round8(n):
  return -(-n // 8) * 8


@pytest.mark.parametrize("n_prompts", [0, 3, 4])
@pytest.mark.parametrize("multiple", [1, 2])
def test_cudnn_multiple_pads_to_its_multiple_only(
  tiny_params, monkeypatch, n_prompts, multiple
):
  # 17 tokens: 2 pads them once to 18 and the keys (18 + prompts) only when
  # odd; 1 pads nothing, so cuDNN gets no lengths (no mask at all).
  seen = _xla_for_cudnn(monkeypatch)
  plain = vit.VisionTransformer(
    **TINY, num_classes=5, kv_only=True, levers=Levers("matmul", pad_tokens=1)
  )
  model = vit.VisionTransformer(
    **TINY, num_classes=5, kv_only=True, levers=Levers("cudnn", multiple)
  )
  p = _prompts(n=n_prompts) if n_prompts else None
  x = _images()
  a = plain.apply({"params": tiny_params}, x, p)
  b = model.apply({"params": tiny_params}, x, p)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  if multiple == 2:
    assert seen[0][0][1] == 18
    assert seen[0][1][1] == 18 + n_prompts + n_prompts % 2
    np.testing.assert_array_equal(seen[0][2], [17 + n_prompts] * 4)
  else:
    assert (seen[0][0][1], seen[0][1][1]) == (17, 17 + n_prompts)
    assert seen[0][2] is None
  # jax checks even lengths in training only when a bias (or a boolean
  # mask, which it turns into one) reaches cuDNN; this path passes neither.
  assert all(not ({"bias", "mask"} & set(kw)) for *_, kw in seen)
  if not n_prompts:
    return

  _assert_prompt_grads_equal(plain, model, tiny_params, x, p)


def test_stacked_prompt_keys_values_equal_per_block(tiny_params, monkeypatch):
  calls = []
  real = levers.stacked_kv
  monkeypatch.setattr(
    levers,
    "stacked_kv",
    lambda params, ps, **kw: calls.append(len(ps)) or real(params, ps, **kw),
  )
  kw = dict(TINY, num_classes=5, kv_only=True)
  plain = vit.VisionTransformer(**kw)
  stacked = vit.VisionTransformer(**kw, levers=Levers(kv_stacked=True))
  p, x = _prompts(), _images()
  a = plain.apply({"params": tiny_params}, x, p)
  assert not calls
  b = stacked.apply({"params": tiny_params}, x, p)
  assert calls == [TINY["num_layers"]]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  _assert_prompt_grads_equal(plain, stacked, tiny_params, x, p)
  # Vmapped as the grid runs members: prompts mapped, images shared.
  members = jax.tree.map(lambda t: jnp.stack([t, 0.5 * t]), p)
  va = jax.jit(jax.vmap(lambda q: plain.apply({"params": tiny_params}, x, q)))(
    members
  )
  vb = jax.jit(
    jax.vmap(lambda q: stacked.apply({"params": tiny_params}, x, q))
  )(members)
  np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5)


def test_stacked_prompt_keys_values_are_two_matmuls_for_all_blocks(
  tiny_params,
):
  # What the lever is for: 2 prompt projections per step instead of 2 per
  # block, in the forward pass and in its gradient.
  kw = dict(TINY, num_classes=5, kv_only=True)
  p, x = _prompts(), _images()

  def dots(model, grad):
    def f(q):
      return model.apply({"params": tiny_params}, x, q).sum()

    jaxpr = jax.make_jaxpr(jax.grad(f) if grad else f)(p)
    return str(jaxpr).count("dot_general")

  layers = TINY["num_layers"]
  for grad, per_projection in ((False, 1), (True, 2)):
    plain = dots(vit.VisionTransformer(**kw), grad)
    stacked = dots(
      vit.VisionTransformer(**kw, levers=Levers(kv_stacked=True)), grad
    )
    assert plain - stacked == 2 * per_projection * (layers - 1)


def test_stacked_prompt_keys_values_fall_back_per_block(tiny_params):
  # Ragged counts (a condensed tree) and per-example dropout run per block,
  # with the same dropout masks as without the lever.
  kw = dict(TINY, num_classes=5, kv_only=True)
  p, x = _prompts(n=4), _images()
  ragged = dict(p, encoderblock_1=p["encoderblock_1"][:2])
  for model_kw, tree, is_train in (
    ({}, ragged, False),
    ({"prompt_dropout": 0.5}, p, True),
  ):
    plain = vit.VisionTransformer(**kw, **model_kw)
    stacked = vit.VisionTransformer(
      **kw, **model_kw, levers=Levers(kv_stacked=True)
    )
    rngs = {"dropout": jax.random.key(3)}
    kw_apply = dict(train=is_train, rngs=rngs)
    a = plain.apply({"params": tiny_params}, x, tree, **kw_apply)
    b = stacked.apply({"params": tiny_params}, x, tree, **kw_apply)
    np.testing.assert_array_equal(a, b)
    if is_train:  # the masks drew from the rng: not the no-dropout logits
      c = plain.apply({"params": tiny_params}, x, tree)
      assert not np.allclose(a, c)


def test_padded_tokens_with_a_masked_kv_cache(tiny_params):
  # Multi-task serving: per-example prompt masks and once-padded tokens.
  frozen, _ = vit.split_head(tiny_params)
  p = _prompts(n=4)
  cache = vit.build_kv_cache(frozen, p, TINY["num_heads"])
  mask = jnp.array([[True, True, False, True]] * 4)
  cache = {k: dict(c, mask=mask) for k, c in cache.items()}
  kept = {k: v[jnp.array([0, 1, 3])] for k, v in p.items()}
  x = _images()
  want = vit.VisionTransformer(**TINY, num_classes=5, kv_only=True).apply(
    {"params": tiny_params}, x, kept
  )
  got = vit.VisionTransformer(
    **TINY, num_classes=5, kv_only=True, levers=Levers(pad_tokens=8)
  ).apply({"params": tiny_params}, x, cache)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _assert_is_flax_exact_gelu(fn, x, atol):
  """``fn`` and its gradient are ``nn.gelu(approximate=False)``'s, in float32.

  To rounding: 1 + erf loses the far negative tail's digits, absolute
  errors of float32 epsilon times |x|.
  """
  np.testing.assert_allclose(
    fn(x), nn.gelu(x, approximate=False), rtol=1e-6, atol=atol
  )
  np.testing.assert_allclose(
    jax.grad(lambda x: fn(x).sum())(x),
    jax.grad(lambda x: nn.gelu(x, approximate=False).sum())(x),
    rtol=1e-5,
    atol=1e-6,
  )


def test_removed_levers_config_keys_warn_and_change_nothing():
  from vptpc import config_util

  a, c = tiny_config(), tiny_config()
  # An older run's config.json: accepted, compared as equal, one program.
  c.model.fuse_qkv, c.model.gelu_vjp, c.model.ln_vjp = True, "on", "off"
  with pytest.warns(DeprecationWarning, match="model.gelu_vjp='on'"):
    m = build.build_model(c)
  assert m == build.build_model(a)
  assert build.program_key(a, 3) == build.program_key(c, 3)
  assert config_util.changed_keys(c.to_dict(), a.to_dict()) == ([], [])
  assert config_util.problems(c) == []


def test_former_lever_fields_map_into_levers_with_a_warning():
  from vptpc.models import registry

  want = registry.create_model(
    "tiny32", num_classes=3, levers=Levers("xla", 2, True)
  )
  with pytest.warns(DeprecationWarning, match=r"levers=Levers\(attention_"):
    got = registry.create_model(
      "tiny32",
      num_classes=3,
      attention_impl="xla",
      cudnn_multiple=2,
      kv_stacked=True,
    )
  assert got == want
  with pytest.warns(DeprecationWarning, match="gelu_vjp was removed"):
    got = vit.create_model("tiny32", num_classes=3, gelu_vjp=True)
  assert got == vit.create_model("tiny32", num_classes=3)
  with pytest.warns(DeprecationWarning, match="levers.CUDNN_PAD"):
    assert vit.CUDNN_PAD == levers.CUDNN_PAD


def test_unmeasured_levers_are_config_keys_off_by_default():
  from vptpc import config_util

  c = tiny_config()
  assert (c.model.cudnn_multiple, c.model.kv_stacked) == (0, False)
  assert build.build_model(c).levers == Levers()
  c.model.cudnn_multiple, c.model.kv_stacked = 2, True
  m = build.build_model(c)
  assert m.levers == Levers(cudnn_multiple=2, kv_stacked=True)
  c.model.cudnn_multiple = -2
  (msg,) = config_util.problems(c)
  assert "config.model.cudnn_multiple" in msg and "-2" in msg
  assert {"model.cudnn_multiple", "model.kv_stacked"} <= set(
    config_util.SAFE_TO_CHANGE
  )


def test_patch_embedding_equals_the_strided_convolution():
  emb = vit.PatchEmbedding(16, 8)
  x = _images()
  params = emb.init(jax.random.key(0), x)["params"]
  params = dict(params, bias=jnp.linspace(-1, 1, 16))
  conv = nn.Conv(16, (8, 8), strides=(8, 8), padding="VALID")
  want = conv.apply({"params": params}, x)
  np.testing.assert_allclose(
    emb.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5
  )
  # nn.Conv's parameter shapes, so vit_jax and timm checkpoints load.
  conv_shapes = jax.tree.map(
    jnp.shape, conv.init(jax.random.key(0), x)["params"]
  )
  assert jax.tree.map(jnp.shape, params) == conv_shapes


def test_cudnn_attention_traces_under_a_vmapped_grid_step():
  # cuDNN's batching rule folds the mapped axis into every operand's batch
  # axis; in the vmapped grid the queries of block 0 are not mapped (shared
  # images) while its keys are (each member's prompts). The trace below
  # runs that rule on CPU, with cuDNN's version checks stubbed.
  fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  if not hasattr(fa, "check_cudnn_version"):
    pytest.skip("this jax has no cuDNN version check to stub")
  mp = pytest.MonkeyPatch()
  mp.setattr(fa, "check_cudnn_version", lambda: 91000)
  mp.setattr(fa, "check_compute_capability", lambda c: True)
  try:
    q = jnp.ones((2, 17, 2, 8), jnp.bfloat16)
    k = jnp.ones((3, 2, 20, 2, 8), jnp.bfloat16)

    def loss(k, q):
      return levers.attention(
        q, k, k, implementation="cudnn", kv_valid=19
      ).sum()

    for axes, qq in [((0, None), q), ((0, 0), jnp.stack([q] * 3))]:
      jaxpr = jax.make_jaxpr(jax.vmap(jax.grad(loss), in_axes=axes))(k, qq)
      assert "dot_product_attention" in str(jaxpr)
  finally:
    mp.undo()


@pytest.mark.parametrize(
  "backend,nvidia,dtype,want",
  [
    ("cpu", False, jnp.bfloat16, "matmul"),
    ("gpu", True, jnp.bfloat16, "cudnn"),
    ("gpu", True, jnp.float16, "cudnn"),
    ("gpu", True, jnp.float32, "xla"),  # cuDNN has no float32 kernel
    ("gpu", False, jnp.bfloat16, "xla"),  # ROCm
    ("tpu", False, jnp.bfloat16, "xla"),  # never a GPU-only kernel
  ],
)
def test_attention_default_per_backend(
  monkeypatch, backend, nvidia, dtype, want
):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(levers, "_is_nvidia", lambda: nvidia)
  assert levers.resolve_attention_impl(None, dtype) == want
  assert levers.resolve_attention_impl("", dtype) == want
  assert levers.resolve_attention_impl("xla", dtype) == "xla"


def test_unknown_attention_impl_is_named():
  with pytest.raises(ValueError, match="'flash'"):
    levers.resolve_attention_impl("flash", jnp.float32)
  with pytest.raises(ValueError, match="'flash'"):
    Levers("flash")
  with pytest.raises(ValueError, match="cudnn_multiple"):
    Levers(cudnn_multiple=-2)


# ------------------------------------------------------------------ data


def _fgvc_folder(tmp_path, n=7):
  root = tmp_path / "fgvc"
  (root / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  lines = []
  for i in range(n):
    # Different shapes: the device copy pads them to the largest.
    h, w = 20 + 3 * (i % 3), 30 - 2 * (i % 2)
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(root / f"images/{i}.png")
    lines.append(f"images/{i}.png {i % 3}")
  (root / "train.txt").write_text("\n".join(lines) + "\n")
  return root


@pytest.mark.parametrize("preprocess", ["vtab", "fgvc"])
def test_device_batches_equal_host_batches(tmp_path, preprocess):
  root = _fgvc_folder(tmp_path)
  split = pipeline.load_split(
    "x",
    "train",
    image_size=16,
    source="folder",
    folder=str(root),
    preprocess=preprocess,
    train=True,
  )
  assert split.crop == (preprocess == "fgvc")
  placed = device_data.place(split)
  gather = jax.jit(
    lambda arr, row: device_data.gather(
      arr, row, normalization="imagenet", image_size=16
    )
  )
  for epoch in (0, 3):
    host = list(
      pipeline.train_batches(
        split, batch_size=3, seed=5, epoch=epoch, normalization="imagenet"
      )
    )
    plan = device_data.epoch_plan(placed, batch_size=3, seed=5, epoch=epoch)
    assert plan["index"].shape == (3, 3)  # 7 images: 3 + 3 + 1 padded
    for s, h in enumerate(host):
      d = jax.device_get(
        gather(placed.arrays, jax.tree.map(lambda x, s=s: x[s], plan))
      )
      for key in ("image", "label", "mask"):
        np.testing.assert_array_equal(d[key], h[key])
  # A plan's slice is the same steps as the whole epoch's.
  part = device_data.epoch_plan(
    placed, batch_size=3, seed=5, epoch=3, start_step=1, stop_step=2
  )
  full = device_data.epoch_plan(placed, batch_size=3, seed=5, epoch=3)
  for key in part:
    np.testing.assert_array_equal(part[key], full[key][1:2])


def test_device_eval_plan_equals_eval_batches(tmp_path):
  root = _fgvc_folder(tmp_path)
  split = pipeline.load_split(
    "x", "train", image_size=16, source="folder", folder=str(root)
  )
  placed = device_data.place(split)
  plan = device_data.eval_plan(placed, batch_size=4)
  for s, h in enumerate(
    pipeline.eval_batches(split, batch_size=4, normalization="minus1_1")
  ):
    row = jax.tree.map(lambda x, s=s: x[s], plan)
    d = device_data.gather(
      placed.arrays, row, normalization="minus1_1", image_size=16
    )
    np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])
    np.testing.assert_array_equal(np.asarray(d["mask"]), h["mask"])


def test_uncached_split_stays_on_the_host(tmp_path):
  root = _fgvc_folder(tmp_path)
  lazy = pipeline.load_split(
    "x",
    "train",
    image_size=16,
    source="folder",
    folder=str(root),
    cache_max_gb=0.0,
  )
  assert device_data.nbytes(lazy) == 0
  with pytest.raises(ValueError, match="decoded per batch"):
    device_data.place(lazy)


def _run(tmp_path, name, data_dir, **over):
  c = tiny_config("epochs=2,parallel=jit", **{"data.data_dir": data_dir})
  c.data.train_split = "train[:200]"  # 4 steps of 64, the last padded
  c.data.eval_split = "test[:100]"
  c.checkpoint_every_steps = 3
  for k, v in over.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  res = train.train_stage(c, str(tmp_path / name), quiet=True)
  prompts, head, _ = pr.load_prompts(res["export"])
  return res, {"prompts": prompts, "head": head}


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_device_data_run_ends_with_the_host_runs_prompts(tmp_path, data_dir):
  host, p_host = _run(tmp_path, "host", data_dir, **{"data.on_device": "never"})
  scan, p_scan = _run(tmp_path, "scan", data_dir)
  step, p_step = _run(tmp_path, "step", data_dir, scan_steps=False)
  _same(p_host, p_scan)
  _same(p_host, p_step)
  assert host["eval_accuracy"] == scan["eval_accuracy"] == step["eval_accuracy"]
  assert scan["train_img_per_s"] > 0


def test_scanned_epochs_resume_mid_epoch(tmp_path, data_dir):
  c = tiny_config("epochs=2,parallel=jit", **{"data.data_dir": data_dir})
  c.data.train_split = "train[:200]"
  c.data.eval_split = "test[:100]"
  whole = train.train_stage(c, str(tmp_path / "whole"), quiet=True)
  part = train.train_stage(
    c, str(tmp_path / "cut"), quiet=True, stop_after_steps=5
  )
  assert part == {"stopped_at_step": 5}  # inside the second epoch
  rest = train.train_stage(c, str(tmp_path / "cut"), quiet=True)
  assert rest["step"] == whole["step"] == 8
  a, _, _ = pr.load_prompts(whole["export"])
  b, _, _ = pr.load_prompts(rest["export"])
  _same(a, b)


def test_grid_on_device_data_equals_grid_on_host_data(data_dir):
  def cfg(**over):
    c = tiny_config("epochs=2,num_prompts=2,parallel=jit")
    c.data.data_dir = data_dir
    c.data.train_split = "train[:128]"
    c.data.eval_split = "test[:64]"
    c.warmup_epochs = 1
    c.data.on_device = over.get("on_device", "auto")
    return c

  members = [(1.0, 1e-2), (0.1, 0.0)]
  dev = sweep.train_grid(cfg(), members)
  host = sweep.train_grid(cfg(on_device="never"), members)
  assert dev[0]["timing"]["data"] == "device"
  assert host[0]["timing"]["data"] == "host"
  for a, b in zip(dev, host, strict=True):
    _same(a["trainable"], b["trainable"])
    assert a["eval_accuracy"] == b["eval_accuracy"]


# ---------------------------------------------------------------- caches


def test_seeds_share_the_read_the_decode_and_the_compile(
  tmp_path, data_dir, tiny_params, monkeypatch
):
  ckpt = tmp_path / "backbone.npz"
  npz_checkpoint.save_npz(ckpt, vit.split_head(jax.device_get(tiny_params))[0])
  reads = []
  real = checkpoint.load_pretrained
  monkeypatch.setattr(
    checkpoint,
    "load_pretrained",
    lambda *a, **k: reads.append(a[0]) or real(*a, **k),
  )
  runners = []
  real_runner = runner.Runner

  class Spy(real_runner):
    def __init__(self, *a, **k):
      super().__init__(*a, **k)
      runners.append(self)

  monkeypatch.setattr(runner, "Runner", Spy)
  splits = []
  real_split = pipeline.split_from_config
  monkeypatch.setattr(
    pipeline,
    "split_from_config",
    lambda *a, **k: splits.append(real_split(*a, **k)) or splits[-1],
  )
  for seed in (1, 2):
    _run(
      tmp_path,
      f"seed{seed}",
      data_dir,
      seed=seed,
      **{"model.checkpoint_path": str(ckpt)},
    )
  assert len(reads) == 1  # the checkpoint is read once per process
  assert splits[0] is splits[2] and splits[1] is splits[3]  # decoded once
  # The compiled steps are the same objects: the second seed compiles none.
  assert runners[0]._train_steps is runners[1]._train_steps
  assert runners[0]._eval_all is runners[1]._eval_all


def test_program_key_drops_the_seed_not_the_recipe():
  a, b = tiny_config(), tiny_config()
  b.seed = a.seed + 1
  b.data.train_split = "train[:10]"
  assert build.program_key(a, 13) == build.program_key(b, 13)
  b.base_lr = a.base_lr * 2
  assert build.program_key(a, 13) != build.program_key(b, 13)
  assert build.program_key(a, 13) != build.program_key(a, 14)
  c = tiny_config()
  c.model.kv_stacked = True
  assert build.program_key(a, 13) != build.program_key(c, 13)


def test_gelu_erf_form_is_flaxs_exact_gelu():
  x = jnp.linspace(-12.0, 12.0, 481)
  _assert_is_flax_exact_gelu(vit.gelu, x, 2e-6)
  # bfloat16: computed in float32 and rounded once, so within half a bf16
  # ulp of the float32 value (flax's bf16 form rounds every step).
  xb = x.astype(jnp.bfloat16)
  exact = nn.gelu(xb.astype(jnp.float32), approximate=False)
  got = vit.gelu(xb)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    got.astype(jnp.float32), exact, rtol=2.0**-8, atol=1e-6
  )
