"""Makes the tiny timm reference that tests/test_timm_parity.py loads.

Run once, where torch and timm are installed (neither is a vptpc or test
dependency; the tests read only the files written here)::

  python benchmarks/make_timm_reference.py --out tests/data

The committed files were made with torch 2.13.0+cpu, timm 1.0.31 and
safetensors 0.8.0 on CPU (timm imports torchvision 0.28.0; PyPI's CUDA build
of it was used with its operator registration skipped, which timm's model
code does not use).

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
"""

from __future__ import annotations

import argparse
import os

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


def randomise(model, torch, seed):
  """Redraws every parameter: N(0, 0.3), LayerNorm scales 1 + N(0, 0.3)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.3
      is_ln_scale = p.ndim == 1 and name.endswith(".weight")
      p.copy_(noise + 1.0 if is_ln_scale else noise)
  return model.eval()


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="tests/data")
  a = ap.parse_args()
  import safetensors
  import timm
  import torch
  from safetensors.torch import save_file
  from timm.models.swin_transformer import SwinTransformer
  from timm.models.vision_transformer import VisionTransformer

  os.makedirs(a.out, exist_ok=True)
  swin = randomise(SwinTransformer(**SWIN), torch, 0)
  vit = randomise(VisionTransformer(**VIT), torch, 1)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
  images = images.astype(np.float32)
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
