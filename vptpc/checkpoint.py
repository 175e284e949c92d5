"""Reading backbones: Google's vit_jax `.npz` files and timm's `.safetensors`.

`load_pretrained` reads a backbone file onto a model's params template, the
reader picked by the file's suffix: `vptpc.npz_checkpoint` for Google's
vit_jax `.npz` archives (ViT), whose keys `vptpc.models.vit` shares, and
`vptpc.timm_checkpoint` for timm's `.safetensors` files (ViT and Swin),
renamed onto each backbone family's tree (`vptpc.models.registry`). Both
diff the file against the template strictly: a head may be missing or of
another size (VPT trains a new one); anything else missing, extra or of the
wrong shape raises one `CheckpointError` that lists every offending key with
its shapes; the ViT position embedding and the Swin relative-position bias
tables are resized when the image or window size differs (logged).

`read_shapes` and `backbone_dims` read a file's array headers only, in
milliseconds, for the preflight checks.

Prompts are never part of a backbone file; they live in their own small file
(`vptpc.prompts.save_prompts`). Nothing is downloaded at run time
(`vptpc.hub` fetches timm weights by name, once).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from vptpc import moved, npz_checkpoint, timm_checkpoint
from vptpc.models import registry
from vptpc.npz_checkpoint import CheckpointError


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


def load_pretrained(
  path: str | os.PathLike, template: Mapping[str, Any]
) -> dict[str, Any]:
  """Loads a backbone file onto a params template (reader by suffix).

  ``.safetensors`` files are read as timm checkpoints
  (`vptpc.timm_checkpoint.load_safetensors`, ViT or Swin); anything else as
  a vit_jax `.npz` (`vptpc.npz_checkpoint.restore_params`, ViT only).

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
      architecture, or its keys or shapes do not fit.
  """
  if os.fspath(path).endswith(".safetensors"):
    return timm_checkpoint.load_safetensors(path, template)
  if timm_checkpoint.model_arch(template) != "vit":
    raise CheckpointError(
      f"{os.fspath(path)!r}: Swin backbones are read from timm-named "
      ".safetensors files (e.g. timm/swin_base_patch4_window7_224.ms_in22k "
      "on the Hugging Face hub), not vit_jax .npz files."
    )
  return npz_checkpoint.restore_params(
    npz_checkpoint.read_npz(path), template, source=f"{os.fspath(path)!r}"
  )


# Names that moved to `vptpc.npz_checkpoint` and `vptpc.timm_checkpoint`:
# still importable from here, with a DeprecationWarning naming the new
# home.
_MOVED = {
  "POSEMB_KEY": npz_checkpoint,
  "ALLOWED_MISSING_PREFIXES": npz_checkpoint,
  "ALLOWED_EXTRA_PREFIXES": npz_checkpoint,
  "flatten": npz_checkpoint,
  "unflatten": npz_checkpoint,
  "read_npz": npz_checkpoint,
  "save_npz": npz_checkpoint,
  "resize_posemb": npz_checkpoint,
  "restore_params": npz_checkpoint,
  "resize_posemb_timm": timm_checkpoint,
  "SAFETENSORS_HINT": timm_checkpoint,
  "read_safetensors": timm_checkpoint,
  "model_arch": timm_checkpoint,
  "file_kind": timm_checkpoint,
  "resize_rel_pos_table": timm_checkpoint,
  "TimmFit": timm_checkpoint,
  "timm_names": timm_checkpoint,
  "timm_fit": timm_checkpoint,
  "load_safetensors": timm_checkpoint,
}


__getattr__ = moved.forwarder(__name__, _MOVED)
