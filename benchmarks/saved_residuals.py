"""What a train step's forward pass keeps for its backward, per lever.

Traces (no compile, any backend) the gradient of a bf16 ViT key/value
train loss with respect to the prompts and the head, and sums the
residuals `jax.ad_checkpoint.print_saved_residuals` lists, in MB per
image, for each combination of the GELU's and the LayerNorms' own VJPs
(``VisionTransformer.gelu_vjp`` / ``ln_vjp``, `vit.own_vjp_default`).
Residuals are split into weights (constants, arguments), the attention
function's own and the rest (what the two levers change). Attention is
traced with XLA's implementation, since cuDNN's does not trace on CPU;
its residuals are reported apart for that reason::

  python benchmarks/saved_residuals.py               # B/16, 100 prompts
  python benchmarks/saved_residuals.py --model=testing --image_size=32
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import print_saved_residuals

from vptpc.models import vit

_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "bool": 1, "f64": 8}


def residual_mb(model, image_size: int, prompts: int, batch: int) -> dict:
  """MB per image of saved residuals by kind for one model."""
  x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), x[:1])["params"]
  )
  frozen, head = vit.split_head(shapes)
  frozen = vit.cast_backbone(
    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), frozen), model.dtype
  )
  head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), head)
  width = model.hidden_size
  trainable = {
    "prompts": {
      f"encoderblock_{i}": jnp.zeros((prompts, width))
      for i in range(model.num_layers)
    },
    "head": head,
  }

  def loss(t):
    params = vit.merge_head(frozen, t["head"])
    return model.apply({"params": params}, x, t["prompts"], train=True).sum()

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(loss, trainable)
  out = {"weights": 0.0, "attention": 0.0, "rest": 0.0}
  for line in buf.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\]\s+(.*)", line)
    if not m:
      continue
    n = 1
    for d in filter(None, m.group(2).split(",")):
      n *= int(d)
    mb = n * _BYTES.get(m.group(1), 4) / batch / 1e6
    why = m.group(3)
    if any(w in why for w in ("constant", "literal", "argument")):
      out["weights"] += mb
    elif "(attention)" in why:
      out["attention"] += mb
    else:
      out["rest"] += mb
  return {k: round(v, 3) for k, v in out.items()}


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="B/16")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--prompts", type=int, default=100)
  ap.add_argument("--batch", type=int, default=4)
  a = ap.parse_args()
  for gelu, ln in ((0, 0), (1, 0), (0, 1), (1, 1)):
    model = vit.create_model(
      a.model,
      num_classes=10,
      dtype=jnp.bfloat16,
      kv_only=True,
      attention_impl="xla",
      pad_tokens=8,
      gelu_vjp=bool(gelu),
      ln_vjp=bool(ln),
    )
    row = dict(model=a.model, prompts=a.prompts, gelu_vjp=gelu, ln_vjp=ln)
    row.update(residual_mb(model, a.image_size, a.prompts, a.batch))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
