"""Mini-VTAB: an offline suite of small VTAB-style tasks as TFDS datasets.

Each task is a TFDS `GeneratorBasedBuilder`, prepared as array_record into a
local ``data_dir`` on first use (no network, no TensorFlow) and read with
`tfds.data_source` by the same pipeline as real VTAB data. Every builder has
a ``train`` split of 1,000 and a ``test`` split of at least 500 examples, so
VTAB-1k's split strings apply unchanged (`SPLITS`).

The tasks (images; classes; the label, as VTAB defines it):

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits; 10; the
  digit.
* ``dsprites_loc``: dSprites-style sprites, 64x64, 1 channel; 16; x position
  (32 values) // 2.
* ``dsprites_ori``: the same generator; 16; floor(orientation index (40
  values) * 16 / 40).
* ``count``: 3-10 coloured objects, 64x64 (CLEVR-count-like); 8; number of
  objects - 3.

The generators are seeded and deterministic: the same builder version writes
the same bytes. Test images come from a different seed than training images.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from vptpc import assets, config_util
from vptpc.data.toy import encode_png

# VTAB-1k split strings (docs/references.md, "VTAB-1k: splits"): the first
# 800 training images, the next 200 for validation, both for final runs,
# and the held-out test split.
SPLITS = {
  "train800": "train[:800]",
  "val200": "train[800:1000]",
  "train800val200": "train[:1000]",
  "test": "test",
}
TRAIN_SIZE = 1000
TEST_SIZE = 1000
# Prompts' LR as a fraction of the head's on the embedded backbone
# (`task_config` gives the measurement behind it).
PROMPT_LR_SCALE = assets.PROMPT_LR_SCALE


@dataclasses.dataclass(frozen=True)
class Task:
  """One mini-VTAB task: its TFDS name, classes and sizes."""

  name: str
  tfds_name: str
  num_classes: int
  test_size: int
  group: str


TASKS = {
  t.name: t
  for t in (
    Task("digits", "vptpc_digits", 10, 797, "natural"),
    Task("dsprites_loc", "vptpc_dsprites_loc", 16, TEST_SIZE, "structured"),
    Task("dsprites_ori", "vptpc_dsprites_ori", 16, TEST_SIZE, "structured"),
    Task("count", "vptpc_count", 8, TEST_SIZE, "structured"),
  )
}


def _image_feature(shape):
  return tfds.features.Image(shape=shape)


def _info(builder, features: dict) -> tfds.core.DatasetInfo:
  """DatasetInfo shared by the mini-VTAB builders (image, label, ...)."""
  return tfds.core.DatasetInfo(
    builder=builder,
    description=builder.__doc__,
    features=tfds.features.FeaturesDict(features),
    supervised_keys=("image", "label"),
  )


# ---------------------------------------------------------------------------
# digits: real handwritten digits shipped with scikit-learn.
# ---------------------------------------------------------------------------


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits as uint8 (1797, 8, 8, 1) images and labels."""
  # Imported here: scikit-learn takes over a second to import, and only
  # building this one dataset needs it.
  from sklearn.datasets import load_digits

  d = load_digits()
  images = np.round(d.images / 16.0 * 255.0).astype(np.uint8)[..., None]
  return images, d.target.astype(np.int64)


class VptpcDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, 1,000 train / 797 test."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return _info(
      self,
      {
        "image": _image_feature((8, 8, 1)),
        "label": tfds.features.ClassLabel(num_classes=10),
      },
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels = digits_arrays()
    perm = np.random.default_rng(0).permutation(len(labels))
    return {
      "train": self._generate_examples(images, labels, perm[:TRAIN_SIZE]),
      "test": self._generate_examples(images, labels, perm[TRAIN_SIZE:]),
    }

  def _generate_examples(self, images, labels, idx):
    for i in idx:
      yield int(i), {"image": encode_png(images[i]), "label": int(labels[i])}


# ---------------------------------------------------------------------------
# dSprites-style sprites.
# ---------------------------------------------------------------------------

