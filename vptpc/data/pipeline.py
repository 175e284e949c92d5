"""Input pipeline: TFDS data sources to fixed-shape, masked numpy batches.

A split is read from its source (`vptpc.data.sources`: prepared TFDS
datasets or image folders, never downloaded), each example turned into an
image and a label (`vptpc.data.decoding`, a VTAB task's label rule) and the
image preprocessed (`vptpc.data.preprocessing`: ``vtab``, ``fgvc`` or
``crop``; bilinear or bicubic). Decoded splits are cached in memory as uint8
up to ``config.data.cache_max_gb``; larger ones (VTAB test sets reach
73,728 images) are decoded per batch.

Batches are dicts ``{"image": float32 (B, S, S, 3), "label": int32 (B,),
"mask": bool (B,)}`` with a static batch size: the last partial batch is
padded and masked, so training keeps VPT's partial batch (1,000 = 7 x 128 +
104) and evaluation counts every example exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from vptpc import moved
from vptpc.data import decoding, folder_layout, preprocessing, sources, vtab
from vptpc.data.sources import DataError


def _get_many(source, idx: Sequence[int]) -> list:
  """Batch read where the source supports it, else one by one."""
  try:
    return source.__getitems__(idx)
  except TypeError:
    # tfds.testing.mock_data's sources fail on batch reads (TFDS 4.9).
    return [source[i] for i in idx]


@dataclasses.dataclass
class Split:
  """A split: decoded and cached in memory, or decoded per batch.

  VTAB-1k trains on 1,000 images, so caching them decoded and resized (as
  task_adaptation and big_vision do) makes every epoch after the first
  free. Splits over ``cache_max_gb`` keep only the source and decode the
  examples each batch asks for (`get`).

  Attributes:
    images: uint8 (N, S, S, 3), or a list of (H, W, 3) arrays (``fgvc``
      training images, cropped per batch), or None when not cached.
    labels: int32 (N,), or None when not cached.
    name: ``dataset:split`` for messages.
    image_size: side S of the model input.
    crop: random-crop and flip per batch (``fgvc`` training).
    source: the source (uncached splits).
    example_fn: example dict -> (image, label) (uncached splits).
    preprocess: the `vptpc.data.preprocessing.preprocess_image` mode
      (uncached splits).
    interpolation: its resize filter (uncached splits).
    num_classes: labels are checked against it (uncached splits).
    info: where the data came from (`vptpc.data.sources.resolved_info`),
      for the workdir.
  """

  images: Any
  labels: np.ndarray | None
  name: str = ""
  image_size: int = 0
  crop: bool = False
  source: Any = None
  example_fn: Callable | None = None
  preprocess: str = "vtab"
  interpolation: str = "bilinear"
  num_classes: int | None = None
  info: dict = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    if self.labels is not None:
      return len(self.labels)
    return len(self.source)

  def get(
    self,
    idx: np.ndarray,
    crop_key: tuple[int, ...] | None = None,
    first_row: int = 0,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Returns uint8 images (n, S, S, 3) and int32 labels for ``idx``.

    Random crops (``crop``) of row r of a batch come from
    ``(*crop_key, first_row + r)``, so a process holding a slice of the
    batch crops exactly as the whole batch would.
    """
    if self.labels is None:
      exs = _get_many(self.source, [int(i) for i in idx])
      pairs = []
      for i, e in zip(idx, exs, strict=True):
        try:
          pairs.append(self.example_fn(e))
        except DataError:
          raise
        except Exception as err:  # noqa: BLE001 - decoders raise many types
          raise DataError(
            f"Cannot decode example {int(i)} of {self.name!r}: "
            f"{type(err).__name__}: {err}"
          ) from err
      labels = np.asarray([p[1] for p in pairs], np.int32)
      _check_labels(labels, self.num_classes, self.name)
      images = (
        np.stack(
          [
            preprocessing.preprocess_image(
              p[0],
              self.image_size,
              self.preprocess,
              interpolation=self.interpolation,
            )
            for p in pairs
          ]
        )
        if pairs
        else np.zeros((0,) + (self.image_size,) * 2 + (3,), np.uint8)
      )
      return images, labels
    labels = self.labels[idx]
    if not self.crop:
      return self.images[idx], labels
    key = tuple(crop_key or (0,))
    s = self.image_size
    out = np.empty((len(idx), s, s, 3), np.uint8)
    for j, i in enumerate(idx):
      im = self.images[i]
      top, left, flip = preprocessing.crop_params(
        key, first_row + j, *im.shape[:2], s
      )
      im = im[top : top + s, left : left + s]
      out[j] = im[:, ::-1] if flip else im
    return out, labels


