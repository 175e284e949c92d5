"""Cost of the folder-dataset image check (``config.data.verify_images``).

  python benchmarks/verify_images_cost.py --train=1000 --test=1880 --size=256

Writes a folder dataset of ``train + test`` JPEGs (``size`` px, smooth
patterns plus noise, quality 90) to a temporary directory, then times
`vptpc.data.pipeline.image_problems` over both splits in each mode, twice
(the first pass may read from disk, the second from the page cache), and
the preflight's folder checks (`vptpc.preflight.data_problems`) with the
default mode. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_folder(root: str, train: int, test: int, size: int) -> int:
  """Writes the dataset; returns its size in bytes."""
  os.makedirs(os.path.join(root, "images"))
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:size, 0:size]
  total = 0
  for split, n in (("train", train), ("test", test)):
    lines = []
    for i in range(n):
      a = np.stack([x * (i % 7 + 1), y * (i % 5 + 1), x + y], -1) % 256
      a = (a + rng.integers(0, 40, a.shape)).clip(0, 255).astype(np.uint8)
      rel = f"images/{split}{i}.jpg"
      Image.fromarray(a).save(os.path.join(root, rel), quality=90)
      total += os.path.getsize(os.path.join(root, rel))
      lines.append(f"{rel} {i % 10}\n")
    with open(os.path.join(root, f"{split}.txt"), "w") as f:
      f.writelines(lines)
  return total


def main() -> None:
  """Builds the dataset and prints the timings."""
  from vptpc import config_util, preflight
  from vptpc.data import pipeline

  ap = argparse.ArgumentParser()
  ap.add_argument("--train", type=int, default=1000)
  ap.add_argument("--test", type=int, default=1880)
  ap.add_argument("--size", type=int, default=256)
  a = ap.parse_args()
  tmp = tempfile.mkdtemp(prefix="vptpc-verify-")
  try:
    root = os.path.join(tmp, "data")
    nbytes = make_folder(root, a.train, a.test, a.size)
    files = a.train + a.test
    print(json.dumps({"files": files, "px": a.size, "mb": nbytes / 1e6}))
    for mode in ("header", "decode"):
      for run in (1, 2):
        t0 = time.perf_counter()
        for split in ("train", "test"):
          assert pipeline.image_problems(root, split, mode) == []
        s = time.perf_counter() - t0
        print(
          json.dumps(
            {
              "mode": mode,
              "pass": run,
              "seconds": round(s, 3),
              "ms_per_file": round(1e3 * s / files, 3),
            }
          )
        )
    c = config_util.base_config()
    c.data.source, c.data.folder = "folder", root
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.num_classes = 10
    t0 = time.perf_counter()
    problems, _, _ = preflight.data_problems(c)
    assert not problems, problems
    print(
      json.dumps(
        {
          "preflight_folder_checks_s": round(time.perf_counter() - t0, 3),
          "verify_images": c.data.verify_images,
        }
      )
    )
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
