"""The parity table of docs/backbones.md: vptpc's timm ViTs against timm.

For each tiny random timm model that ``make_timm_reference.py`` wrote
(``tests/data``: the plain ViT and every variant of ``--variants``), loads
the file through `vptpc.checkpoint.load_pretrained` onto the model
`vptpc.models.registry.create_model` builds from the timm name (shrunk to
the tiny geometry) and prints the largest relative logit error against
timm's float64 logits: plain, with VPT-Deep prompts on the key/value path,
and with VPT-Shallow prompts (both added to the timm model the official
way). Neither torch nor timm is needed::

  python benchmarks/backbone_parity.py [--data=tests/data]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(patch_size=8, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
# File key -> the timm name whose architecture the tiny model shrinks.
VARIANTS = {
  "mae": "vit_base_patch16_224.mae",
  "clip_openai": "vit_base_patch16_clip_224.openai",
  "clip_laion": "vit_base_patch16_clip_224.laion2b",
  "dinov2": "vit_base_patch14_dinov2.lvd142m",
  "dinov2_reg4": "vit_base_patch14_reg4_dinov2.lvd142m",
  "gap": "vit_medium_patch16_gap_240.sw_in12k",
}


def rel_err(got, want) -> float:
  """Largest absolute difference over the largest reference magnitude."""
  got = np.asarray(got, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def rows(data: str) -> list[dict]:
  """One row per tiny model: the timm name it stands for and its errors."""
  import jax
  import jax.numpy as jnp

  from vptpc import checkpoint
  from vptpc.models import registry

  def load(path, model):
    tmpl = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )["params"]
    return checkpoint.load_pretrained(path, tmpl)

  out = []
  with np.load(os.path.join(data, "timm_reference.npz")) as z:
    plain = {k: z[k] for k in z.files}
  model = registry.create_model(
    "vit_base_patch16_224.orig_in21k", num_classes=5, **TINY
  )
  params = load(os.path.join(data, "timm_vit_tiny.safetensors"), model)
  got = model.apply({"params": params}, plain["images"])
  out.append(
    dict(
      name="vit_base_patch16_224.* (supervised)",
      plain=rel_err(got, plain["vit_logits"]),
      deep=None,
      shallow=None,
    )
  )
  with np.load(os.path.join(data, "timm_variants.npz")) as z:
    ref = {k: z[k] for k in z.files}
  for key, name in VARIANTS.items():
    path = os.path.join(data, f"timm_{key}_tiny.safetensors")
    model = registry.create_model(name, num_classes=5, **TINY)
    kv = registry.create_model(name, num_classes=5, kv_only=True, **TINY)
    params = load(path, model)
    p = ref[f"{key}_deep_prompts"]
    deep = {f"encoderblock_{i}": jnp.asarray(p[i]) for i in range(len(p))}
    shallow = {"input": jnp.asarray(ref[f"{key}_shallow_prompts"])}
    x = ref["images"]
    out.append(
      dict(
        name=name,
        plain=rel_err(model.apply({"params": params}, x), ref[f"{key}_logits"]),
        deep=rel_err(
          kv.apply({"params": params}, x, deep), ref[f"{key}_deep_logits"]
        ),
        shallow=rel_err(
          model.apply({"params": params}, x, shallow),
          ref[f"{key}_shallow_logits"],
        ),
      )
    )
  return out


def table(found: list[dict]) -> str:
  """The rows as a Markdown table."""
  fmt = lambda v: "" if v is None else f"{v:.1e}"  # noqa: E731
  lines = [
    "| timm name | plain | VPT-Deep (kv) | VPT-Shallow |",
    "|---|---|---|---|",
  ]
  lines += [
    f"| `{r['name']}` | {fmt(r['plain'])} | {fmt(r['deep'])} | "
    f"{fmt(r['shallow'])} |"
    for r in found
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; the module docstring says what it measures."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", default=os.path.join(HERE, "..", "tests", "data"))
  a = ap.parse_args(argv)
  print(table(rows(a.data)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
