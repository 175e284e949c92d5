"""How trustworthy a run's probabilities are: calibration, logit scale, noise.

  python benchmarks/calibration.py --runs=runs/demo --out=results/calibration/demo.json

For every ``prompts.npz`` under each ``--runs`` folder (a demo run has
``full/`` and ``condensed/``), rebuilds the task from the run's
``config.json`` (its backbone, its eval split, its normalisation) and the
exported prompts and head, classifies the eval split with
`vptpc.serve` (the path users serve with) and reports:

* ``accuracy``: top-1 on the eval split (it equals the run's own figure);
* ``ece``: expected calibration error, 15 equal-width confidence bins
  (|accuracy - mean confidence| per bin, weighted by the bin's share);
* ``nll``: mean negative log-likelihood of the true class;
* ``logit_abs_max`` and ``logit_std``: the largest |logit| and the mean
  per-image standard deviation of the logits;
* ``noise_max_prob``: the mean top-1 probability on ``--noise`` images of
  uniform random pixels (a model that knows nothing about them should not
  be certain), and ``noise_saturated``: the share of them above 0.99;
* ``first_loss`` and ``last_loss``: the run's first and last logged
  training loss (``metrics.jsonl``), against chance, ``ln C``.

``tests/test_benchmarks.py`` runs it on a tiny run folder.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BINS = 15


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
  """Expected calibration error of top-1 confidence, equal-width bins."""
  conf = probs.max(-1)
  correct = probs.argmax(-1) == labels
  edges = np.linspace(0.0, 1.0, bins + 1)
  # Bin b holds confidences in (edges[b], edges[b + 1]]; 0 goes in bin 0.
  idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
  total = 0.0
  for b in range(bins):
    m = idx == b
    if m.any():
      total += m.mean() * abs(correct[m].mean() - conf[m].mean())
  return float(total)


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _losses(run: str) -> tuple[float | None, float | None]:
  """The first and last logged training loss of a run folder."""
  path = os.path.join(run, "metrics.jsonl")
  if not os.path.exists(path):
    return None, None
  with open(path) as f:
    rows = [json.loads(ln) for ln in f if ln.strip()]
  losses = [r["train_loss"] for r in rows if "train_loss" in r]
  return (losses[0], losses[-1]) if losses else (None, None)


def report(prompts_path: str, *, noise: int = 256, seed: int = 0) -> dict:
  """The figures above for one exported ``prompts.npz`` of a run."""
  import jax.numpy as jnp
  import ml_collections

  from vptpc import build, serve
  from vptpc import prompts as prompts_lib
  from vptpc.data import pipeline, preprocessing

  run = os.path.dirname(os.path.abspath(prompts_path))
  with open(os.path.join(run, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = build.build_model(config).clone(kv_only=True)
  backbone, _ = build.load_backbone(config, model)
  prompts, head, _ = prompts_lib.load_prompts(prompts_path, backbone=backbone)
  bank = serve.build_bank(backbone, {"task": (prompts, head)}, model=model)

  def logits_of(images: np.ndarray) -> np.ndarray:
    out = serve.classify(
      model, backbone, bank, images, np.zeros(len(images), np.int32)
    )
    return np.asarray(out, np.float64)

  split = pipeline.split_from_config(config, "eval", augment=False)
  logits, labels = [], []
  for batch in pipeline.eval_batches(
    split, batch_size=256, normalization=config.data.normalize
  ):
    keep = np.asarray(batch["mask"], bool)
    logits.append(logits_of(np.asarray(batch["image"]))[keep])
    labels.append(np.asarray(batch["label"])[keep])
  z, y = np.concatenate(logits), np.concatenate(labels)
  p = _softmax(z)
  # Uniform random pixels, normalised the way the run's images are.
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  pixels = rng.integers(0, 256, (noise, size, size, 3)).astype(np.float32)
  scale, shift = preprocessing.affine(config.data.normalize)
  pn = _softmax(logits_of(jnp.asarray(pixels * scale + shift)))
  first, last = _losses(run)
  return {
    "prompts": prompts_path,
    "num_prompts": int(sum(prompts_lib.prompts_per_layer(prompts))),
    "classes": int(z.shape[-1]),
    "chance_loss": round(math.log(z.shape[-1]), 4),
    "first_loss": first,
    "last_loss": last,
    "images": int(len(y)),
    "accuracy": float((z.argmax(-1) == y).mean()),
    "ece": ece(p, y),
    "nll": float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-300)).mean()),
    "mean_confidence": float(p.max(-1).mean()),
    "logit_abs_max": float(np.abs(z).max()),
    "logit_std": float(z.std(-1).mean()),
    "noise_max_prob": float(pn.max(-1).mean()),
    "noise_saturated": float((pn.max(-1) > 0.99).mean()),
  }


def reports(runs: list[str], noise: int) -> list[dict]:
  """`report` for every ``prompts.npz`` under the run folders."""
  rows = []
  for run in runs:
    paths = sorted(
      glob.glob(os.path.join(run, "**", "prompts.npz"), recursive=True)
    )
    if not paths:
      raise SystemExit(f"error: no prompts.npz under {run!r}.")
    for path in paths:
      rows.append(report(path, noise=noise))
  return rows


def markdown(rows: list[dict]) -> str:
  """The rows as a markdown table."""
  cols = [
    "prompts",
    "accuracy",
    "ece",
    "nll",
    "mean_confidence",
    "logit_abs_max",
    "logit_std",
    "noise_max_prob",
    "noise_saturated",
    "first_loss",
    "last_loss",
    "chance_loss",
  ]
  out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = []
    for c in cols:
      v = r[c]
      cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default="", help="run folders, comma-separated")
  ap.add_argument("--out", default="", help="write the rows as JSON here")
  ap.add_argument("--noise", type=int, default=256, help="noise images")
  args = ap.parse_args()
  runs = [r for r in args.runs.split(",") if r]
  if not runs:
    raise SystemExit("error: --runs=DIR[,DIR] is needed.")
  rows = reports(runs, args.noise)
  print(markdown(rows))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
