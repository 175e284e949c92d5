"""Tests for loading vit_jax `.npz` backbones."""

import os
import stat
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SIZE, TINY

from vptpc import checkpoint, npz_checkpoint, prompts, timm_checkpoint
from vptpc.models import vit


def google_npz_arrays(width, depth, heads, mlp, patch, tokens, classes, rng):
  """Arrays under the exact key names of Google's ViT-B_16.npz (i21k).

  Written out by hand, independently of the model, to pin the naming.
  """
  hd = width // heads
  shapes = {
    "cls": (1, 1, width),
    "embedding/kernel": (patch, patch, 3, width),
    "embedding/bias": (width,),
    "Transformer/posembed_input/pos_embedding": (1, tokens, width),
    "Transformer/encoder_norm/scale": (width,),
    "Transformer/encoder_norm/bias": (width,),
    "pre_logits/kernel": (width, width),
    "pre_logits/bias": (width,),
    "head/kernel": (width, classes),
    "head/bias": (classes,),
  }
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      shapes[f"{b}/{ln}/scale"] = (width,)
      shapes[f"{b}/{ln}/bias"] = (width,)
    a = f"{b}/MultiHeadDotProductAttention_1"
    for n in ("query", "key", "value"):
      shapes[f"{a}/{n}/kernel"] = (width, heads, hd)
      shapes[f"{a}/{n}/bias"] = (heads, hd)
    shapes[f"{a}/out/kernel"] = (heads, hd, width)
    shapes[f"{a}/out/bias"] = (width,)
    shapes[f"{b}/MlpBlock_3/Dense_0/kernel"] = (width, mlp)
    shapes[f"{b}/MlpBlock_3/Dense_0/bias"] = (mlp,)
    shapes[f"{b}/MlpBlock_3/Dense_1/kernel"] = (mlp, width)
    shapes[f"{b}/MlpBlock_3/Dense_1/bias"] = (width,)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def tiny_google_arrays(seed=0, tokens=1 + (IMAGE_SIZE // 8) ** 2):
  return google_npz_arrays(
    width=32,
    depth=3,
    heads=2,
    mlp=64,
    patch=8,
    tokens=tokens,
    classes=7,
    rng=np.random.default_rng(seed),
  )


def backbone_template(image_size=IMAGE_SIZE):
  model = vit.VisionTransformer(**TINY, num_classes=5)
  params = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))
  )["params"]
  return vit.split_head(params)[0]


def test_google_npz_layout_loads_and_round_trips(tmp_path):
  arrays = tiny_google_arrays()
  path = tmp_path / "ViT-tiny.npz"
  np.savez(path, **arrays)
  loaded = checkpoint.load_pretrained(path, backbone_template())
  flat = npz_checkpoint.flatten(loaded)
  # Every backbone key of the Google layout is used; head/pre_logits dropped.
  assert set(flat) == {
    k for k in arrays if not k.startswith(("head/", "pre_logits/"))
  }
  for k, v in flat.items():
    np.testing.assert_array_equal(v, arrays[k])
  # Save in the same layout and load again: identical.
  again = tmp_path / "again.npz"
  npz_checkpoint.save_npz(again, loaded)
  reloaded = checkpoint.load_pretrained(again, backbone_template())
  for k, v in npz_checkpoint.flatten(reloaded).items():
    np.testing.assert_array_equal(v, flat[k])
  # And the loaded tree runs in the model.
  model = vit.VisionTransformer(**TINY)
  feats = model.apply({"params": loaded}, jnp.ones((1, 32, 32, 3)))
  assert feats.shape == (1, 32)


def test_head_is_kept_from_template_when_file_head_differs(
  tmp_path, tiny_params
):
  np.savez(tmp_path / "c.npz", **tiny_google_arrays())
  loaded = checkpoint.load_pretrained(tmp_path / "c.npz", tiny_params)
  # File head has 7 classes, model 5: the template's fresh head is kept.
  np.testing.assert_array_equal(
    loaded["head"]["kernel"], tiny_params["head"]["kernel"]
  )


def test_posemb_resize_same_size_is_identity():
  pe = np.random.default_rng(0).normal(size=(1, 1 + 14 * 14, 8))
  out = npz_checkpoint.resize_posemb(pe, 1 + 14 * 14)
  np.testing.assert_allclose(out, pe, atol=1e-6)


def test_posemb_resize_is_bilinear():
  # A field linear in the grid coordinates stays linear under bilinear
  # resampling (away from the clamped border) and the CLS row is kept.
  g = 4
  yy, xx = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  grid = np.stack([yy, xx], -1).reshape(1, g * g, 2).astype(np.float32)
  pe = np.concatenate([np.full((1, 1, 2), 7.0, np.float32), grid], 1)
  out = npz_checkpoint.resize_posemb(pe, 1 + 8 * 8)
  assert out.shape == (1, 65, 2)
  np.testing.assert_array_equal(out[0, 0], [7.0, 7.0])
  new = out[0, 1:].reshape(8, 8, 2)
  # Interior rows step by g/8 = 0.5 in the old grid's units.
  np.testing.assert_allclose(np.diff(new[1:-1, 3, 0]), 0.5, atol=1e-6)
  np.testing.assert_allclose(np.diff(new[3, 1:-1, 1]), 0.5, atol=1e-6)


