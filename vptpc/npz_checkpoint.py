"""Google's vit_jax `.npz` backbones, and the flat layout every reader fills.

Google's ViT checkpoints (`ViT-B_16.npz` from ImageNet-21k, the augreg files)
are flat `.npz` archives whose keys are `/`-joined paths such as
``Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel``. `vptpc.models.vit`
uses the same names, so loading is a key-for-key copy with a strict diff
(`restore_params`):

* ``head/*`` may be missing from the file (VPT trains a new head);
* ``head/*`` and ``pre_logits/*`` may be extra in the file (the i21k head is
  all zeros and `pre_logits` is a representation layer VPT does not use);
* anything else missing, extra or of the wrong shape raises one
  `CheckpointError` that lists every offending key with its shapes;
* the position embedding is resized bilinearly over the patch grid when the
  image size differs from the checkpoint's (logged).

`flatten` and `unflatten` convert between a params tree and that flat
layout, which the timm reader (`vptpc.timm_checkpoint`) fills too, raising
the same `CheckpointError`; `save_npz` writes it (vptpc's pretraining saves
its backbone so). `vptpc.checkpoint.load_pretrained` picks the reader.
"""

from __future__ import annotations

import math
import os
import secrets
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

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


def temp_file(directory: str, suffix: str = ".tmp") -> tuple[int, str]:
  """A new file in ``directory`` for an atomic write: ``(fd, path)``.

  As `tempfile.mkstemp`, but with the mode ``open()`` gives (0666 less
  the umask, 0644 under umask 022): mkstemp's 0600 would survive the
  rename and leave the written file private, unlike the files beside it.
  The name starts with ``.`` and ends with ``suffix``.
  """
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
  while True:
    path = os.path.join(directory, f".{secrets.token_hex(8)}{suffix}")
    try:
      return os.open(path, flags, 0o666), path
    except FileExistsError:
      continue  # another writer drew the same name


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
  fd, tmp = temp_file(d, ".npz.tmp")
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


def format_shape(shape) -> str:
  """``(1, 197, 768)``: a shape as the error messages print it."""
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
      mismatched.append(
        f"  {k}: model {format_shape(t.shape)}, file {format_shape(v.shape)}"
      )
  if missing or extra or mismatched:
    lines = [f"{source} does not fit the model:"]
    if missing:
      lines.append("missing from the file (model expects them):")
      lines += [f"  {k} {format_shape(want[k].shape)}" for k in missing]
    if extra:
      lines.append("unexpected in the file (model has no such parameter):")
      lines += [f"  {k} {format_shape(flat[k].shape)}" for k in extra]
    if mismatched:
      lines.append("shape mismatch:")
      lines += mismatched
    lines.append(
      "Check the model variant (patch size, width, depth) matches the file."
    )
    raise CheckpointError("\n".join(lines))
  return unflatten(out)
