"""Input pipeline: TFDS data sources to fixed-shape, masked numpy batches.

Three sources (``config.data.source``):

* ``tfds`` prepared as array_record: `tfds.data_source`, no TensorFlow;
* ``tfds`` prepared as tfrecord: `tfds.load` with images left encoded (needs
  the ``tf`` extra; GPUs are hidden from TensorFlow so it cannot take the
  accelerator's memory);
* ``folder``: the community "extracted VTAB-1k" layout, ``images/`` plus
  ``train800.txt`` ... with ``path label`` lines (`FolderSource`).

The pipeline never downloads: a dataset that is not prepared in ``data_dir``
fails in seconds, before TFDS is asked anything, with a message naming the
dataset, the version and the command (or manual step) that prepares it;
vptpc's own generated datasets (`LOCAL_BUILDERS`) are prepared on first use.

Preprocessing (``config.data.preprocess``): ``vtab`` resizes to the model
size as VTAB's ``tf.image.resize`` does (bilinear, half-pixel centres, no
antialiasing, aspect ratio not kept; `resize_bilinear`); ``fgvc`` is VPT's
FGVC recipe (shorter side to 256/224 of the input size, random crop and
horizontal flip when training, centre crop when evaluating, PIL bilinear as
torchvision); ``crop`` is the centre-crop recipe folder users often apply
(shorter side, centre crop, no augmentation; numbers may differ from the
TFDS pipeline's). ``config.data.interpolation`` picks the filter of every
mode: ``bilinear`` (the above) or ``bicubic`` (`resize_bicubic` for
``vtab``, PIL's bicubic otherwise), what timm's checkpoints state for their
input. Decoded splits are cached in memory as uint8 up to
``config.data.cache_max_gb``; larger ones (VTAB test sets reach 73,728
images) are decoded per batch.

Batches are dicts ``{"image": float32 (B, S, S, 3), "label": int32 (B,),
"mask": bool (B,)}`` with a static batch size: the last partial batch is
padded and masked, so training keeps VPT's partial batch (1,000 = 7 x 128 +
104) and evaluation counts every example exactly once.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from vptpc.data import folder_layout, vtab
from vptpc.data.vtab import decode_image

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
# OpenAI CLIP's statistics, which timm's CLIP image towers (OpenAI's and
# LAION's) were trained with.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
NORMALIZATIONS = ("imagenet", "minus1_1", "clip")
PREPROCESS = ("vtab", "fgvc", "crop")
# The resize filter (``config.data.interpolation``): VTAB's and VPT's
# bilinear, or the bicubic filter timm's checkpoints were trained with.
INTERPOLATIONS = ("bilinear", "bicubic")
SOURCES = ("tfds", "folder")
# FGVC (VPT): Resize(256) -> RandomCrop(224), i.e. resize to 256/224 of the
# model input.
FGVC_RESIZE_RATIO = 256 / 224


class DataError(ValueError):
  """A dataset or split is missing or malformed."""


def default_data_dir() -> str:
  """Returns ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  return os.environ.get(
    "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
  )


def prepare_local(name: str, data_dir: str):
  """Generates one of vptpc's own datasets into ``data_dir`` if needed.

  Nothing is downloaded: the builders draw their images locally. TFDS's own
  "Downloading and preparing dataset ..." lines would say otherwise, so they
  are replaced by one line of vptpc's own, printed only when the dataset is
  actually generated.

  Returns:
    The prepared `tfds.core.DatasetBuilder`.
  """
  import contextlib
  import importlib
  import io

  import tensorflow_datasets as tfds

  module, cls = LOCAL_BUILDERS[name].split(":")
  builder_cls = getattr(importlib.import_module(module), cls)
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  tfds.disable_progress_bar()
  if prepared_dir(f"{name}:{builder.version}", data_dir) is None:
    print(
      f"Generating {name} locally into {builder.data_dir} (no download; "
      "once per data_dir).",
      flush=True,
    )
  # TFDS prints its download wording with print(); nothing else runs here.
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare()
  return builder


