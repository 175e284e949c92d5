"""FractalDB-style images from iterated function systems (IFS), in numpy.

Formula-driven supervised pretraining (Kataoka et al., "Pre-training without
Natural Images", ACCV 2020): each class is one random IFS (2-4 contractive
affine maps); an image renders the IFS attractor by the chaos game. vptpc adds
what a 32-px backbone needs to transfer to VTAB's structured tasks
(docs/references.md, "Embedded backbone": class-only fractal features
discard position):

* every instance is jittered (map parameters scaled by 1 + N(0, sigma)),
  optionally rotated, scaled and placed at a random position on a noisy background, in a
  random colour;
* besides the class, each image has a position target: the 4 x 4 grid cell
  of the object's centre, learnt by an auxiliary head during pretraining;
* optionally (``orientation_bins > 0``) each instance is rotated uniformly
  over the full circle and the rotation, binned, is a second auxiliary
  target. The shipped class + position features read dSprites orientation
  weakly (probe 18.3%, chance 6.25%; MODEL_CARD.md), and rotating without
  asking for the angle would teach the opposite: invariance to it. Measured
  once at the shipped schedule (results/pretrain_orientation/), 16 bins made
  things worse (class 2.1%, orientation at chance), so it is off by default;
* optionally (``axis_bins > 0``) the binned principal axis of the rendered
  object, a pose target read off the image alone, with ``rotate_fraction``
  of the instances rotated over the full circle (``"rotated"`` marks them,
  so a trainer can keep them out of the class loss).

Everything is vectorised over a batch of images and fully determined by the
seeds, so the pretraining data can be regenerated bit for bit.
"""

from __future__ import annotations

import numpy as np

POSITION_GRID = 4  # position target: a POSITION_GRID x POSITION_GRID cell.


def _random_maps(rng: np.random.Generator, n: int) -> np.ndarray:
  """Samples ``n`` contractive affine maps as rows (a, b, c, d, e, f)."""
  maps = []
  while len(maps) < n:
    m = rng.uniform(-1.0, 1.0, 6)
    s = np.linalg.svd(m[:4].reshape(2, 2), compute_uv=False)
    if s[0] < 0.95 and s[1] > 0.05:  # contractive, not collapsed to a line
      maps.append(m)
  return np.stack(maps)


def _probs(maps: np.ndarray) -> np.ndarray:
  """Chaos-game map probabilities proportional to |det| (FractalDB)."""
  det = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2])
  det = np.maximum(det, 1e-3)
  return det / det.sum()


def chaos_points(
  codes: np.ndarray,
  rng: np.random.Generator,
  num_points: int,
  burn_in: int = 20,
) -> np.ndarray:
  """Runs the chaos game for a batch of IFS codes.

  Args:
    codes: (B, M, 7) maps (a, b, c, d, e, f, prob); unused maps prob 0.
    rng: random generator.
    num_points: points kept per image.
    burn_in: first iterations dropped (not yet on the attractor).

  Returns:
    (B, num_points, 2) float32 points.
  """
  b = codes.shape[0]
  cum = np.cumsum(codes[..., 6], axis=1)
  cum[:, -1] = 1.0
  x = np.zeros((b, 2), np.float64)
  out = np.empty((b, num_points, 2), np.float32)
  rows = np.arange(b)
  u = rng.random((burn_in + num_points, b))
  for t in range(burn_in + num_points):
    k = (u[t][:, None] > cum).sum(1)
    m = codes[rows, k]
    x = np.stack(
      [
        m[:, 0] * x[:, 0] + m[:, 1] * x[:, 1] + m[:, 4],
        m[:, 2] * x[:, 0] + m[:, 3] * x[:, 1] + m[:, 5],
      ],
      1,
    )
    if t >= burn_in:
      out[:, t - burn_in] = x
  return out


def filling_ratio(points: np.ndarray, size: int = 32) -> np.ndarray:
  """Fraction of a size x size grid over each bbox that the points cover."""
  lo = points.min(1, keepdims=True)
  ext = np.maximum(
    (points.max(1, keepdims=True) - lo).max(-1, keepdims=True), 1e-6
  )
  ij = np.clip(
    ((points - lo) / ext * (size - 1)).round().astype(int), 0, size - 1
  )
  flat = ij[..., 0] * size + ij[..., 1]
  occ = np.zeros((points.shape[0], size * size), bool)
  np.put_along_axis(occ, flat, True, axis=1)
  return occ.mean(1)


