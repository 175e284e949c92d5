"""Swin through the run pipeline: registry, cast, training, PC, vtab, preflight.

Every run uses the 32-px ``swin-testing`` Swin (widths 16/32/64, 6 blocks)
on tiny slices, so the whole module stays within seconds.
"""

import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_swin import numpy_vpt_swin
from test_vtab_pipeline import fake_prepared_eurosat

from vptpc import build, config_util, flops, preflight, train
from vptpc import prompts as pr
from vptpc.models import registry, swin, vit
from vptpc.models.levers import Levers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Compiles dominate these tests (conftest.fast_compiles).
pytestmark = pytest.mark.usefixtures("fast_compiles")


# Two one-block stages of the test Swin: every kind of parameter (patch
# embedding, block, patch merging, final norm) at a fraction of the compile.
TWO_STAGES = dict(
  swin.get_model_config("testing", depths=(1, 1), num_heads=(1, 2)).to_dict()
)


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("name,family", sorted(registry.model_rows().items()))
def test_every_registry_row_builds_its_family(name, family):
  c = config_util.base_config()
  c.model.name = name
  assert registry.model_family(name) == family
  assert config_util.problems(c) == []
  model = build.build_model(c)
  want = swin.SwinTransformer if family == "swin" else vit.VisionTransformer
  assert isinstance(model, want)


def test_registry_aliases_ambiguity_and_errors():
  assert registry.model_family("testing") == "vit"  # vit_jax's, as before
  tiny = registry.create_model("swin-testing", num_classes=3)
  assert tiny.embed_dim == 16 and tiny.prompt_widths()[-1] == 64
  for alias in ("swin_b", "Swin-B", "swin_base_patch4_window7_224.ms_in22k"):
    assert registry.create_model(alias, num_classes=3).embed_dim == 128
  c = config_util.base_config()
  c.model.name = "swin_z"
  (msg,) = config_util.problems(c)
  assert "config.model.name='swin_z'" in msg and "Swin-B" in msg
  assert "B/16" in msg
  c.model.name = "swin_b"
  c.model.attention_impl = "cudnn"
  text = "\n".join(config_util.problems(c))
  assert "config.model.attention_impl='cudnn'" in text
  assert "cudnn_multiple" not in text and "kv_stacked" not in text
  c.model.kv_stacked = True
  assert "config.model.kv_stacked=True" in "\n".join(config_util.problems(c))
  with pytest.raises(ValueError, match="attention_impl"):
    build.build_model(c)
  # The ViT's levers as an object: refused for a Swin, named the same way.
  with pytest.raises(ValueError, match="config.model.cudnn_multiple=2"):
    registry.create_model("swin-testing", num_classes=3, levers=Levers("", 2))


def test_cast_backbone_keeps_swin_bf16_logits_bit_identical():
  model = swin.SwinTransformer(
    **{**TWO_STAGES, "num_classes": 4, "kv_only": True},
    dtype=jnp.bfloat16,
  )
  params = swin.init_params(model, jax.random.key(0), 32)
  frozen, head = vit.split_head(params)
  cast = registry.cast_backbone(model, frozen, jnp.bfloat16)
  flat = {
    "/".join(getattr(k, "key", str(k)) for k in p): x.dtype
    for p, x in jax.tree_util.tree_leaves_with_path(cast)
  }
  assert flat["norm/scale"] == flat["patch_embed/norm/bias"] == jnp.float32
  assert flat["layers_1/downsample/norm/scale"] == jnp.float32
  assert flat["layers_0/blocks_0/norm2/scale"] == jnp.float32
  assert flat["layers_0/blocks_0/attn/relative_position_bias_table"] == (
    jnp.float32
  )
  assert flat["layers_0/blocks_0/attn/qkv/kernel"] == jnp.bfloat16
  assert flat["patch_embed/proj/kernel"] == jnp.bfloat16
  prompts = registry.init_prompts(jax.random.key(1), model, num_prompts=3)
  x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
  fwd = jax.jit(
    lambda f, p: model.apply({"params": vit.merge_head(f, head)}, x, p)
  )
  np.testing.assert_array_equal(fwd(cast, prompts), fwd(frozen, prompts))


# ------------------------------------------------- vtab, training and PC


