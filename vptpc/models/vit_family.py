"""The ViT family: everything vptpc knows that is particular to ViTs.

The Flax module lives in `vptpc.models.vit` (a model file); this module is
the family's plugin (`vptpc.models.registry`): which names it builds
(vit_jax's variants and timm's checkpoints, `vptpc.models.vit_variants`),
how a timm ``.safetensors`` file's names map onto the module's, its FLOP
count, prompt init and metadata, the key/value cache, and its exports.

Token layout, for every ViT: ``[class, registers, prompts, patches]``. Prompts
go after the class and register tokens, so those keep the positions their
position embedding and the pretrained blocks expect, and the pooled
features (the class token's output, or the mean of the patch outputs) never
include a prompt's output: prompts steer the image tokens through attention
only, as VPT's official code does for the class token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from vptpc import flops
from vptpc import prompts as prompts_lib
from vptpc.models import convert, vit, vit_variants

NAME = "vit"
DISPLAY = "ViT"
# ``vptpc.export`` writes ONNX / StableHLO graphs of ViTs.
EXPORTABLE = True
# The random-init 32-px model of `smoke` configs.
SMOKE_MODEL = "tiny32"
# Attention over the whole sequence (`vptpc.analysis` reads its maps).
GLOBAL_ATTENTION = True
# Reads vit_jax .npz files as well as timm .safetensors.
READS_NPZ = True
# The file a run reads when a config names the model and no checkpoint.
STANDARD_CHECKPOINTS = {"B/16": "imagenet21k_ViT-B_16.npz"}
ALIASES = {"ViT-B/16": "B/16", "ViT-B_16": "B/16"}
# What a user with no file is told to fetch.
CHECKPOINT_FIX = (
  "download the vit_jax .npz yourself (e.g. ViT-B_16.npz from "
  "gs://vit_models/imagenet21k/) or fetch a timm checkpoint with python -m "
  "vptpc.prepare --weights=timm/<name> (docs/backbones.md), and pass its "
  "path as --config.model.checkpoint_path=PATH (configs/vtab.py: "
  "checkpoint=PATH)"
)
FILE_KINDS = {"vit": "a timm ViT", "vit_jax": "a vit_jax ViT"}
_POSEMB = "Transformer/posembed_input/pos_embedding"


def knows(name: str) -> bool:
  """Whether ``name`` is a ViT this family builds."""
  try:
    vit.get_model_config(name)
  except ValueError:
    return False
  return True


def model_names() -> tuple[str, ...]:
  """Every ViT name `create_model` accepts."""
  return vit.model_names()


def pretrained(name: str) -> vit_variants.Pretrained | None:
  """The timm checkpoint row of ``name`` (`vit_variants.TIMM_WEIGHTS`)."""
  return vit_variants.TIMM_WEIGHTS.get(name.removeprefix("timm/"))


def create_model(name: str, **fields: Any) -> vit.VisionTransformer:
  """The `vptpc.models.vit.VisionTransformer` of ``name`` with ``fields``."""
  return vit.create_model(name, **fields)


def owns(model: Any) -> bool:
  """Whether ``model`` is a ViT module."""
  return isinstance(model, vit.VisionTransformer)


def owns_tree(params: Mapping[str, Any]) -> bool:
  """Whether a params tree is a ViT's (top-level ``Transformer``)."""
  return "Transformer" in params


def file_kind(keys) -> str | None:
  """``"vit"`` (timm), ``"vit_jax"`` or None for a checkpoint's keys."""
  if any(k.startswith("blocks.") for k in keys):
    return "vit"
  if any(k.startswith("Transformer/") for k in keys):
    return "vit_jax"
  return None


