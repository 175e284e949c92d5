"""Cost of preflight's prompt-file check against a ViT-B/16 checkpoint.

  python benchmarks/preflight_prompt_cost.py
  python benchmarks/preflight_prompt_cost.py --model=testing   # seconds

Writes a random-weight vit_jax ``.npz`` of ``--model`` (ViT-B/16: 343 MB)
and a prompts file trained "on" it to a temporary directory, then times,
twice each (page cache warm after the write): the header-only shapes of the
backbone (`vptpc.preflight.run_backbone`), and the whole check when the
shapes fit, which reads the checkpoint to compare fingerprints
(`vptpc.preflight.prompt_file_problems`). Prints JSON lines: the
checkpoint's size, then per pass ``headers_s`` and ``with_fingerprint_s``.
The measured cost is quoted in `vptpc.preflight.run_fingerprint`.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  """Writes the files and prints the timings."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="ViT-B_16", help="a vit_jax variant")
  a = ap.parse_args()
  import jax

  from vptpc import config_util, npz_checkpoint, preflight, prompts
  from vptpc.models import vit

  tmp = tempfile.mkdtemp(prefix="vptpc-prompt-cost-")
  try:
    cfg = vit.get_model_config(a.model)
    model = vit.create_model(a.model, num_classes=None)
    shapes = jax.eval_shape(
      lambda r: vit.init_params(model, r, 224), jax.random.key(0)
    )
    rng = np.random.default_rng(0)
    backbone = jax.tree.map(
      lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32),
      vit.split_head(shapes)[0],
    )
    ckpt = os.path.join(tmp, "backbone.npz")
    npz_checkpoint.save_npz(ckpt, backbone)
    p = prompts.init_prompts(
      jax.random.key(0),
      num_prompts=10,
      hidden_size=cfg.hidden_size,
      patch_size=cfg.patch_size,
      num_layers=cfg.num_layers,
    )
    path = os.path.join(tmp, "prompts.npz")
    prompts.save_prompts(path, p, backbone=backbone)
    c = config_util.base_config()
    c.model.name = a.model
    c.model.checkpoint_path = ckpt
    print(json.dumps({"checkpoint_mb": round(os.path.getsize(ckpt) / 1e6)}))
    for run in (1, 2):
      t0 = time.perf_counter()
      dims, _ = preflight.run_backbone(c)
      t1 = time.perf_counter()
      problems = preflight.prompt_file_problems(path, c, "test")
      t2 = time.perf_counter()
      assert dims["hidden_size"] == cfg.hidden_size, dims
      assert problems == [], problems
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
