"""Cost of preflight's prompt-file check against a ViT-B/16 checkpoint.

  python benchmarks/preflight_prompt_cost.py

Writes a random-weight ViT-B/16 vit_jax ``.npz`` (343 MB) and a prompts
file trained "on" it to a temporary directory, then times, twice each
(page cache warm after the write): the header-only shapes of the backbone
(`vptpc.preflight.run_backbone`), and the whole check when the shapes fit,
which reads the checkpoint to compare fingerprints
(`vptpc.preflight.prompt_file_problems`). Prints JSON lines.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  """Writes the files and prints the timings."""
  import jax

  from vptpc import checkpoint, config_util, preflight, prompts
  from vptpc.models import vit

  tmp = tempfile.mkdtemp(prefix="vptpc-prompt-cost-")
  try:
    model = vit.create_model("ViT-B_16", num_classes=None)
    shapes = jax.eval_shape(
      lambda r: vit.init_params(model, r, 224), jax.random.key(0)
    )
    rng = np.random.default_rng(0)
    backbone = jax.tree.map(
      lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32),
      vit.split_head(shapes)[0],
    )
    ckpt = os.path.join(tmp, "ViT-B_16.npz")
    checkpoint.save_npz(ckpt, backbone)
    p = prompts.init_prompts(
      jax.random.key(0),
      num_prompts=10,
      hidden_size=768,
      patch_size=16,
      num_layers=12,
    )
    path = os.path.join(tmp, "prompts.npz")
    prompts.save_prompts(path, p, backbone=backbone)
    c = config_util.base_config()
    c.model.name = "ViT-B_16"
    c.model.checkpoint_path = ckpt
    print(json.dumps({"checkpoint_mb": round(os.path.getsize(ckpt) / 1e6)}))
    for run in (1, 2):
      t0 = time.perf_counter()
      dims, _ = preflight.run_backbone(c)
      t1 = time.perf_counter()
      problems = preflight.prompt_file_problems(path, c, "test")
      t2 = time.perf_counter()
      assert dims["hidden_size"] == 768 and problems == [], problems
      print(
        json.dumps(
          {
            "pass": run,
            "headers_s": round(t1 - t0, 3),
            "with_fingerprint_s": round(t2 - t1, 3),
          }
        )
      )
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
