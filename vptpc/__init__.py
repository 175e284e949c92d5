"""vptpc: Visual Prompt Tuning and Prompt Condensation for ViTs in JAX/Flax.

The library is importable piece by piece:

* `vptpc.models.vit` - the Flax ViT (vit_jax parameter names) with prompts;
* `vptpc.models.swin` - the Flax Swin (timm parameter names) with prompts;
* `vptpc.prompts` - the prompt pytree: init, count, gather, save/load, summary;
* `vptpc.checkpoint` - loading Google's `.npz` and timm's `.safetensors`
  backbones with a strict diff.
"""

from vptpc import checkpoint, prompts
from vptpc.models import vit
from vptpc.models.vit import create_model, get_model_config

__version__ = "0.1.0"

__all__ = [
  "checkpoint",
  "create_model",
  "get_model_config",
  "prompts",
  "vit",
]
