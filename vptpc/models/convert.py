"""Renaming a timm state dict onto a vptpc params tree: the shared pieces.

Each family module (`vptpc.models.vit_family`, `vptpc.models.swin_family`)
maps its own parameter names to timm's with these; `vptpc.checkpoint`
applies the map with one strict diff for every family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Src(NamedTuple):
  """Where a vptpc parameter comes from in a timm file."""

  key: str  # timm key
  shape: tuple[int, ...]  # the timm tensor's shape the model implies
  convert: Callable[[np.ndarray], np.ndarray]  # timm tensor -> vptpc array


def linear(shape) -> Src:
  """A Dense kernel: vptpc (in, out) <- torch (out, in)."""
  return Src("", (shape[1], shape[0]), lambda w: w.T)


def conv(shape) -> Src:
  """A conv kernel: vptpc HWIO <- torch OIHW."""
  return Src(
    "",
    (shape[3], shape[2], shape[0], shape[1]),
    lambda w: w.transpose(2, 3, 1, 0),
  )


def same(shape) -> Src:
  """A tensor stored the same way in both."""
  return Src("", tuple(shape), lambda w: w)
