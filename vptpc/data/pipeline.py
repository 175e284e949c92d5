"""Input pipeline: TFDS data sources to fixed-shape, masked numpy batches.

Reading goes through `tfds.data_source` (array_record, no TensorFlow). The
pipeline never downloads: a dataset that is not prepared in ``data_dir``
fails in seconds with a message naming it, unless it is one of vptpc's own
generated datasets (`LOCAL_BUILDERS`), which are prepared on first use.

Batches are dicts ``{"image": float32 (B, S, S, 3), "label": int32 (B,),
"mask": bool (B,)}`` with a static batch size: the last partial batch is
padded and masked, so training keeps VPT's partial batch (1,000 = 7 x 128 +
104) and evaluation counts every example exactly once.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator

import numpy as np
from absl import logging
from PIL import Image

# vptpc's own datasets, generated locally (no network) on first use, as
# "module:class" so that TFDS is imported only when data is read (the train
# step and benchmarks run on images that lack TFDS).
LOCAL_BUILDERS = {
  "vptpc_toy": "vptpc.data.toy:VptpcToy",
  "vptpc_digits": "vptpc.data.minivtab:VptpcDigits",
  "vptpc_dsprites_loc": "vptpc.data.minivtab:VptpcDspritesLoc",
  "vptpc_dsprites_ori": "vptpc.data.minivtab:VptpcDspritesOri",
  "vptpc_count": "vptpc.data.minivtab:VptpcCount",
}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
NORMALIZATIONS = ("imagenet", "minus1_1")


class DataError(ValueError):
  """A dataset or split is missing or malformed."""


def default_data_dir() -> str:
  """Returns ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  return os.environ.get(
    "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
  )


def prepare_local(name: str, data_dir: str):
  """Generates one of vptpc's own datasets into ``data_dir`` if needed.

  Returns:
    The prepared `tfds.core.DatasetBuilder`.
  """
  import importlib

  import tensorflow_datasets as tfds

  module, cls = LOCAL_BUILDERS[name].split(":")
  builder_cls = getattr(importlib.import_module(module), cls)
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  tfds.disable_progress_bar()
  builder.download_and_prepare()
  return builder


def open_source(name: str, split: str, data_dir: str | None = None):
  """Opens a TFDS split as a random-access data source, never downloading.

  Args:
    name: TFDS name, optionally ``name:version`` or ``name/config:version``.
    split: a TFDS split string, e.g. ``train[:800]``.
    data_dir: where prepared datasets live (default `default_data_dir`).

  Returns:
    A sequence of example dicts (``image`` decoded to uint8, ``label``).

  Raises:
    DataError: the dataset is not prepared there, or the split is invalid.
  """
  import tensorflow_datasets as tfds

  data_dir = data_dir or default_data_dir()
  base = name.split(":")[0]
  if base in LOCAL_BUILDERS:
    prepare_local(base, data_dir)
  try:
    return tfds.data_source(
      name, split=split, data_dir=data_dir, download=False
    )
  except Exception as e:  # TFDS raises several types; all mean "not usable".
    raise DataError(
      f"Dataset {name!r} split {split!r} is not available in data_dir "
      f"{data_dir!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
      "vptpc never downloads during a run: prepare it first (see README, "
      "'Data'), or point config.data.data_dir at the prepared copy."
    ) from e


