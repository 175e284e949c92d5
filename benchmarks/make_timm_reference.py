"""Makes the tiny timm reference that tests/test_timm_parity.py loads.

Run once, where torch and timm are installed (neither is a vptpc or test
dependency; the tests read only the files written here)::

  python benchmarks/make_timm_reference.py --out tests/data

and, for the backbone-variant files (``--variants`` writes only those, so
the files above stay as committed)::

  python benchmarks/make_timm_reference.py --out tests/data --variants

The committed files were made with torch 2.13.0+cpu, timm 1.0.31 and
safetensors 0.8.0 (numpy 2.4.6) on CPU (timm imports torchvision 0.28.0;
PyPI's CUDA build of it was used with its operator registration skipped,
which timm's model code does not use: the script stubs
``torchvision._meta_registrations`` before importing timm).

and the key layouts of the real checkpoints vptpc knows by name
(``--manifests``: ``timm_manifests.json.gz``, every tensor's shape of the
model timm builds for each name; no weights)::

  python benchmarks/make_timm_reference.py --out tests/data --manifests

It writes:

* ``timm_swin_tiny.safetensors``: the ``state_dict`` of a timm
  ``SwinTransformer`` (32 px, patch 2, width 8, depths (2, 2, 2), heads
  (1, 2, 4), window 4: shifted windows in stages 0 and 1, a clamped
  window in stage 2; 5 classes), every parameter redrawn at random so that
  each matters numerically;
* ``timm_vit_tiny.safetensors``: the same for a timm ``VisionTransformer``
  (32 px, patch 8, width 16, depth 2, 2 heads, MLP 32, class token, 5
  classes);
* ``timm_reference.npz``: ``images`` (2, 32, 32, 3) NHWC, the logits of both
  models computed by timm in float64 (``swin_logits``, ``vit_logits``),
  and one Swin relative-position bias table resized from window 4 to
  window 6 with ``torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False)`` (``table`` -> ``table_w6``), the resize Microsoft's
  Swin code applies when fine-tuning at another window size.

With ``--variants`` it writes, instead, tiny random timm
``VisionTransformer`` variants (the ``VIT`` geometry above plus each
variant's kwargs in ``VARIANTS``, as timm's model functions set them; one
seed each; every parameter redrawn as above, LayerScale gammas
0.5 + N(0, 0.3)):

* ``timm_<key>_tiny.safetensors`` for each key: ``mae`` (average pool
  with ``fc_norm``, no final norm: MAE's fine-tuning model), ``clip_openai``
  (``norm_pre``, no patch bias, LayerNorm eps 1e-5, QuickGELU),
  ``clip_laion`` (the same with GELU), ``dinov2`` (LayerScale; trained at
  64 px, so ``pos_embed`` has 1 + 64 rows), ``dinov2_reg4`` (LayerScale,
  4 register tokens, no position embedding on the class/register tokens;
  64 px, 64 rows) and ``gap`` (no class token, final norm then average
  pool, no qkv bias, LayerScale);
* ``timm_variants.npz``: ``images`` (the images above) and, per key,
  ``<key>_logits`` computed by timm in float64 at 32 px (the 64-px
  dinov2 files loaded into a 32-px model through timm's
  ``checkpoint_filter_fn``, which resamples ``pos_embed`` bicubic with
  antialias in float32; that result is ``<key>_pos_embed_32``),
  ``<key>_deep_prompts`` (2, 3, 16) and ``<key>_shallow_prompts`` (3, 16)
  float32 N(0, 0.5), and ``<key>_deep_logits`` / ``<key>_shallow_logits``:
  the logits with those prompts added the way VPT's ``forward_deep_prompt``
  does (inserted after the class and register tokens before block 0; for
  Deep, replaced before every later block; dropped before the final norm
  and pooling), in float64.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np

SWIN = dict(
  img_size=32,
  patch_size=2,
  embed_dim=8,
  depths=(2, 2, 2),
  num_heads=(1, 2, 4),
  window_size=4,
  num_classes=5,
)
VIT = dict(
  img_size=32,
  patch_size=8,
  embed_dim=16,
  depth=2,
  num_heads=2,
  mlp_ratio=2.0,
  num_classes=5,
  global_pool="token",
)
# key: (seed, extra kwargs, size the checkpoint is "trained" at). The norm
# layer is filled in as "ln1e-5" = partial(timm.layers.LayerNorm, eps=1e-5).
VARIANTS = {
  "mae": (10, dict(global_pool="avg"), 32),
  "clip_openai": (
    11,
    dict(pre_norm=True, norm_layer="ln1e-5", act_layer="quick_gelu"),
    32,
  ),
  "clip_laion": (12, dict(pre_norm=True, norm_layer="ln1e-5"), 32),
  "dinov2": (13, dict(init_values=1e-5), 64),
  "dinov2_reg4": (
    14,
    dict(init_values=1e-5, reg_tokens=4, no_embed_class=True),
    64,
  ),
  "gap": (
    15,
    dict(
      class_token=False,
      global_pool="avg",
      fc_norm=False,
      qkv_bias=False,
      init_values=1e-6,
    ),
    32,
  ),
}
N_PROMPTS = 3


def randomise(model, torch, seed):
  """Redraws every parameter: N(0, 0.3), LayerNorm scales 1 + N(0, 0.3).

  LayerScale gammas (``*.gamma``; none in the Swin/ViT of the default run)
  become 0.5 + N(0, 0.3).
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.3
      is_ln_scale = p.ndim == 1 and name.endswith(".weight")
      if name.endswith(".gamma"):
        p.copy_(noise + 0.5)
      else:
        p.copy_(noise + 1.0 if is_ln_scale else noise)
  return model.eval()


