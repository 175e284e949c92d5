"""Loading timm-named `.safetensors` files: parity with timm and clear errors.

The files under tests/data were written once by
benchmarks/make_timm_reference.py (torch 2.13.0+cpu, timm 1.0.31,
safetensors 0.8.0): tiny random timm models, a fixed input and the logits
timm computed for it in float64. No torch is needed here.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vptpc import checkpoint, npz_checkpoint, timm_checkpoint
from vptpc.models import swin, vit

DATA = os.path.join(os.path.dirname(__file__), "data")
SWIN_FILE = os.path.join(DATA, "timm_swin_tiny.safetensors")
VIT_FILE = os.path.join(DATA, "timm_vit_tiny.safetensors")
SWIN_CFG = dict(
  patch_size=2,
  embed_dim=8,
  depths=(2, 2, 2),
  num_heads=(1, 2, 4),
  window_size=4,
)
VIT_CFG = dict(
  patch_size=8, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32
)


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(DATA, "timm_reference.npz")) as z:
    return {k: z[k] for k in z.files}


def template(model, size=32):
  return jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, size, size, 3))
  )["params"]


def _errors(got, want):
  err = np.abs(got - want)
  return float(err.max()), float((err / np.abs(want)).max())


def test_swin_from_timm_file_matches_timm_logits(ref):
  model = swin.SwinTransformer(**SWIN_CFG, num_classes=5)
  params = checkpoint.load_pretrained(SWIN_FILE, template(model))
  got = np.asarray(jax.jit(model.apply)({"params": params}, ref["images"]))
  abs_err, rel_err = _errors(got, ref["swin_logits"])
  print(f"Swin parity: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  np.testing.assert_allclose(got, ref["swin_logits"], rtol=0, atol=1e-4)
  # The head came from the file (5 classes match); the table is timm's.
  raw = load_file(SWIN_FILE)
  np.testing.assert_array_equal(
    params["head"]["kernel"], raw["head.fc.weight"].T
  )
  np.testing.assert_array_equal(
    params["layers_2"]["blocks_1"]["attn"]["relative_position_bias_table"],
    raw["layers.2.blocks.1.attn.relative_position_bias_table"],
  )


def test_vit_from_timm_file_matches_timm_logits(ref):
  model = vit.VisionTransformer(**VIT_CFG, num_classes=5)
  params = checkpoint.load_pretrained(VIT_FILE, template(model))
  got = np.asarray(jax.jit(model.apply)({"params": params}, ref["images"]))
  abs_err, rel_err = _errors(got, ref["vit_logits"])
  print(f"ViT parity: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  np.testing.assert_allclose(got, ref["vit_logits"], rtol=0, atol=1e-4)
  # timm's fused qkv went to vit_jax's (D, heads, head_dim) kernels.
  q = params["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_1"]
  w = load_file(VIT_FILE)["blocks.1.attn.qkv.weight"]
  np.testing.assert_array_equal(q["value"]["kernel"][:, 1, 3], w[32 + 8 + 3])


def test_rel_pos_table_resize_matches_torch_bicubic(ref):
  got = timm_checkpoint.resize_rel_pos_table(ref["table"], 121)
  np.testing.assert_allclose(got, ref["table_w6"], rtol=0, atol=1e-5)
  same = timm_checkpoint.resize_rel_pos_table(ref["table"], 49)
  np.testing.assert_allclose(same, ref["table"], rtol=0, atol=1e-6)


def test_swin_tables_are_resized_for_another_window(tmp_path, caplog):
  model = swin.SwinTransformer(**{**SWIN_CFG, "window_size": 8}, num_classes=5)
  params = checkpoint.load_pretrained(SWIN_FILE, template(model))
  # Stage 0 (16 x 16 grid) now has 8 x 8 windows: 15 x 15 table.
  t = params["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"]
  assert t.shape == (225, 1)
  # Stage 2 (4 x 4 grid) stays one clamped 4 x 4 window: unchanged.
  raw = load_file(SWIN_FILE)
  np.testing.assert_array_equal(
    params["layers_2"]["blocks_0"]["attn"]["relative_position_bias_table"],
    raw["layers.2.blocks.0.attn.relative_position_bias_table"],
  )


def test_vit_posemb_is_resized_for_another_image_size():
  model = vit.VisionTransformer(**VIT_CFG, num_classes=5)
  params = checkpoint.load_pretrained(VIT_FILE, template(model, 48))
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, 37, 16)
  np.testing.assert_array_equal(
    pe[0, 0], load_file(VIT_FILE)["pos_embed"][0, 0]
  )


def test_head_of_another_size_is_kept_from_template():
  model = swin.SwinTransformer(**SWIN_CFG, num_classes=3)
  tmpl = dict(template(model))
  tmpl["head"] = {"kernel": np.ones((32, 3), np.float32), "bias": np.zeros(3)}
  params = checkpoint.load_pretrained(SWIN_FILE, tmpl)
  np.testing.assert_array_equal(
    params["head"]["kernel"], tmpl["head"]["kernel"]
  )
  headless = swin.SwinTransformer(**SWIN_CFG)  # features only
  assert "head" not in checkpoint.load_pretrained(SWIN_FILE, template(headless))


def test_microsoft_layout_is_renumbered(tmp_path, ref):
  raw = load_file(SWIN_FILE)
  ms = {}
  for k, v in raw.items():
    if ".downsample." in k:  # timm layers.S+1.downsample -> layers.S
      s = int(k.split(".")[1])
      k = k.replace(f"layers.{s}.", f"layers.{s - 1}.", 1)
    ms[k.replace("head.fc.", "head.")] = v
  ms["layers.0.blocks.1.attn_mask"] = np.zeros((16, 16, 16), np.float32)
  path = tmp_path / "swin_ms.safetensors"
  save_file(ms, str(path))
  model = swin.SwinTransformer(**SWIN_CFG, num_classes=5)
  params = checkpoint.load_pretrained(path, template(model))
  got = np.asarray(jax.jit(model.apply)({"params": params}, ref["images"]))
  np.testing.assert_allclose(got, ref["swin_logits"], rtol=0, atol=1e-4)


def test_missing_and_unreadable_files_are_named(tmp_path):
  model = swin.SwinTransformer(**SWIN_CFG)
  with pytest.raises(
    npz_checkpoint.CheckpointError, match="nope.safetensors.*hub"
  ):
    checkpoint.load_pretrained(tmp_path / "nope.safetensors", template(model))
  bad = tmp_path / "trunc.safetensors"
  data = open(SWIN_FILE, "rb").read()
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(npz_checkpoint.CheckpointError, match="trunc.safetensors"):
    checkpoint.load_pretrained(bad, template(model))
  with pytest.raises(npz_checkpoint.CheckpointError, match="Swin.*safetensors"):
    checkpoint.load_pretrained(tmp_path / "w.npz", template(model))


def test_wrong_architecture_is_named():
  s = template(swin.SwinTransformer(**SWIN_CFG))
  v = template(vit.VisionTransformer(**VIT_CFG))
  with pytest.raises(
    npz_checkpoint.CheckpointError, match="timm ViT checkpoint.*model is a Swin"
  ):
    checkpoint.load_pretrained(VIT_FILE, s)
  with pytest.raises(
    npz_checkpoint.CheckpointError, match="timm Swin checkpoint.*model is a ViT"
  ):
    checkpoint.load_pretrained(SWIN_FILE, v)


def test_diff_lists_missing_extra_and_mismatched_keys(tmp_path):
  raw = load_file(SWIN_FILE)
  del raw["layers.1.blocks.0.norm2.weight"]
  raw["layers.0.blocks.0.adapter.weight"] = np.zeros((4, 4), np.float32)
  raw["layers.2.blocks.1.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
  path = tmp_path / "bad_swin.safetensors"
  save_file(raw, str(path))
  model = swin.SwinTransformer(**SWIN_CFG, num_classes=5)
  with pytest.raises(npz_checkpoint.CheckpointError) as e:
    checkpoint.load_pretrained(path, template(model))
  msg = str(e.value)
  assert "bad_swin.safetensors" in msg
  assert (
    "layers_1/blocks_0/norm2/scale (16) <- layers.1.blocks.0.norm2.weight"
    in msg
  )
  assert "layers.0.blocks.0.adapter.weight (4, 4)" in msg
  assert (
    "layers_2/blocks_1/mlp/fc1/kernel <- layers.2.blocks.1.mlp.fc1.weight: "
    "model (32, 128) (file shape (128, 32) expected), file (64, 32)"
  ) in msg
  # The ViT: timm's qkv must be (3D, D); a wrong one is named once per use.
  raw = load_file(VIT_FILE)
  raw["blocks.0.attn.qkv.weight"] = np.zeros((48, 8), np.float32)
  path = tmp_path / "bad_vit.safetensors"
  save_file(raw, str(path))
  with pytest.raises(
    npz_checkpoint.CheckpointError,
    match=r"query/kernel <- blocks.0.attn.qkv.weight: model \(16, 2, 8\)",
  ):
    checkpoint.load_pretrained(path, template(vit.VisionTransformer(**VIT_CFG)))


def test_bfloat16_files_are_widened(tmp_path):
  import ml_dtypes

  raw = load_file(VIT_FILE)
  path = tmp_path / "bf16.safetensors"
  from safetensors.flax import save_file as save_flax

  save_flax(
    {k: jnp.asarray(v.astype(ml_dtypes.bfloat16)) for k, v in raw.items()},
    str(path),
  )
  model = vit.VisionTransformer(**VIT_CFG, num_classes=5)
  params = checkpoint.load_pretrained(path, template(model))
  cls = params["cls"]
  assert cls.dtype == np.float32
  np.testing.assert_allclose(cls, raw["cls_token"], rtol=1e-2, atol=1e-2)


def test_reference_files_are_small():
  # Eight tiny timm models (ViT, Swin and six ViT variants) and their logits.
  total = sum(os.path.getsize(os.path.join(DATA, f)) for f in os.listdir(DATA))
  assert total < 600_000, total
