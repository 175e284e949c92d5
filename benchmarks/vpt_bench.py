"""One command: VPT-Deep speed on every prompt path, vs PyTorch and the peak.

For ViT-B/16 at 224 px (and, with ``--small``, the embedded 32-px ViT) and
each deep prompt count, measures eval images/s and train-step images/s on
each prompt path (``full``: prompts as tokens through every block;
``kv``: key/value-only with keys/values projected once per batch;
``kv_per_image``: projected per image; ``kv_cache`` (eval only): the
per-task cache of `vptpc.models.vit.build_kv_cache`), under jit and pmap;
GFLOPs per image in the PC paper's convention (multiply-accumulates, which
is what reproduces its 17.6 for ViT-B/16): the naive count and the count of
the path actually run; achieved GFLOP/s (true FLOPs: 2 per
multiply-accumulate) as a fraction of this machine's peak matmul rate
(2 n^3 / time) measured in the same run; the PyTorch reference
(``--torch_ref``: a plain PyTorch VPT-Deep script, run in a subprocess of
the same invocation, skipped without torch) and the input pipeline's
images/s on a cached 1k-image split. Writes ``bench.md`` and ``bench.json``
to ``--out`` and prints the table::

  python benchmarks/vpt_bench.py --out=results/bench_cpu --cpu_devices=2
  python benchmarks/vpt_bench.py --out=/tmp/bench_gpu --batch=128 \\
      --dtype=bfloat16 --torch_ref=benchmarks/torch_vpt_ref.py

Train GFLOPs count the backward pass as one more forward (the backbone is
frozen, so only activation gradients are computed, no weight gradients):
train = 2 x forward with prompts, 1 x forward without (head only: no
backward through the backbone). Weights and data are random; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_fields(items: list[str]) -> dict:
  """``["name=value", ...]`` as model fields, checked against the ViT's.

  A name is a `VisionTransformer` field or a `vptpc.models.levers.Levers`
  field (`model_kwargs` puts those into ``levers``).

  Raises:
    ValueError: an item without ``=`` or a name that is neither (named,
      with the known ones).
  """
  from vptpc import config_args
  from vptpc.models import levers, vit

  known = {f.name for f in dataclasses.fields(vit.VisionTransformer)}
  known |= {f.name for f in dataclasses.fields(levers.Levers)}
  known -= {"parent", "name", "levers"}
  out = {}
  for item in items:
    name, eq, value = item.partition("=")
    if not eq or name not in known:
      raise ValueError(
        f"model field item {item!r}: expected name=value with a "
        f"VisionTransformer or Levers field name, one of {sorted(known)}."
      )
    # ``auto`` / ``none``: the field's default; else as a config override.
    auto = value.lower() in ("auto", "none")
    out[name] = None if auto else config_args._guess(value)
  return out


def model_kwargs(fields: dict, attention: str = "") -> dict:
  """`parse_fields`' dict as `create_model` keywords, levers in ``levers``.

  ``attention``: the attention implementation unless the fields name one
  (``attention_impl``).
  """
  from vptpc.models.levers import Levers

  names = {f.name for f in dataclasses.fields(Levers)}
  lever = {k: v for k, v in fields.items() if k in names}
  lever.setdefault("attention_impl", attention)
  rest = {k: v for k, v in fields.items() if k not in names}
  return dict(rest, levers=Levers(**lever))


def median_seconds(fn, warmup: int, iters: int) -> float:
  """Median wall seconds of ``fn()`` (which blocks) after warm-up calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def peak_matmul_gflops(jax, jnp, dtype, n: int) -> float:
  """Measured GFLOP/s of an (n, n) @ (n, n) matmul in ``dtype``."""
  a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n)).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  s = median_seconds(lambda: jax.block_until_ready(f(a, b)), 2, 5)
  return 2 * n**3 / s / 1e9


def torch_reference(path, prompts, batch, iters) -> dict | None:
  """Runs the PyTorch reference in a subprocess; its JSON, or None."""
  if not path or not os.path.exists(path):
    return None
  device = "cpu"
  try:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
  except ImportError:
    return None
  cmd = [
    sys.executable,
    os.path.join(HERE, "run_torch_ref.py"),
    path,
    f"--device={device}",
    "--",
    "--prompts",
    str(prompts),
    "--batch",
    str(batch),
    "--steps",
    str(iters),
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
  if out.returncode:
    print(out.stderr[-2000:], file=sys.stderr)
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])


