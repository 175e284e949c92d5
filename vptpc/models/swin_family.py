"""The Swin family: everything vptpc knows that is particular to Swins.

The Flax module lives in `vptpc.models.swin`; this module is the family's
plugin (`vptpc.models.registry`): its names (a name starting with ``swin``,
any case, is a Swin; ``swin-testing`` is the tiny 32-px test Swin), how a
timm ``.safetensors`` file's names map onto the module's, its FLOP count,
prompt init and metadata, the key/value cache, and that `vptpc.export`
does not write its graphs (`vptpc.serve` serves Swin tasks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vptpc import flops
from vptpc.models import convert, swin

NAME = "swin"
DISPLAY = "Swin"
EXPORTABLE = False
READS_NPZ = False
# Window attention: no square maps over the whole sequence.
GLOBAL_ATTENTION = False
TESTING = "swin-testing"
# The random-init 32-px model of `smoke` configs.
SMOKE_MODEL = TESTING
# The pretrained Swin-B VPT reports, in timm's naming.
SWIN_B_TIMM = "swin_base_patch4_window7_224"
STANDARD_CHECKPOINTS = {SWIN_B_TIMM: f"{SWIN_B_TIMM}.ms_in22k.safetensors"}
ALIASES = {"swin_b": SWIN_B_TIMM, "swin-b": SWIN_B_TIMM, "Swin-B": SWIN_B_TIMM}
CHECKPOINT_FIX = (
  "download model.safetensors of timm/swin_base_patch4_window7_224.ms_in22k "
  "from the Hugging Face hub yourself (vptpc never downloads it; Swin-B, "
  "ImageNet-22k) and pass its path as --config.model.checkpoint_path=PATH "
  "(configs/vtab.py: checkpoint=PATH); docs/swin.md"
)
FILE_KINDS = {"swin": "a timm Swin"}
EXTRA_FILE_KEYS = ("head.",)


def _variant(name: str) -> str:
  return "testing" if name.lower().replace("_", "-") == TESTING else name


def knows(name: str) -> bool:
  """Whether ``name`` is a Swin (it starts with ``swin`` and is known)."""
  if not str(name).lower().startswith("swin"):
    return False
  try:
    swin.get_model_config(_variant(name))
  except ValueError:
    return False
  return True


def model_names() -> tuple[str, ...]:
  """Every canonical Swin name (``testing`` as ``swin-testing``)."""
  names = [TESTING if n == "testing" else n for n in swin.model_names()]
  return tuple(names) + tuple(swin._TIMM_NAMES)  # noqa: SLF001


def pretrained(name: str) -> None:
  """Swin checkpoints carry no preprocessing row (ImageNet's applies)."""
  del name


def create_model(name: str, **fields: Any) -> swin.SwinTransformer:
  """The `vptpc.models.swin.SwinTransformer` of ``name``."""
  return swin.create_model(_variant(name), **fields)


def owns(model: Any) -> bool:
  """Whether ``model`` is a Swin module."""
  return isinstance(model, swin.SwinTransformer)


def owns_tree(params: Mapping[str, Any]) -> bool:
  """Whether a params tree is a Swin's (``patch_embed`` and stages)."""
  return "patch_embed" in params and any(
    k.startswith("layers_") for k in params
  )


def file_kind(keys) -> str | None:
  """``"swin"`` for a timm Swin checkpoint's keys, else None."""
  if any(k.startswith("layers.") and ".blocks." in k for k in keys):
    return "swin"
  return None


def adapt_file(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renumbers Microsoft's layout (merging closes a stage) as timm's."""
  if "layers.0.downsample.reduction.weight" not in raw:
    return raw
  return {
    re.sub(
      r"^layers\.(\d+)\.downsample",
      lambda m: f"layers.{int(m.group(1)) + 1}.downsample",
      k,
    )
    .replace("head.weight", "head.fc.weight")
    .replace("head.bias", "head.fc.bias"): v
    for k, v in raw.items()
  }


# ViT-only ``config.model`` keys (`vptpc.models.levers.Levers`) and the value
# a Swin needs them to keep.
_VIT_ONLY = {
  "attention_impl": ("", "Swin's window attention has one implementation"),
  "cudnn_multiple": (0, ""),
  "kv_stacked": (False, ""),
}


def model_problems(model_config: Mapping[str, Any]) -> list[str]:
  """ViT-only settings given for a Swin, each named.

  Silently ignoring them would hide a misconfigured run.
  """
  out = []
  for key, (default, why) in _VIT_ONLY.items():
    value = model_config.get(key, default)
    if value in (default, None) or (default == "" and not value):
      continue
    because = f" ({why})" if why else ""
    out.append(
      f"config.model.{key}={value!r} applies to ViT only{because}: "
      f"leave it {default!r}."
    )
  return out


def feature_width(model: swin.SwinTransformer) -> int:
  """Width of the pooled features (the last stage's)."""
  return model.num_features


def num_prefix(model: swin.SwinTransformer) -> int:
  """A Swin has no class or register tokens."""
  del model
  return 0


def init_prompts(
  rng: jax.Array,
  model: swin.SwinTransformer,
  *,
  num_prompts: int | Sequence[int],
  variant: str = "deep",
) -> dict[str, jax.Array]:
  """One set per block with the stage's width (`swin.init_prompts`)."""
  return swin.init_prompts(rng, model, num_prompts=num_prompts, variant=variant)


def final_norm_path(backbone: Mapping[str, Any]) -> tuple[str, ...]:
  """``norm``: it normalises every token before the average pool."""
  del backbone
  return ("norm",)


# Parameters that stay float32 in a cast backbone: LayerNorms (applied in
# float32 whatever the compute dtype) and the relative-position bias table,
# which is added to float32 attention logits as it is.
_KEEP_F32 = ("norm", "norm1", "norm2", "relative_position_bias_table")


def cast_backbone(
  model: swin.SwinTransformer, params: Mapping[str, Any], dtype: Any
) -> dict[str, Any]:
  """Dense/Conv kernels and biases in ``dtype``; norms and tables float32."""
  del model
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return dict(params)

  def cast(path, x):
    names = [getattr(k, "key", str(k)) for k in path]
    if any(n in _KEEP_F32 for n in names):
      return x
    return jnp.asarray(x, dtype)

  return jax.tree_util.tree_map_with_path(cast, dict(params))


def build_kv_cache(
  model: swin.SwinTransformer,
  backbone: Mapping[str, Any],
  prompts: Mapping[str, jax.Array],
) -> dict[str, Any]:
  """Per-task prompt keys and values (`swin.build_kv_cache`)."""
  return swin.build_kv_cache(model, backbone, prompts)


def intermediates(found: Mapping[str, Any]) -> Mapping[str, Any]:
  """A Swin sows its per-block inputs at the top level."""
  return found


def _widths(backbone: Mapping[str, Any]) -> list[int]:
  """Width of every block in order (from its ``norm1`` scale)."""
  widths = []
  stages = sorted(
    (k for k in backbone if re.fullmatch(r"layers_\d+", k)),
    key=lambda k: int(k[7:]),
  )
  for s in stages:
    blocks = sorted(
      (k for k in backbone[s] if re.fullmatch(r"blocks_\d+", k)),
      key=lambda k: int(k[7:]),
    )
    widths += [
      int(np.shape(backbone[s][b]["norm1"]["scale"])[0]) for b in blocks
    ]
  return widths


def backbone_meta(backbone: Mapping[str, Any]) -> dict[str, Any]:
  """Widths per block (prompt widths follow the stages) and the rest."""
  widths = _widths(backbone)
  return {
    "arch": NAME,
    "hidden_size": int(np.shape(backbone["norm"]["scale"])[0]),
    "num_layers": len(widths),
    "widths": widths,
    "patch_size": int(np.shape(backbone["patch_embed"]["proj"]["kernel"])[0]),
  }


def gmacs(
  model: swin.SwinTransformer,
  image_size: int,
  prompts_per_layer: int | Sequence[int],
  count: str,
  variant: str,
) -> float:
  """GMACs per image (`vptpc.flops.swin_gmacs`)."""
  return flops.swin_gmacs(
    **flops.swin_dims(model, image_size),
    prompts_per_layer=prompts_per_layer,
    variant=variant,
    count=count,
  )


def checkpoint_sources(want: Mapping[str, Any]) -> dict[str, convert.Src]:
  """Maps each Swin key to its timm key, timm shape and conversion."""
  out = {}
  for k, t in want.items():
    parts = k.split("/")
    leaf = parts[-1]
    base = ".".join(
      re.sub(r"^(layers|blocks)_(\d+)$", r"\1.\2", p) for p in parts[:-1]
    )
    if base == "head":
      base = "head.fc"
    shape = tuple(t.shape)
    if leaf == "kernel":
      src = convert.conv(shape) if len(shape) == 4 else convert.linear(shape)
      name = "weight"
    elif leaf == "scale":
      src, name = convert.same(shape), "weight"
    else:
      src, name = convert.same(shape), leaf
    out[k] = src._replace(key=f"{base}.{name}")
  return out


def file_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
  """Widths per block, depth and patch size of a Swin file, or {}."""
  if file_kind(shapes) != "swin" or "norm.weight" not in shapes:
    return {}
  found = [
    (int(m.group(1)), int(m.group(2)), int(v[0]))
    for k, v in shapes.items()
    if (m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.norm1\.weight", k))
  ]
  widths = [w for _, _, w in sorted(found)]
  return {
    "arch": NAME,
    "hidden_size": int(shapes["norm.weight"][0]),
    "num_layers": len(widths),
    "widths": widths,
    "patch_size": int(shapes["patch_embed.proj.weight"][-1]),
  }


def image_size_problems(
  name: str, image_size: int, fields: Mapping[str, Any]
) -> list[str]:
  """An input side every stage's patch merging halves evenly."""
  cfg = swin.get_model_config(_variant(name), **fields)
  unit = cfg.patch_size * 2 ** (len(cfg.depths) - 1)
  if image_size > 0 and image_size % unit == 0:
    return []
  lo = max(unit, image_size // unit * unit)
  return [
    f"config.data.image_size={image_size} is not a multiple of {unit} "
    f"({name}: patch {cfg.patch_size}, halved by each of "
    f"{len(cfg.depths) - 1} patch mergings); use {lo} or {lo + unit}."
  ]
