"""The runs of VPT's protocol: each grid point's and seed's config and workdir.

`vptpc.protocol` trains them; `vptpc.preflight` checks them all before
anything is written. Both read this module, which knows only configs and
paths, so the preflight need not import the training code.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

# ``config.protocol.mode``: one run, VPT's lr x wd grid, or the final seeds.
MODES = ("single", "tune", "final")


def done(workdir: str) -> dict[str, Any] | None:
  """A finished run's ``results.json`` (None: not finished)."""
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      res = json.load(f)
  except (OSError, ValueError):
    return None
  if "eval_accuracy" in res or "condensed" in res:
    return res
  return None


def fmt_value(v: float) -> str:
  """A grid value as it appears in a run folder's name (``0.001``, ``1e-05``)."""
  return f"{v:g}"


def tune_runs(
  config: ml_collections.ConfigDict, workdir: str
) -> list[tuple[ml_collections.ConfigDict, str]]:
  """(config, workdir) of every grid point of ``mode=tune``, in grid order.

  Each point trains ``protocol.tune_splits`` as a single run in
  ``<workdir>/tune/lr<lr>_wd<wd>``, vmapped or not.
  """
  p = config.protocol
  out = []
  for lr in p.lrs:
    for wd in p.wds:
      c = ml_collections.ConfigDict(config.to_dict())
      c.base_lr, c.weight_decay = float(lr), float(wd)
      c.data.train_split, c.data.eval_split = p.tune_splits
      c.protocol.mode = "single"
      out.append(
        (
          c,
          os.path.join(workdir, "tune", f"lr{fmt_value(lr)}_wd{fmt_value(wd)}"),
        )
      )
  return out


def tuned_values(config, workdir: str) -> tuple[float, float, str]:
  """(base_lr, weight_decay, where they came from) for the final runs.

  Raises:
    FileNotFoundError: ``protocol.tuned_from`` names a missing file.
    ValueError: the tune.json read is not one `tune` wrote.
  """
  path = config.protocol.tuned_from or os.path.join(workdir, "tune.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        best = json.load(f)["best"]
      return float(best["base_lr"]), float(best["weight_decay"]), path
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(
        f"{path} is not a tune.json written by mode=tune ({type(e).__name__}: "
        f"{e}); run mode=tune again (--config.overwrite=True) or set "
        "config.protocol.tuned_from."
      ) from None
  if config.protocol.tuned_from:
    raise FileNotFoundError(
      f"config.protocol.tuned_from={path!r} does not exist (run mode=tune "
      "first, or leave it empty to use base_lr / weight_decay)."
    )
  return float(config.base_lr), float(config.weight_decay), "config"


def final_runs(
  config: ml_collections.ConfigDict, workdir: str
) -> list[tuple[ml_collections.ConfigDict, str]]:
  """(config, workdir) of every seed of ``mode=final``, in seed order."""
  p = config.protocol
  lr, wd, _ = tuned_values(config, workdir)
  out = []
  for seed in p.seeds:
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed, c.base_lr, c.weight_decay = int(seed), lr, wd
    c.data.train_split, c.data.eval_split = p.final_splits
    c.protocol.mode = "single"
    out.append((c, os.path.join(workdir, "final", f"seed{seed}")))
  return out