def describe_data_dir(data_dir: str) -> str:
  """Where ``data_dir`` came from, for the startup log."""
  if os.environ.get("TFDS_DATA_DIR") == data_dir:
    return f"{data_dir} ($TFDS_DATA_DIR)"
  if data_dir == default_data_dir():
    return f"{data_dir} (default; set config.data.data_dir or $TFDS_DATA_DIR)"
  return f"{data_dir} (config.data.data_dir)"


def _split_version(name: str) -> tuple[str, str | None]:
  """``"a/b:1.2.3"`` -> (``"a/b"``, ``"1.2.3"``); no version -> None."""
  if ":" in name:
    base, version = name.split(":", 1)
    return base, version
  return name, None


def prepared_dir(name: str, data_dir: str) -> str | None:
  """Returns the prepared TFDS directory of ``name`` in ``data_dir``.

  Looks only at the file system (``<data_dir>/<name>[/<config>]/<version>/
  dataset_info.json``), so it answers in milliseconds and never touches the
  network. Without a version, the newest prepared one is returned.
  """
  base, version = _split_version(name)
  root = os.path.join(data_dir, base)
  if version is not None:
    d = os.path.join(root, version)
    return d if os.path.exists(os.path.join(d, "dataset_info.json")) else None
  found = sorted(
    glob.glob(os.path.join(root, "*", "dataset_info.json")),
    key=lambda f: [
      int(x) if x.isdigit() else 0 for x in f.split(os.sep)[-2].split(".")
    ],
  )
  return os.path.dirname(found[-1]) if found else None


def _prepare_hint(name: str, data_dir: str) -> str:
  """The exact step that makes ``name`` available in ``data_dir``."""
  base, _ = _split_version(name)
  for task in vtab.TASKS.values():
    if task.tfds_name and _split_version(task.tfds_name)[0] == base:
      if task.manual:
        return f"Manual step for {task.key}: {task.manual}"
      return (
        "Prepare it once (this downloads): python -m vptpc.prepare "
        f"--tasks={task.key} --data_dir={data_dir}"
      )
  return (
    'Prepare it once (this downloads): python -c "import '
    f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir="
    f"'{data_dir}', file_format='array_record').download_and_prepare()\""
  )


def missing_message(name: str, data_dir: str) -> str:
  """The error for a dataset that is not prepared in ``data_dir``."""
  base = name.split(":")[0]
  return (
    f"Dataset {name!r} is not prepared in data_dir {data_dir!r} (no "
    f"{os.path.join(data_dir, base, _split_version(name)[1] or '*')}/"
    "dataset_info.json). vptpc never downloads during a run. "
    + _prepare_hint(name, data_dir)
  )


def split_names(split: str) -> list[str]:
  """The split names a TFDS split string reads (``train[:800]+test``)."""
  out = []
  for part in split.split("+"):
    part = part.strip()
    out.append(part.split("[", 1)[0].strip())
  return out


def split_problems(name: str, split: str, data_dir: str) -> list[str]:
  """Split names of ``split`` that the prepared dataset does not have."""
  where = prepared_dir(name, data_dir)
  if where is None:
    return []
  try:
    with open(os.path.join(where, "dataset_info.json")) as f:
      have = [sp["name"] for sp in json.load(f).get("splits", [])]
  except (OSError, ValueError, KeyError, TypeError):
    return []
  if not have:
    return []
  bad = [n for n in split_names(split) if n not in have]
  if not bad:
    return []
  return [
    f"Split {split!r} of {name!r} names {', '.join(map(repr, bad))}, which "
    f"{where} does not have (splits: {', '.join(have)}); fix "
    "config.data.train_split / eval_split (or the config's tune_splits / "
    "final_splits)."
  ]