def make_class_codes(
  num_classes: int,
  seed: int,
  *,
  min_fill: float = 0.12,
  max_maps: int = 4,
) -> np.ndarray:
  """Samples one non-degenerate IFS per class.

  Degenerate codes (attractors that collapse to a few points or a thin line)
  are rejected by a filling-ratio check, as FractalDB does.

  Args:
    num_classes: number of classes.
    seed: seed of the class definitions.
    min_fill: minimum filling ratio of the attractor over its bounding box.
    max_maps: maximum number of maps (2..max_maps per class).

  Returns:
    (num_classes, max_maps, 7) codes; unused maps have probability 0.
  """
  rng = np.random.default_rng(seed)
  codes = np.zeros((num_classes, max_maps, 7))
  filled = 0
  while filled < num_classes:
    want = num_classes - filled
    cand = np.zeros((want * 2, max_maps, 7))
    for i in range(len(cand)):
      n = int(rng.integers(2, max_maps + 1))
      maps = _random_maps(rng, n)
      cand[i, :n, :6] = maps
      cand[i, :n, 6] = _probs(maps)
    fill = filling_ratio(chaos_points(cand, rng, 2000))
    ok = cand[fill >= min_fill][:want]
    codes[filled : filled + len(ok)] = ok
    filled += len(ok)
  return codes