def test_posemb_is_resized_when_image_size_differs(tmp_path, caplog):
  # The file was made at 32 px (4x4 grid); the model runs at 48 px (6x6).
  np.savez(tmp_path / "c.npz", **tiny_google_arrays())
  loaded = checkpoint.load_pretrained(tmp_path / "c.npz", backbone_template(48))
  pe = loaded["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, 37, 32)


def test_missing_file_is_named(tmp_path):
  path = tmp_path / "nope.npz"
  with pytest.raises(npz_checkpoint.CheckpointError, match="nope.npz"):
    checkpoint.load_pretrained(path, backbone_template())


def test_truncated_file_is_named(tmp_path):
  path = tmp_path / "ViT-B_16.npz"
  np.savez(path, **tiny_google_arrays())
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(
    npz_checkpoint.CheckpointError, match="ViT-B_16.npz.*truncated"
  ):
    checkpoint.load_pretrained(path, backbone_template())


def test_non_npz_file_is_named(tmp_path):
  path = tmp_path / "model.pth"
  path.write_bytes(b"not a zip archive at all" * 10)
  with pytest.raises(npz_checkpoint.CheckpointError, match="model.pth"):
    checkpoint.load_pretrained(path, backbone_template())


def test_non_vit_npz_is_rejected(tmp_path):
  path = tmp_path / "resnet.npz"
  np.savez(path, **{"block1/unit1/conv1/kernel": np.zeros((3, 3, 3, 8))})
  with pytest.raises(
    npz_checkpoint.CheckpointError, match="resnet.npz.*not look"
  ):
    checkpoint.load_pretrained(path, backbone_template())


def test_diff_lists_missing_extra_and_mismatched_keys(tmp_path):
  arrays = tiny_google_arrays()
  del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
  arrays["Transformer/encoderblock_0/Adapter/kernel"] = np.zeros((4, 4))
  arrays["Transformer/encoderblock_2/MlpBlock_3/Dense_0/kernel"] = np.zeros(
    (32, 128)
  )
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(npz_checkpoint.CheckpointError) as e:
    checkpoint.load_pretrained(path, backbone_template())
  msg = str(e.value)
  assert "bad.npz" in msg
  assert "missing" in msg and "encoderblock_1/LayerNorm_2/scale (32)" in msg
  assert "unexpected" in msg and "encoderblock_0/Adapter/kernel (4, 4)" in msg
  assert "Dense_0/kernel: model (32, 64), file (32, 128)" in msg
  # pre_logits and head are allowed extras, so they are not listed.
  assert "pre_logits" not in msg and "head/" not in msg


def test_wrong_variant_is_reported_with_shapes(tmp_path):
  arrays = google_npz_arrays(
    width=16,
    depth=3,
    heads=2,
    mlp=64,
    patch=8,
    tokens=17,
    classes=3,
    rng=np.random.default_rng(0),
  )
  path = tmp_path / "w16.npz"
  np.savez(path, **arrays)
  with pytest.raises(
    npz_checkpoint.CheckpointError, match=r"cls: model \(1, 1, 32\)"
  ):
    checkpoint.load_pretrained(path, backbone_template())


def test_save_npz_does_not_clobber_on_failure(tmp_path):
  path = tmp_path / "keep.npz"
  npz_checkpoint.save_npz(path, {"a": np.ones(3)})
  before = path.read_bytes()

  class Boom:
    def __array__(self, *a, **k):
      raise RuntimeError("boom")

  with pytest.raises(RuntimeError):
    npz_checkpoint.save_npz(path, {"a": Boom()})
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["keep.npz"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
  # As the run's other files (config.json, results.json), not mkstemp's
  # private 0600.
  old = os.umask(umask)
  try:
    npz_checkpoint.save_npz(tmp_path / "b.npz", {"a": np.ones(3)})
    prompts.save_prompts(tmp_path / "prompts.npz", {"input": np.ones((2, 4))})
    with open(tmp_path / "plain.json", "w") as f:
      f.write("{}")
  finally:
    os.umask(old)
  for name in ("b.npz", "prompts.npz", "plain.json"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    "b.npz",
    "plain.json",
    "prompts.npz",
  ]


def test_moved_names_warn_and_resolve():
  for name, new in (
    ("save_npz", npz_checkpoint),
    ("POSEMB_KEY", npz_checkpoint),
    ("timm_fit", timm_checkpoint),
  ):
    with pytest.warns(DeprecationWarning, match=f"{new.__name__}.{name}"):
      assert getattr(checkpoint, name) is getattr(new, name)
  # The error load_pretrained raises stays there, without a warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert checkpoint.CheckpointError is npz_checkpoint.CheckpointError
  with pytest.raises(AttributeError, match="no_such_name"):
    checkpoint.no_such_name  # noqa: B018