DSPRITES_SIZE = 64
NUM_X = NUM_Y = 32  # position values, as dSprites
NUM_ORIENTATIONS = 40  # over [0, 2pi), as dSprites
SCALES = np.linspace(0.5, 1.0, 6)


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether canonical coordinates (u, v) in about [-1, 1] are in a shape."""
  if shape == 0:  # square
    return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
  if shape == 1:  # ellipse
    return (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 1.0
  # heart (implicit curve), flipped so that it points down
  x, y = u * 1.2, -v * 1.2 + 0.2
  return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


def render_sprite(shape: int, scale: float, orient: int, x: int, y: int):
  """Renders one dSprites-style binary sprite at 64x64 (x4 supersampled).

  Returns:
    uint8 (64, 64, 1) image with values 0 or 255-ish (antialiased edges).
  """
  s = DSPRITES_SIZE
  ss = 4
  g = (np.arange(s * ss) + 0.5) / ss
  yy, xx = np.meshgrid(g, g, indexing="ij")
  # Centres span the middle of the canvas as in dSprites (positions 0..1).
  cx = 10 + x * (s - 20) / (NUM_X - 1)
  cy = 10 + y * (s - 20) / (NUM_Y - 1)
  half = 9.0 * scale
  theta = 2 * np.pi * orient / NUM_ORIENTATIONS
  dx, dy = (xx - cx) / half, (yy - cy) / half
  u = np.cos(theta) * dx + np.sin(theta) * dy
  v = -np.sin(theta) * dx + np.cos(theta) * dy
  m = _inside(shape, u, v).astype(np.float32)
  m = m.reshape(s, ss, s, ss).mean((1, 3))
  return np.round(m * 255).astype(np.uint8)[..., None]


def dsprites_latents(seed: int, n: int) -> np.ndarray:
  """Samples (shape, scale, orientation, x, y) indices uniformly."""
  rng = np.random.default_rng(seed)
  return np.stack(
    [
      rng.integers(0, 3, n),
      rng.integers(0, len(SCALES), n),
      rng.integers(0, NUM_ORIENTATIONS, n),
      rng.integers(0, NUM_X, n),
      rng.integers(0, NUM_Y, n),
    ],
    1,
  )


def dsprites_label(latents: np.ndarray, attribute: str) -> np.ndarray:
  """VTAB's 16-way labels: x position // 2, or orientation binned to 16."""
  if attribute == "x":
    return latents[:, 3] * 16 // NUM_X
  if attribute == "orientation":
    return latents[:, 2] * 16 // NUM_ORIENTATIONS
  raise ValueError(f"attribute must be 'x' or 'orientation', got {attribute!r}")


class _DspritesBase(tfds.core.GeneratorBasedBuilder):
  """dSprites-style sprites; subclasses pick the predicted attribute."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  ATTRIBUTE = "x"

  def _info(self):
    return _info(
      self,
      {
        "image": _image_feature((DSPRITES_SIZE, DSPRITES_SIZE, 1)),
        "label": tfds.features.ClassLabel(num_classes=16),
        "latents": tfds.features.Tensor(shape=(5,), dtype=np.int64),
      },
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      "train": self._generate_examples(seed=10, n=TRAIN_SIZE),
      "test": self._generate_examples(seed=11, n=TEST_SIZE),
    }

  def _generate_examples(self, seed, n):
    lat = dsprites_latents(seed, n)
    labels = dsprites_label(lat, self.ATTRIBUTE)
    for i in range(n):
      sh, sc, o, x, y = (int(v) for v in lat[i])
      img = render_sprite(sh, SCALES[sc], o, x, y)
      yield (
        i,
        {
          "image": encode_png(img),
          "label": int(labels[i]),
          "latents": lat[i].astype(np.int64),
        },
      )


class VptpcDspritesLoc(_DspritesBase):
  """dSprites-style location task: x position in 16 bins (VTAB dSpr-Loc)."""

  ATTRIBUTE = "x"


class VptpcDspritesOri(_DspritesBase):
  """dSprites-style orientation task: 16 bins (VTAB dSpr-Ori)."""

  ATTRIBUTE = "orientation"


# ---------------------------------------------------------------------------
# Counting, in the spirit of CLEVR-count.
# ---------------------------------------------------------------------------

COUNT_SIZE = 64
MIN_OBJECTS, MAX_OBJECTS = 3, 10


def render_count_scene(rng: np.random.Generator, n: int) -> np.ndarray:
  """Renders ``n`` non-overlapping shaded objects on a floor gradient."""
  s, ss = COUNT_SIZE, 2
  g = (np.arange(s * ss) + 0.5) / ss
  yy, xx = np.meshgrid(g, g, indexing="ij")
  floor = 0.35 + 0.25 * yy[..., None] / s
  img = np.broadcast_to(floor, (s * ss, s * ss, 3)).copy()
  img *= rng.uniform(0.8, 1.2, 3)
  placed: list[tuple[float, float, float]] = []
  while len(placed) < n:
    r = rng.uniform(3.0, 6.0)
    cx, cy = rng.uniform(r + 1, s - r - 1, 2)
    if all(
      (cx - a) ** 2 + (cy - b) ** 2 > (r + c + 1.5) ** 2 for a, b, c in placed
    ):
      placed.append((cx, cy, r))
  for cx, cy, r in placed:
    kind = rng.integers(3)
    dx, dy = xx - cx, yy - cy
    if kind == 0:  # sphere-like disc
      m = dx * dx + dy * dy <= r * r
    elif kind == 1:  # cube-like square
      m = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    else:  # cylinder-like triangle
      m = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    colour = rng.uniform(0.1, 1.0, 3)
    shade = 1.0 - 0.35 * np.clip((dx + dy) / (2 * r), -1, 1)
    img[m] = colour * shade[m][:, None]
  img = img.reshape(s, ss, s, ss, 3).mean((1, 3))
  img += rng.normal(0, 0.02, img.shape)
  return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


class VptpcCount(tfds.core.GeneratorBasedBuilder):
  """Count 3-10 objects (label = count - 3), like VTAB's CLEVR-count."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return _info(
      self,
      {
        "image": _image_feature((COUNT_SIZE, COUNT_SIZE, 3)),
        "label": tfds.features.ClassLabel(
          num_classes=MAX_OBJECTS - MIN_OBJECTS + 1
        ),
      },
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      "train": self._generate_examples(seed=20, n=TRAIN_SIZE),
      "test": self._generate_examples(seed=21, n=TEST_SIZE),
    }

  def _generate_examples(self, seed, n):
    rng = np.random.default_rng(seed)
    for i in range(n):
      k = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
      yield (
        i,
        {
          "image": encode_png(render_count_scene(rng, k)),
          "label": k - MIN_OBJECTS,
        },
      )


