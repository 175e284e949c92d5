"""A tiny procedurally generated TFDS dataset for tests and smoke runs.

``vptpc_toy``: 32x32 RGB noise with one bright square in one of four
quadrants; the label is the quadrant. 1,000 ``train`` and 200 ``test``
examples, so VTAB-1k-style slices (``train[:800]``, ``train[800:]``) apply.
It is a TFDS builder prepared as array_record, read with
`tfds.data_source`: the same code path as real TFDS datasets, with no
network and no TensorFlow.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
  """PNG-encodes a uint8 (H, W, C) image (TFDS encodes via TF otherwise)."""
  buf = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
    buf, format="PNG"
  )
  return buf.getvalue()


class VptpcToy(tfds.core.GeneratorBasedBuilder):
  """Quadrant-of-a-bright-square classification, 4 classes, 32 px."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(num_classes=4),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated locally; nothing is downloaded.
    return {
      "train": self._generate_examples(seed=0, n=1000),
      "test": self._generate_examples(seed=1, n=200),
    }

  def _generate_examples(self, seed: int, n: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
      label = int(rng.integers(4))
      img = rng.integers(0, 100, (32, 32, 3), dtype=np.uint8)
      r, c = (label // 2) * 16, (label % 2) * 16
      # Jittered square inside the quadrant so the task is not a lookup.
      dr, dc = rng.integers(0, 8, 2)
      img[r + dr : r + dr + 8, c + dc : c + dc + 8] = rng.integers(
        150, 256, 3, dtype=np.uint8
      )
      yield i, {"image": encode_png(img), "label": label}
