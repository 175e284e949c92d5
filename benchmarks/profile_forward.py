"""Where the time of one VPT-Deep forward goes, op by op.

Times each piece of one ViT block separately (jitted on its own, median of
``--iters``) at the shapes of the key/value-only path: the query/key/value
projections of the image tokens, the prompts' key/value projection, the
attention core (QK^T, softmax, AV over image + prompt keys), the output
projection, the two LayerNorms, the MLP's two matmuls and its GELU; then the
whole jitted forward. The sum of the pieces times the block count, beside
the measured forward, says how much the fusion gains or loses; each matmul's
GFLOP/s beside the machine's peak (a square ``--matmul_n`` matmul, measured
in the same run) says which shapes run below it. Prints a Markdown table and
writes it (``profile.md``) and its rows (``profile.json``) to ``--out``::

  python benchmarks/profile_forward.py --out=results/profile_cpu
  python benchmarks/profile_forward.py --out=/tmp/p --model=tiny32 \
      --image_size=32 --batch=2 --prompts=2 --iters=1 --matmul_n=64  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import time


def median_ms(fn, args, iters: int) -> float:
  """Median wall milliseconds of ``fn(*args)`` after one warm-up call."""
  import jax

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * sorted(times)[len(times) // 2]


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="results/profile")
  ap.add_argument("--model", default="B/16", help="a ViT variant name")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompts", type=int, default=100)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--matmul_n", type=int, default=2048)
  a = ap.parse_args()

  import jax
  import jax.numpy as jnp

  from vptpc import prompts as pr
  from vptpc.models import levers, vit

  cfg = vit.get_model_config(a.model, num_classes=100)
  d, heads, mlp, layers = (
    cfg.hidden_size,
    cfg.num_heads,
    cfg.mlp_dim,
    cfg.num_layers,
  )
  b, t, k = a.batch, (a.image_size // cfg.patch_size) ** 2 + 1, a.prompts
  hd = d // heads
  key = iter(jax.random.split(jax.random.key(0), 32))

  def rnd(*shape):
    return jax.random.normal(next(key), shape, jnp.float32)

  n = a.matmul_n
  peak_ms = median_ms(jax.jit(jnp.matmul), (rnd(n, n), rnd(n, n)), a.iters)
  peak = 2 * n**3 / peak_ms / 1e6  # GFLOP/s

  x = rnd(b, t, d)
  p = rnd(k, d)
  w_qkv = rnd(d, 3 * d)
  w_kv = rnd(d, 2 * d)
  w_o = rnd(d, d)
  w1, w2 = rnd(d, mlp), rnd(mlp, d)
  q4 = rnd(b, t, heads, hd)
  k4, v4 = rnd(b, t + k, heads, hd), rnd(b, t + k, heads, hd)
  h = rnd(b, t, mlp)
  scale, bias = rnd(d), rnd(d)

  def ln(y):
    m = y.mean(-1, keepdims=True)
    v = ((y - m) ** 2).mean(-1, keepdims=True)
    return (y - m) * jax.lax.rsqrt(v + 1e-6) * scale + bias

  m_tok = b * t
  pieces = [
    # name, fn, args, FLOPs (2 per multiply-accumulate)
    ("LayerNorm x2", lambda y: ln(ln(y)), (x,), 0),
    ("q,k,v projection (image tokens)", jnp.matmul, (x, w_qkv), 2 * m_tok * d * 3 * d),
    ("k,v projection (prompts, once)", jnp.matmul, (p, w_kv), 2 * k * d * 2 * d),
    (
      "attention core, jax.nn.dot_product_attention",
      jax.nn.dot_product_attention,
      (q4, k4, v4),
      2 * 2 * b * heads * t * (t + k) * hd,
    ),
    (
      "attention core, vptpc matmul (used)",
      lambda q_, k_, v_: levers.attention(q_, k_, v_, None, "matmul"),
      (q4, k4, v4),
      2 * 2 * b * heads * t * (t + k) * hd,
    ),
    ("output projection", jnp.matmul, (x, w_o), 2 * m_tok * d * d),
    ("MLP fc1", jnp.matmul, (x, w1), 2 * m_tok * d * mlp),
    ("GELU (exact)", lambda z: jax.nn.gelu(z, approximate=False), (h,), 0),
    ("MLP fc2", jnp.matmul, (h, w2), 2 * m_tok * mlp * d),
  ]  # fmt: skip
  rows = []
  total = total_train = 0.0
  for name, fn, args, fl in pieces:
    ms = median_ms(jax.jit(fn), args, a.iters)
    # Forward + backward to the activations only (the backbone is frozen),
    # as in a VPT train step: q, k and v for attention, else the first.
    wrt = (0, 1, 2) if name.startswith("attention") else 0
    fb = jax.jit(jax.grad(lambda *x, f=fn: (f(*x) ** 2).sum(), argnums=wrt))
    ms_train = median_ms(fb, args, a.iters)
    if "jax.nn" not in name:  # the alternative, not in the model
      total += ms
      total_train += ms_train
    rows.append(
      dict(
        piece=name,
        ms_per_block=round(ms, 2),
        ms_x_layers=round(ms * layers, 1),
        gflop_s=round(fl / ms / 1e6, 1) if fl else "",
        pct_peak=round(100 * fl / ms / 1e6 / peak, 1) if fl else "",
        fwd_bwd_ms_per_block=round(ms_train, 2),
      )
    )
  params = vit.init_params(
    vit.create_model(cfg), jax.random.key(0), a.image_size
  )
  prompts = pr.init_prompts(
    jax.random.key(1),
    num_prompts=k,
    hidden_size=d,
    patch_size=cfg.patch_size,
    num_layers=layers,
  )
  model = vit.create_model(cfg, kv_only=True)
  img = rnd(b, a.image_size, a.image_size, 3)
  fwd = jax.jit(lambda pp, im: model.apply({"params": params}, im, pp))
  whole = median_ms(fwd, (prompts, img), a.iters)
  for r in rows:
    r["pct_of_sum"] = round(100 * r["ms_per_block"] / total, 1)
  blank = dict(gflop_s="", pct_peak="", pct_of_sum="")
  rows.append(
    dict(
      blank,
      piece=f"sum of pieces used x {layers} blocks",
      ms_per_block=round(total, 2),
      ms_x_layers=round(total * layers, 1),
      pct_of_sum=100.0,
      fwd_bwd_ms_per_block=round(total_train, 2),
    )
  )
  rows.append(
    dict(
      blank,
      piece="whole jitted forward (kv path)",
      ms_per_block="",
      ms_x_layers=round(whole, 1),
      fwd_bwd_ms_per_block="",
    )
  )
  cols = ["piece", "ms_per_block", "ms_x_layers", "gflop_s", "pct_peak"]
  cols += ["pct_of_sum", "fwd_bwd_ms_per_block"]
  lines = [
    f"ViT {a.model} at {a.image_size} px, batch {b}, {k} deep prompts "
    "(key/value path), float32, "
    f"{jax.devices()[0].platform}; peak matmul {peak:.1f} GFLOP/s "
    f"({n}^2, same run).",
    "",
    "| " + " | ".join(cols) + " |",
    "|" + "---|" * len(cols),
  ]
  lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
  text = "\n".join(lines)
  print(text)
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "profile.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(a.out, "profile.json"), "w") as f:
    json.dump({"peak_gflop_s": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