def make_row(ctx: dict, what: str, mode: str, s: float, gflops: float):
  """One table row from a measured median step time ``s`` (seconds)."""
  b = ctx["batch"]
  r = dict(
    model=ctx["model"],
    batch=b,
    dtype=ctx["dtype"],
    prompts=ctx["prompts"],
    path=ctx["path"],
    what=what,
    mode=mode,
    img_s=round(b / s, 2),
    gflops_naive=float(f"{ctx['naive']:.4g}"),
    gflops_actual=float(f"{gflops:.4g}"),
    achieved_gflop_s=round(2 * gflops * b / s, 1),
    pct_peak=round(100 * 2 * gflops * b / s / ctx["peak"], 1),
    device=ctx["device"],
  )
  if ctx.get("spec"):
    r["pct_spec"] = round(100 * 2 * gflops * b / s / ctx["spec"], 1)
  print(json.dumps(r), flush=True)
  return r


def pipeline_row(model, batch, mode, img_s, device="host CPU") -> dict:
  """A table row for the input pipeline's images/s (no FLOPs)."""
  return dict(
    model=model,
    batch=batch,
    dtype="uint8->float32",
    prompts="",
    path="",
    what="input pipeline (cached 1k)",
    mode=mode,
    img_s=round(img_s, 1),
    gflops_naive="",
    gflops_actual="",
    achieved_gflop_s="",
    pct_peak="",
    device=device,
  )


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="results/bench")
  ap.add_argument("--model", default="B/16")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompts", default="0,30,100")
  ap.add_argument("--paths", default="full,kv,kv_per_image")
  ap.add_argument("--modes", default="jit,pmap")
  ap.add_argument("--pmap_prompts", default="100", help="counts run on pmap")
  ap.add_argument("--cpu_devices", type=int, default=1)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--matmul_n", type=int, default=2048)
  ap.add_argument("--small", action="store_true", help="also fractal-Ti/4")
  ap.add_argument(
    "--attention", default="", help="attention_impl: '', matmul, xla or cudnn"
  )
  ap.add_argument(
    "--model_fields",
    default="",
    help="more VisionTransformer or Levers fields, name=value,... (e.g. "
    "kv_stacked=1)",
  )
  ap.add_argument(
    "--full_at", default="", help="prompt counts of the full path ('': all)"
  )
  ap.add_argument("--kv_cache", type=int, default=1, help="time kv_cache eval")
  ap.add_argument(
    "--cast_backbone",
    type=int,
    default=1,
    help="keep the frozen backbone in the compute dtype (as vptpc.runner.Runner)",
  )
  ap.add_argument(
    "--spec_tflops",
    type=float,
    default=0.0,
    help="datasheet dense peak (e.g. 989 for H100 SXM bf16): adds pct_spec",
  )
  ap.add_argument(
    "--torch_ref",
    default=os.path.join(HERE, "torch_vpt_ref.py"),
  )
  a = ap.parse_args()

  import jax

  if a.cpu_devices > 1:
    jax.config.update("jax_num_cpu_devices", a.cpu_devices)
  import jax.numpy as jnp
  import numpy as np
  from table import print_rows

  from vptpc import flops, optim, parallel, steps
  from vptpc import prompts as pr
  from vptpc.data import pipeline
  from vptpc.models import vit

  dtype = jnp.dtype(a.dtype)
  fields = parse_fields([f for f in a.model_fields.split(",") if f])
  dev = jax.devices()[0]
  device = f"{dev.platform}:{dev.device_kind}"
  peak = peak_matmul_gflops(jax, jnp, dtype, a.matmul_n)
  print(f"peak matmul ({a.matmul_n}^2, {a.dtype}): {peak:.1f} GFLOP/s")
  rows = []
  models = [(a.model, a.image_size, a.batch)]
  if a.small:
    models.append(("fractal-Ti/4", 32, 64))
  n_dev = jax.local_device_count()
  for name, size, batch in models:
    cfg = vit.get_model_config(name, num_classes=100)
    params = vit.init_params(vit.create_model(cfg), jax.random.key(0), size)
    frozen, head = vit.split_head(jax.device_get(params))
    rng = np.random.default_rng(0)
    data = {
      "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
      "label": rng.integers(0, 100, batch).astype(np.int32),
      "mask": np.ones(batch, bool),
    }
    dims = dict(
      hidden_size=cfg.hidden_size,
      num_layers=cfg.num_layers,
      mlp_dim=cfg.mlp_dim,
      num_patches=(size // cfg.patch_size) ** 2,
      patch_size=cfg.patch_size,
    )
    sched = optim.create_lr_schedule(
      base_lr=0.1,
      batch_size=batch,
      steps_per_epoch=1,
      total_epochs=100,
      warmup_epochs=0,
    )
    opt = optim.create_optimizer(sched, weight_decay=1e-4)
    for n_p in (int(x) for x in a.prompts.split(",")):
      prompts = pr.init_prompts(
        jax.random.key(1),
        num_prompts=n_p,
        hidden_size=cfg.hidden_size,
        patch_size=cfg.patch_size,
        num_layers=cfg.num_layers,
      )
      naive = flops.vit_gmacs(**dims, prompts_per_layer=n_p)
      kvc = flops.vit_gmacs(**dims, prompts_per_layer=n_p, count="kv")
      paths = ["full"] if n_p == 0 else a.paths.split(",")
      if n_p and a.full_at and str(n_p) not in a.full_at.split(","):
        paths = [p for p in paths if p != "full"]
      if n_p and "kv" in paths and a.kv_cache:
        paths.append("kv_cache")
      for path in paths:
        over = vit.path_overrides("kv" if path == "kv_cache" else path)
        model = vit.create_model(
          cfg, dtype=dtype, **over, **model_kwargs(fields, a.attention)
        )
        actual = naive if path == "full" else kvc

        ctx = dict(
          model=name, batch=batch, dtype=a.dtype, prompts=n_p,
          path=path if n_p else "none", naive=naive, peak=peak, device=device,
          spec=a.spec_tflops * 1e3,
        )  # fmt: skip

        # Eval forward (jit).
        run_frozen = frozen
        if a.cast_backbone:
          run_frozen = vit.cast_backbone(frozen, dtype)
        fp = {"params": vit.merge_head(run_frozen, head)}
        arg = prompts
        if path == "kv_cache":
          arg = vit.build_kv_cache(frozen, prompts, cfg.num_heads, dtype)
        fwd = jax.jit(lambda p, x, m=model, fp=fp: m.apply(fp, x, p))
        x = jnp.asarray(data["image"])
        s = median_seconds(
          lambda f=fwd, p=arg, x=x: jax.block_until_ready(f(p, x)),
          a.warmup,
          a.iters,
        )
        rows.append(make_row(ctx, "eval", "jit", s, actual))
        if path == "kv_cache":
          continue
        # Train step (jit, and pmap where asked).
        step_fn = steps.make_train_step(model, opt, sched)
        key = jax.random.key(0)
        for mode in a.modes.split(","):
          if mode == "pmap" and (
            n_dev < 2
            or batch % n_dev
            or str(n_p) not in a.pmap_prompts.split(",")
          ):
            continue
          # Host copies: the jitted step donates its state's buffers.
          state = jax.device_get(
            steps.create_train_state({"prompts": prompts, "head": head}, opt)
          )
          if mode == "jit":
            step = parallel.jit_train_step(step_fn)
            dev = jax.devices()[0]
            st = jax.device_put(state, dev)
            fz = jax.device_put(run_frozen, dev)
            # On the device already, as the prefetching loop leaves it: a
            # host batch would time its own transfer (77 MB at B/16 b128).
            dd = jax.device_put(data, dev)

            def run(st, step=step, fz=fz, d=dd, k=key):
              return step(st, fz, d, k)
          else:
            step = parallel.pmap_train_step(step_fn)
            st = parallel.replicate(state)
            fz = parallel.replicate(run_frozen)
            sharded = parallel.shard_batch(data)

            def run(st, step=step, fz=fz, sh=sharded, k=key):
              return step(st, fz, sh, k)

          box = [st]

          def once(run=run, box=box):
            box[0], m = run(box[0])
            jax.block_until_ready(m)

          s = median_seconds(once, a.warmup, a.iters)
          mode_name = mode if mode == "jit" else f"pmap x{n_dev}"
          # Backward through the frozen backbone exists only when prompts
          # do; a head-only step is one forward (XLA drops the rest).
          train_gmacs = actual * (2 if n_p else 1)
          rows.append(make_row(ctx, "train", mode_name, s, train_gmacs))
    # Input pipeline: cached 1k-image split -> normalised, padded batches.
    split = pipeline.Split(
      rng.integers(0, 255, size=(1000, size, size, 3), dtype=np.uint8),
      rng.integers(0, 100, 1000).astype(np.int32),
      "random",
      size,
    )
    t = time.perf_counter()
    n = 0
    for b in pipeline.train_batches(
      split, batch_size=batch, seed=0, epoch=0, normalization="imagenet"
    ):
      n += int(b["mask"].sum())
    rows.append(
      pipeline_row(name, batch, "host", n / (time.perf_counter() - t))
    )
    # The same split on the device: gather + normalise inside jit
    # (vptpc.data.device), as vptpc.runner.Runner runs it.
    from vptpc.data import device as device_data

    dsplit = device_data.place(split)
    plan = device_data.epoch_plan(dsplit, batch_size=batch, seed=0, epoch=0)

    def gather_all(arr, p, size=size):
      # Each batch reduced to a scalar so that nothing but the gather runs.
      return jax.lax.map(
        lambda r: device_data.gather(
          arr, r, normalization="imagenet", image_size=size
        )["image"].sum(),
        p,
      )

    gather = jax.jit(gather_all)
    s = median_seconds(
      lambda g=gather, d=dsplit, p=plan: jax.block_until_ready(g(d.arrays, p)),
      1,
      3,
    )
    rows.append(
      pipeline_row(name, batch, "device", int(plan["mask"].sum()) / s, device)
    )
  torch_rows = []
  if a.model == "B/16" and a.image_size == 224:
    for n_p in (int(x) for x in a.prompts.split(",")):
      ref = torch_reference(a.torch_ref, n_p, a.batch, a.iters)
      if ref is None:
        continue
      naive = flops.vit_gmacs(
        hidden_size=768,
        num_layers=12,
        mlp_dim=3072,
        num_patches=196,
        patch_size=16,
        prompts_per_layer=n_p,
      )
      for what in ("eval", "train"):
        img_s = ref[f"{what}_img_s"]
        g = naive * (2 if what == "train" else 1)
        torch_rows.append(
          dict(
            model="B/16 (PyTorch reference)",
            batch=a.batch,
            dtype="float32",
            prompts=n_p,
            path="full",
            what=what,
            mode=f"torch {ref['torch']}, {ref['threads']} threads",
            img_s=img_s,
            gflops_naive=round(naive, 2),
            gflops_actual=round(naive, 2),
            achieved_gflop_s=round(2 * g * img_s, 1),
            pct_peak=round(100 * 2 * g * img_s / peak, 1),
            device=ref.get("device", ""),
          )
        )
  rows += torch_rows
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "bench.json"), "w") as f:
    json.dump(
      {
        "peak_matmul_gflop_s": peak,
        "args": vars(a),
        # As the process ran (`import vptpc` may have added to it).
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # The levers the rows ran with (`vptpc.models.levers.Levers`).
        "levers": dataclasses.asdict(
          model_kwargs(fields, a.attention)["levers"]
        ),
        "rows": rows,
      },
      f,
      indent=1,
    )
  cols = [
    "model",
    "prompts",
    "path",
    "what",
    "mode",
    "batch",
    "dtype",
    "img_s",
    "gflops_naive",
    "gflops_actual",
    "achieved_gflop_s",
    "pct_peak",
  ]
  if a.spec_tflops:
    cols.append("pct_spec")
  slim = [{c: r.get(c, "") for c in cols} for r in rows]
  import contextlib
  import io

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print(
      f"Device: {device}; peak matmul {peak:.1f} GFLOP/s ({a.matmul_n}^2 "
      f"{a.dtype}, measured in this run"
      + (f"; datasheet {a.spec_tflops:g} TFLOP/s" if a.spec_tflops else "")
      + "). gflops_* are per image in the PC "
      "paper's convention (multiply-accumulates; train: 2 x forward); "
      "achieved GFLOP/s count 2 FLOPs per multiply-accumulate.\n"
    )
    print_rows(slim)
  with open(os.path.join(a.out, "bench.md"), "w") as f:
    f.write(buf.getvalue())
  print(buf.getvalue())


if __name__ == "__main__":
  main()