def _check_labels(labels, num_classes, name, warn: bool = False) -> None:
  """Refuses labels outside ``[0, num_classes)``; warns on unused classes."""
  if num_classes is None or not len(labels):
    return
  if labels.min() < 0 or labels.max() >= num_classes:
    raise DataError(
      f"{name!r} has labels in [{labels.min()}, {labels.max()}] but "
      f"config.data.num_classes is {num_classes}; set "
      f"config.data.num_classes={int(labels.max()) + 1} or fix the labels."
    )
  if warn and labels.max() + 1 < num_classes:
    logging.warning(
      "config.data.num_classes=%d but %s uses labels up to %d: classes "
      "%d..%d never get an example (the head keeps them untrained).",
      num_classes,
      name,
      int(labels.max()),
      int(labels.max()) + 1,
      num_classes - 1,
    )


def load_split(
  name: str,
  split: str,
  *,
  image_size: int,
  data_dir: str | None = None,
  num_classes: int | None = None,
  example_fn: Callable | None = None,
  source: str = "tfds",
  folder: str = "",
  preprocess: str = "vtab",
  train: bool = False,
  cache_max_gb: float = 4.0,
  interpolation: str = "bilinear",
) -> Split:
  """Opens a split and, if it fits ``cache_max_gb``, decodes it into memory.

  Args:
    name: TFDS dataset name (``name[:version]``); for messages only when
      ``source="folder"``.
    split: TFDS split string, or the split file stem for ``folder``.
    image_size: side of the square model input.
    data_dir: prepared-data directory.
    num_classes: if given, labels outside ``[0, num_classes)`` are an error.
    example_fn: example dict -> (image, label), e.g. a VTAB task's label
      rule (`vptpc.data.vtab`); default
      `vptpc.data.decoding.default_example_fn`.
    source: ``tfds`` or ``folder``.
    folder: the folder root (``source="folder"``).
    preprocess: see `vptpc.data.preprocessing.preprocess_image`.
    interpolation: the resize filter,
      `vptpc.data.preprocessing.INTERPOLATIONS`.
    train: training split (``fgvc`` then crops per batch).
    cache_max_gb: decode into memory up to this size.

  Returns:
    The `Split`.

  Raises:
    DataError: the dataset is unavailable, empty, or has bad labels.
  """
  if preprocess not in preprocessing.PREPROCESS:
    raise DataError(
      f"preprocess must be one of {preprocessing.PREPROCESS}, got "
      f"{preprocess!r}."
    )
  if interpolation not in preprocessing.INTERPOLATIONS:
    raise DataError(
      f"interpolation must be one of {preprocessing.INTERPOLATIONS}, got "
      f"{interpolation!r}."
    )
  if source == "tfds":
    src = sources.open_source(name, split, data_dir)
    info = sources.resolved_info(name, data_dir)
  elif source == "folder":
    src = sources.FolderSource(folder, split)
    info = {"name": name, "folder": os.path.abspath(folder)}
  else:
    raise DataError(
      f"data.source must be one of {sources.SOURCES}, got {source!r}."
    )
  info["split"] = split
  example_fn = example_fn or decoding.default_example_fn
  n = len(src)
  if n == 0:
    raise DataError(f"Split {split!r} of {name!r} is empty.")
  info["num_examples"] = n
  label = f"{name}:{split}"
  crop = preprocess == "fgvc" and train
  side = (
    round(image_size * preprocessing.FGVC_RESIZE_RATIO) if crop else image_size
  )
  if n * side * side * 3 * (2 if crop else 1) > cache_max_gb * 2**30:
    logging.info("%s: %d examples, decoded per batch (not cached).", label, n)
    return Split(
      None,
      None,
      label,
      image_size,
      source=src,
      example_fn=example_fn,
      preprocess=preprocess,
      interpolation=interpolation,
      num_classes=num_classes,
      info=info,
    )
  images = [] if crop else np.empty((n, image_size, image_size, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  chunk = 256
  for start in range(0, n, chunk):
    idx = list(range(start, min(n, start + chunk)))
    for j, ex in zip(idx, _get_many(src, idx), strict=True):
      image, labels[j] = example_fn(ex)
      image = preprocessing.preprocess_image(
        image, image_size, preprocess, train, interpolation
      )
      if crop:
        images.append(image)
      else:
        images[j] = image
  _check_labels(labels, num_classes, label, warn=train)
  logging.info("Loaded %s: %d examples at %d px.", label, n, image_size)
  return Split(images, labels, label, image_size, crop=crop, info=info)


# Decoded splits of this process, newest last: the seeds of a final run and
# the chunks of a tuning grid read the same splits (`split_from_config`).
_SPLIT_CACHE: dict[str, Split] = {}
SPLIT_CACHE_SIZE = 4


def _split_key(d, which: str, augment: bool) -> str:
  """A split's cache key: the data config, and when its files last changed.

  The modification time of the folder layout's split file, or of the
  prepared TFDS dataset's ``dataset_info.json``, is part of the key, so a
  dataset rewritten in place is read again.
  """
  data_dir = d.data_dir or sources.default_data_dir()
  split = d.train_split if which == "train" else d.eval_split
  if d.get("source", "tfds") == "folder":
    root = d.get("folder", "") or (
      vtab.folder_root(data_dir, d.task) if d.get("task", "") else ""
    )
    base = folder_layout.parse_split(split)[0] if split else split
    stamp_file = os.path.join(root, f"{base}.txt")
    if not os.path.exists(stamp_file):
      stamp_file = os.path.join(root, base)  # class folders
  else:
    where = sources.prepared_dir(d.name, data_dir)
    stamp_file = os.path.join(where or "", "dataset_info.json")
  stamp = (
    os.stat(stamp_file).st_mtime_ns if os.path.exists(stamp_file) else None
  )
  return json.dumps(
    [d.to_dict(), which, augment, stamp], sort_keys=True, default=str
  )


def clear_split_cache() -> None:
  """Forgets the decoded splits this process keeps (`split_from_config`)."""
  _SPLIT_CACHE.clear()


def split_from_config(config, which: str, augment: bool = True) -> Split:
  """Loads ``config.data``'s ``train`` or ``eval`` split.

  ``augment=False`` reads a training split the way evaluation does (no
  random crops), e.g. for importance scoring.

  Decoded splits are kept per process (the last `SPLIT_CACHE_SIZE`, keyed
  by the whole ``config.data``, the split and the data directories'
  modification times), so the seeds of ``protocol.mode=final`` and the
  chunks of a vmapped grid decode their images once.

  ``config.data.task`` (a `vptpc.data.vtab` key) supplies the label rule;
  ``config.data.source`` picks TFDS or a folder (``config.data.folder``,
  default ``<data_dir>/vptpc_folders/<task>``).
  """
  d = config.data
  if which not in ("train", "eval"):
    raise ValueError(f"which must be train or eval, got {which!r}.")
  key = _split_key(d, which, augment)
  if key in _SPLIT_CACHE:
    _SPLIT_CACHE[key] = _SPLIT_CACHE.pop(key)  # newest last
    return _SPLIT_CACHE[key]
  split = _load_split_from_config(d, which, augment)
  if split.labels is not None:  # only decoded splits are worth keeping
    _SPLIT_CACHE[key] = split
    while len(_SPLIT_CACHE) > SPLIT_CACHE_SIZE:
      _SPLIT_CACHE.pop(next(iter(_SPLIT_CACHE)))
  return split


def _load_split_from_config(d, which: str, augment: bool) -> Split:
  data_dir = d.data_dir or sources.default_data_dir()
  example_fn = None
  if d.get("task", ""):
    example_fn = vtab.get_task(d.task).example_fn
  folder = d.get("folder", "") or (
    vtab.folder_root(data_dir, d.task) if d.get("task", "") else ""
  )
  return load_split(
    d.name,
    d.train_split if which == "train" else d.eval_split,
    image_size=d.image_size,
    data_dir=data_dir,
    num_classes=d.num_classes,
    example_fn=example_fn,
    source=d.get("source", "tfds"),
    folder=folder,
    preprocess=d.get("preprocess", "vtab"),
    interpolation=d.get("interpolation", "bilinear"),
    train=which == "train" and augment,
    cache_max_gb=d.get("cache_max_gb", 4.0),
  )


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Steps per epoch keeping the last partial batch (as single-GPU VPT)."""
  return math.ceil(num_examples / batch_size)


def _batch(
  split: Split,
  idx: np.ndarray,
  batch_size: int,
  norm: str,
  crop_key: tuple[int, ...] | None = None,
  rows: tuple[int, int] | None = None,
) -> dict:
  """Gathers ``idx`` and pads to ``batch_size`` with masked copies.

  ``rows`` keeps only rows [start, end) of the padded global batch (this
  process's share in a multi-process run); only those are decoded.
  """
  pad = batch_size - len(idx)
  mask = np.concatenate([np.ones(len(idx), bool), np.zeros(pad, bool)])
  idx = np.concatenate([idx, np.full(pad, idx[0] if len(idx) else 0)])
  first = 0
  if rows is not None:
    first = rows[0]
    idx, mask = idx[rows[0] : rows[1]], mask[rows[0] : rows[1]]
  images, labels = split.get(idx.astype(np.int64), crop_key, first)
  return {
    "image": preprocessing.normalize(images, norm),
    "label": labels,
    "mask": mask,
  }


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one training epoch (depends on seed and epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(
  split: Split,
  *,
  batch_size: int,
  seed: int,
  epoch: int,
  normalization: str,
  start_step: int = 0,
  rows: tuple[int, int] | None = None,
) -> Iterator[dict]:
  """Yields one epoch of shuffled, padded batches.

  The order depends only on (seed, epoch), so a run resumed mid-epoch sees
  exactly the batches an uninterrupted run would.

  Args:
    split: the cached training split.
    batch_size: global batch size.
    seed: run seed.
    epoch: epoch number (reshuffled every epoch, as VPT).
    normalization: see `vptpc.data.preprocessing.normalize`.
    start_step: first step within the epoch to yield (for resuming).
    rows: keep rows [start, end) of every batch (this process's share,
      `vptpc.parallel.process_slice`); None keeps the whole batch.
  """
  perm = epoch_permutation(len(split), seed, epoch)
  for s in range(start_step, steps_per_epoch(len(split), batch_size)):
    yield _batch(
      split,
      perm[s * batch_size : (s + 1) * batch_size],
      batch_size,
      normalization,
      # Crops depend on (seed, epoch, step, row) only: resumes and other
      # process counts see the same ones.
      (seed, epoch, s) if split.crop else None,
      rows,
    )


def eval_batches(
  split: Split,
  *,
  batch_size: int,
  normalization: str,
  rows: tuple[int, int] | None = None,
) -> Iterator[dict]:
  """Yields the split in order, the last batch padded and masked.

  With ``rows`` (multi-process), each process gets its share of every batch,
  so across processes every example is counted exactly once.
  """
  for s in range(steps_per_epoch(len(split), batch_size)):
    idx = np.arange(s * batch_size, min(len(split), (s + 1) * batch_size))
    yield _batch(split, idx, batch_size, normalization, rows=rows)


# Names that moved to `vptpc.data.sources`, `vptpc.data.preprocessing` and
# `vptpc.data.decoding`: still importable from here, with a
# DeprecationWarning naming the new home.
_MOVED = {
  "LOCAL_BUILDERS": sources,
  "SOURCES": sources,
  "default_data_dir": sources,
  "prepare_local": sources,
  "describe_data_dir": sources,
  "prepared_dir": sources,
  "missing_message": sources,
  "split_names": sources,
  "split_problems": sources,
  "folder_problems": sources,
  "VERIFY_IMAGES": sources,
  "verify_image": sources,
  "image_problems": sources,
  "open_source": sources,
  "resolved_info": sources,
  "folder_items": sources,
  "FolderSource": sources,
  "IMAGENET_MEAN": preprocessing,
  "IMAGENET_STD": preprocessing,
  "CLIP_MEAN": preprocessing,
  "CLIP_STD": preprocessing,
  "NORMALIZATIONS": preprocessing,
  "PREPROCESS": preprocessing,
  "INTERPOLATIONS": preprocessing,
  "FGVC_RESIZE_RATIO": preprocessing,
  "resize_bilinear": preprocessing,
  "resize_bicubic": preprocessing,
  "preprocess_image": preprocessing,
  "affine": preprocessing,
  "normalize": preprocessing,
  "crop_params": preprocessing,
  "default_example_fn": decoding,
}


__getattr__ = moved.forwarder(__name__, _MOVED)
