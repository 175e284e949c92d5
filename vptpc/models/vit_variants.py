"""The named ViTs: vit_jax's variants, timm's architectures and checkpoints.

`vptpc.models.vit.get_model_config` builds any of these names. Each row
gives the architecture fields a name stands for (`VisionTransformer`
keyword arguments); a timm checkpoint's row also says how its weights
expect their input (size, mean/std, resize filter), as timm's pretrained
config for the name has them.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _vit(
  patch: int, width: int, depth: int, heads: int, mlp: int = 0, **extra
) -> dict[str, Any]:
  """A ViT's fields; the MLP is 4x the width unless ``mlp`` says."""
  return dict(
    patch_size=patch,
    hidden_size=width,
    num_layers=depth,
    num_heads=heads,
    mlp_dim=mlp or 4 * width,
    **extra,
  )


# vit_jax's variants (`configs/models.py`), by vit_jax's name: patch, width,
# depth, heads; `testing` is vit_jax's tiny test model, `tiny32` the 32-px
# variant of vptpc's offline tests.
VARIANTS: dict[str, dict[str, Any]] = {
  "Ti/16": _vit(16, 192, 12, 3),
  "S/16": _vit(16, 384, 12, 6),
  "B/16": _vit(16, 768, 12, 12),
  "B/32": _vit(32, 768, 12, 12),
  "L/16": _vit(16, 1024, 24, 16),
  "H/14": _vit(14, 1280, 32, 16),
  "testing": _vit(16, 10, 1, 2, mlp=10),
  # vptpc's embedded backbone (32 px, 8 x 8 patches): vptpc.pretrain.
  "fractal-S/4": _vit(4, 192, 6, 3),
  "fractal-Ti/4": _vit(4, 128, 6, 4),
  "tiny32": _vit(8, 32, 3, 2, mlp=64),
}

