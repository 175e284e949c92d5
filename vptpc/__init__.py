"""vptpc: Visual Prompt Tuning and Prompt Condensation for ViTs in JAX/Flax.

The library is importable piece by piece:

* `vptpc.models.vit` - the Flax ViT (vit_jax parameter names) with prompts;
* `vptpc.models.swin` - the Flax Swin (timm parameter names) with prompts;
* `vptpc.prompts` - the prompt pytree: init, count, gather, save/load, summary;
* `vptpc.checkpoint` - loading Google's `.npz` and timm's `.safetensors`
  backbones with a strict diff.

Importing it adds ``--xla_gpu_enable_triton_gemm=false`` to ``XLA_FLAGS``
(`_default_xla_flags` says why), unless the flag is already set there or
``VPTPC_KEEP_XLA_FLAGS=1``.
"""

import os


def _default_xla_flags() -> None:
  """Makes XLA's GPU matmuls cuBLAS's, unless the user chose otherwise.

  On an NVIDIA H200 (jax 0.11.2, ``results/bench_gpu_h200``) XLA's Triton
  GEMMs were slower than cuBLAS's for ViT-B/16: with the flag the eval
  forward (100 prompts, key/value path) ran at 10,130 img/s against
  9,193 without, and an 8192² bf16 matmul at 658 against 594 TFLOP/s.
  XLA reads the variable when its backend starts, so this must run before
  the first computation; on CPU and TPU the flag does nothing.
  """
  if os.environ.get("VPTPC_KEEP_XLA_FLAGS", "") not in ("", "0"):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_enable_triton_gemm" not in flags:
    os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_gpu_enable_triton_gemm=false".strip()
    )


_default_xla_flags()

from vptpc import checkpoint, prompts  # noqa: E402
from vptpc.models import vit  # noqa: E402
from vptpc.models.vit import create_model, get_model_config  # noqa: E402

__version__ = "0.1.0"

__all__ = [
  "checkpoint",
  "create_model",
  "get_model_config",
  "prompts",
  "vit",
]