def folder_problems(
  root: str, split: str, num_classes: int | None
) -> tuple[list[str], list[str]]:
  """Checks a folder split without decoding an image: (problems, warnings).

  Problems: a missing root or split file, a malformed line, a label outside
  ``[0, num_classes)``, a listed image that does not exist. Warning: a
  ``num_classes`` larger than the labels use (the head's extra classes never
  see an example). Corrupt images are `image_problems`' job.
  """
  try:
    items = folder_items(root, split)
  except DataError as e:
    return [str(e)], []
  problems, warnings = [], []
  if not items:
    return [f"Split file {os.path.join(root, split)}.txt lists no images."], []
  labels = np.asarray([lab for _, lab in items])
  if num_classes is not None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
      rel, lab = items[bad[0]]
      problems.append(
        f"{os.path.join(root, split)}.txt has {len(bad)} label(s) outside "
        f"[0, {num_classes}) (first: line {bad[0] + 1}, {rel} {lab}); set "
        f"config.data.num_classes={int(labels.max()) + 1} or fix the labels."
      )
    elif labels.max() + 1 < num_classes:
      warnings.append(
        f"config.data.num_classes={num_classes} but "
        f"{os.path.join(root, split)}.txt uses labels up to "
        f"{int(labels.max())}: classes {int(labels.max()) + 1}.."
        f"{num_classes - 1} never get an example."
      )
  missing = [
    rel for rel, _ in items if not os.path.isfile(os.path.join(root, rel))
  ]
  if missing:
    problems.append(
      f"{len(missing)} image(s) listed in {os.path.join(root, split)}.txt do "
      f"not exist under {root} (first: {', '.join(missing[:3])})."
    )
  return problems, warnings


VERIFY_IMAGES = ("header", "decode", "off")


def verify_image(path: str, mode: str = "header") -> str | None:
  """Why an image file would not decode, or None if it looks fine.

  Args:
    path: the file.
    mode: ``header``: `PIL.Image.Image.verify` (the format's headers; for
      PNG every chunk's checksum; JPEG scan data is not read); ``decode``:
      a full decode, as training does.
  """
  try:
    with Image.open(path) as im:
      if mode == "decode":
        im.convert("RGB")
      else:
        im.verify()
  except Exception as e:  # noqa: BLE001 - PIL raises many types on bad data
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return None


def image_problems(root: str, split: str, mode: str = "header") -> list[str]:
  """Corrupt images of a folder split, as one line (empty: none found).

  Listed files that do not exist are left to `folder_problems`; see
  `verify_image` for ``mode`` (``off`` checks nothing).
  """
  if mode == "off":
    return []
  try:
    items = folder_items(root, split)
  except DataError:
    return []  # folder_problems names it
  bad = []
  for rel in dict.fromkeys(rel for rel, _ in items):
    full = os.path.join(root, rel)
    if os.path.isfile(full):
      why = verify_image(full, mode)
      if why:
        bad.append(f"{rel} ({why})")
  if not bad:
    return []
  return [
    f"{len(bad)} corrupt image(s) in split {split!r} of {root} (first: "
    f"{'; '.join(bad[:3])}): replace or remove them (and their lines), or "
    "set config.data.verify_images=off to skip this check (a corrupt image "
    "then stops the run when a batch decodes it)."
  ]


class _TfrecordSource(Sequence):
  """A tfrecord-prepared split read once through `tfds.load` (needs TF).

  Images stay encoded (``SkipDecoding``) until `vptpc.data.vtab` or
  `decode_image` decodes them, so holding the examples costs the file size.
  """

  def __init__(self, name: str, split: str, data_dir: str):
    try:
      import tensorflow as tf
    except ImportError as e:
      raise DataError(
        f"Dataset {name!r} in {data_dir!r} is prepared as tfrecord, which "
        "only TensorFlow reads. Install it (pip install -e '.[tf]') or "
        "re-prepare as array_record (python -m vptpc.prepare)."
      ) from e
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")  # keep the GPU for JAX
    ds = tfds.load(
      name,
      split=split,
      data_dir=data_dir,
      download=False,
      decoders={"image": tfds.decode.SkipDecoding()},
    )
    self._examples = list(tfds.as_numpy(ds))

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, i):
    return self._examples[i]

  def __getitems__(self, idx):
    return [self._examples[i] for i in idx]


