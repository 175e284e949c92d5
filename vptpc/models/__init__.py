"""Flax models: the Vision Transformer with VPT prompts."""

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
