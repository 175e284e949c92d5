"""Preprocessing: one decoded image to its cached form, and normalisation.

Modes (``config.data.preprocess``): ``vtab`` resizes to the model
size as VTAB's ``tf.image.resize`` does (bilinear, half-pixel centres, no
antialiasing, aspect ratio not kept; `resize_bilinear`); ``fgvc`` is VPT's
FGVC recipe (shorter side to 256/224 of the input size, random crop and
horizontal flip when training, centre crop when evaluating, PIL bilinear as
torchvision); ``crop`` is the centre-crop recipe folder users often apply
(shorter side, centre crop, no augmentation; numbers may differ from the
TFDS pipeline's). ``config.data.interpolation`` picks the filter of every
mode: ``bilinear`` (the above) or ``bicubic`` (`resize_bicubic` for
``vtab``, PIL's bicubic otherwise), what timm's checkpoints state for their
input.

Images are cached as uint8 (`preprocess_image`); each batch is mapped to
float32 by `normalize` (``config.data.normalize``), and ``fgvc`` training
images are cropped per batch (`crop_params`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vptpc.data import decoding, sources

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
# FGVC (VPT): Resize(256) -> RandomCrop(224), i.e. resize to 256/224 of the
# model input.
FGVC_RESIZE_RATIO = 256 / 224


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize as TF2's ``tf.image.resize`` (float32 output).

  Half-pixel centres and no antialiasing: output pixel i samples the input
  at ``(i + 0.5) * in / out - 0.5``, clamped to the border, which is what
  VTAB's preprocessing does (docs/references.md, "VTAB-1k: preprocessing");
  PIL antialiases when shrinking.
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
    raise sources.DataError(
      f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}."
    )
  image = decoding.decode_image(image)
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
  raise sources.DataError(
    f"preprocess must be one of {PREPROCESS}, got {mode!r}."
  )


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
  raise sources.DataError(
    f"normalize must be one of {NORMALIZATIONS}, got {mode!r}."
  )


def normalize(images: np.ndarray, mode: str) -> np.ndarray:
  """Maps uint8 images to float32: ImageNet or CLIP mean/std, or [-1, 1].

  VPT uses ImageNet statistics; Google's i21k checkpoints were trained on
  [-1, 1] (docs/references.md, "VPT: protocol"), hence the choice.
  """
  scale, shift = affine(mode)
  # One affine map, in place: 1.7x the images/s of (x/255 - mean)/std at
  # ViT-B/16 size, whose temporaries capped the pipeline below what an H100
  # step consumes (benchmarks/vpt_bench.py's pipeline line).
  x = images.astype(np.float32)
  x *= scale
  x += shift
  return x


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
