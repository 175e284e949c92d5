"""Mixed-task batch throughput vs per-task batches on one frozen backbone.

T tasks with different (condensed-like, ragged) prompt counts and heads;
the same images classified (a) as one mixed batch per step through
`vptpc.serve` and (b) task by task, each task's images as its own batch
through the plain model (what a server without the bank does)::

  python benchmarks/serve_bench.py --tasks=8 --batch=64
  python benchmarks/serve_bench.py --model=B/16 --image_size=224 --batch=16

Random weights; nothing is downloaded. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="fractal-Ti/4")
  ap.add_argument("--image_size", type=int, default=32)
  ap.add_argument("--tasks", type=int, default=8)
  ap.add_argument("--batch", type=int, default=64, help="mixed batch size")
  ap.add_argument("--iters", type=int, default=5)
  a = ap.parse_args()

  import jax
  import numpy as np
  from table import print_rows

  from vptpc import prompts as pr
  from vptpc import serve
  from vptpc.models import vit

  cfg = vit.get_model_config(a.model)
  model = vit.create_model(cfg, kv_only=True)
  params = vit.init_params(model, jax.random.key(0), a.image_size)
  frozen, _ = vit.split_head(params)
  rng = np.random.default_rng(0)
  tasks = {}
  for t in range(a.tasks):
    counts = rng.integers(0, 8, cfg.num_layers).tolist()  # ragged, like PC
    p = pr.init_prompts(
      jax.random.key(t),
      num_prompts=counts,
      hidden_size=cfg.hidden_size,
      patch_size=cfg.patch_size,
      num_layers=cfg.num_layers,
    )
    c = int(rng.integers(2, 20))
    head = {
      "kernel": rng.normal(size=(cfg.hidden_size, c)).astype(np.float32),
      "bias": np.zeros(c, np.float32),
    }
    tasks[f"t{t}"] = (p, head)
  bank = serve.build_bank(frozen, tasks, num_heads=cfg.num_heads)
  fn = serve.make_classifier(model)
  images = rng.normal(size=(a.batch, a.image_size, a.image_size, 3)).astype(
    np.float32
  )
  ids = np.arange(a.batch, dtype=np.int32) % a.tasks
  alone = {}
  for name, (p, head) in tasks.items():
    m = vit.create_model(cfg, kv_only=True, num_classes=head["kernel"].shape[1])
    prm = vit.merge_head(frozen, head)
    alone[name] = jax.jit(
      lambda x, p=p, m=m, prm=prm: m.apply({"params": prm}, x, p)
    )
  per_task = {n: images[ids == i] for i, n in enumerate(tasks)}

  def mixed():
    jax.block_until_ready(serve.classify(model, frozen, bank, images, ids, fn))

  def separate():
    for n, x in per_task.items():
      jax.block_until_ready(alone[n](x))

  def timed(f):
    f()
    ts = []
    for _ in range(a.iters):
      t0 = time.perf_counter()
      f()
      ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]

  s_mixed, s_sep = timed(mixed), timed(separate)
  dev = jax.devices()[0]
  print_rows(
    [
      dict(
        how="one mixed-task batch (TaskBank)",
        tasks=a.tasks,
        images=a.batch,
        img_s=round(a.batch / s_mixed, 1),
        device=f"{dev.platform}",
      ),
      dict(
        how="per-task batches (plain model)",
        tasks=a.tasks,
        images=a.batch,
        img_s=round(a.batch / s_sep, 1),
        device=f"{dev.platform}",
      ),
    ]
  )
  print(f"\nmixed / per-task throughput: {s_sep / s_mixed:.2f}x")


if __name__ == "__main__":
  main()
