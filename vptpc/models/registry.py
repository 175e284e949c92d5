"""Which backbone family a ``config.model.name`` names, and family dispatch.

One rule decides the family, so no name is ambiguous:

* a name that starts with ``swin`` (any case) is a Swin: the variants
  ``Swin-T``/``Swin-S``/``Swin-B``/``Swin-L``, the short forms ``swin_b``,
  ``swin-b``, timm names such as ``swin_base_patch4_window7_224`` (a
  pretrained tag ``.ms_in22k`` may follow), and ``swin-testing``, the tiny
  32-px test Swin (`vptpc.models.swin`'s ``testing`` variant);
* every other name is a ViT (`vptpc.models.vit.model_names`, e.g. ``B/16``,
  ``tiny32``). The bare name ``testing`` is vit_jax's test ViT, as it always
  was; the Swin one is spelled ``swin-testing``.

The functions below hide the few places where the two families differ: the
module's constructor (`create_model`), the pooled feature width
(`feature_width`), VPT's prompt init (`init_prompts`), the final norm the
pre-logit standardisation folds into (`final_norm_path`) and the bf16
backbone cast (`cast_backbone`). Everything else (the frozen/head split,
the train and eval steps, Prompt Condensation) is the same code for both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vptpc.models import swin, vit

FAMILIES = ("vit", "swin")
SWIN_TESTING = "swin-testing"
# The pretrained Swin-B VPT reports (vpt.md §8), in timm's naming.
SWIN_B_TIMM = "swin_base_patch4_window7_224"


# The file each pretrained backbone VPT / the PC paper use is saved as (in
# the working directory, unless a config names another path); vptpc never
# downloads it. Keys are canonical names (`canonical_name`).
STANDARD_CHECKPOINTS = {
  "B/16": "imagenet21k_ViT-B_16.npz",
  SWIN_B_TIMM: f"{SWIN_B_TIMM}.ms_in22k.safetensors",
}
# Spellings of those two models that configs accept.
_ALIASES = {
  "swin_b": SWIN_B_TIMM,
  "swin-b": SWIN_B_TIMM,
  "Swin-B": SWIN_B_TIMM,
  "ViT-B/16": "B/16",
  "ViT-B_16": "B/16",
}


def canonical_name(name: str) -> str:
  """``name`` with the short spellings of ViT-B/16 and Swin-B resolved."""
  return _ALIASES.get(name, name)


def no_checkpoint_message(config_file: str, model: str) -> str:
  """The error for a model without a standard file and no ``checkpoint=``."""
  files = ", ".join(f"{m}: {f}" for m, f in STANDARD_CHECKPOINTS.items())
  return (
    f"{config_file}: model={model!r} has no standard checkpoint file; pass "
    f"checkpoint=PATH (standard files: {files})."
  )


def standard_checkpoint(name: str) -> str:
  """The standard checkpoint file name of a model, or "" if it has none."""
  return STANDARD_CHECKPOINTS.get(canonical_name(name), "")


def is_swin_name(name: str) -> bool:
  """Whether ``name`` names a Swin (module docstring: the one rule)."""
  return str(name).lower().startswith("swin")


def swin_variant(name: str) -> str:
  """The `vptpc.models.swin` variant name for a Swin ``config.model.name``."""
  return "testing" if name.lower().replace("_", "-") == SWIN_TESTING else name


def model_rows() -> dict[str, str]:
  """Every canonical model name -> its family (aliases aside).

  ViT names come from `vptpc.models.vit.model_names`; Swin names are its
  variants (``testing`` as ``swin-testing``) and timm's Swin names.
  """
  rows = {n: "vit" for n in vit.model_names()}
  for n in swin.model_names():
    rows[SWIN_TESTING if n == "testing" else n] = "swin"
  for n in swin._TIMM_NAMES:  # noqa: SLF001 (the module's own name table)
    rows[n] = "swin"
  return rows


def model_family(name: str) -> str:
  """``"vit"`` or ``"swin"`` for a ``config.model.name`` (module docstring).

  Raises:
    ValueError: naming ``config.model.name``, the bad value and the known
      names of both families, when neither family knows it.
  """
  try:
    if is_swin_name(name):
      swin.get_model_config(swin_variant(name))
      return "swin"
    vit.get_model_config(name)
    return "vit"
  except ValueError:
    pass
  raise ValueError(
    f"config.model.name={name!r} is not a known model. ViT: "
    f"{', '.join(vit.model_names())}. Swin: "
    f"{', '.join(n for n, f in model_rows().items() if f == 'swin')} (also "
    "'swin_b'-style short names and timm names with a pretrained tag, e.g. "
    f"'{SWIN_B_TIMM}.ms_in22k')."
  )


def model_problems(model_config: Mapping[str, Any]) -> list[str]:
  """Problems of a ``config.model`` that depend on its family (may be [])."""
  try:
    family = model_family(model_config["name"])
  except ValueError as e:
    return [str(e)]
  out = []
  if family == "swin":
    # Swin's window attention has a single implementation; silently
    # ignoring a ViT-only setting would hide a misconfigured run.
    if model_config.get("attention_impl", ""):
      out.append(
        f"config.model.attention_impl={model_config['attention_impl']!r} "
        "applies to ViT only; Swin's window attention has one "
        "implementation: leave it ''."
      )
    if model_config.get("fuse_qkv", False):
      out.append(
        "config.model.fuse_qkv=True applies to ViT only (Swin's qkv "
        "projection is already one fused matmul): leave it False."
      )
    for key, default in (("cudnn_multiple", 0), ("kv_stacked", False)):
      if model_config.get(key, default) not in (default, None):
        out.append(
          f"config.model.{key}={model_config[key]!r} applies to ViT only: "
          f"leave it {default!r}."
        )
    for key in ("gelu_vjp", "ln_vjp"):
      if model_config.get(key, "auto") not in ("auto", None):
        out.append(
          f"config.model.{key}={model_config[key]!r} applies to ViT only "
          "(a Swin's GELU and LayerNorms use autodiff): leave it 'auto'."
        )
  return out


def own_vjp_setting(value: str | bool | None) -> bool | None:
  """A ``config.model.gelu_vjp`` / ``ln_vjp`` value as the ViT field's value.

  ``"auto"`` (or None) is None, which `vptpc.models.vit.own_vjp_default`
  resolves per backend; ``"on"`` / ``"off"`` (or a bool) force it.

  Raises:
    ValueError: any other value, named.
  """
  if value is None or isinstance(value, bool):
    return value
  table = {"auto": None, "on": True, "off": False}
  if value not in table:
    raise ValueError(
      f"An own-VJP setting must be 'auto', 'on' or 'off', got {value!r}."
    )
  return table[value]


def create_model(
  name: str,
  *,
  num_classes: int | None,
  kv_only: bool = False,
  kv_shared: bool = True,
  prompt_dropout: float = 0.0,
  dtype: Any = jnp.float32,
  attention_impl: str | None = None,
  fuse_qkv: bool = False,
  gelu_vjp: bool | None = None,
  ln_vjp: bool | None = None,
  cudnn_multiple: int | None = None,
  kv_stacked: bool = False,
) -> vit.VisionTransformer | swin.SwinTransformer:
  """Builds the ViT or Swin that ``name`` names (see `model_family`).

  ``gelu_vjp``, ``ln_vjp``, ``cudnn_multiple`` (0 or None: the default)
  and ``kv_stacked`` are `vptpc.models.vit.VisionTransformer`'s fields
  (None: per backend).

  Raises:
    ValueError: an unknown name, or a ViT-only option (``attention_impl``,
      ``fuse_qkv``, ``gelu_vjp``, ``ln_vjp``, ``cudnn_multiple``,
      ``kv_stacked``) given for a Swin.
  """
  kw = dict(
    num_classes=num_classes,
    kv_only=kv_only,
    kv_shared=kv_shared,
    prompt_dropout=prompt_dropout,
    dtype=dtype,
  )
  if model_family(name) == "swin":
    bad = model_problems(
      {
        "name": name,
        "attention_impl": attention_impl,
        "fuse_qkv": fuse_qkv,
        "gelu_vjp": gelu_vjp,
        "ln_vjp": ln_vjp,
        "cudnn_multiple": cudnn_multiple,
        "kv_stacked": kv_stacked,
      }
    )
    if bad:
      raise ValueError(" ".join(bad))
    return swin.create_model(swin_variant(name), **kw)
  return vit.create_model(
    name,
    attention_impl=attention_impl,
    fuse_qkv=fuse_qkv,
    gelu_vjp=gelu_vjp,
    ln_vjp=ln_vjp,
    cudnn_multiple=cudnn_multiple or None,
    kv_stacked=kv_stacked,
    **kw,
  )


def is_swin(model: Any) -> bool:
  """Whether ``model`` is a `vptpc.models.swin.SwinTransformer`."""
  return isinstance(model, swin.SwinTransformer)


def feature_width(model: Any) -> int:
  """Width of the features the head reads (ViT: D; Swin: last stage's)."""
  return model.num_features if is_swin(model) else model.hidden_size


def init_prompts(
  rng: jax.Array,
  model: Any,
  *,
  num_prompts: int | Sequence[int],
  variant: str = "deep",
) -> dict[str, jax.Array]:
  """VPT's prompt init for the model's family.

  ViT: uniform in ``sqrt(6 / (3 p^2 + D))`` (`vptpc.prompts.init_prompts`);
  Swin: one set per block with the stage's width, uniform in the official
  Swin bound (`vptpc.models.swin.init_prompts`).
  """
  if is_swin(model):
    return swin.init_prompts(
      rng, model, num_prompts=num_prompts, variant=variant
    )
  from vptpc import prompts as prompts_lib

  return prompts_lib.init_prompts(
    rng,
    num_prompts=num_prompts,
    hidden_size=model.hidden_size,
    patch_size=model.patch_size,
    num_layers=model.num_layers,
    variant=variant,
  )


def final_norm_path(backbone: Mapping[str, Any]) -> tuple[str, ...]:
  """Where the LayerNorm before the head lives in a backbone tree.

  ViT: ``Transformer/encoder_norm`` (it normalises the class token); Swin:
  ``norm`` (it normalises every token before the average pool, so an
  affine change of it is the same change of the pooled features).
  """
  if "Transformer" in backbone:
    return ("Transformer", "encoder_norm")
  if "patch_embed" in backbone and "norm" in backbone:
    return ("norm",)
  raise ValueError(
    "The backbone is neither a vptpc ViT ('Transformer', ...) nor a Swin "
    f"('patch_embed', 'norm', ...): top-level keys {sorted(backbone)}."
  )


# Swin parameters that must stay float32 in a cast backbone: LayerNorms
# (applied in float32 whatever the compute dtype) and the relative-position
# bias table, which `swin.WindowAttention` indexes and adds to float32
# attention logits as it is; cast to bf16 it would be rounded, not the
# same function.
_SWIN_KEEP_F32 = ("norm", "norm1", "norm2", "relative_position_bias_table")


def cast_backbone(
  model: Any, params: Mapping[str, Any], dtype: Any
) -> dict[str, Any]:
  """The frozen backbone with its matmul/conv weights stored in ``dtype``.

  The same function as the float32 backbone, bit for bit, without a cast
  per weight per step. ViT: `vptpc.models.vit.cast_backbone`. Swin: every
  Dense/Conv kernel and bias is cast (each module casts them to its compute
  dtype on every call anyway); LayerNorm parameters (``norm``, ``norm1``,
  ``norm2``, ``patch_embed/norm``, ``downsample/norm``) and the
  relative-position bias tables stay float32.
  """
  if not is_swin(model):
    return vit.cast_backbone(params, dtype)
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return dict(params)

  def cast(path, x):
    names = [getattr(k, "key", str(k)) for k in path]
    if any(n in _SWIN_KEEP_F32 for n in names):
      return x
    return jnp.asarray(x, dtype)

  return jax.tree_util.tree_map_with_path(cast, dict(params))