def forward_prompted(model, x, prompts, torch):
  """Logits with VPT prompts added as VPT's ``forward_deep_prompt`` does.

  ``prompts`` (depth, L, D) is VPT-Deep (layer i's prompts replace the
  previous prompt outputs before block i); (L, D) is VPT-Shallow (inserted
  once before block 0 and carried through). Prompts go right after the
  ``model.num_prefix_tokens`` class/register tokens and are dropped after the
  last block, before ``model.norm`` and ``model.forward_head``.
  """
  deep = prompts.ndim == 3
  n = model.num_prefix_tokens
  length = prompts.shape[-2]
  x = model.patch_embed(x)
  x = model._pos_embed(x)
  x = model.patch_drop(x)
  x = model.norm_pre(x)
  b = x.shape[0]
  for i, block in enumerate(model.blocks):
    p = (prompts[i] if deep else prompts).expand(b, -1, -1)
    if i == 0:
      x = torch.cat([x[:, :n], p, x[:, n:]], dim=1)
    elif deep:
      x = torch.cat([x[:, :n], p, x[:, n + length :]], dim=1)
    x = block(x)
  x = torch.cat([x[:, :n], x[:, n + length :]], dim=1)
  x = model.norm(x)
  return model.forward_head(x)


def write_variants(out_dir, images, torch, save_file):
  """Writes the ``--variants`` files; the module docstring says which."""
  from functools import partial

  from timm.layers import LayerNorm
  from timm.models.vision_transformer import (
    VisionTransformer,
    checkpoint_filter_fn,
  )

  x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
  out = {"images": images}
  for key, (seed, extra, train_size) in VARIANTS.items():
    kw = dict(VIT, **extra)
    if kw.get("norm_layer") == "ln1e-5":
      kw["norm_layer"] = partial(LayerNorm, eps=1e-5)
    trained = randomise(
      VisionTransformer(**dict(kw, img_size=train_size)), torch, seed
    )
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_file(state, os.path.join(out_dir, f"timm_{key}_tiny.safetensors"))
    if train_size == VIT["img_size"]:
      model = trained
    else:
      model = VisionTransformer(**kw).eval()
      loaded = checkpoint_filter_fn(dict(state), model)
      model.load_state_dict(loaded)
      assert loaded["pos_embed"].shape == model.pos_embed.shape
      out[f"{key}_pos_embed_32"] = loaded["pos_embed"].double().numpy()
    model = model.double()
    rng = np.random.default_rng(seed)
    deep = (
      rng.normal(size=(VIT["depth"], N_PROMPTS, VIT["embed_dim"])) * 0.5
    ).astype(np.float32)
    shallow = (rng.normal(size=(N_PROMPTS, VIT["embed_dim"])) * 0.5).astype(
      np.float32
    )
    with torch.no_grad():
      logits = model(x)
      # Self-check: with no prompts the prompt code is timm's own forward.
      for empty in ((VIT["depth"], 0, VIT["embed_dim"]), (0, VIT["embed_dim"])):
        none = forward_prompted(model, x, torch.zeros(empty).double(), torch)
        assert torch.allclose(none, logits, rtol=1e-12, atol=1e-12), key
      deep_logits = forward_prompted(
        model, x, torch.from_numpy(deep).double(), torch
      )
      shallow_logits = forward_prompted(
        model, x, torch.from_numpy(shallow).double(), torch
      )
    assert not torch.allclose(deep_logits, logits), key
    assert not torch.allclose(shallow_logits, deep_logits), key
    out[f"{key}_logits"] = logits.numpy()
    out[f"{key}_deep_prompts"] = deep
    out[f"{key}_deep_logits"] = deep_logits.numpy()
    out[f"{key}_shallow_prompts"] = shallow
    out[f"{key}_shallow_logits"] = shallow_logits.numpy()
  np.savez(os.path.join(out_dir, "timm_variants.npz"), **out)
  return out