def test_vtab_swin_smoke_with_pc_through_main_then_device_data(tmp_path):
  """configs/vtab.py with model=swin_b and PC through vptpc.main (mock data).

  The run (``parallel=auto``: pmap over the 8 CPU devices, host data)
  trains, scores, condenses and fine-tunes; then the same first stage under
  jit on device data (one scan per epoch) must end with the same prompts.
  """
  import tensorflow_datasets as tfds
  from absl import flags

  from vptpc import main as entry

  data_dir = fake_prepared_eurosat(tmp_path)
  work = tmp_path / "work"
  cfg = os.path.join(ROOT, "configs", "vtab.py")
  arg = (
    "task=eurosat,model=swin_b,smoke,mode=single,condense_keep=0.5,"
    f"data_dir={data_dir}"
  )
  with tfds.testing.mock_data(num_examples=12):
    entry._parse_flags(
      [
        "vptpc.main",
        f"--config={cfg}:{arg}",
        f"--workdir={work}",
      ]
    )
    entry.main(["vptpc.main"])
    c = flags.FLAGS.config
    flags.FLAGS.unparse_flags()
    dev_c = config_util.load_config(f"{cfg}:{arg}")
    dev_c.parallel = "jit"
    dev_c.condense.keep = 0.0
    dev = train.train_stage(dev_c, str(tmp_path / "dev"), quiet=True)
  stored = json.loads((work / "config.json").read_text())
  assert stored["model"]["name"] == "swin-testing"
  assert stored["data"]["image_size"] == 32
  res = json.loads((work / "results.json").read_text())
  full_dir = work / "full"
  assert json.loads((full_dir / "results.json").read_text())["step"] == 2
  # Host data (the run's first stage) and device data: the same prompts.
  full_p, full_h, meta = pr.load_prompts(full_dir / "prompts.npz")
  dev_p, _, _ = pr.load_prompts(dev["export"])
  assert meta["backbone"]["widths"] == [16, 16, 32, 32, 64, 64]
  for k in full_p:
    np.testing.assert_allclose(full_p[k], dev_p[k], rtol=0, atol=1e-6)
  assert dev["eval_accuracy"] == res["full"]["eval_accuracy"]
  # PC: ragged per-block counts, widths still following the stages, saved
  # with the backbone's fingerprint.
  model = build.build_model(c)
  backbone, _ = build.load_backbone(c, model)
  cond_p, _, meta = pr.load_prompts(
    work / "condensed" / "prompts.npz", backbone=backbone
  )
  counts = res["condensed"]["prompts_per_layer"]
  assert res["full"]["prompts_per_layer"] == [2] * 6
  assert sum(counts) == 6 and len(set(counts)) > 1, counts
  assert counts == [len(res["kept_indices"][k]) for k in pr.layer_keys(cond_p)]
  for g, w in enumerate(model.prompt_widths()):
    assert cond_p[f"encoderblock_{g}"].shape == (counts[g], w)
  assert meta["backbone"]["arch"] == "swin" and meta["variant"] == "deep"
  # The reported FLOPs are Swin's (swin_gmacs), both conventions.
  dims = flops.swin_dims(model, 32)
  for key, count in (("gflops_naive", "naive"), ("gflops_kv", "kv")):
    want = flops.swin_gmacs(**dims, prompts_per_layer=counts, count=count)
    assert res["condensed"][key] == pytest.approx(want)
  assert res["condensed"]["gflops_naive"] < res["full"]["gflops_naive"]
  # The full model with the dropped prompts removed (the kept indices of the
  # full export), through the run's kv_only Swin, is the official
  # semantics' condensed forward (NumPy, float64).
  kept = pr.gather_prompts(full_p, res["kept_indices"])
  params = vit.merge_head(backbone, full_h)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  # jit: the eager Swin forward takes longer than its compile.
  got = jax.jit(lambda p, k: model.apply({"params": p}, x, k))(params, kept)
  want, _ = numpy_vpt_swin(params, x, kept, swin.get_model_config("testing"))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_setup_swin_token_init_and_standardized_prelogits(data_dir):
  from test_train import tiny_config

  c = tiny_config("epochs=1,num_prompts=2,parallel=jit")
  c.model.name = registry.SWIN_TESTING
  # The vtab smoke run's model (10 classes): its jitted initialisers are
  # reused (build._init_fn caches them per model), so only the feature and
  # token programs compile here.
  c.data.num_classes = 10
  c.data.data_dir = data_dir
  c.data.train_split = "train[:16]"
  c.eval_batch_size = 16
  c.prompt.init = "tokens"
  c.prompt.init_images = 2
  c.model.prelogit_norm = "standardize"
  c.model.prelogit_norm_images = 16
  s = build.setup(c)
  head = s.state.trainable["head"]
  # Prompts are block inputs of the stage's width (Swin's top-level
  # intermediates), drawn from the un-standardised backbone's pools.
  pools = build.token_pools(
    s.model, vit.merge_head(s.checkpoint_backbone, head), s.train, c
  )
  for g, w in enumerate(s.model.prompt_widths()):
    p = np.asarray(s.state.trainable["prompts"][f"encoderblock_{g}"])
    pool = np.asarray(pools[f"encoderblock_{g}"])
    assert p.shape == (2, w) and pool.shape[0] == 2 * (256 >> (2 * (g // 2)))
    assert all(np.abs(pool - row).max(-1).min() == 0 for row in p)
  # The stats folded into Swin's final `norm` standardise the pooled
  # features of the same images.
  assert "Transformer" not in s.frozen
  mean, std = build.prelogit_stats(
    s.model, vit.merge_head(s.frozen, head), s.train, c
  )
  np.testing.assert_allclose(mean, 0, atol=1e-4)
  np.testing.assert_allclose(std, 1, atol=1e-3)


def _vtab(arg):
  spec = importlib.util.spec_from_file_location(
    "vtab_cfg", os.path.join(ROOT, "configs", "vtab.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_vtab_swin_config_and_missing_weights_fail_fast(tmp_path):
  c = _vtab("task=dtd,model=swin_b")
  assert c.model.name == "swin_base_patch4_window7_224"
  assert c.model.checkpoint_path == (
    "swin_base_patch4_window7_224.ms_in22k.safetensors"
  )
  assert c.data.image_size == 224 and c.data.normalize == "imagenet"
  assert c.model.kv_only and c.prompt.variant == "deep"
  same = _vtab("task=dtd,model=swin_base_patch4_window7_224")
  assert same.model.to_dict() == c.model.to_dict()
  assert _vtab("task=dtd").model.checkpoint_path == "imagenet21k_ViT-B_16.npz"
  with pytest.raises(ValueError, match="checkpoint=PATH"):
    _vtab("task=dtd,model=L/16")
  # Weights and data absent: both named, nothing written, in well under 1 s.
  c.model.checkpoint_path = str(tmp_path / "swin.safetensors")
  c.data.data_dir = str(tmp_path / "tfds")
  before = sorted(os.listdir(tmp_path))
  t0 = time.perf_counter()
  with pytest.raises(preflight.PreflightError) as e:
    preflight.check(c, str(tmp_path / "w"))
  assert time.perf_counter() - t0 < 3
  text = str(e.value)
  assert "swin.safetensors' does not exist" in text
  assert "timm/swin_base_patch4_window7_224.ms_in22k" in text
  assert "python -m vptpc.prepare --tasks=dtd" in text
  assert sorted(os.listdir(tmp_path)) == before
  # A damaged header, a ViT file for a Swin, and a .npz for a Swin.
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\xff" * 64)
  (msg,) = preflight.checkpoint_problems(str(bad), "swin_b")
  assert "not a readable .safetensors" in msg
  vit_file = tmp_path / "vit.safetensors"
  header = json.dumps(
    {
      "blocks.0.norm1.weight": {
        "dtype": "F32",
        "shape": [1],
        "data_offsets": [0, 4],
      }
    }
  ).encode()
  vit_file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
  (msg,) = preflight.checkpoint_problems(str(vit_file), "swin_b")
  assert "is a timm ViT checkpoint" in msg and "names a Swin" in msg
  assert preflight.checkpoint_problems(str(vit_file), "B/16") == []
  npz = tmp_path / "x.npz"
  npz.write_bytes(b"PK")
  (msg,) = preflight.checkpoint_problems(str(npz), "swin_b")
  assert "timm .safetensors" in msg


def test_swin_vmapped_grid_equals_separate_runs(tmp_path, data_dir):
  from test_train import tiny_config

  from vptpc import sweep

  def cfg():
    c = tiny_config("epochs=1,num_prompts=2,parallel=jit")
    c.model.name = registry.SWIN_TESTING
    c.data.num_classes = 10  # the smoke run's model: its inits are cached
    c.data.data_dir = data_dir
    c.data.train_split = "train[:32]"
    c.data.eval_split = "test[:16]"
    c.batch_size = c.eval_batch_size = 16
    c.warmup_epochs = 0
    return c

  members = [(1.0, 1e-2), (0.1, 0.0)]
  grid = sweep.train_grid_chunked(cfg(), members, chunk=2)
  lr, wd = members[1]
  c = cfg()
  c.base_lr, c.weight_decay = lr, wd
  res = train.train_stage(c, str(tmp_path / "alone"), quiet=True)
  prompts, head, _ = pr.load_prompts(res["export"])
  assert [p.shape[-1] for p in prompts.values()] == list(
    registry.create_model(
      registry.SWIN_TESTING, num_classes=None
    ).prompt_widths()
  )
  for a, b in zip(
    jax.tree_util.tree_leaves({"prompts": prompts, "head": head}),
    jax.tree_util.tree_leaves(grid[1]["trainable"]),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  a, b = grid[0]["trainable"]["head"], grid[1]["trainable"]["head"]
  assert np.abs(a["kernel"] - b["kernel"]).max() > 1e-4
