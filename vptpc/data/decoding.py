"""From one dataset example to an ``(image, label)`` pair.

Example functions take one example dict of numpy values (as
``tfds.data_source`` returns them; images may also be encoded PNG/JPEG bytes,
as a tfrecord copy read with ``SkipDecoding`` gives) and return a uint8
``(H, W, 3)`` image and a Python int label. Labels are never clipped: a label
outside ``[0, num_classes)`` is returned as is so that the pipeline's range
check sees it.

The label rules are task_adaptation's (docs/references.md, "VTAB-1k: the 19
tasks"); each `vptpc.data.vtab` task names the rule it uses. Datasets
without a rule read their ``image`` and ``label`` features
(`default_example_fn`).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------
# Images.


def decode_image(value: Any) -> np.ndarray:
  """Returns a uint8 (H, W, 3) image from a decoded array or encoded bytes.

  Args:
    value: a uint8 array of shape (H, W), (H, W, 1) or (H, W, 3) (integer or
      bool arrays with values in [0, 255] are cast), or PNG/JPEG bytes
      (decoded with PIL; EXIF orientation is ignored, as TensorFlow's
      decoders ignore it).

  Returns:
    The image as uint8 (H, W, 3); grayscale is tiled to 3 channels.

  Raises:
    ValueError: the shape, dtype or value range is not an image.
  """
  if isinstance(value, np.ndarray) and value.dtype == object and not value.ndim:
    value = value.item()
  if isinstance(value, bytes | bytearray | memoryview):
    with Image.open(io.BytesIO(bytes(value))) as im:
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  image = np.asarray(value)
  if image.dtype != np.uint8:
    ok = image.dtype == bool or np.issubdtype(image.dtype, np.integer)
    if ok and image.size:
      ok = 0 <= image.min() and image.max() <= 255
    if not ok:
      raise ValueError(
        f"Expected a uint8 image (or integers in [0, 255]), got dtype "
        f"{image.dtype} with shape {image.shape}."
      )
    image = image.astype(np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
      f"Expected an image of shape (H, W), (H, W, 1) or (H, W, 3), got "
      f"{image.shape}."
    )
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def dsprites_image(value: Any) -> np.ndarray:
  """Scales dSprites' 0/1 single-channel image to 0/255, 3 channels."""
  image = decode_image(value)
  if image.size and image.max() > 1:
    raise ValueError(
      f"dSprites images hold 0/1 values (task_adaptation multiplies them by "
      f"255); got values up to {image.max()}."
    )
  return image * np.uint8(255)


# ---------------------------------------------------------------------------
# Labels. Each is a small pure function of one example (docs/references.md,
# "VTAB-1k: the 19 tasks").

CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DIST_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
KITTI_NO_VEHICLE_DISTANCE = 1000.0
KITTI_VEHICLE_TYPES = 3  # TFDS kitti types 0, 1, 2: Car, Van, Truck.


def _int(value: Any) -> int:
  """A scalar (Python or 0-d numpy) as a Python int."""
  return int(np.asarray(value).item())


def _bucket(distance: float, thresholds: tuple[float, ...]) -> int:
  """The largest i with ``thresholds[i] < distance``; -1 if there is none.

  task_adaptation's ``reduce_max(where(thrs - dist < 0))``.
  """
  return int(np.sum(np.asarray(thresholds) < distance)) - 1


def label_feature(example: Mapping[str, Any]) -> int:
  """The TFDS ``label`` feature."""
  return _int(example["label"])


def clevr_count(example: Mapping[str, Any]) -> int:
  """Number of objects - 3 (3-10 objects -> classes 0-7)."""
  return len(example["objects"]["size"]) - 3


def clevr_dist(example: Mapping[str, Any]) -> int:
  """Bucket of the closest object's depth, ``min(pixel_coords[:, 2])``.

  Thresholds (0, 8, 8.5, 9, 9.5, 10, 100), strict ``<`` (6 classes). With
  no objects the distance is +inf (TensorFlow's empty ``reduce_min``), which
  gives the out-of-range label 6.
  """
  coords = np.asarray(example["objects"]["pixel_coords"], np.float32)
  depth = coords.reshape(-1, 3)[:, 2]
  distance = float(depth.min()) if depth.size else float("inf")
  return _bucket(distance, CLEVR_DIST_THRESHOLDS)


def kitti_dist(example: Mapping[str, Any]) -> int:
  """Bucket of the closest vehicle's depth, ``location[:, 2]``.

  Vehicles are ``type < 3``; the distance is the minimum over their depths
  and 1000 (task_adaptation appends 1000, so no vehicle gives 1000).
  Thresholds (-100, 8, 20, 999), strict ``<``: <= 8 m, 8-20 m, 20-999 m,
  none (4 classes).
  """
  objects = example["objects"]
  types = np.asarray(objects["type"]).reshape(-1)
  depth = np.asarray(objects["location"], np.float32).reshape(-1, 3)[:, 2]
  vehicles = depth[types < KITTI_VEHICLE_TYPES]
  distance = min([float(d) for d in vehicles] + [KITTI_NO_VEHICLE_DISTANCE])
  return _bucket(distance, KITTI_DIST_THRESHOLDS)


def dsprites_loc(example: Mapping[str, Any]) -> int:
  """``label_x_position // 2`` (32 positions -> 16 classes)."""
  return _int(example["label_x_position"]) // 2


def dsprites_ori(example: Mapping[str, Any]) -> int:
  """``floor(label_orientation / 2.5)`` (40 orientations -> 16 classes)."""
  return _int(example["label_orientation"]) * 16 // 40


def smallnorb_azi(example: Mapping[str, Any]) -> int:
  """``label_azimuth`` (TFDS: 0..17)."""
  return _int(example["label_azimuth"])


def smallnorb_ele(example: Mapping[str, Any]) -> int:
  """``label_elevation`` (TFDS: 0..8)."""
  return _int(example["label_elevation"])


def _example(
  image_fn: Callable[[Any], np.ndarray],
  label_fn: Callable[[Mapping[str, Any]], int],
  example: Mapping[str, Any],
) -> tuple[np.ndarray, int]:
  """``(image_fn(example["image"]), label_fn(example))``."""
  return image_fn(example["image"]), label_fn(example)


def make_example_fn(
  label_fn: Callable[[Mapping[str, Any]], int],
  image_fn: Callable[[Any], np.ndarray] = decode_image,
) -> Callable[[Mapping[str, Any]], tuple[np.ndarray, int]]:
  """A picklable example function (a `functools.partial` of `_example`)."""
  return functools.partial(_example, image_fn, label_fn)


def default_example_fn(example: Mapping[str, Any]) -> tuple[np.ndarray, int]:
  """``image`` and ``label`` of an example (datasets without a rule)."""
  return decode_image(example["image"]), int(example["label"])