def write_manifests(out_dir, timm):
  """Writes ``timm_manifests.json.gz``: every timm checkpoint's key layout.

  For each name vptpc knows (`vptpc.models.vit_variants.TIMM_WEIGHTS`), the shape
  of every tensor of the model timm builds for the name, which is what its
  hub file holds; no weights are made or downloaded.
  """
  import gzip
  import json

  from vptpc.models import vit_variants

  out = {}
  for name in vit_variants.TIMM_WEIGHTS:
    model = timm.create_model(name, pretrained=False)
    out[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
  path = os.path.join(out_dir, "timm_manifests.json.gz")
  with gzip.GzipFile(path, "wb", mtime=0) as f:
    f.write(json.dumps(out, sort_keys=True).encode())
  return out


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="tests/data")
  ap.add_argument(
    "--variants",
    action="store_true",
    help="write only the timm ViT variant files (timm_variants.npz, ...)",
  )
  ap.add_argument(
    "--manifests",
    action="store_true",
    help="write only timm_manifests.json.gz (key layouts of real models)",
  )
  a = ap.parse_args()
  # PyPI's torchvision cannot register its meta ops next to this torch; skip them (timm's models do not use them).
  sys.modules.setdefault(
    "torchvision._meta_registrations",
    types.ModuleType("torchvision._meta_registrations"),
  )
  import safetensors
  import timm
  import torch
  from safetensors.torch import save_file
  from timm.models.swin_transformer import SwinTransformer
  from timm.models.vision_transformer import VisionTransformer

  os.makedirs(a.out, exist_ok=True)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
  images = images.astype(np.float32)
  if a.manifests:
    out = write_manifests(a.out, timm)
    print(f"timm {timm.__version__}; wrote the key layouts of {sorted(out)}")
    return
  if a.variants:
    out = write_variants(a.out, images, torch, save_file)
    print(
      f"torch {torch.__version__}, timm {timm.__version__}, safetensors "
      f"{safetensors.__version__}; wrote {sorted(out)} to {a.out}"
    )
    return
  swin = randomise(SwinTransformer(**SWIN), torch, 0)
  vit = randomise(VisionTransformer(**VIT), torch, 1)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
  out = {"images": images}
  for name, model in (("swin", swin), ("vit", vit)):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(a.out, f"timm_{name}_tiny.safetensors"))
    with torch.no_grad():
      out[f"{name}_logits"] = model.double()(x).numpy()
  table = swin.state_dict()[
    "layers.1.blocks.0.attn.relative_position_bias_table"
  ]
  side = int(round(table.shape[0] ** 0.5))
  grid = table.double().T.reshape(1, -1, side, side)
  resized = torch.nn.functional.interpolate(
    grid, size=(11, 11), mode="bicubic", align_corners=False
  )
  out["table"] = table.numpy().astype(np.float64)
  out["table_w6"] = resized.reshape(table.shape[1], -1).T.numpy()
  np.savez(os.path.join(a.out, "timm_reference.npz"), **out)
  print(
    f"torch {torch.__version__}, timm {timm.__version__}, safetensors "
    f"{safetensors.__version__}; wrote {sorted(out)} to {a.out}"
  )


if __name__ == "__main__":
  main()
