"""Flax models with VPT prompts: the ViT (`vit`) and the Swin (`swin`)."""

from vptpc.models.vit import (
  VisionTransformer,
  count_params,
  create_model,
  get_model_config,
  init_params,
  merge_head,
  model_names,
  split_head,
)

__all__ = [
  "VisionTransformer",
  "count_params",
  "create_model",
  "get_model_config",
  "init_params",
  "merge_head",
  "model_names",
  "split_head",
]