def open_source(name: str, split: str, data_dir: str | None = None):
  """Opens a TFDS split as a random-access data source, never downloading.

  Args:
    name: TFDS name, optionally ``name:version`` or ``name/config:version``.
    split: a TFDS split string, e.g. ``train[:800]``.
    data_dir: where prepared datasets live (default `default_data_dir`).

  Returns:
    A sequence of example dicts (``image`` decoded to uint8, or encoded bytes
    from a tfrecord copy; ``label`` and the dataset's other features).

  Raises:
    DataError: the dataset is not prepared there, or the split is invalid.
  """
  import tensorflow_datasets as tfds

  data_dir = data_dir or default_data_dir()
  base = name.split(":")[0]
  if base in LOCAL_BUILDERS:
    prepare_local(base, data_dir)
  else:
    where = prepared_dir(name, data_dir)
    if where is None:
      raise DataError(missing_message(name, data_dir))
    with open(os.path.join(where, "dataset_info.json")) as f:
      fmt = json.load(f).get("fileFormat", "tfrecord")
    if fmt != "array_record":
      try:
        return _TfrecordSource(name, split, data_dir)
      except DataError:
        raise
      except Exception as e:
        raise DataError(
          f"Dataset {name!r} split {split!r} could not be read from "
          f"{where!r} ({type(e).__name__}: {str(e).splitlines()[0]})."
        ) from e
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


def resolved_info(name: str, data_dir: str | None = None) -> dict[str, Any]:
  """Name, resolved version, file format and split sizes of a dataset.

  Read from the prepared ``dataset_info.json`` (written to the workdir so a
  result names the exact data it came from; VTAB-1k subsets depend on the
  version, vtab.md).
  """
  data_dir = data_dir or default_data_dir()
  where = prepared_dir(name, data_dir)
  if where is None:
    return {"name": name}
  with open(os.path.join(where, "dataset_info.json")) as f:
    info = json.load(f)
  return {
    "name": name,
    "version": info.get("version"),
    "file_format": info.get("fileFormat", "tfrecord"),
    "splits": {
      sp["name"]: sum(int(n) for n in sp.get("shardLengths", []))
      for sp in info.get("splits", [])
    },
    "path": where,
  }


def folder_items(root: str, split: str) -> list[tuple[str, int]]:
  """``(relative path, label)`` of a folder split, either layout.

  ``<root>/<split>.txt`` lines, else ``<root>/<split>/<class>/*`` class
  folders (`folder_layout`); a split may carry a slice (``train[:80%]``).

  Raises:
    DataError: the root or the split is missing, or a line is malformed.
  """
  if not os.path.isdir(root):
    raise DataError(
      f"Folder dataset root {root!r} does not exist (expected images/ and "
      f"{split}.txt there; see vptpc.data.vtab for the layout). Set "
      "config.data.folder, or config.data.data_dir to where "
      "vptpc_folders/<task> lives."
    )
  try:
    items = folder_layout.split_file_items(root, split)
    if items is None and os.path.isdir(os.path.join(root, "train")):
      items = folder_layout.class_folder_items(root, split)
  except folder_layout.LayoutError as e:
    raise DataError(str(e)) from None
  if items is None:
    path = os.path.join(root, f"{folder_layout.parse_split(split)[0]}.txt")
    have = sorted(os.path.basename(f) for f in glob.glob(f"{root}/*.txt"))
    raise DataError(
      f"Split file {path!r} is missing (found: {have or 'no .txt files'})."
    )
  return items


class FolderSource(Sequence):
  """A folder dataset: split files or class folders (`folder_layout`).

  ``<root>/<split>.txt`` holds one ``relative/path.jpg <int label>`` per
  line, paths relative to ``root`` (NOAH / SSF layout, vtab.md); without
  it, ``<root>/<split>/<class>/*.jpg`` class folders are read. A split may
  carry a slice (``train[:80%]``).
  """

  def __init__(self, root: str, split: str):
    self.root = root
    self.items: list[tuple[str, int]] = folder_items(root, split)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i):
    rel, label = self.items[i]
    full = os.path.join(self.root, rel)
    try:
      with Image.open(full) as im:
        image = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types on bad data
      raise DataError(f"Cannot read image {full!r}: {e}") from e
    return {"image": image, "label": label}

  def __getitems__(self, idx):
    return [self[i] for i in idx]