def preprocess_image(image: np.ndarray, size: int) -> np.ndarray:
  """Returns a uint8 (size, size, 3) image: channels tiled, resized.

  Resizing is bilinear with the aspect ratio not kept, as VTAB's
  ``tf.image.resize`` (vtab.md); PIL's filter matches it for upsampling and
  antialiases when shrinking.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.shape[0] != size or image.shape[1] != size:
    image = np.asarray(
      Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    )
  return image


def normalize(images: np.ndarray, mode: str) -> np.ndarray:
  """Maps uint8 images to float32: ImageNet mean/std, or [-1, 1].

  VPT uses ImageNet statistics; Google's i21k checkpoints were trained on
  [-1, 1] (vpt.md §5), hence the choice.
  """
  x = images.astype(np.float32) / 255.0
  if mode == "imagenet":
    return (x - IMAGENET_MEAN) / IMAGENET_STD
  if mode == "minus1_1":
    return x * 2.0 - 1.0
  raise DataError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}.")


@dataclasses.dataclass
class Split:
  """A decoded, resized split held in memory as uint8.

  VTAB-1k trains on 1,000 images, so caching them decoded and resized (as
  task_adaptation and big_vision do) makes every epoch after the first free.
  """

  images: np.ndarray  # uint8 (N, S, S, 3)
  labels: np.ndarray  # int32 (N,)
  name: str = ""

  def __len__(self) -> int:
    return len(self.labels)


def load_split(
  name: str,
  split: str,
  *,
  image_size: int,
  data_dir: str | None = None,
  num_classes: int | None = None,
) -> Split:
  """Reads, decodes and resizes a whole split into memory.

  Args:
    name: TFDS dataset name (``name[:version]``).
    split: TFDS split string.
    image_size: side of the square model input.
    data_dir: prepared-data directory.
    num_classes: if given, labels outside ``[0, num_classes)`` are an error.

  Returns:
    The cached `Split`.

  Raises:
    DataError: the dataset is unavailable, empty, or has bad labels.
  """
  source = open_source(name, split, data_dir)
  n = len(source)
  if n == 0:
    raise DataError(f"Split {split!r} of {name!r} is empty.")
  images = np.empty((n, image_size, image_size, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  chunk = 256
  for start in range(0, n, chunk):
    idx = list(range(start, min(n, start + chunk)))
    for j, ex in zip(idx, source.__getitems__(idx), strict=True):
      images[j] = preprocess_image(ex["image"], image_size)
      labels[j] = ex["label"]
  if num_classes is not None and (
    labels.min() < 0 or labels.max() >= num_classes
  ):
    raise DataError(
      f"{name!r} {split!r} has labels in [{labels.min()}, {labels.max()}] but "
      f"config.data.num_classes is {num_classes}."
    )
  logging.info(
    "Loaded %s %s: %d examples at %d px.", name, split, n, image_size
  )
  return Split(images, labels, f"{name}:{split}")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Steps per epoch keeping the last partial batch (as single-GPU VPT)."""
  return math.ceil(num_examples / batch_size)


def _batch(split: Split, idx: np.ndarray, batch_size: int, norm: str) -> dict:
  """Gathers ``idx`` and pads to ``batch_size`` with masked copies."""
  pad = batch_size - len(idx)
  mask = np.concatenate([np.ones(len(idx), bool), np.zeros(pad, bool)])
  idx = np.concatenate([idx, np.full(pad, idx[0] if len(idx) else 0)])
  return {
    "image": normalize(split.images[idx], norm),
    "label": split.labels[idx],
    "mask": mask,
  }


def train_batches(
  split: Split,
  *,
  batch_size: int,
  seed: int,
  epoch: int,
  normalization: str,
  start_step: int = 0,
) -> Iterator[dict]:
  """Yields one epoch of shuffled, padded batches.

  The order depends only on (seed, epoch), so a run resumed mid-epoch sees
  exactly the batches an uninterrupted run would.

  Args:
    split: the cached training split.
    batch_size: global batch size.
    seed: run seed.
    epoch: epoch number (reshuffled every epoch, as VPT).
    normalization: see `normalize`.
    start_step: first step within the epoch to yield (for resuming).
  """
  perm = np.random.default_rng([seed, epoch]).permutation(len(split))
  for s in range(start_step, steps_per_epoch(len(split), batch_size)):
    yield _batch(
      split,
      perm[s * batch_size : (s + 1) * batch_size],
      batch_size,
      normalization,
    )


def eval_batches(
  split: Split, *, batch_size: int, normalization: str
) -> Iterator[dict]:
  """Yields the split in order, the last batch padded and masked."""
  for s in range(steps_per_epoch(len(split), batch_size)):
    idx = np.arange(s * batch_size, min(len(split), (s + 1) * batch_size))
    yield _batch(split, idx, batch_size, normalization)
