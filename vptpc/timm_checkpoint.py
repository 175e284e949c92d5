"""timm's `.safetensors` backbones (ViT and Swin), read without PyTorch.

`load_safetensors` reads the `.safetensors` files most people download from
the Hugging Face hub in timm's naming: timm's ViTs (``timm/vit_*``: the
ImageNet-21k ViT-B/16 VPT used, AugReg, MAE, CLIP, DINOv2...; docs/backbones.md)
and the Swin (``timm/swin_*``, e.g.
``timm/swin_base_patch4_window7_224.ms_in22k``). The `safetensors` package
reads them into NumPy without PyTorch. Each backbone family maps timm's
names onto its tree (`vptpc.models.registry`: `vptpc.models.vit` keeps
vit_jax names, `vptpc.models.swin` timm's), with the same strict diff and
messages as the `.npz` loader (`vptpc.npz_checkpoint`), and the ViT position
embedding or the Swin relative-position bias tables are resized when the
image or window size differs. `timm_fit` decides whether a file fits from
names and shapes alone, so the preflight checks a file's header with it.
Nothing is downloaded at run time (`vptpc.hub` fetches timm weights by
name, once).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from vptpc import npz_checkpoint
from vptpc.models import registry


def resize_posemb_timm(
  posemb: Any, num_prefix: int, new_grid: int
) -> np.ndarray:
  """Resizes a timm position embedding the way timm loads it at a new size.

  timm's ``resample_abs_pos_embed`` (what ``checkpoint_filter_fn`` applies,
  e.g. to DINOv2's 518-px embedding at 224 px): the ``num_prefix`` rows of
  the class and register tokens are kept, the patch rows are resized as a
  square grid with PyTorch's antialiased bicubic filter, which is
  ``jax.image.resize``'s ``cubic`` with antialiasing (Keys' a = -0.5,
  widened when shrinking; equal to timm's within float32 rounding).

  Args:
    posemb: (1, num_prefix + g*g, D) array.
    num_prefix: leading rows that are not patches (0 when the embedding
      covers the patches only).
    new_grid: the new grid side.

  Returns:
    (1, num_prefix + new_grid**2, D) float32 array.

  Raises:
    CheckpointError: the old grid is not square.
  """
  posemb = np.asarray(posemb, np.float64)
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  g_old = math.isqrt(grid.shape[0])
  if g_old * g_old != grid.shape[0] or new_grid < 1:
    raise npz_checkpoint.CheckpointError(
      f"Cannot resize a position embedding of {grid.shape[0]} patch rows to "
      f"a {new_grid}x{new_grid} grid: the patch grid must be square."
    )
  if g_old == new_grid:
    return posemb.astype(np.float32)
  g = grid.reshape(g_old, g_old, -1).astype(np.float32)
  out = jax.image.resize(
    jnp.asarray(g), (new_grid, new_grid, g.shape[-1]), "cubic", antialias=True
  )
  out = np.asarray(out, np.float32).reshape(1, new_grid**2, -1)
  return np.concatenate([prefix.astype(np.float32), out], axis=1)


SAFETENSORS_HINT = (
  "Download a timm .safetensors file, e.g. model.safetensors of "
  "timm/vit_base_patch16_224.orig_in21k (ViT-B/16, ImageNet-21k) or "
  "timm/swin_base_patch4_window7_224.ms_in22k (Swin-B, ImageNet-22k) from "
  "the Hugging Face hub, and point the config's checkpoint path at it."
)
# Shapes in messages, printed as the `.npz` reader prints them.
_fmt = npz_checkpoint.format_shape
# Buffers some files carry; never parameters.
_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a `.safetensors` file into float32 NumPy arrays.

  Uses the `safetensors` package (no PyTorch); bfloat16 tensors, which NumPy
  cannot represent, are read through JAX and widened.

  Raises:
    CheckpointError: the file is missing, not a safetensors file, or empty.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise npz_checkpoint.CheckpointError(
      f"Checkpoint file {path!r} does not exist. {SAFETENSORS_HINT}"
    )
  try:
    try:
      flat = load_file(path)
    except TypeError:  # e.g. "data type 'bfloat16' not understood"
      with safe_open(path, framework="flax") as f:
        flat = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
  except (SafetensorError, OSError, ValueError) as e:
    raise npz_checkpoint.CheckpointError(
      f"Checkpoint file {path!r} is not a readable .safetensors file "
      f"(truncated or another format?): {type(e).__name__}: {e}"
    ) from e
  if not flat:
    raise npz_checkpoint.CheckpointError(
      f"Checkpoint file {path!r} holds no tensors."
    )
  return {
    k: np.asarray(v, np.float32) if v.dtype.kind == "f" else np.asarray(v)
    for k, v in flat.items()
  }


def model_arch(template: Mapping[str, Any]) -> str:
  """The backbone family (``"vit"``, ``"swin"``...) of a params tree.

  Raises:
    CheckpointError: no family recognises the tree.
  """
  try:
    return registry.family_of_tree(template).NAME
  except ValueError as e:
    raise npz_checkpoint.CheckpointError(str(e)) from e


def file_kind(keys) -> str | None:
  """What a checkpoint's keys are, by the families' rules.

  A family's kind (``"vit"``, ``"swin"``, ``"vit_jax"``), or None for a
  layout no family knows.
  """
  for fam in registry.families():
    kind = fam.file_kind(keys)
    if kind is not None:
      return kind
  return None


def kind_words(kind: str | None) -> str:
  """``"a timm ViT"``...: what a `file_kind` is, in the family's words."""
  for fam in registry.families():
    if kind in fam.FILE_KINDS:
      return fam.FILE_KINDS[kind]
  return "a layout no backbone family knows"


