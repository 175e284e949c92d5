"""Backbone families as plugins: which family a model name belongs to.

A family is one module under `vptpc.models` that owns everything particular
to it (`vptpc.models.vit_family`, `vptpc.models.swin_family`): the names it
builds, its Flax module, how timm's checkpoint names map onto its
parameters, its FLOP count, prompt init and metadata, its key/value cache
and whether `vptpc.export` writes its graphs. `FAMILIES` lists them by name
and they are imported by name (as big_vision imports its models), so the
rest of vptpc asks `family` / `family_of` and never tests for a family
itself. Adding a family is one module, one line in `FAMILIES` and its tests
(docs/backbones.md walks through one).

Which family a name belongs to follows one rule: the first family in
`FAMILIES` order whose ``knows`` accepts it. Swin names start with
``swin`` (any case; ``swin-testing`` is the tiny 32-px test Swin); every
other known name is a ViT (vit_jax's ``B/16``, ``tiny32``, ``testing``...,
and timm's checkpoint names such as ``vit_base_patch14_dinov2.lvd142m``).
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from vptpc.models import levers as levers_lib
from vptpc.models import vit_variants

# Family name -> its module. The order decides which family a name belongs
# to when several would accept it: the more specific rule first.
FAMILIES = {
  "swin": "vptpc.models.swin_family",
  "vit": "vptpc.models.vit_family",
}


def family(name: str) -> ModuleType:
  """The module of the family called ``name`` (a `FAMILIES` key).

  Raises:
    ValueError: an unknown family, with the known ones.
  """
  if name not in FAMILIES:
    raise ValueError(
      f"Unknown backbone family {name!r}; known: {', '.join(FAMILIES)}."
    )
  return importlib.import_module(FAMILIES[name])


def families() -> list[ModuleType]:
  """Every family module, in `FAMILIES` order."""
  return [family(n) for n in FAMILIES]


def _aliases() -> dict[str, str]:
  out: dict[str, str] = {}
  for fam in families():
    out.update(fam.ALIASES)
  return out


def canonical_name(name: str) -> str:
  """``name`` with short spellings (``ViT-B/16``, ``swin_b``) resolved."""
  name = str(name)
  return _aliases().get(name, name.removeprefix("timm/"))


def _standard() -> dict[str, str]:
  out: dict[str, str] = {}
  for fam in families():
    out.update(fam.STANDARD_CHECKPOINTS)
  return out


def no_checkpoint_message(config_file: str, model: str) -> str:
  """The error for a model without a standard file and no ``checkpoint=``."""
  files = ", ".join(f"{m}: {f}" for m, f in _standard().items())
  return (
    f"{config_file}: model={model!r} has no standard checkpoint file; pass "
    f"checkpoint=PATH, or for a timm checkpoint name fetch it once with "
    f"python -m vptpc.prepare --weights=timm/<name> (standard files: "
    f"{files}; timm names: docs/backbones.md)."
  )


def standard_checkpoint(name: str) -> str:
  """The standard checkpoint file name of a model, or "" if it has none."""
  return _standard().get(canonical_name(name), "")


def family_of_name(name: str) -> ModuleType:
  """The family module that builds ``config.model.name`` = ``name``.

  Raises:
    ValueError: naming ``config.model.name``, the bad value and every
      family's known names, when no family knows it.
  """
  name = canonical_name(name)
  for fam in families():
    if fam.knows(name):
      return fam
  if "." in name:  # a timm checkpoint name: the ones vptpc knows
    raise ValueError(
      f"config.model.name={name!r} is not a timm checkpoint vptpc knows; "
      f"known: {', '.join(timm_weight_names())} (docs/backbones.md)."
    )
  known = "; ".join(
    f"{fam.NAME}: {', '.join(n for n in fam.model_names() if '.' not in n)}"
    for fam in families()
  )
  raise ValueError(
    f"config.model.name={name!r} is not a known model. Known names, by "
    f"family: {known}; and timm checkpoint names (docs/backbones.md)."
  )


def model_family(name: str) -> str:
  """The family (a `FAMILIES` key) of a ``config.model.name``."""
  return family_of_name(name).NAME


def family_of(model: Any) -> ModuleType:
  """The family module of a built Flax model.

  Raises:
    TypeError: a module no family owns.
  """
  for fam in families():
    if fam.owns(model):
      return fam
  raise TypeError(f"{type(model).__name__} belongs to no backbone family.")


def family_of_tree(params: Mapping[str, Any]) -> ModuleType:
  """The family module of a params tree (from its top-level names).

  Raises:
    ValueError: a tree no family recognises, with its first keys.
  """
  for fam in families():
    if fam.owns_tree(params):
      return fam
  raise ValueError(
    f"Unknown backbone tree (top-level keys {sorted(params)[:6]}): no family "
    f"({', '.join(FAMILIES)}) recognises it."
  )


def model_rows() -> dict[str, str]:
  """Every canonical model name -> its family (aliases aside)."""
  return {n: fam.NAME for fam in families() for n in fam.model_names()}


def timm_weight_names() -> tuple[str, ...]:
  """Timm checkpoint names whose weights `vptpc.prepare` fetches by name."""
  return tuple(vit_variants.TIMM_WEIGHTS)


def pretrained(name: str) -> Any:
  """The preprocessing row of a timm checkpoint name, or None."""
  try:
    return family_of_name(name).pretrained(canonical_name(name))
  except ValueError:
    return None


def exportable(name: str) -> bool:
  """Whether `vptpc.export` writes graphs for ``name``'s family."""
  return family_of_name(name).EXPORTABLE