_B16 = VARIANTS["B/16"]
_CLIP = dict(_B16, pre_norm=True, ln_eps=1e-5)
_DINOV2 = dict(_B16, patch_size=14, layer_scale=True)
# timm's ViT architectures, by timm's model name (without the pretrained
# tag), as its `vision_transformer` model functions define them.
TIMM_ARCHS: dict[str, dict[str, Any]] = {
  "vit_small_patch16_224": dict(VARIANTS["S/16"]),
  "vit_base_patch16_224": dict(_B16),
  "vit_large_patch16_224": dict(VARIANTS["L/16"]),
  "vit_base_patch16_clip_224": _CLIP,
  "vit_base_patch16_clip_quickgelu_224": dict(_CLIP, act="quick_gelu"),
  "vit_base_patch14_dinov2": _DINOV2,
  "vit_base_patch14_reg4_dinov2": dict(
    _DINOV2, num_registers=4, posemb_prefix=False
  ),
  "vit_medium_patch16_gap_240": _vit(
    16,
    512,
    12,
    8,
    class_token=False,
    pool="avg",
    qkv_bias=False,
    layer_scale=True,
  ),
}

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP_MEAN_STD = (
  (0.48145466, 0.4578275, 0.40821073),
  (0.26862954, 0.26130258, 0.27577711),
)


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A timm checkpoint: its architecture and preprocessing.

  The preprocessing fields are timm's pretrained config for the name
  (``timm.models.get_pretrained_cfg``).

  Attributes:
    arch: the `TIMM_ARCHS` row.
    pretraining: what the weights were trained on, in words.
    image_size: the input side the weights were trained at.
    mean_std: the per-channel input mean and std.
    interpolation: timm's resize filter for the weights.
    overrides: architecture fields in which these weights differ from
      timm's model of ``arch`` (see `TIMM_WEIGHTS`).
  """

  arch: str
  pretraining: str
  image_size: int = 224
  mean_std: tuple[tuple[float, ...], tuple[float, ...]] = INCEPTION_MEAN_STD
  interpolation: str = "bicubic"
  overrides: tuple[tuple[str, Any], ...] = ()


_IN21K = "supervised, ImageNet-21k"
# Every timm checkpoint vptpc knows, by its hub name (``timm/<name>`` on the
# Hugging Face hub). Two rows depart from timm's model of the name, both to
# follow how the weights were trained and are tuned:
# * MAE pools by averaging the patch outputs into ``fc_norm``, as MAE's own
#   fine-tuning does; timm's model of the name reads the class token. The
#   file's final ``norm`` becomes ``fc_norm``.
# * OpenAI's CLIP was trained with QuickGELU; timm keeps plain GELU for the
#   name and the right activation in ``vit_base_patch16_clip_quickgelu_224``.
TIMM_WEIGHTS: dict[str, Pretrained] = {
  "vit_base_patch16_224.orig_in21k": Pretrained(
    "vit_base_patch16_224", f"{_IN21K} (original ViT; VPT's backbone)"
  ),
  "vit_small_patch16_224.augreg_in21k": Pretrained(
    "vit_small_patch16_224", f"{_IN21K} (AugReg)"
  ),
  "vit_base_patch16_224.augreg_in21k": Pretrained(
    "vit_base_patch16_224", f"{_IN21K} (AugReg)"
  ),
  "vit_large_patch16_224.augreg_in21k": Pretrained(
    "vit_large_patch16_224", f"{_IN21K} (AugReg)"
  ),
  "vit_base_patch16_224.mae": Pretrained(
    "vit_base_patch16_224",
    "self-supervised, MAE on ImageNet-1k",
    mean_std=IMAGENET_MEAN_STD,
    overrides=(("pool", "avg"), ("fc_norm", True)),
  ),
  "vit_base_patch16_clip_224.openai": Pretrained(
    "vit_base_patch16_clip_224",
    "image-text contrastive, CLIP on OpenAI's WIT-400M",
    mean_std=CLIP_MEAN_STD,
    overrides=(("act", "quick_gelu"),),
  ),
  "vit_base_patch16_clip_224.laion2b": Pretrained(
    "vit_base_patch16_clip_224",
    "image-text contrastive, OpenCLIP on LAION-2B",
    mean_std=CLIP_MEAN_STD,
  ),
  "vit_base_patch14_dinov2.lvd142m": Pretrained(
    "vit_base_patch14_dinov2",
    "self-supervised, DINOv2 on LVD-142M",
    image_size=518,
    mean_std=IMAGENET_MEAN_STD,
  ),
  "vit_base_patch14_reg4_dinov2.lvd142m": Pretrained(
    "vit_base_patch14_reg4_dinov2",
    "self-supervised, DINOv2 with 4 registers on LVD-142M",
    image_size=518,
    mean_std=IMAGENET_MEAN_STD,
  ),
  "vit_medium_patch16_gap_240.sw_in12k": Pretrained(
    "vit_medium_patch16_gap_240",
    "supervised, ImageNet-12k (no class token, average pool)",
    image_size=240,
  ),
}


def timm_arch(name: str) -> dict[str, Any] | None:
  """The architecture fields of a timm model name, or None if unknown.

  ``name`` is a `TIMM_WEIGHTS` name (``arch.tag``) or a `TIMM_ARCHS` name.
  """
  if name in TIMM_WEIGHTS:
    w = TIMM_WEIGHTS[name]
    return dict(TIMM_ARCHS[w.arch], **dict(w.overrides))
  if name in TIMM_ARCHS:
    return dict(TIMM_ARCHS[name])
  return None


def names() -> tuple[str, ...]:
  """Every name `arch` knows: vit_jax's, timm's checkpoints, timm's models."""
  return tuple(VARIANTS) + tuple(TIMM_WEIGHTS) + tuple(TIMM_ARCHS)


def arch(name: str) -> dict[str, Any] | None:
  """The architecture fields of a ViT name, or None if unknown.

  ``name``: a vit_jax variant (``B/16``; ``ViT-B_16`` and ``ViT-B/16`` are
  accepted too) or a timm name (`timm_arch`; a ``timm/`` prefix is
  dropped).
  """
  found = timm_arch(name.removeprefix("timm/"))
  if found is not None:
    return found
  key = name.removeprefix("ViT-")
  if key not in VARIANTS:
    key = key.replace("_", "/")
  return dict(VARIANTS[key]) if key in VARIANTS else None
