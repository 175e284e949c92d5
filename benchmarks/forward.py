"""Eval-forward throughput of a VPT-Deep ViT: full path vs key/value-only path.

Prints a Markdown table (and one JSON line per row with ``--json``). Run::

  python benchmarks/forward.py                       # ViT-B/16, 224 px, batch 8
  python benchmarks/forward.py --model=tiny32 --image_size=32 --batch=64

Weights are random (speed does not depend on them); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from table import print_rows

from vptpc import prompts as pr
from vptpc.flops import vit_gmacs
from vptpc.models import vit


def bench(fn, *args, warmup, iters):
  """Returns the median wall seconds of ``fn(*args)`` after warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  times.sort()
  return times[len(times) // 2]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="B/16")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompts", type=int, default=100)
  ap.add_argument("--classes", type=int, default=100)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--json", action="store_true")
  a = ap.parse_args()

  cfg = vit.get_model_config(a.model, num_classes=a.classes)
  dtype = jnp.dtype(a.dtype)
  params = vit.init_params(
    vit.create_model(cfg), jax.random.key(0), a.image_size
  )
  p = pr.init_prompts(
    jax.random.key(1),
    num_prompts=a.prompts,
    hidden_size=cfg.hidden_size,
    patch_size=cfg.patch_size,
    num_layers=cfg.num_layers,
  )
  images = jax.random.normal(
    jax.random.key(2), (a.batch, a.image_size, a.image_size, 3)
  )
  tokens = (a.image_size // cfg.patch_size) ** 2 + 1
  dev = jax.devices()[0]
  rows = []
  for path, kv_only in (("full", False), ("kv_only", True)):
    model = vit.create_model(cfg, kv_only=kv_only, dtype=dtype)
    fwd = jax.jit(lambda prm, pp, x, m=model: m.apply({"params": prm}, x, pp))
    s = bench(fwd, params, p, images, warmup=a.warmup, iters=a.iters)
    count = vit_gmacs(
      hidden_size=cfg.hidden_size,
      num_layers=cfg.num_layers,
      mlp_dim=cfg.mlp_dim,
      num_patches=tokens - 1,
      patch_size=cfg.patch_size,
      prompts_per_layer=a.prompts,
      count="naive" if path == "full" else "kv",
    )
    rows.append(
      dict(
        path=path,
        model=a.model,
        image_size=a.image_size,
        batch=a.batch,
        prompts_per_layer=a.prompts,
        dtype=a.dtype,
        device=f"{dev.platform}:{dev.device_kind}",
        ms_per_batch=round(s * 1e3, 1),
        img_s=round(a.batch / s, 2),
        gflops_per_img=round(count, 2),
      )
    )
  rows[1]["speedup"] = round(rows[1]["img_s"] / rows[0]["img_s"], 3)
  rows[0]["speedup"] = 1.0
  print_rows(rows, a.json)


if __name__ == "__main__":
  main()