def default_example_fn(example: Mapping[str, Any]) -> tuple[np.ndarray, int]:
  """``image`` and ``label`` of an example (datasets without a rule)."""
  return decode_image(example["image"]), int(example["label"])


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize as TF2's ``tf.image.resize`` (float32 output).

  Half-pixel centres and no antialiasing: output pixel i samples the input
  at ``(i + 0.5) * in / out - 0.5``, clamped to the border, which is what
  VTAB's preprocessing does (vtab.md); PIL antialiases when shrinking.
  """
  x = np.asarray(image, np.float32)

  def weights(n_in, n_out):
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    lo_f = np.floor(pos)
    lo = np.clip(lo_f.astype(np.int64), 0, n_in - 1)
    hi = np.clip(np.ceil(pos).astype(np.int64), 0, n_in - 1)
    return lo, hi, (pos - lo_f).astype(np.float32)

  y0, y1, wy = weights(x.shape[0], height)
  x0, x1, wx = weights(x.shape[1], width)
  top = x[y0] * (1 - wy)[:, None, None] + x[y1] * wy[:, None, None]
  return top[:, x0] * (1 - wx)[None, :, None] + top[:, x1] * wx[None, :, None]


def _cubic_matrix(n_in: int, n_out: int, a: float = -0.5) -> np.ndarray:
  """(n_out, n_in) weights of a half-pixel bicubic resize (TF2's).

  Taps outside the image get no weight and the rest are renormalised to sum
  to 1, as TF2's ``scale_and_translate`` (and ``jax.image.resize``) do.
  """
  m = np.zeros((n_out, n_in), np.float64)
  pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  for i, x in enumerate(pos):
    x0 = int(np.floor(x))
    for j in range(max(x0 - 1, 0), min(x0 + 3, n_in)):
      t = abs(x - j)
      if t <= 1:
        m[i, j] = ((a + 2) * t - (a + 3)) * t * t + 1
      elif t < 2:
        m[i, j] = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    m[i] /= m[i].sum()
  return m


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize (float32 output): the `resize_bilinear` of ``bicubic``.

  As TF2's ``tf.image.resize(method="bicubic")``: Keys' cubic kernel with
  ``a = -0.5``, half-pixel centres, no antialiasing. The output may
  overshoot [0, 255] slightly and is clipped where it is cached.
  """
  x = np.asarray(image, np.float32)
  wy = _cubic_matrix(x.shape[0], height).astype(np.float32)
  wx = _cubic_matrix(x.shape[1], width).astype(np.float32)
  return np.einsum("ih,hwc,jw->ijc", wy, x, wx)


def _resize_shorter(
  image: np.ndarray, size: int, interpolation: str = "bilinear"
) -> np.ndarray:
  """Shorter side to ``size``, aspect kept (torchvision ``Resize(int)``)."""
  h, w = image.shape[:2]
  if h <= w:
    nh, nw = size, max(1, round(w * size / h))
  else:
    nh, nw = max(1, round(h * size / w)), size
  if (nh, nw) == (h, w):
    return image
  filt = (
    Image.Resampling.BICUBIC
    if interpolation == "bicubic"
    else Image.Resampling.BILINEAR
  )
  return np.asarray(Image.fromarray(image).resize((nw, nh), filt))


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top : top + size, left : left + size]


def preprocess_image(
  image: np.ndarray,
  size: int,
  mode: str = "vtab",
  train: bool = False,
  interpolation: str = "bilinear",
) -> np.ndarray:
  """Returns the cached form of one image (uint8, channels tiled).

  ``vtab``: (size, size, 3), `resize_bilinear` rounded to uint8 (at most
  0.5/255 from TF's float output). ``crop``: shorter side to ``size`` and a
  centre crop. ``fgvc``: shorter side to ``size * 256 / 224``; evaluation
  images are centre-cropped here, training images are kept whole for the
  per-batch random crop. ``interpolation``: `INTERPOLATIONS`.
  """
  if interpolation not in INTERPOLATIONS:
    raise DataError(
      f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}."
    )
  image = decode_image(image)
  if mode == "vtab":
    if image.shape[0] != size or image.shape[1] != size:
      resize = resize_bicubic if interpolation == "bicubic" else resize_bilinear
      image = np.clip(np.round(resize(image, size, size)), 0, 255)
      image = image.astype(np.uint8)
    return image
  if mode == "crop":
    return _center_crop(_resize_shorter(image, size, interpolation), size)
  if mode == "fgvc":
    image = _resize_shorter(
      image, round(size * FGVC_RESIZE_RATIO), interpolation
    )
    return image if train else _center_crop(image, size)
  raise DataError(f"preprocess must be one of {PREPROCESS}, got {mode!r}.")


