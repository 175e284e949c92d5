"""Reading backbones: Google's vit_jax `.npz` files and timm's `.safetensors`.

Google's ViT checkpoints (`ViT-B_16.npz` from ImageNet-21k, the augreg files)
are flat `.npz` archives whose keys are `/`-joined paths such as
``Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel``. `vptpc.models.vit`
uses the same names, so loading is a key-for-key copy with a strict diff:

* ``head/*`` may be missing from the file (VPT trains a new head);
* ``head/*`` and ``pre_logits/*`` may be extra in the file (the i21k head is
  all zeros and `pre_logits` is a representation layer VPT does not use);
* anything else missing, extra or of the wrong shape raises one
  `CheckpointError` that lists every offending key with its shapes;
* the position embedding is resized bilinearly over the patch grid when the
  image size differs from the checkpoint's (logged).

Prompts are never part of a backbone file; they live in their own small file
(`vptpc.prompts.save_prompts`).

`load_safetensors` reads the `.safetensors` files most people download from
the Hugging Face hub in timm's naming: timm's ViTs (``timm/vit_*``: the
ImageNet-21k ViT-B/16 VPT used, AugReg, MAE, CLIP, DINOv2...; docs/backbones.md)
and the Swin (``timm/swin_*``, e.g.
``timm/swin_base_patch4_window7_224.ms_in22k``). The `safetensors` package
reads them into NumPy without PyTorch. Each backbone family maps timm's
names onto its tree (`vptpc.models.registry`: `vptpc.models.vit` keeps
vit_jax names, `vptpc.models.swin` timm's), with the same strict diff and
messages as the `.npz` loader, and the ViT position embedding or the Swin
relative-position bias tables are resized when the image or window size
differs. `load_pretrained` picks the reader from the file suffix. Nothing
is downloaded at run time (`vptpc.hub` fetches timm weights by name, once).
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from vptpc.models import registry

POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
# Keys a checkpoint may lack (the new task gets a fresh head).
ALLOWED_MISSING_PREFIXES = ("head/",)
# Keys a checkpoint may carry that a VPT backbone does not use.
ALLOWED_EXTRA_PREFIXES = ("head/", "pre_logits/")


class CheckpointError(ValueError):
  """A checkpoint file is missing, unreadable, or does not fit the model."""


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Flattens a nested dict into ``{"a/b/c": leaf}`` (vit_jax key layout)."""
  return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Rebuilds the nested dict from `/`-joined keys (vit_jax `recover_tree`)."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every array of an `.npz` file into memory.

  Args:
    path: a local file.

  Returns:
    ``{key: float32 array}`` exactly as stored (keys `/`-joined).

  Raises:
    CheckpointError: the file is missing, not an `.npz`, or truncated.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(
      f"Checkpoint file {path!r} does not exist. Download a vit_jax .npz "
      "(e.g. ViT-B_16.npz) or use the embedded default backbone."
    )
  if not zipfile.is_zipfile(path):
    # np.load would try it as a pickle and advise allow_pickle=True: wrong
    # advice for a corrupt or truncated file.
    raise CheckpointError(
      f"Checkpoint file {path!r} is not a .npz archive (not a zip file: "
      "truncated, corrupt or another format). Re-download the vit_jax .npz."
    )
  try:
    with np.load(path, allow_pickle=False) as z:
      # Reading each array now surfaces truncation here, not mid-training.
      flat = {k: np.asarray(z[k]) for k in z.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise CheckpointError(
      f"Checkpoint file {path!r} is a damaged .npz archive "
      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
      "Re-download the vit_jax .npz."
    ) from e
  if not flat:
    raise CheckpointError(f"Checkpoint file {path!r} holds no arrays.")
  return flat


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
  """Every array's shape in an `.npz` or `.safetensors` file, data unread.

  An `.npz` is a zip of `.npy` members whose headers hold the shapes; a
  `.safetensors` file starts with a JSON header that does. Either costs
  milliseconds for a 350 MB ViT-B/16, so preflight checks can use it.

  Args:
    path: a local `.npz` or `.safetensors` file.

  Returns:
    ``{key: shape}`` (npz keys without the ``.npy`` suffix).

  Raises:
    CheckpointError: the file is missing or its headers are unreadable.
  """
  import json
  import struct

  path = os.fspath(path)
  try:
    if path.endswith(".safetensors"):
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
      return {
        k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"
      }
    read = {
      (1, 0): np.lib.format.read_array_header_1_0,
      (2, 0): np.lib.format.read_array_header_2_0,
    }
    out = {}
    with zipfile.ZipFile(path) as z:
      for info in z.infolist():
        with z.open(info) as f:
          shape, _, _ = read[np.lib.format.read_magic(f)](f)
        out[info.filename.removesuffix(".npy")] = tuple(shape)
    return out
  except (OSError, ValueError, KeyError, struct.error, zipfile.BadZipFile) as e:
    raise CheckpointError(
      f"Cannot read the array headers of {path!r} ({type(e).__name__}: {e})."
    ) from e


def backbone_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
  """Width, depth and patch size of a backbone file, from its shapes alone.

  Knows vit_jax `.npz` keys and timm's ViT and Swin `.safetensors` keys;
  the fields are those `vptpc.prompts.save_prompts` records (Swin adds the
  per-block ``widths``).

  Args:
    shapes: `read_shapes` of the file.

  Returns:
    ``{"hidden_size", "num_layers", "patch_size"}`` (+ ``arch``, ``widths``
    for Swin), or ``{}`` for a layout it does not know.
  """
  for fam in registry.families():
    dims = fam.file_dims(shapes)
    if dims:
      return dims
  return {}


def save_npz(path: str | os.PathLike, params: Mapping[str, Any]) -> None:
  """Writes a params tree as a vit_jax-layout `.npz`, atomically.

  The file is written to a temporary name and renamed, so an interrupted
  write never replaces an existing good file with a truncated one.

  Args:
    path: destination (``.npz`` is not appended).
    params: nested dict of arrays (backbone, optionally ``head``).
  """
  path = os.fspath(path)
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def resize_posemb(posemb: Any, new_num_tokens: int) -> np.ndarray:
  """Resizes a (1, 1 + g*g, D) position embedding to ``new_num_tokens``.

  The class-token row is kept; the patch rows are resized bilinearly as a
  g x g grid to the new square grid (vit_jax does the same with an order-1
  zoom). A same-size resize is the identity.

  Args:
    posemb: (1, 1 + g_old**2, D) array.
    new_num_tokens: 1 + g_new**2.

  Returns:
    (1, new_num_tokens, D) float32 array.

  Raises:
    CheckpointError: either grid is not square.
  """
  posemb = np.asarray(posemb, np.float32)
  cls, grid = posemb[:, :1], posemb[0, 1:]
  g_old = math.isqrt(grid.shape[0])
  g_new = math.isqrt(new_num_tokens - 1)
  if g_old * g_old != grid.shape[0] or g_new * g_new != new_num_tokens - 1:
    raise CheckpointError(
      f"Cannot resize position embedding of {posemb.shape[1]} tokens to "
      f"{new_num_tokens}: patch grids must be square (1 + g*g tokens)."
    )
  grid = grid.reshape(g_old, g_old, -1)
  # Half-pixel-centre bilinear; without antialiasing it equals an order-1
  # interpolation and is exactly the identity at the same size.
  resized = jax.image.resize(
    jnp.asarray(grid),
    (g_new, g_new, grid.shape[-1]),
    method="bilinear",
    antialias=False,
  )
  resized = np.asarray(resized, np.float32).reshape(1, g_new * g_new, -1)
  return np.concatenate([cls, resized], axis=1)


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
    raise CheckpointError(
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


def _fmt(shape) -> str:
  return "(" + ", ".join(str(s) for s in shape) + ")"


def restore_params(
  flat: Mapping[str, np.ndarray],
  template: Mapping[str, Any],
  *,
  source: str = "checkpoint",
) -> dict[str, Any]:
  """Matches flat checkpoint arrays to a params template, strictly.

  Args:
    flat: ``{"a/b": array}`` from the file.
    template: the model's params tree (arrays or ShapeDtypeStructs) whose
      structure and shapes the result must have. Leaves under ``head`` that
      the file lacks are taken from ``template`` (which then must hold
      arrays).
    source: file name used in messages.

  Returns:
    A nested dict with the template's structure.

  Raises:
    CheckpointError: listing every missing, unexpected and mis-shaped key.
  """
  want = flatten(template)
  if not any(k.startswith("Transformer/encoderblock_") for k in flat):
    sample = ", ".join(sorted(flat)[:5])
    raise CheckpointError(
      f"{source} does not look like a vit_jax ViT checkpoint: it has no "
      f"'Transformer/encoderblock_*' keys (first keys: {sample})."
    )
  missing = [
    k
    for k in want
    if k not in flat and not k.startswith(ALLOWED_MISSING_PREFIXES)
  ]
  extra = [
    k
    for k in flat
    if k not in want and not k.startswith(ALLOWED_EXTRA_PREFIXES)
  ]
  out, mismatched = {}, []
  for k, t in want.items():
    if k not in flat:
      out[k] = t
      continue
    v = flat[k]
    if tuple(v.shape) == tuple(t.shape):
      out[k] = np.asarray(v, np.float32)
    elif k == POSEMB_KEY and v.ndim == 3 and v.shape[-1] == t.shape[-1]:
      logging.info(
        "Resizing %s from %s to %s (bilinear over the patch grid).",
        POSEMB_KEY,
        v.shape,
        tuple(t.shape),
      )
      out[k] = resize_posemb(v, t.shape[1])
    elif k.startswith("head/"):
      # A head for another label set is not an error: VPT trains a new one.
      out[k] = t
    else:
      mismatched.append(f"  {k}: model {_fmt(t.shape)}, file {_fmt(v.shape)}")
  if missing or extra or mismatched:
    lines = [f"{source} does not fit the model:"]
    if missing:
      lines.append("missing from the file (model expects them):")
      lines += [f"  {k} {_fmt(want[k].shape)}" for k in missing]
    if extra:
      lines.append("unexpected in the file (model has no such parameter):")
      lines += [f"  {k} {_fmt(flat[k].shape)}" for k in extra]
    if mismatched:
      lines.append("shape mismatch:")
      lines += mismatched
    lines.append(
      "Check the model variant (patch size, width, depth) matches the file."
    )
    raise CheckpointError("\n".join(lines))
  return unflatten(out)


def load_pretrained(
  path: str | os.PathLike, template: Mapping[str, Any]
) -> dict[str, Any]:
  """Loads a backbone file onto a params template (reader by suffix).

  ``.safetensors`` files are read as timm checkpoints (`load_safetensors`,
  ViT or Swin); anything else as a vit_jax `.npz` (ViT only).

  Args:
    path: local `.npz` (e.g. ``ViT-B_16.npz``) or timm ``.safetensors``.
    template: params tree from ``init_params`` of `vptpc.models.vit` or
      `vptpc.models.swin` (or `jax.eval_shape`); its image size decides the
      position-embedding length. Include ``head`` to keep the template's
      freshly initialised head where the file has none or one of another
      size.

  Returns:
    The params tree, float32 numpy arrays.

  Raises:
    CheckpointError: the file is missing, unreadable, of another
      architecture, or its keys or shapes do not fit (see `restore_params`).
  """
  if os.fspath(path).endswith(".safetensors"):
    return load_safetensors(path, template)
  if model_arch(template) != "vit":
    raise CheckpointError(
      f"{os.fspath(path)!r}: Swin backbones are read from timm-named "
      ".safetensors files (e.g. timm/swin_base_patch4_window7_224.ms_in22k "
      "on the Hugging Face hub), not vit_jax .npz files."
    )
  return restore_params(read_npz(path), template, source=f"{os.fspath(path)!r}")


# --- timm .safetensors (ViT and Swin). ---------------------------------------

SAFETENSORS_HINT = (
  "Download a timm .safetensors file, e.g. model.safetensors of "
  "timm/vit_base_patch16_224.orig_in21k (ViT-B/16, ImageNet-21k) or "
  "timm/swin_base_patch4_window7_224.ms_in22k (Swin-B, ImageNet-22k) from "
  "the Hugging Face hub, and point the config's checkpoint path at it."
)
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
    raise CheckpointError(
      f"Checkpoint file {path!r} does not exist. {SAFETENSORS_HINT}"
    )
  from safetensors import SafetensorError, safe_open
  from safetensors.numpy import load_file

  try:
    try:
      flat = load_file(path)
    except TypeError:  # e.g. "data type 'bfloat16' not understood"
      with safe_open(path, framework="flax") as f:
        flat = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(
      f"Checkpoint file {path!r} is not a readable .safetensors file "
      f"(truncated or another format?): {type(e).__name__}: {e}"
    ) from e
  if not flat:
    raise CheckpointError(f"Checkpoint file {path!r} holds no tensors.")
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
    raise CheckpointError(str(e)) from e


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


def _kind_words(kind: str | None) -> str:
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
    raise CheckpointError(
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
  rows = want[POSEMB_KEY].shape[1]
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
  (average pool, then ``fc_norm``) starts from (`vit.TIMM_WEIGHTS`).
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
    raise CheckpointError(
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
    if k == POSEMB_KEY and len(v) == 3 and v[-1] == t[-1]:
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
    raise CheckpointError(str(e)) from e
  raw = read_safetensors(path)
  found = file_kind(raw)
  if found != arch:
    sample = ", ".join(sorted(raw)[:5])
    raise CheckpointError(
      f"{source} is {_kind_words(found)} checkpoint, but the model is "
      f"a {fam.DISPLAY} (first keys: {sample})."
    )
  want = flatten(template)
  raw = timm_names(raw, want, arch)
  fit = timm_fit({k: tuple(v.shape) for k, v in raw.items()}, want, arch)
  if not fit.ok:
    raise CheckpointError(fit.report(source, arch))
  out = {}
  for k, src in fit.sources.items():
    t = want[k]
    v = raw.get(src.key)
    if v is None or (k.startswith("head/") and tuple(v.shape) != src.shape):
      out[k] = t  # no head, or one for another label set: VPT trains one
    elif tuple(v.shape) == src.shape:
      out[k] = np.asarray(src.convert(v), np.float32)
    elif k == POSEMB_KEY:
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
  return unflatten(out)
