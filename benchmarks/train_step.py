"""Train-step throughput of VPT-Deep: jit on one device vs pmap over several.

Prints a Markdown table. On a CPU host the devices are split with
``--cpu_devices`` (set before JAX starts); on a GPU/TPU the real local
devices are used. Run::

  python benchmarks/train_step.py                  # B/16, 224 px, batch 8
  python benchmarks/train_step.py --cpu_devices=2  # + pmap over 2 CPU devices
  python benchmarks/train_step.py --model=tiny32 --image_size=32 --batch=64

Weights and data are random; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="B/16")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompts", type=int, default=100)
  ap.add_argument("--classes", type=int, default=100)
  ap.add_argument("--cpu_devices", type=int, default=1)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--paths", default="full,kv_only")
  ap.add_argument("--modes", default="jit,pmap")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--json", action="store_true")
  a = ap.parse_args()

  import jax
  from table import print_rows

  if a.cpu_devices > 1:
    jax.config.update("jax_num_cpu_devices", a.cpu_devices)
  import jax.numpy as jnp
  import numpy as np

  from vptpc import optim, parallel, train
  from vptpc import prompts as pr
  from vptpc.models import vit

  cfg = vit.get_model_config(a.model, num_classes=a.classes)
  params = vit.init_params(
    vit.create_model(cfg), jax.random.key(0), a.image_size
  )
  frozen, head = vit.split_head(jax.device_get(params))
  prompts = pr.init_prompts(
    jax.random.key(1),
    num_prompts=a.prompts,
    hidden_size=cfg.hidden_size,
    patch_size=cfg.patch_size,
    num_layers=cfg.num_layers,
  )
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(a.batch, a.image_size, a.image_size, 3)).astype(
      np.float32
    ),
    "label": rng.integers(0, a.classes, a.batch).astype(np.int32),
    "mask": np.ones(a.batch, bool),
  }
  schedule = optim.create_lr_schedule(
    base_lr=0.1,
    batch_size=a.batch,
    steps_per_epoch=1,
    total_epochs=100,
    warmup_epochs=0,
  )
  opt = optim.create_optimizer(schedule, weight_decay=1e-4)
  key = jax.random.key(0)
  n_dev = jax.local_device_count()
  dev = jax.devices()[0]
  rows = []
  for path in a.paths.split(","):
    model = vit.create_model(
      cfg, kv_only=path == "kv_only", dtype=jnp.dtype(a.dtype)
    )
    step_fn = train.make_train_step(model, opt, schedule)
    for mode in a.modes.split(","):
      if mode == "pmap" and a.batch % n_dev:
        continue
      state = jax.device_get(
        train.create_train_state({"prompts": prompts, "head": head}, opt)
      )
      if mode == "jit":
        step = parallel.jit_train_step(step_fn)
        state, fz = jax.device_put(state), jax.device_put(frozen)

        def run(state, step=step, fz=fz):
          return step(state, fz, batch, key)
      else:
        step = parallel.pmap_train_step(step_fn)
        state, fz = parallel.replicate(state), parallel.replicate(frozen)

        def run(state, step=step, fz=fz):
          return step(state, fz, parallel.shard_batch(batch), key)

      for _ in range(a.warmup):
        state, m = run(state)
        jax.block_until_ready(m)
      times = []
      for _ in range(a.iters):
        t = time.perf_counter()
        state, m = run(state)
        jax.block_until_ready(m)  # CPU collectives need a wait per step.
        times.append(time.perf_counter() - t)
      s = sorted(times)[len(times) // 2]
      rows.append(
        dict(
          path=path,
          mode=mode,
          devices=1 if mode == "jit" else n_dev,
          model=a.model,
          image_size=a.image_size,
          batch=a.batch,
          prompts_per_layer=a.prompts,
          dtype=a.dtype,
          device=f"{dev.platform}:{dev.device_kind}",
          ms_per_step=round(s * 1e3, 1),
          img_s=round(a.batch / s, 2),
        )
      )
      del state
  print_rows(rows, a.json)


if __name__ == "__main__":
  main()