def model_problems(model_config: Mapping[str, Any]) -> list[str]:
  """Problems of a ``config.model`` that depend on its family (may be [])."""
  try:
    fam = family_of_name(model_config["name"])
  except ValueError as e:
    return [str(e)]
  return fam.model_problems(model_config)


def image_size_problems(
  model_config: Mapping[str, Any], image_size: int, fields: Mapping[str, Any]
) -> list[str]:
  """An input side the named model cannot take, named (may be [])."""
  try:
    fam = family_of_name(model_config["name"])
    return fam.image_size_problems(
      canonical_name(model_config["name"]), int(image_size), fields
    )
  except ValueError:
    return []  # the name or the fields are reported on their own


def create_model(
  name: str,
  *,
  num_classes: int | None,
  kv_only: bool = False,
  kv_shared: bool = True,
  prompt_dropout: float = 0.0,
  dtype: Any = jnp.float32,
  **fields: Any,
) -> Any:
  """Builds the model ``name`` names with its family's constructor.

  ``fields`` are the family module's own fields: for a ViT its speed
  options (``levers``, a `vptpc.models.levers.Levers`) and architecture
  overrides (``hidden_size``, ``num_layers``... for a shrunk test model
  of the same family). The former lever fields (``attention_impl=``,
  ``cudnn_multiple=``, ``kv_stacked=``) still work, with a
  DeprecationWarning naming ``levers=Levers(...)``.

  Raises:
    ValueError: an unknown name, or levers other than the defaults for a
      family other than the ViT's.
  """
  fam = family_of_name(name)
  fields = levers_lib.from_former_fields(
    fields, "vptpc.models.registry.create_model"
  )
  lev = fields.pop("levers", None) or levers_lib.Levers()
  if fam.NAME == "vit":
    fields["levers"] = lev
  elif lev != levers_lib.Levers():
    # Named as the config keys that set them (the family's own check).
    bad = fam.model_problems(dataclasses.asdict(lev))
    raise ValueError(" ".join(bad) or f"{lev!r} applies to ViT only.")
  return fam.create_model(
    canonical_name(name),
    num_classes=num_classes,
    kv_only=kv_only,
    kv_shared=kv_shared,
    prompt_dropout=prompt_dropout,
    dtype=dtype,
    **fields,
  )


def feature_width(model: Any) -> int:
  """Width of the features the head reads (ViT: D; Swin: last stage's)."""
  return family_of(model).feature_width(model)


def init_prompts(
  rng: jax.Array,
  model: Any,
  *,
  num_prompts: int | Sequence[int],
  variant: str = "deep",
) -> dict[str, jax.Array]:
  """VPT's prompt init for the model's family."""
  return family_of(model).init_prompts(
    rng, model, num_prompts=num_prompts, variant=variant
  )


def final_norm_path(backbone: Mapping[str, Any]) -> tuple[str, ...]:
  """Where the LayerNorm before the head lives in a backbone tree."""
  return family_of_tree(backbone).final_norm_path(backbone)


def cast_backbone(
  model: Any, params: Mapping[str, Any], dtype: Any
) -> dict[str, Any]:
  """The frozen backbone with its matmul weights stored in ``dtype``.

  The same function as the float32 backbone, bit for bit, without a cast
  per weight per step; each family keeps its LayerNorms (and Swin its
  relative-position tables) in float32.
  """
  return family_of(model).cast_backbone(model, params, dtype)


def build_kv_cache(
  model: Any, backbone: Mapping[str, Any], prompts: Mapping[str, jax.Array]
) -> dict[str, Any]:
  """A task's VPT-Deep prompts as per-block keys and values (serving)."""
  return family_of(model).build_kv_cache(model, backbone, prompts)


def standard_checkpoints() -> dict[str, str]:
  """Every family's standard checkpoint files, by canonical model name."""
  return _standard()


# Former names, kept: the Swin family's own constants (no warning), and
# module constants that are deprecated (a warning naming the new spelling).
_SWIN_CONSTANTS = {"SWIN_TESTING": "TESTING", "SWIN_B_TIMM": "SWIN_B_TIMM"}
_DEPRECATED = {
  "STANDARD_CHECKPOINTS": (
    "vptpc.models.registry.standard_checkpoints()",
    standard_checkpoints,
  ),
}


def _deprecated(old: str, new: str) -> None:

  warnings.warn(
    f"vptpc.models.registry.{old} is deprecated: use {new}.",
    DeprecationWarning,
    stacklevel=3,
  )


def __getattr__(name: str) -> Any:
  """Former module constants (see `_SWIN_CONSTANTS`, `_DEPRECATED`)."""
  if name in _SWIN_CONSTANTS:
    return getattr(family("swin"), _SWIN_CONSTANTS[name])
  if name in _DEPRECATED:
    new, get = _DEPRECATED[name]
    _deprecated(name, new)
    return get()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_swin_name(name: str) -> bool:
  """Deprecated: ``model_family(name) == "swin"``."""
  _deprecated("is_swin_name", 'model_family(name) == "swin"')
  return str(name).lower().startswith("swin")


def is_swin(model: Any) -> bool:
  """Deprecated: ``family_of(model).NAME == "swin"``."""
  _deprecated("is_swin", 'family_of(model).NAME == "swin"')
  return family_of(model).NAME == "swin"
