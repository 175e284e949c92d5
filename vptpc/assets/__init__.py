"""Files shipped inside the package: the embedded pretrained backbone."""

from __future__ import annotations

import os

DEFAULT_BACKBONE = "fractal_vit_ti4.npz"
DEFAULT_MODEL = "fractal-Ti/4"
# The prompts' LR as a fraction of the head's on this backbone (measured in
# `vptpc.data.minivtab`'s recipe; VPT's own recipe uses 1.0).
PROMPT_LR_SCALE = 0.01
# This backbone's frozen CLS features are far from centred (mean norm ~24 of
# ~27), so its recipe reads them standardised with the task's statistics
# and starts the head at zero: the first loss is ln C and logits stay in
# range (VPT's recipe, ``vpt`` / ``none``, starts at a loss of 10-20 here
# and ends with logits of ~300; docs/offline_backbone.md).
HEAD_INIT = "zeros"
PRELOGIT_NORM = "standardize"


def path(name: str = DEFAULT_BACKBONE) -> str:
  """Returns the absolute path of a shipped asset file.

  Raises:
    FileNotFoundError: naming the file, if the package lacks it.
  """
  p = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
  if not os.path.exists(p):
    raise FileNotFoundError(f"vptpc asset {p!r} is missing from the package.")
  return p