def render(
  codes: np.ndarray,
  labels: np.ndarray,
  rng: np.random.Generator,
  *,
  size: int = 32,
  num_points: int = 800,
  jitter: float = 0.05,
  max_rotation: float = 0.0,
  orientation_bins: int = 0,
  rotate_fraction: float = 0.0,
  axis_bins: int = 0,
  axis_max_isotropy: float = 0.6,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Renders one random instance of each requested class.

  Args:
    codes: (C, M, 7) class codes from `make_class_codes`.
    labels: (B,) class of each image to render.
    rng: random generator (all instance randomness comes from it).
    size: image side.
    num_points: chaos-game points per image.
    jitter: std of the multiplicative jitter of the map parameters.
    max_rotation: instances are rotated uniformly in ±max_rotation degrees
      (FractalDB uses none; a fractal's identity is its shape at a pose).
      Ignored when ``orientation_bins > 0``.
    orientation_bins: if > 0, rotate uniformly in [0, 360) degrees and
      return the rotation's bin (``angle * bins // 360``) as a target.
    rotate_fraction: this fraction of instances (drawn per image) is rotated
      uniformly over the full circle instead; their ``"rotated"`` target is
      1, so a trainer can leave them out of the class loss (a fractal class
      is a shape at its pose) while its pose targets still use them.
    axis_bins: if > 0, the ``"axis"`` target: the angle of the rendered
      object's principal axis (intensity-weighted second moments, modulo
      180 degrees, measured from the column axis towards the row axis) in
      this many bins; -1 (ignore) where the object is nearly isotropic
      (minor / major moment above ``axis_max_isotropy``), as its axis is
      then noise. Unlike a rotation angle, it is read off the image alone.
    axis_max_isotropy: see ``axis_bins``.

  Returns:
    images uint8 (B, size, size, 3) and the auxiliary targets, int32 (B,):
    ``{"position": ...}``, plus ``"orientation"`` if ``orientation_bins``,
    ``"rotated"`` if ``rotate_fraction`` and ``"axis"`` if ``axis_bins``.
  """
  b = len(labels)
  c = codes[labels].copy()
  c[..., :6] *= 1.0 + jitter * rng.standard_normal(c[..., :6].shape)
  pts = chaos_points(c, rng, num_points).astype(np.float64)
  # Random rotation, then scale the longest side to the object size.
  if orientation_bins > 0:
    degrees = rng.uniform(0.0, 360.0, b)
  else:
    degrees = rng.uniform(-max_rotation, max_rotation, b)
  if rotate_fraction > 0:
    # Drawn only when asked for, so the default data stay bit-identical.
    rotated = rng.random(b) < rotate_fraction
    degrees = np.where(rotated, rng.uniform(0.0, 360.0, b), degrees)
  theta = np.deg2rad(degrees)
  rot = np.stack(
    [np.cos(theta), -np.sin(theta), np.sin(theta), np.cos(theta)], -1
  ).reshape(b, 2, 2)
  pts = np.einsum("bij,bpj->bpi", rot, pts)
  lo = pts.min(1, keepdims=True)
  ext = np.maximum(
    (pts.max(1, keepdims=True) - lo).max(-1, keepdims=True), 1e-6
  )
  obj = rng.uniform(0.3, 0.8, (b, 1, 1)) * size
  pts = (pts - lo) / ext * obj
  span = pts.max(1)  # (B, 2) extent in pixels
  off = rng.uniform(0, 1, (b, 2)) * np.maximum(size - 1 - span, 0)
  pts = pts + off[:, None, :]
  # The target bins where the object sits within the room it had to move
  # (its offset over the free span), so all cells are equally likely.
  rel = off / np.maximum(size - 1 - span, 1e-6)
  cell = np.clip((rel * POSITION_GRID).astype(int), 0, POSITION_GRID - 1)
  position = (cell[:, 0] * POSITION_GRID + cell[:, 1]).astype(np.int32)
  # Point density -> intensity (log, so thin arms stay visible).
  ij = np.clip(pts.round().astype(int), 0, size - 1)
  flat = ij[..., 0] * size + ij[..., 1] + (np.arange(b) * size * size)[:, None]
  dens = np.bincount(flat.ravel(), minlength=b * size * size).reshape(
    b, size, size
  )
  inten = np.log1p(dens) / np.log1p(
    np.maximum(dens.max((1, 2), keepdims=True), 1)
  )
  fg = rng.uniform(0.35, 1.0, (b, 1, 1, 3))
  bg = rng.uniform(0.0, 0.3, (b, 1, 1, 3))
  img = bg + (fg - bg) * inten[..., None]
  img = img + rng.normal(0, 0.03, img.shape)
  targets = {"position": position}
  if orientation_bins > 0:
    ori = (degrees * orientation_bins // 360).astype(np.int32)
    targets["orientation"] = np.minimum(ori, orientation_bins - 1)
  if rotate_fraction > 0:
    targets["rotated"] = rotated.astype(np.int32)
  if axis_bins > 0:
    targets["axis"] = principal_axis_bins(inten, axis_bins, axis_max_isotropy)
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), targets


def principal_axis_bins(
  weights: np.ndarray, bins: int, max_isotropy: float
) -> np.ndarray:
  """Binned principal-axis angle of (B, H, W) intensity maps; -1 if isotropic.

  The angle is ``0.5 * atan2(2 C_rc, C_cc - C_rr)`` of the intensity-weighted
  covariance of (row, column) pixel coordinates, taken modulo 180 degrees.
  A horizontal flip maps it to ``180 - angle``, i.e. bin k to ``bins-1-k``.
  """
  _, h, w = weights.shape
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  m = np.maximum(weights.sum((1, 2)), 1e-9)

  def mean(f):
    return (weights * f).sum((1, 2)) / m

  mr, mc = mean(r), mean(c)
  crr = mean(r * r) - mr**2
  ccc = mean(c * c) - mc**2
  crc = mean(r * c) - mr * mc
  angle = np.rad2deg(0.5 * np.arctan2(2 * crc, ccc - crr)) % 180.0
  tr, det = crr + ccc, crr * ccc - crc**2
  disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0.0))
  iso = (tr / 2 - disc) / np.maximum(tr / 2 + disc, 1e-9)
  out = np.minimum((angle * bins / 180.0).astype(np.int32), bins - 1)
  return np.where(iso > max_isotropy, -1, out).astype(np.int32)


def make_dataset(
  codes: np.ndarray,
  per_class: int,
  seed: int,
  *,
  size: int = 32,
  chunk: int = 2000,
  max_rotation: float = 0.0,
  orientation_bins: int = 0,
  rotate_fraction: float = 0.0,
  axis_bins: int = 0,
  axis_max_isotropy: float = 0.6,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """Renders ``per_class`` instances of every class, shuffled.

  Args:
    codes: class codes.
    per_class: instances per class.
    seed: instance seed (use different seeds for train and held-out data).
    size: image side.
    chunk: images rendered per vectorised call.
    max_rotation: see `render`.
    orientation_bins: see `render`.
    rotate_fraction: see `render`.
    axis_bins: see `render`.
    axis_max_isotropy: see `render`.

  Returns:
    (images uint8 (N, size, size, 3), labels int32 (N,), auxiliary targets:
    a dict of int32 (N,) arrays, as `render` returns them).
  """
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(codes), dtype=np.int32), per_class)
  labels = labels[rng.permutation(len(labels))]
  images = np.empty((len(labels), size, size, 3), np.uint8)
  targets: dict[str, np.ndarray] = {}
  for s in range(0, len(labels), chunk):
    im, aux = render(
      codes,
      labels[s : s + chunk],
      rng,
      size=size,
      max_rotation=max_rotation,
      orientation_bins=orientation_bins,
      rotate_fraction=rotate_fraction,
      axis_bins=axis_bins,
      axis_max_isotropy=axis_max_isotropy,
    )
    images[s : s + chunk] = im
    for k, v in aux.items():
      targets.setdefault(k, np.empty(len(labels), np.int32))[s : s + chunk] = v
  return images, labels, targets