def task_config(
  task: str,
  *,
  variant: str = "deep",
  num_prompts: int = 10,
  mode: str = "final",
  seed: int = 42,
  epochs: int = 30,
  base_lr: float = 0.1,
  weight_decay: float = 1e-4,
  batch_size: int = 64,
  prompt_lr_scale: float = PROMPT_LR_SCALE,
  smoke: bool = False,
  backbone: str = "",
  head_init: str = assets.HEAD_INIT,
  prelogit_norm: str = assets.PRELOGIT_NORM,
):
  """The training config of one mini-VTAB run on the embedded backbone.

  Four settings differ from the official ViT-B recipe. The embedded
  backbone's features have norm ~27, most of it a mean shared by every
  image (norm ~24), so (1) the head reads them standardised with the task's
  training statistics (``prelogit_norm=standardize``) and (2) starts at zero
  (``head_init=zeros``): the first loss is then ln C, where VPT's recipe
  starts at 10-20 and ends with logits of ~300 and saturated probabilities
  (docs/offline_backbone.md). Measured on the val200 split of dsprites_loc
  (10 epochs, base LR 1.0) with VPT's head init: (3) the LR follows the
  schedule per step with 2 warmup epochs (stepped per epoch, the momentum
  gathered at LR 0 in epoch 0 lands in one jump and the head diverged), and
  (4) prompts get 1/100 of the head's LR (with one LR, VPT-Deep reached
  10-15% against the linear probe's 68%; at 0.01, 52%).

  Args:
    task: a key of `TASKS`.
    variant: ``deep`` or ``shallow`` (``num_prompts=0``: head only, i.e. a
      linear probe trained with VPT's recipe).
    num_prompts: prompts per layer (deep) or in total (shallow).
    mode: ``final`` (train800val200 -> test) or ``tune`` (train800 ->
      val200), VTAB-1k's protocol.
    seed: run seed.
    epochs: training epochs (warmup is a tenth of them).
    base_lr: VPT base LR (scaled by batch / 256).
    weight_decay: coupled L2 weight decay.
    batch_size: global batch.
    prompt_lr_scale: LR multiplier of the prompts (``config.prompt.lr_scale``).
    smoke: shrink to a few steps for tests.
    backbone: a fractal-Ti/4 ``.npz`` to use instead of the shipped one
      (e.g. a ``vptpc.pretrain`` result).
    head_init: ``zeros`` or VPT's ``vpt`` (``config.model.head_init``).
    prelogit_norm: ``standardize`` or VPT's ``none``
      (``config.model.prelogit_norm``).

  Returns:
    A `vptpc.config_util.base_config` with the fields set.

  Raises:
    ValueError: unknown task or mode (named).
  """
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; known: {', '.join(TASKS)}.")
  if mode not in ("final", "tune"):
    raise ValueError(f"mode must be final or tune, got {mode!r}.")
  t = TASKS[task]
  c = config_util.base_config()
  c.seed = seed
  c.model.name = assets.DEFAULT_MODEL
  c.model.checkpoint_path = backbone or assets.path()
  c.model.kv_only = variant == "deep"
  c.model.head_init = head_init
  c.model.prelogit_norm = prelogit_norm
  c.prompt.variant = variant
  c.prompt.num_prompts = num_prompts
  c.data.name = t.tfds_name
  c.data.num_classes = t.num_classes
  c.data.image_size = 32
  c.data.normalize = "minus1_1"  # what the embedded backbone was trained on
  final = mode == "final"
  c.data.train_split = SPLITS["train800val200" if final else "train800"]
  c.data.eval_split = SPLITS["test" if final else "val200"]
  c.batch_size = batch_size
  c.eval_batch_size = 256
  c.total_epochs = epochs
  c.warmup_epochs = min(2, epochs - 1)
  c.per_step_schedule = True
  c.prompt.lr_scale = prompt_lr_scale
  c.base_lr = base_lr
  c.weight_decay = weight_decay
  c.log_every_steps = 16
  c.checkpoint_every_steps = 160
  c.progress_bar = True
  if smoke:
    c.data.train_split = "train[:64]"
    c.data.eval_split = "test[:64]"
    c.total_epochs, c.warmup_epochs = 2, 1
    c.eval_batch_size = 64
  return c