def resize_rel_pos_table(table: Any, new_len: int) -> np.ndarray:
  """Resizes a Swin relative-position bias table to another window size.

  The ``((2w-1)^2, heads)`` table is a ``(2w-1) x (2w-1)`` grid per head,
  resized bicubically as ``torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False)`` does (cubic coefficient -0.75, half-pixel centres,
  clamped borders), which is what Microsoft's Swin code applies when
  fine-tuning at another window size. A same-size resize is the identity.

  Args:
    table: ``(S * S, heads)`` array.
    new_len: ``S2 * S2``, the new table length.

  Returns:
    (new_len, heads) float32 array.

  Raises:
    CheckpointError: either side is not a square grid.
  """
  table = np.asarray(table, np.float64)
  s_old, s_new = math.isqrt(table.shape[0]), math.isqrt(new_len)
  if s_old * s_old != table.shape[0] or s_new * s_new != new_len:
    raise npz_checkpoint.CheckpointError(
      f"Cannot resize a relative-position table of {table.shape[0]} rows to "
      f"{new_len}: both must be (2w-1)^2 for square windows."
    )
  w = _bicubic_matrix(s_old, s_new)
  grid = table.T.reshape(-1, s_old, s_old)
  out = np.einsum("ij,hjk,lk->hil", w, grid, w)
  return out.reshape(table.shape[1], -1).T.astype(np.float32)


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) 1-D bicubic interpolation weights (torch's convention)."""

  def kernel(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0

  m = np.zeros((n_out, n_in))
  scale = n_in / n_out
  for i in range(n_out):
    x = (i + 0.5) * scale - 0.5
    x0 = math.floor(x)
    t = x - x0
    for tap in range(-1, 3):
      m[i, min(max(x0 + tap, 0), n_in - 1)] += kernel(tap - t)
  return m


def _posemb_prefix_rows(want: Mapping[str, Any]) -> int:
  """Leading position-embedding rows of a ViT template that are not patches.

  The class and register tokens' rows, or none when the embedding covers
  the patches only (timm's ``no_embed_class``).
  """
  rows = want[npz_checkpoint.POSEMB_KEY].shape[1]
  prefix = ("cls" in want) + (
    want["reg_token"].shape[1] if "reg_token" in want else 0
  )
  patches = rows - prefix
  return prefix if math.isqrt(patches) ** 2 == patches else 0


class TimmFit(NamedTuple):
  """How a timm file's tensors (names and shapes) fit a params template."""

  sources: dict[str, Any]  # template key -> `vptpc.models.convert.Src`
  missing: list[str]  # "model key (shape) <- file key (shape)"
  extra: list[str]  # "file key (shape)"
  mismatched: list[str]  # "model key <- file key: ..."

  @property
  def ok(self) -> bool:
    """Whether the file fits."""
    return not (self.missing or self.extra or self.mismatched)

  def summary(self) -> str:
    """One line: the counts and the first offender of each kind."""
    parts = [
      f"{len(lines)} {what} (e.g. {lines[0].strip()})"
      for what, lines in (
        ("missing", self.missing),
        ("unexpected", self.extra),
        ("of another shape", self.mismatched),
      )
      if lines
    ]
    return "; ".join(parts)

  def report(self, source: str, arch: str) -> str:
    """Every offender, one per line, for `CheckpointError`."""
    lines = [f"{source} does not fit the model (timm {arch} names):"]
    if self.missing:
      lines.append("missing from the file (model key <- file key expected):")
      lines += [f"  {x}" for x in self.missing]
    if self.extra:
      lines.append("unexpected in the file (model has no such parameter):")
      lines += [f"  {x}" for x in self.extra]
    if self.mismatched:
      lines.append("shape mismatch:")
      lines += [f"  {x}" for x in self.mismatched]
    lines.append(
      "Check the model variant (patch size, width, depth, heads) matches "
      "the file."
    )
    return "\n".join(lines)


def timm_names(
  raw: Mapping[str, Any], want: Mapping[str, Any], arch: str
) -> dict[str, Any]:
  """A timm file's tensors (or shapes) under the names the family maps.

  The family's own renaming (`adapt_file`: Microsoft's Swin layout), and
  MAE's pretraining file, whose final ``norm`` is the one its fine-tuning
  (average pool, then ``fc_norm``) starts from (`vit_variants.TIMM_WEIGHTS`).
  """
  raw = dict(registry.family(arch).adapt_file(dict(raw)))
  if (
    "fc_norm/scale" in want
    and "fc_norm.weight" not in raw
    and "norm.weight" in raw
  ):
    logging.info("Using the file's final norm as fc_norm.")
    raw["fc_norm.weight"] = raw.pop("norm.weight")
    raw["fc_norm.bias"] = raw.pop("norm.bias")
  return raw


def timm_fit(
  shapes: Mapping[str, tuple[int, ...]],
  want: Mapping[str, Any],
  arch: str,
) -> TimmFit:
  """Whether a timm file fits a template, from names and shapes alone.

  What `load_safetensors` checks before it reads a value, and what the
  preflight checks from the file's header: every template parameter has its
  timm tensor with the shape the model implies (a head of another size, a
  position embedding or relative-position table that can be resized
  excepted), and the file has nothing else but what the family ignores.

  Args:
    shapes: ``{timm key: shape}`` of the file (after the family's
      ``adapt_file`` renaming, and MAE's ``norm`` -> ``fc_norm``).
    want: the flattened template (anything with ``.shape``).
    arch: the family name.

  Raises:
    CheckpointError: the template has parameters the family cannot name.
  """
  fam = registry.family(arch)
  sources = fam.checkpoint_sources(want)
  unmapped = sorted(set(want) - set(sources))
  if unmapped:
    raise npz_checkpoint.CheckpointError(
      f"The {arch} template has parameters with no timm name: {unmapped}."
    )
  used = {s.key for s in sources.values()}
  extra = [
    f"{k} {_fmt(v)}"
    for k, v in shapes.items()
    if k not in used
    and not k.startswith(fam.EXTRA_FILE_KEYS)
    and not k.endswith(_BUFFER_SUFFIXES)
  ]
  missing, mismatched = [], []
  for k, src in sources.items():
    t = tuple(want[k].shape)
    v = shapes.get(src.key)
    if v is None:
      if not k.startswith("head/"):
        missing.append(f"{k} {_fmt(t)} <- {src.key} {_fmt(src.shape)}")
      continue
    v = tuple(v)
    if v == src.shape or k.startswith("head/"):
      continue
    if k == npz_checkpoint.POSEMB_KEY and len(v) == 3 and v[-1] == t[-1]:
      pre = _posemb_prefix_rows(want)
      if math.isqrt(v[1] - pre) ** 2 != v[1] - pre:
        mismatched.append(
          f"{k} <- {src.key}: file {_fmt(v)} is not {pre} prefix rows and "
          f"a square patch grid, so it cannot be resized to {_fmt(t)}"
        )
      continue
    if (
      k.endswith("relative_position_bias_table")
      and len(v) == 2
      and v[1] == t[1]
    ):
      continue
    mismatched.append(
      f"{k} <- {src.key}: model {_fmt(t)} (file shape {_fmt(src.shape)} "
      f"expected), file {_fmt(v)}"
    )
  return TimmFit(sources, missing, extra, mismatched)


def load_safetensors(
  path: str | os.PathLike,
  template: Mapping[str, Any],
  *,
  arch: str | None = None,
) -> dict[str, Any]:
  """Loads a timm-named `.safetensors` ViT or Swin onto a params template.

  timm names are renamed onto vptpc's by the model's family
  (``checkpoint_sources`` of `vptpc.models.vit_family` and
  `vptpc.models.swin_family`): Linear weights are transposed, conv weights
  go from OIHW to HWIO, LayerNorm ``weight`` becomes ``scale``, and timm's
  fused ViT ``qkv`` is split into the query/key/value kernels of shape (D,
  heads, head_dim). Swin files in Microsoft's original layout (patch
  merging at the end of a stage, ``head.weight``) are renumbered as timm
  does, and MAE's final ``norm`` becomes ``fc_norm`` (`timm_names`). The
  file must fit the template exactly (`timm_fit`), except that the ViT
  position embedding (antialiased bicubic, as timm: `resize_posemb_timm`)
  and the Swin relative-position tables (bicubic, `resize_rel_pos_table`)
  are resized when the template's image or window size differs.

  Args:
    path: local ``.safetensors`` file.
    template: the model's params tree (arrays or ShapeDtypeStructs); a
      ``head`` whose shape the file does not match is taken from it.
    arch: the family (``"vit"``, ``"swin"``); from the template if None.

  Returns:
    The params tree with the template's structure, float32 NumPy arrays.

  Raises:
    CheckpointError: the file is missing or unreadable, holds another
      architecture, or has missing, unexpected or mis-shaped keys (all
      listed, with timm and vptpc names).
  """
  source = f"{os.fspath(path)!r}"
  arch = arch or model_arch(template)
  try:
    fam = registry.family(arch)
  except ValueError as e:
    raise npz_checkpoint.CheckpointError(str(e)) from e
  raw = read_safetensors(path)
  found = file_kind(raw)
  if found != arch:
    sample = ", ".join(sorted(raw)[:5])
    raise npz_checkpoint.CheckpointError(
      f"{source} is {kind_words(found)} checkpoint, but the model is "
      f"a {fam.DISPLAY} (first keys: {sample})."
    )
  want = npz_checkpoint.flatten(template)
  raw = timm_names(raw, want, arch)
  fit = timm_fit({k: tuple(v.shape) for k, v in raw.items()}, want, arch)
  if not fit.ok:
    raise npz_checkpoint.CheckpointError(fit.report(source, arch))
  out = {}
  for k, src in fit.sources.items():
    t = want[k]
    v = raw.get(src.key)
    if v is None or (k.startswith("head/") and tuple(v.shape) != src.shape):
      out[k] = t  # no head, or one for another label set: VPT trains one
    elif tuple(v.shape) == src.shape:
      out[k] = np.asarray(src.convert(v), np.float32)
    elif k == npz_checkpoint.POSEMB_KEY:
      pre = _posemb_prefix_rows(want)
      logging.info(
        "Resizing %s from %s to %s (bicubic, antialiased, as timm).",
        src.key,
        v.shape,
        tuple(t.shape),
      )
      out[k] = resize_posemb_timm(v, pre, math.isqrt(t.shape[1] - pre))
    else:  # a relative-position table (`timm_fit` allows no other)
      logging.info(
        "Resizing %s from %s to %s (bicubic).", src.key, v.shape, tuple(t.shape)
      )
      out[k] = resize_rel_pos_table(v, t.shape[0])
  return npz_checkpoint.unflatten(out)
