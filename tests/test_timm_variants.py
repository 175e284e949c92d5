"""timm's ViT variants (MAE, CLIP, DINOv2, registers, no class token).

Each tiny random timm model under tests/data (written by
benchmarks/make_timm_reference.py --variants) loads through the public
loader onto the model the public constructor builds from the timm name
(shrunk to the tiny geometry), and gives timm's logits; VPT-Deep and
VPT-Shallow logits match prompts added to the timm model the official way.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vptpc import checkpoint, npz_checkpoint
from vptpc.models import registry, vit, vit_variants

DATA = os.path.join(os.path.dirname(__file__), "data")
# The tiny geometry and the timm name each test file stands for: one table,
# the parity benchmark's (which prints docs/backbones.md's numbers).
sys.path.insert(0, os.path.join(os.path.dirname(DATA), "..", "benchmarks"))
from backbone_parity import TINY, VARIANTS  # noqa: E402


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(DATA, "timm_variants.npz")) as z:
    return {k: z[k] for k in z.files}


def tiny_model(key, **kw):
  return registry.create_model(VARIANTS[key], num_classes=5, **TINY, **kw)


def load(key, model):
  tmpl = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )["params"]
  path = os.path.join(DATA, f"timm_{key}_tiny.safetensors")
  return checkpoint.load_pretrained(path, tmpl)


def rel_err(got, want):
  got = np.asarray(got, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_variant_matches_timm_logits(ref, key):
  model = tiny_model(key)
  params = load(key, model)
  logits = model.apply({"params": params}, ref["images"])
  assert rel_err(logits, ref[f"{key}_logits"]) < 1e-5


@pytest.mark.parametrize("key", sorted(VARIANTS))
@pytest.mark.parametrize("path", vit.PROMPT_PATHS)
def test_variant_deep_prompts_match_official_way(ref, key, path):
  model = tiny_model(key, **vit.path_overrides(path))
  params = load(key, model)
  p = ref[f"{key}_deep_prompts"]
  prompts = {f"encoderblock_{i}": jnp.asarray(p[i]) for i in range(len(p))}
  logits = model.apply({"params": params}, ref["images"], prompts)
  assert rel_err(logits, ref[f"{key}_deep_logits"]) < 1e-5


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_variant_shallow_prompts_match_official_way(ref, key):
  model = tiny_model(key)
  params = load(key, model)
  prompts = {"input": jnp.asarray(ref[f"{key}_shallow_prompts"])}
  logits = model.apply({"params": params}, ref["images"], prompts)
  assert rel_err(logits, ref[f"{key}_shallow_logits"]) < 1e-5


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_variant_kv_cache_matches_prompts(ref, key):
  model = tiny_model(key, kv_only=True)
  params = load(key, model)
  p = ref[f"{key}_deep_prompts"]
  prompts = {f"encoderblock_{i}": jnp.asarray(p[i]) for i in range(len(p))}
  backbone, _ = vit.split_head(params)
  cache = registry.build_kv_cache(model, backbone, prompts)
  logits = model.apply({"params": params}, ref["images"], cache)
  assert rel_err(logits, ref[f"{key}_deep_logits"]) < 1e-5


@pytest.mark.parametrize("key", ["dinov2", "dinov2_reg4"])
def test_posemb_resized_as_timm(ref, key):
  params = load(key, tiny_model(key))
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_allclose(pe, ref[f"{key}_pos_embed_32"], atol=1e-6)


def test_architecture_comes_from_the_name():
  cfg = vit.get_model_config("vit_base_patch14_reg4_dinov2.lvd142m")
  assert (cfg.patch_size, cfg.num_registers, cfg.posemb_prefix) == (
    14,
    4,
    False,
  )
  assert vit.get_model_config("vit_base_patch16_clip_224.openai").act == (
    "quick_gelu"
  )
  assert vit.get_model_config("vit_base_patch16_224.mae").pool == "avg"
  gap = vit.get_model_config("vit_medium_patch16_gap_240.sw_in12k")
  assert not gap.class_token and not gap.qkv_bias


def test_file_of_another_variant_is_refused():
  # A CLIP file (no patch bias, norm_pre) onto DINOv2's model: named.
  model = tiny_model("dinov2")
  tmpl = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )["params"]
  path = os.path.join(DATA, "timm_clip_openai_tiny.safetensors")
  with pytest.raises(npz_checkpoint.CheckpointError, match="ls1.gamma"):
    checkpoint.load_pretrained(path, tmpl)


@pytest.fixture(scope="module")
def manifests():
  import gzip
  import json

  with gzip.open(os.path.join(DATA, "timm_manifests.json.gz")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", sorted(vit_variants.TIMM_WEIGHTS))
def test_every_checkpoint_row_maps_onto_timms_layout(manifests, name):
  # The real model of each row, as shapes only: every parameter has its
  # timm key and shape in the layout timm builds for the name (its hub
  # file), and the file has nothing else but heads.
  row = vit_variants.TIMM_WEIGHTS[name]
  model = registry.create_model(name, num_classes=None)
  size = row.image_size
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, size, size, 3))
  )["params"]
  fam = registry.family_of(model)
  want = {
    src.key: tuple(src.shape)
    for src in fam.checkpoint_sources(npz_checkpoint.flatten(shapes)).values()
  }
  layout = {k: tuple(v) for k, v in manifests[name].items()}
  if dict(row.overrides).get("fc_norm"):  # MAE: the file's norm is fc_norm
    layout = {
      k.replace("norm.", "fc_norm.", 1) if k.startswith("norm.") else k: v
      for k, v in layout.items()
    }
  assert {k: layout.get(k) for k in want} == want
  extra = [k for k in layout if k not in want]
  assert all(k.startswith(fam.EXTRA_FILE_KEYS) for k in extra), extra


@pytest.mark.parametrize("name", sorted(vit_variants.TIMM_WEIGHTS))
def test_every_checkpoint_row_has_a_preprocessing(name):
  from vptpc import config_util
  from vptpc.data import preprocessing

  pre = config_util.pretrained_preprocessing(name)
  row = vit_variants.TIMM_WEIGHTS[name]
  scale, shift = preprocessing.affine(pre["normalize"])
  mean, std = (np.asarray(v, np.float32) for v in row.mean_std)
  # pixels * scale + shift == (pixels / 255 - mean) / std
  np.testing.assert_allclose(scale, 1 / (255 * std), rtol=1e-6)
  np.testing.assert_allclose(shift, -mean / std, rtol=1e-6)
  assert pre["image_size"] % vit.get_model_config(name).patch_size == 0
  assert registry.model_family(name) == "vit"


@pytest.mark.parametrize(
  "key, graph, fmt",
  [
    ("clip_openai", "kv", "onnx"),
    ("clip_openai", "full", "stablehlo"),
    ("dinov2_reg4", "kv", "stablehlo"),
    ("dinov2_reg4", "full", "stablehlo"),
    ("gap", "kv", "stablehlo"),
    ("mae", "full", "stablehlo"),
  ],
)
def test_variant_task_exports(tmp_path, ref, key, graph, fmt):
  import json

  from vptpc import export, export_formats
  from vptpc import prompts as pr
  from vptpc.data import preprocessing

  arch = ",".join(f"{k}={v}" for k, v in TINY.items())
  path = os.path.join(DATA, f"timm_{key}_tiny.safetensors")
  model = tiny_model(key)
  params = load(key, model)
  backbone, head = vit.split_head(params)
  p = ref[f"{key}_deep_prompts"] * 3
  prompts = {f"encoderblock_{i}": jnp.asarray(p[i]) for i in range(len(p))}
  run = tmp_path / "run"
  run.mkdir()
  pr.save_prompts(
    run / "prompts.npz",
    prompts,
    head,
    backbone=backbone,
    metadata={"model": VARIANTS[key]},
  )
  norm = "clip" if key.startswith("clip") else "imagenet"
  (run / "config.json").write_text(
    json.dumps(
      {
        "model": {"name": VARIANTS[key], "checkpoint_path": path, "arch": arch},
        "data": {"image_size": 32, "normalize": norm},
      }
    )
  )
  if fmt == "onnx":
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
  out = tmp_path / f"task.{fmt}"
  # The export's own check runs the written graph on images against the
  # JAX model; the StableHLO one is reloaded here as a user would.
  info = export.export_task(run / "prompts.npz", out, graph=graph, fmt=fmt)
  assert info["check"]["max_abs_diff"] <= 1e-4
  if fmt == "stablehlo":
    exp, _ = export_formats.load_stablehlo(out)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    want = model.apply(
      {"params": params}, preprocessing.normalize(images, norm), prompts
    )
    np.testing.assert_allclose(exp.call(images), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", ["clip_openai", "dinov2_reg4", "gap"])
def test_variant_serves_mixed_tasks(ref, key):
  from vptpc import serve

  params = load(key, tiny_model(key))
  frozen, _ = vit.split_head(params)
  rng = np.random.default_rng(0)
  tasks = {}
  for name, counts, classes in (("a", (3, 1), 4), ("b", (0, 2), 3)):
    p = {
      f"encoderblock_{i}": jnp.asarray(rng.normal(size=(n, 16)), jnp.float32)
      for i, n in enumerate(counts)
    }
    head = {
      "kernel": rng.normal(size=(16, classes)).astype(np.float32),
      "bias": rng.normal(size=(classes,)).astype(np.float32),
    }
    tasks[name] = (p, head)
  features = registry.create_model(
    VARIANTS[key], num_classes=None, kv_only=True, **TINY
  )
  bank = serve.build_bank(frozen, tasks, model=features)
  names = ["a", "b", "b", "a"]
  images = ref["images"][[0, 1, 0, 1]]
  logits = np.asarray(
    serve.classify(features, frozen, bank, images, bank.task_ids(names))
  )
  for t, (prompts, head) in tasks.items():
    idx = [i for i, n in enumerate(names) if n == t]
    c = head["kernel"].shape[-1]
    alone = registry.create_model(VARIANTS[key], num_classes=c, **TINY)
    want = alone.apply(
      {"params": vit.merge_head(frozen, head)}, images[idx], prompts
    )
    np.testing.assert_allclose(logits[idx, :c], want, rtol=1e-5, atol=1e-5)


def test_flops_count_class_and_register_tokens(capsys):
  from vptpc import flops

  reg = registry.create_model(VARIANTS["dinov2_reg4"], num_classes=None)
  assert reg.num_prefix == 5
  # 16 x 16 patches at 224 px, plus the class and four register tokens.
  want = flops.vit_gmacs(
    hidden_size=768,
    num_layers=12,
    mlp_dim=3072,
    num_patches=256,
    patch_size=14,
    prompts_per_layer=10,
    num_prefix=5,
  )
  assert flops.model_gmacs(reg, 224, 10) == pytest.approx(want)
  gap = registry.create_model(VARIANTS["gap"], num_classes=None)
  assert gap.num_prefix == 0
  assert flops.main(["--model", VARIANTS["dinov2_reg4"], "--prompts=0"]) == 0
  assert VARIANTS["dinov2_reg4"] in capsys.readouterr().out


def test_vtab_config_takes_the_checkpoints_preprocessing():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "vtab_cfg",
    os.path.join(os.path.dirname(DATA), "..", "configs", "vtab.py"),
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(f"task=dtd,model={VARIANTS['clip_openai']}")
  assert c.model.checkpoint_path == f"hf-hub:timm/{VARIANTS['clip_openai']}"
  assert (c.data.image_size, c.data.normalize, c.data.interpolation) == (
    224,
    "clip",
    "bicubic",
  )
  c = mod.get_config(f"task=dtd,model={VARIANTS['dinov2']},image_size=224")
  assert (c.data.image_size, c.data.normalize) == (224, "imagenet")
  assert (
    mod.get_config(f"task=dtd,model={VARIANTS['dinov2']}").data.image_size
    == 518
  )
  c = mod.get_config("task=dtd")  # VPT's own backbone and recipe, unchanged
  assert (c.data.image_size, c.data.normalize, c.data.interpolation) == (
    224,
    "imagenet",
    "bilinear",
  )


def test_parity_benchmark_prints_the_docs_table(capsys):
  import backbone_parity

  assert backbone_parity.main(["--data", DATA]) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 2 + 1 + len(VARIANTS)
  errors = [
    float(x) for line in out[2:] for x in line.split("|")[2:5] if x.strip()
  ]
  assert len(errors) == 1 + 3 * len(VARIANTS) and max(errors) < 1e-5


def test_serve_takes_the_runs_interpolation(capsys):
  from vptpc import serve

  bad = ["--task=a=missing.npz", "--interpolation=lanczos"]
  assert serve.main(bad) == 2
  err = capsys.readouterr().err
  assert "--interpolation='lanczos'" in err and "bicubic" in err