def adapt_file(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A timm ViT file as `checkpoint_sources` expects it (unchanged)."""
  return raw


def model_problems(model_config: Mapping[str, Any]) -> list[str]:
  """Problems of a ViT ``config.model`` (none beyond the generic checks)."""
  del model_config
  return []


def feature_width(model: vit.VisionTransformer) -> int:
  """Width of the pooled features the head reads (D)."""
  return model.hidden_size


def num_prefix(model: vit.VisionTransformer) -> int:
  """Tokens before the prompts: class and register tokens."""
  return model.num_prefix


def init_prompts(
  rng: jax.Array,
  model: vit.VisionTransformer,
  *,
  num_prompts: int | Sequence[int],
  variant: str = "deep",
) -> dict[str, jax.Array]:
  """VPT's init: uniform in ``sqrt(6 / (3 p^2 + D))`` (`vptpc.prompts`)."""
  return prompts_lib.init_prompts(
    rng,
    num_prompts=num_prompts,
    hidden_size=model.hidden_size,
    patch_size=model.patch_size,
    num_layers=model.num_layers,
    variant=variant,
  )


def final_norm_path(backbone: Mapping[str, Any]) -> tuple[str, ...]:
  """The LayerNorm the pooled features leave: ``fc_norm`` or the encoder's.

  Either way an affine change of it is the same change of the features
  (the encoder norm is per token, and the pool is a token or a mean).
  """
  if "fc_norm" in backbone:
    return ("fc_norm",)
  return ("Transformer", "encoder_norm")


def cast_backbone(
  model: vit.VisionTransformer, params: Mapping[str, Any], dtype: Any
) -> dict[str, Any]:
  """`vptpc.models.vit.cast_backbone` (LayerNorms stay float32)."""
  del model
  return vit.cast_backbone(params, dtype)


def build_kv_cache(
  model: vit.VisionTransformer,
  backbone: Mapping[str, Any],
  prompts: Mapping[str, jax.Array],
) -> dict[str, Any]:
  """Per-task prompt keys and values (`vptpc.models.vit.build_kv_cache`)."""
  return vit.build_kv_cache(
    backbone, prompts, model.num_heads, model.dtype, model.ln_eps
  )


def intermediates(found: Mapping[str, Any]) -> Mapping[str, Any]:
  """Where a ViT sows its per-block inputs (``Transformer``)."""
  return found["Transformer"]


def backbone_meta(backbone: Mapping[str, Any]) -> dict[str, Any]:
  """Width, depth and patch size from a ViT tree (shapes suffice)."""
  tf = backbone["Transformer"]
  return {
    "hidden_size": int(np.shape(backbone["embedding"]["kernel"])[-1]),
    "num_layers": sum(1 for k in tf if re.fullmatch(r"encoderblock_\d+", k)),
    "patch_size": int(np.shape(backbone["embedding"]["kernel"])[0]),
  }


def gmacs(
  model: vit.VisionTransformer,
  image_size: int,
  prompts_per_layer: int | Sequence[int],
  count: str,
  variant: str,
) -> float:
  """GMACs per image (`vptpc.flops.vit_gmacs`)."""
  del variant  # shallow prompts cost what deep ones do per block

  return flops.vit_gmacs(
    **flops.model_dims(model, image_size),
    prompts_per_layer=prompts_per_layer,
    count=count,
  )


# Keys a timm ViT file may carry that a VPT backbone does not use: the head
# (VPT trains a new one), i21k representation layers, DINOv2's mask token.
EXTRA_FILE_KEYS = ("head.", "pre_logits.", "mask_token")


def checkpoint_sources(want: Mapping[str, Any]) -> dict[str, convert.Src]:
  """Maps each ViT key (vit_jax names) to its timm key, shape, conversion."""
  out = {}
  blk = re.compile(r"Transformer/encoderblock_(\d+)/(.+)$")
  for k, t in want.items():
    shape = tuple(t.shape)
    m = blk.match(k)
    wb = "weight" if k.endswith(("kernel", "scale")) else "bias"
    if k == "cls":
      out[k] = convert.same(shape)._replace(key="cls_token")
    elif k == "reg_token":
      out[k] = convert.same(shape)._replace(key="reg_token")
    elif k.startswith("Transformer/norm_pre/"):
      out[k] = convert.same(shape)._replace(key=f"norm_pre.{wb}")
    elif k.startswith("fc_norm/"):
      out[k] = convert.same(shape)._replace(key=f"fc_norm.{wb}")
    elif m and m.group(2).startswith(("ls1/", "ls2/")):
      out[k] = convert.same(shape)._replace(
        key=f"blocks.{m.group(1)}.{m.group(2).replace('/', '.')}"
      )
    elif k == _POSEMB:
      out[k] = convert.same(shape)._replace(key="pos_embed")
    elif k.startswith("embedding/"):
      src = convert.conv(shape) if k.endswith("kernel") else convert.same(shape)
      out[k] = src._replace(
        key="patch_embed.proj." + ("weight" if k.endswith("kernel") else "bias")
      )
    elif k.startswith("Transformer/encoder_norm/"):
      out[k] = convert.same(shape)._replace(
        key="norm." + ("weight" if k.endswith("scale") else "bias")
      )
    elif k.startswith("head/"):
      src = (
        convert.linear(shape) if k.endswith("kernel") else convert.same(shape)
      )
      out[k] = src._replace(
        key="head." + ("weight" if k.endswith("kernel") else "bias")
      )
    elif m:
      i, rest = m.group(1), m.group(2)
      b = f"blocks.{i}."
      mod, leaf = rest.rsplit("/", 1)
      wb = "weight" if leaf in ("kernel", "scale") else "bias"
      ln = {"LayerNorm_0": "norm1", "LayerNorm_2": "norm2"}
      mlp = {"MlpBlock_3/Dense_0": "mlp.fc1", "MlpBlock_3/Dense_1": "mlp.fc2"}
      att = "MultiHeadDotProductAttention_1/"
      if mod in ln:
        out[k] = convert.same(shape)._replace(key=b + ln[mod] + "." + wb)
      elif mod in mlp:
        src = convert.linear(shape) if leaf == "kernel" else convert.same(shape)
        out[k] = src._replace(key=b + mlp[mod] + "." + wb)
      elif mod.startswith(att) and mod[len(att) :] in ("query", "key", "value"):
        j = ("query", "key", "value").index(mod[len(att) :])
        if leaf == "kernel":  # (D, heads, hd) <- rows j*D:(j+1)*D of (3D, D)
          d = shape[0]
          out[k] = convert.Src(
            b + "attn.qkv.weight",
            (3 * d, d),
            lambda w, j=j, d=d, s=shape: w[j * d : (j + 1) * d].T.reshape(s),
          )
        else:
          d = shape[0] * shape[1]
          out[k] = convert.Src(
            b + "attn.qkv.bias",
            (3 * d,),
            lambda w, j=j, d=d, s=shape: w[j * d : (j + 1) * d].reshape(s),
          )
      elif mod == att + "out":
        if leaf == "kernel":  # (heads, hd, D) <- (D, heads * hd)
          out[k] = convert.Src(
            b + "attn.proj.weight",
            (shape[2], shape[0] * shape[1]),
            lambda w, s=shape: w.T.reshape(s),
          )
        else:
          out[k] = convert.same(shape)._replace(key=b + "attn.proj.bias")
  return out


def file_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
  """Width, depth and patch size of a ViT file from its shapes, or {}."""
  kind = file_kind(shapes)
  if kind == "vit_jax" and "embedding/kernel" in shapes:
    blocks = {
      m.group(1)
      for k in shapes
      if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))
    }
    return {
      "hidden_size": int(shapes["embedding/kernel"][-1]),
      "num_layers": len(blocks),
      "patch_size": int(shapes["embedding/kernel"][0]),
    }
  if kind == "vit" and "patch_embed.proj.weight" in shapes:
    blocks = {
      m.group(1) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))
    }
    return {
      "hidden_size": int(shapes["patch_embed.proj.weight"][0]),
      "num_layers": len(blocks),
      "patch_size": int(shapes["patch_embed.proj.weight"][-1]),
    }
  return {}


def image_size_problems(
  name: str, image_size: int, fields: Mapping[str, Any]
) -> list[str]:
  """An input side the model's patch grid (and position embedding) fits."""
  patch = vit.get_model_config(name, **fields).patch_size
  if image_size > 0 and image_size % patch == 0:
    return []
  lo = max(patch, image_size // patch * patch)
  return [
    f"config.data.image_size={image_size} is not a multiple of {name}'s "
    f"patch size {patch}: the position embedding is resized to a whole "
    f"patch grid; use {lo} or {lo + patch}."
  ]
