"""Cached splits on the accelerator: batches gathered where they are used.

VTAB-1k trains on 1,000 images and FGVC's splits are a few thousand: as
uint8 they fit in accelerator memory many times over (ViT-B/16's 1,000
training images at 224 px are 150 MB). `place` copies a cached
`vptpc.data.pipeline.Split` to the device once; an epoch is then described
by a small integer *plan* made on the host (`epoch_plan`: indices, padding
mask and, for FGVC, crop offsets and flips per row), and `gather` builds
each batch inside the jitted step: gather, crop/flip, normalise. No image
crosses the host-device link after the first epoch, and the host does no
per-image work.

The plan uses exactly the host pipeline's shuffles and crops
(`vptpc.data.pipeline.train_batches`, `vptpc.data.preprocessing.crop_params`),
so the device path yields the same batches in the same order (tested).
Splits that are not cached (decoded per batch) stay on the host path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vptpc.data import pipeline, preprocessing

# ``config.data.on_device``: ``auto`` places cached splits that fit
# ``config.data.device_max_gb`` here (one process, jit mode; `vptpc.runner`
# decides), ``never`` builds every batch on the host.
ON_DEVICE = ("auto", "never")


@dataclasses.dataclass
class DeviceSplit:
  """A cached split's uint8 images and labels on the default device.

  Attributes:
    images: (N, H, W, 3) uint8. For cropped (FGVC training) splits every
      image is zero-padded at the bottom/right to the largest (H, W); the
      crops never reach the padding.
    labels: (N,) int32.
    sizes: (N, 2) int height and width of each unpadded image (host).
    crop: random-crop and flip per batch (FGVC training).
    image_size: side of the model input.
    name: the host split's name, for messages.
  """

  images: jax.Array
  labels: jax.Array
  sizes: np.ndarray
  crop: bool
  image_size: int
  name: str = ""

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def arrays(self) -> dict[str, jax.Array]:
    """The device arrays, as the jitted steps take them."""
    return {"images": self.images, "labels": self.labels}


def nbytes(split: pipeline.Split) -> int:
  """Device bytes `place` would use for ``split`` (0: not placeable)."""
  if split.labels is None:
    return 0
  if split.crop:
    h = max(im.shape[0] for im in split.images)
    w = max(im.shape[1] for im in split.images)
    return len(split.images) * h * w * 3
  return int(np.asarray(split.images).nbytes)


def place(split: pipeline.Split, device: Any = None) -> DeviceSplit:
  """Copies a cached split to ``device`` (default: the first local device).

  Raises:
    ValueError: the split is not cached (decoded per batch).
  """
  if split.labels is None:
    raise ValueError(
      f"{split.name!r} is decoded per batch (larger than "
      "config.data.cache_max_gb), so it cannot be placed on the device."
    )
  if split.crop:
    sizes = np.asarray([im.shape[:2] for im in split.images], np.int32)
    h, w = sizes.max(0)
    images = np.zeros((len(split.images), h, w, 3), np.uint8)
    for i, im in enumerate(split.images):
      images[i, : im.shape[0], : im.shape[1]] = im
  else:
    images = np.asarray(split.images)
    sizes = np.tile(np.asarray(images.shape[1:3], np.int32), (len(images), 1))
  device = device or jax.local_devices()[0]
  return DeviceSplit(
    images=jax.device_put(images, device),
    labels=jax.device_put(np.asarray(split.labels, np.int32), device),
    sizes=sizes,
    crop=split.crop,
    image_size=split.image_size,
    name=split.name,
  )


def _plan_rows(
  split: DeviceSplit,
  batches: list[np.ndarray],
  batch_size: int,
  crop_keys: list[tuple[int, ...]] | None,
) -> dict[str, np.ndarray]:
  idx = np.zeros((len(batches), batch_size), np.int32)
  mask = np.zeros((len(batches), batch_size), bool)
  crops = np.zeros((len(batches), batch_size, 3), np.int32)
  for s, b in enumerate(batches):
    pad = batch_size - len(b)
    # Padding rows repeat the first index and are masked, as the host
    # pipeline's `_batch` does.
    full = np.concatenate([b, np.full(pad, b[0] if len(b) else 0)])
    idx[s], mask[s, : len(b)] = full, True
    if split.crop:
      for j, i in enumerate(full):
        h, w = split.sizes[i]
        crops[s, j] = preprocessing.crop_params(
          crop_keys[s], j, h, w, split.image_size
        )
  plan = {"index": idx, "mask": mask}
  if split.crop:
    plan["crop"] = crops
  return plan


def epoch_plan(
  split: DeviceSplit,
  *,
  batch_size: int,
  seed: int,
  epoch: int,
  start_step: int = 0,
  stop_step: int | None = None,
) -> dict[str, np.ndarray]:
  """The steps [start_step, stop_step) of one training epoch, as arrays.

  Same permutation, padding and crops as `vptpc.data.pipeline.
  train_batches` for (seed, epoch).

  Returns:
    ``{"index": (steps, B) int32, "mask": (steps, B) bool}`` and, for
    cropped splits, ``"crop": (steps, B, 3)`` (top, left, flip).
  """
  n = len(split)
  spe = pipeline.steps_per_epoch(n, batch_size)
  stop = spe if stop_step is None else min(stop_step, spe)
  perm = pipeline.epoch_permutation(n, seed, epoch)
  steps = range(start_step, stop)
  batches = [perm[s * batch_size : (s + 1) * batch_size] for s in steps]
  keys = [(seed, epoch, s) for s in steps] if split.crop else None
  return _plan_rows(split, batches, batch_size, keys)


def eval_plan(split: DeviceSplit, *, batch_size: int) -> dict[str, np.ndarray]:
  """The whole split in order, as `pipeline.eval_batches` batches it."""
  n = len(split)
  batches = [
    np.arange(s * batch_size, min(n, (s + 1) * batch_size))
    for s in range(pipeline.steps_per_epoch(n, batch_size))
  ]
  return _plan_rows(split, batches, batch_size, None)


def normalization_table(normalization: str) -> np.ndarray:
  """(256, 3) float32: `preprocessing.normalize` of every uint8 value per channel.

  Looking values up instead of computing ``x * scale + shift`` on the
  device gives bit-identical batches: a compiler may fuse the multiply and
  add into one rounding (FMA), NumPy rounds twice.
  """
  values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
  return preprocessing.normalize(values, normalization)


def gather(
  arrays: dict[str, jax.Array],
  row: dict[str, jax.Array],
  *,
  normalization: str,
  image_size: int,
) -> dict[str, jax.Array]:
  """One batch from device arrays and one plan row, inside `jit`.

  Args:
    arrays: `DeviceSplit.arrays`.
    row: one step of a plan: ``index`` (B,), ``mask`` (B,) and, for
      cropped splits, ``crop`` (B, 3).
    normalization: see `vptpc.data.preprocessing.normalize`.
    image_size: model input side.

  Returns:
    The batch dict the train and eval steps take (float32 images).
  """
  images = arrays["images"][row["index"]]
  if "crop" in row:
    s = image_size

    def crop_one(im, c):
      im = jax.lax.dynamic_slice(im, (c[0], c[1], 0), (s, s, 3))
      return jnp.where(c[2] > 0, im[:, ::-1], im)

    images = jax.vmap(crop_one)(images, row["crop"])
  table = jnp.asarray(normalization_table(normalization))
  x = table[images.astype(jnp.int32), jnp.arange(3)]
  return {
    "image": x,
    "label": arrays["labels"][row["index"]],
    "mask": row["mask"],
  }