def affine(mode: str) -> tuple[np.ndarray, np.ndarray]:
  """float32 (scale, shift) with which `normalize` maps uint8 pixels.

  Raises:
    DataError: an unknown mode.
  """
  if mode == "imagenet":
    return 1.0 / (255.0 * IMAGENET_STD), -IMAGENET_MEAN / IMAGENET_STD
  if mode == "minus1_1":
    return np.float32(2.0 / 255.0), np.float32(-1.0)
  if mode == "clip":
    return 1.0 / (255.0 * CLIP_STD), -CLIP_MEAN / CLIP_STD
  raise DataError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}.")


def normalize(images: np.ndarray, mode: str) -> np.ndarray:
  """Maps uint8 images to float32: ImageNet or CLIP mean/std, or [-1, 1].

  VPT uses ImageNet statistics; Google's i21k checkpoints were trained on
  [-1, 1] (vpt.md §5), hence the choice.
  """
  scale, shift = affine(mode)
  # One affine map, in place: 1.7x the images/s of (x/255 - mean)/std at
  # ViT-B/16 size, whose temporaries capped the pipeline below what an H100
  # step consumes (benchmarks/vpt_bench.py's pipeline line).
  x = images.astype(np.float32)
  x *= scale
  x += shift
  return x


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
    preprocess: the `preprocess_image` mode (uncached splits).
    interpolation: its resize filter (uncached splits).
    num_classes: labels are checked against it (uncached splits).
    info: where the data came from (`resolved_info`), for the workdir.
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
            preprocess_image(
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
      top, left, flip = crop_params(key, first_row + j, *im.shape[:2], s)
      im = im[top : top + s, left : left + s]
      out[j] = im[:, ::-1] if flip else im
    return out, labels


def crop_params(
  key: tuple[int, ...], row: int, height: int, width: int, size: int
) -> tuple[int, int, int]:
  """(top, left, flip) of the random crop of batch row ``row``.

  Drawn from ``default_rng([*key, row])``, so the host pipeline and the
  on-device one (`vptpc.data.device`) crop every row identically.
  """
  rng = np.random.default_rng([*key, row])
  top = int(rng.integers(0, height - size + 1))
  left = int(rng.integers(0, width - size + 1))
  return top, left, int(rng.random() < 0.5)


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
      rule (`vptpc.data.vtab`); default `default_example_fn`.
    source: ``tfds`` or ``folder``.
    folder: the folder root (``source="folder"``).
    preprocess: see `preprocess_image`.
    interpolation: the resize filter, `INTERPOLATIONS`.
    train: training split (``fgvc`` then crops per batch).
    cache_max_gb: decode into memory up to this size.

  Returns:
    The `Split`.

  Raises:
    DataError: the dataset is unavailable, empty, or has bad labels.
  """
  if preprocess not in PREPROCESS:
    raise DataError(
      f"preprocess must be one of {PREPROCESS}, got {preprocess!r}."
    )
  if interpolation not in INTERPOLATIONS:
    raise DataError(
      f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}."
    )
  if source == "tfds":
    src = open_source(name, split, data_dir)
    info = resolved_info(name, data_dir)
  elif source == "folder":
    src = FolderSource(folder, split)
    info = {"name": name, "folder": os.path.abspath(folder)}
  else:
    raise DataError(f"data.source must be one of {SOURCES}, got {source!r}.")
  info["split"] = split
  example_fn = example_fn or default_example_fn
  n = len(src)
  if n == 0:
    raise DataError(f"Split {split!r} of {name!r} is empty.")
  info["num_examples"] = n
  label = f"{name}:{split}"
  crop = preprocess == "fgvc" and train
  side = round(image_size * FGVC_RESIZE_RATIO) if crop else image_size
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
      image = preprocess_image(
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
  data_dir = d.data_dir or default_data_dir()
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
    where = prepared_dir(d.name, data_dir)
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
  data_dir = d.data_dir or default_data_dir()
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
  return {"image": normalize(images, norm), "label": labels, "mask": mask}


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
    normalization: see `normalize`.
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
