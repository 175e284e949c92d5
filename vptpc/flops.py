"""FLOP counts of a prompted ViT, as Prompt Condensation reports them.

Two conventions (pc.md §1, vpt.md §2), both in multiply-accumulates (MACs),
which is what the PC paper's "GFLOPs" table counts:

* ``naive``: every token, prompts included, goes through the QKV, output and
  MLP projections and attention in every layer. For ViT-B/16 at 224 px this
  gives 17.56 / 22.22 / 26.97 / 31.81 / 36.74 G for 0 / 50 / 100 / 150 / 200
  prompts per layer, the paper's 17.6 / 22.2 / 26.9 / 31.8 / 36.7 (the
  paper's exact counting is unverified; this is the formula that matches).
* ``kv``: VPT-Deep's exact key/value-only form: a layer's prompts add only
  their key/value projections (image-independent, counted once per image
  here as an upper bound) and attention columns for the N image tokens.

Per-layer prompt counts may differ (condensed prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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
  d, n = hidden_size, num_patches + 1
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
  )
