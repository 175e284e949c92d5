"""FLOP counts of a prompted ViT, as Prompt Condensation reports them.

Two conventions (docs/references.md, "PC: FLOPs convention"), both in
multiply-accumulates (MACs), which is what the PC paper's "GFLOPs" table
counts:

* ``naive``: every token, prompts included, goes through the QKV, output and
  MLP projections and attention in every layer. For ViT-B/16 at 224 px this
  gives 17.56 / 22.22 / 26.97 / 31.81 / 36.74 G for 0 / 50 / 100 / 150 / 200
  prompts per layer, the paper's 17.6 / 22.2 / 26.9 / 31.8 / 36.7 (the
  paper's exact counting is unverified; this is the formula that matches).
* ``kv``: VPT-Deep's exact key/value-only form: a layer's prompts add only
  their key/value projections (image-independent, counted once per image
  here as an upper bound) and attention columns for the N image tokens.

Per-layer prompt counts may differ (condensed prompts).

`swin_gmacs` counts a prompted Swin (`vptpc.models.swin`) in the same unit,
with the official VPT code's computation as its naive count and vptpc's
full and key/value paths. `model_gmacs` picks the formula from a built
model (what a run reports).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from vptpc.models import registry


def vit_gmacs(
  *,
  hidden_size: int,
  num_layers: int,
  mlp_dim: int,
  num_patches: int,
  patch_size: int,
  prompts_per_layer: int | Sequence[int] = 0,
  count: str = "naive",
  channels: int = 3,
  num_prefix: int = 1,
) -> float:
  """GMACs per image of a (prompted) ViT encoder.

  Args:
    hidden_size: D.
    num_layers: L.
    mlp_dim: MLP width.
    num_patches: image tokens without the class token (196 for B/16 @ 224).
    patch_size: patch side (for the patch embedding).
    prompts_per_layer: an int for all layers or one count per layer. For
      VPT-Shallow pass the same count for every layer (its prompts are
      carried through all blocks).
    count: ``naive`` or ``kv`` (see the module docstring).
    channels: input channels.
    num_prefix: class and register tokens (0 for a ViT that only
      averages; 5 for DINOv2 with 4 registers).

  Returns:
    Giga multiply-accumulates per image.

  Raises:
    ValueError: bad ``count`` or number of per-layer counts.
  """
  if isinstance(prompts_per_layer, int):
    prompts = [prompts_per_layer] * num_layers
  else:
    prompts = list(prompts_per_layer)
  if len(prompts) != num_layers:
    raise ValueError(
      f"prompts_per_layer has {len(prompts)} entries for {num_layers} layers."
    )
  if count not in ("naive", "kv"):
    raise ValueError(f"count must be 'naive' or 'kv', got {count!r}.")
  d, n = hidden_size, num_patches + num_prefix
  proj = 4 * d * d + 2 * d * mlp_dim  # QKV + out + MLP, per token
  total = num_patches * channels * patch_size * patch_size * d
  for p in prompts:
    if count == "naive":
      t = n + p
      total += t * proj + 2 * t * t * d
    else:
      total += n * proj + 2 * n * (n + p) * d + p * 2 * d * d
  return total / 1e9


def model_dims(model: Any, image_size: int) -> dict[str, int]:
  """The `vit_gmacs` keyword arguments of a ViT module at ``image_size``."""
  return dict(
    hidden_size=model.hidden_size,
    num_layers=model.num_layers,
    mlp_dim=model.mlp_dim,
    num_patches=(image_size // model.patch_size) ** 2,
    patch_size=model.patch_size,
    num_prefix=model.num_prefix,
  )


SWIN_COUNTS = ("naive", "full", "kv")


def swin_gmacs(
  *,
  embed_dim: int,
  depths: Sequence[int],
  window_size: int,
  image_size: int,
  patch_size: int = 4,
  mlp_ratio: float = 4.0,
  prompts_per_layer: int | Sequence[int] = 0,
  variant: str = "deep",
  count: str = "naive",
  channels: int = 3,
) -> float:
  """GMACs per image of a (prompted) Swin, without the head.

  Counts the patch embedding, the QKV, attention (QK and AV), output and MLP
  products of every block and the patch-merging reductions, as Swin's own
  ``flops()`` does (LayerNorms, softmax and biases are not counted; for
  Swin-B at 224 px without prompts this gives 15.4 G, the published
  figure). Prompts add, per block with n prompts, window area T and
  ``nW`` windows:

  * ``naive``: what the official VPT code computes. Prompts are copied into
    every window before the QKV projection, so their QKV, attention and
    output projection are paid ``nW`` times; the MLP once; prompts are also
    merged by each patch merging (4x concatenation).
  * ``full``: vptpc's full path: prompt projections once per image, prompt
    queries attend in every window, the mean over windows is projected
    once.
  * ``kv``: vptpc's key/value path (VPT-Deep only): every block but the last
    adds only the prompt key/value projections (image-independent; counted
    once per image as an upper bound) and n attention columns for each
    image query; the last block is counted as ``full``; no prompt merging.

  Args:
    embed_dim: stage-0 width C0.
    depths: blocks per stage.
    window_size: window side (clamped to each stage's grid).
    image_size: square input side.
    patch_size: patch side.
    mlp_ratio: MLP width / token width.
    prompts_per_layer: VPT-Deep: an int or one count per block; VPT-Shallow:
      the prompt count (carried through every block).
    variant: ``"deep"`` or ``"shallow"``.
    count: ``naive``, ``full`` or ``kv`` (see above).
    channels: input channels.

  Returns:
    Giga multiply-accumulates per image.

  Raises:
    ValueError: bad ``count``/``variant``, counts or ``kv`` with shallow.
  """
  if count not in SWIN_COUNTS:
    raise ValueError(f"count must be one of {SWIN_COUNTS}, got {count!r}.")
  if variant not in ("deep", "shallow"):
    raise ValueError(f"variant must be 'deep' or 'shallow', got {variant!r}.")
  if variant == "shallow" and count == "kv":
    raise ValueError("The key/value count exists only for VPT-Deep.")
  num_blocks = sum(depths)
  if isinstance(prompts_per_layer, int):
    prompts = [prompts_per_layer] * num_blocks
  else:
    prompts = list(prompts_per_layer)
  if variant == "shallow" and len(set(prompts)) > 1:
    raise ValueError("VPT-Shallow has one prompt count for every block.")
  if len(prompts) != num_blocks:
    raise ValueError(
      f"prompts_per_layer has {len(prompts)} entries for {num_blocks} blocks."
    )
  side = image_size // patch_size
  total = side * side * channels * patch_size * patch_size * embed_dim
  g, n_prev = 0, 0
  for s, depth in enumerate(depths):
    c = embed_dim * 2**s
    if s > 0:
      cp = c // 2
      total += (side // 2) ** 2 * 4 * cp * c
      if count != "kv":
        total += n_prev * 4 * cp * c
      side //= 2
    win = min(window_size, side)
    t, nw = win * win, (side // win) ** 2
    hw = side * side
    hidden = int(c * mlp_ratio)
    for _ in range(depth):
      n = prompts[g]
      total += hw * (4 * c * c + 2 * c * hidden)  # QKV, out, MLP
      total += nw * 2 * t * (t + n) * c  # image queries over window+prompts
      last = g == num_blocks - 1
      if count == "kv" and not last:
        total += n * 2 * c * c  # prompt keys and values only
      elif count == "naive":
        total += nw * n * 4 * c * c + n * 2 * c * hidden
        total += nw * 2 * n * (t + n) * c
      else:  # full path (and kv's last block)
        total += n * (4 * c * c + 2 * c * hidden)
        total += nw * 2 * n * (t + n) * c
      n_prev = n
      g += 1
  return total / 1e9


def swin_dims(model: Any, image_size: int) -> dict[str, Any]:
  """The `swin_gmacs` keyword arguments of a Swin module at ``image_size``."""
  return dict(
    embed_dim=model.embed_dim,
    depths=tuple(model.depths),
    window_size=model.window_size,
    image_size=image_size,
    patch_size=model.patch_size,
    mlp_ratio=model.mlp_ratio,
  )


def model_gmacs(
  model: Any,
  image_size: int,
  prompts_per_layer: int | Sequence[int] = 0,
  count: str = "naive",
  variant: str = "deep",
) -> float:
  """GMACs per image of a built ViT or Swin (what a run reports).

  Args:
    model: a `vptpc.models.vit.VisionTransformer` or
      `vptpc.models.swin.SwinTransformer`.
    image_size: square input side.
    prompts_per_layer: an int or one count per block (deep), or the
      shallow count.
    count: ``naive`` (the paper's convention: every prompt is a full token
      everywhere; for Swin, what the official VPT code computes) or ``kv``
      (VPT-Deep's key/value-only path, what ``kv_only`` runs).
    variant: ``deep`` or ``shallow`` (Swin only; a ViT's naive count of
      shallow prompts is the same per-block count).

  Returns:
    Giga multiply-accumulates per image, without the head.

  Raises:
    ValueError: a bad ``count`` (named).
  """
  if count not in ("naive", "kv"):
    raise ValueError(f"count must be 'naive' or 'kv', got {count!r}.")

  return registry.family_of(model).gmacs(
    model, image_size, prompts_per_layer, count, variant
  )


def table(
  models: Sequence[str], prompts: Sequence[int], image_size: int = 224
) -> str:
  """A Markdown table of `model_gmacs`, naive and kv, per model and count.

  Args:
    models: ``config.model.name`` values (`vptpc.models.registry`), e.g.
      ``("B/16", "swin_b")``.
    prompts: deep prompts per block, one row each.
    image_size: square input side.
  """
  built = [
    registry.create_model(registry.canonical_name(m), num_classes=None)
    for m in models
  ]
  head = "| prompts/block | " + " | ".join(
    f"{m} naive | {m} kv" for m in models
  )
  lines = [head + " |", "|---" * (1 + 2 * len(models)) + "|"]
  for n in prompts:
    cells = [
      f"{model_gmacs(m, image_size, n, count=c):.2f}"
      for m in built
      for c in ("naive", "kv")
    ]
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m vptpc.flops --models=B/16,swin_b --prompts=0,50,100``."""
  ap = argparse.ArgumentParser(prog="python -m vptpc.flops")
  ap.add_argument(
    "--models",
    "--model",
    default="B/16,swin_b",
    help="comma-separated config.model.name values (timm names included)",
  )
  ap.add_argument("--prompts", default="0,50,100,150,200")
  ap.add_argument("--image_size", type=int, default=224)
  a = ap.parse_args(argv)
  try:
    print(
      table(
        a.models.split(","),
        [int(x) for x in a.prompts.split(",")],
        a.image_size,
      )
    )
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
