"""The PC paper's analysis as commands that write CSV and PNG.

Three commands (one ``--out`` directory each; every figure has a CSV with
the numbers behind it):

  python -m vptpc.analysis curve --config=configs/minivtab.py:task=digits \\
      --counts=1:3:10:30 --seeds=42 --out=runs/analysis/curve
  python -m vptpc.analysis rank --config=configs/minivtab.py:task=digits \\
      --counts=0:1:2:5:10:20:50:100:200 --out=runs/analysis/rank
  python -m vptpc.analysis heatmap --results=runs/demo/results.json \\
      --out=runs/analysis/heatmap

* ``curve``: test accuracy of VPT-Deep trained with each prompt count
  (``accuracy_vs_prompts.{csv,png}``), and, with ``--pc_runs=<glob>``, the
  condensed models of PC runs (``results.json`` of a ``condense.keep`` run)
  at their average count per layer. Tests the claim that accuracy does not
  grow linearly with the number of prompts.
* ``rank``: the rank of the softmax self-attention matrix (tokens x tokens,
  class token + prompts + patches, the full-sequence form of VPT-Deep) as
  prompts are added (``attention_rank.{csv,png}``). Two measures per
  matrix, averaged over images and heads: ``rank_rel``, the number of
  singular values above ``rel_tol`` times the largest (default 1e-2), and
  ``rank_energy``, the fewest singular values holding ``energy`` (default
  0.9) of the squared Frobenius norm. The CSV reports least-squares fits of
  rank against log(n) and against n (n = number of tokens) with their R^2;
  the paper's claim (secondary; docs/references.md, "PC: secondary
  claims") is that the rank stays low and grows logarithmically with the
  number of prompts. Prompts are VPT's random init, or the trained prompts
  of a ``curve`` run when
  ``--prompts_dir`` points at it and a run with that count exists (the CSV
  says which).
* ``heatmap``: the importance scores of a PC run over (layer, prompt), kept
  prompts marked (``importance.{csv,png}``).

The functions behind the commands are importable (`attention_weights`,
`effective_rank`, `energy_rank`, `rank_table`, `fit_growth`,
`accuracy_curve`, `score_table`).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vptpc import build, flops, train
from vptpc import prompts as prompts_lib
from vptpc.data import pipeline
from vptpc.models import registry, vit


def _plt():
  """Returns pyplot on the file-only backend (no display needed)."""
  # Imported when a plot is drawn: matplotlib costs about a second to import.
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """Writes ``rows`` (dicts with the same keys) to ``path`` atomically."""
  if not rows:
    raise ValueError(f"No rows to write to {path}.")
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


# ---------------------------------------------------------------- rank


def attention_weights(
  model: vit.VisionTransformer,
  backbone: Mapping[str, Any],
  images: np.ndarray,
  prompts: Mapping[str, Any] | None,
) -> list[np.ndarray]:
  """Softmax attention weights of every block, (B, heads, n, n) each.

  The model runs its full-sequence path (``kv_only`` off) so that prompts
  are queries too and each matrix is square over [cls, prompts, patches].
  """
  m = model.clone(num_classes=None, kv_only=False)
  _, state = m.apply(
    {"params": backbone}, images, prompts, mutable=["intermediates"]
  )
  inter = state["intermediates"]["Transformer"]
  out = []
  for i in range(m.num_layers):
    blk = inter[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]
    out.append(np.asarray(blk["attention_weights"][0]))
  return out


def effective_rank(a: np.ndarray, rel_tol: float = 1e-2) -> np.ndarray:
  """Singular values above ``rel_tol`` x the largest, per matrix (..., n, n)."""
  s = np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)
  return (s > rel_tol * s[..., :1]).sum(-1)


def energy_rank(a: np.ndarray, energy: float = 0.9) -> np.ndarray:
  """Fewest singular values holding ``energy`` of sum(sigma^2), per matrix."""
  s = np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)
  c = np.cumsum(s**2, -1) / np.sum(s**2, -1, keepdims=True)
  return (c < energy - 1e-12).sum(-1) + 1


def fit_growth(n: Sequence[float], r: Sequence[float]) -> dict[str, float]:
  """Least-squares fits r ~ a + b log(n) and r ~ a + b n, with R^2 each."""
  n, r = np.asarray(n, np.float64), np.asarray(r, np.float64)
  out = {}
  for name, x in (("log", np.log(n)), ("linear", n)):
    b, a = np.polyfit(x, r, 1)
    pred = a + b * x
    ss = np.sum((r - r.mean()) ** 2)
    out[f"{name}_a"], out[f"{name}_b"] = float(a), float(b)
    out[f"{name}_r2"] = float(1 - np.sum((r - pred) ** 2) / ss) if ss else 1.0
  return out


def rank_table(
  model: vit.VisionTransformer,
  backbone: Mapping[str, Any],
  images: np.ndarray,
  counts: Sequence[int],
  *,
  patch_size: int,
  seed: int = 0,
  rel_tol: float = 1e-2,
  energy: float = 0.9,
  trained: Mapping[int, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
  """Attention rank per (prompt count, layer), averaged over images, heads.

  Args:
    model: the ViT (any ``kv_only``; the full path is used).
    backbone: its frozen parameters.
    images: (B, H, W, 3) normalised images.
    counts: prompts per layer to insert (0 = the plain backbone).
    patch_size: for VPT's init bound.
    seed: prompt init seed.
    rel_tol: threshold of `effective_rank`.
    energy: threshold of `energy_rank`.
    trained: optional ``{count: prompt tree}`` used instead of random init.

  Returns:
    One row per (count, layer) and one per count with ``layer = "mean"``.
  """
  rows = []
  n_img = (images.shape[1] // patch_size) * (images.shape[2] // patch_size)
  for c in counts:
    source = "none"
    prompts = None
    if c > 0 and trained and c in trained:
      prompts, source = trained[c], "trained"
    elif c > 0:
      prompts = prompts_lib.init_prompts(
        jax.random.key(seed),
        num_prompts=c,
        hidden_size=model.hidden_size,
        patch_size=patch_size,
        num_layers=model.num_layers,
      )
      source = "random_init"
    ws = attention_weights(model, backbone, images, prompts)
    per = []
    for i, w in enumerate(ws):
      rr, er = effective_rank(w, rel_tol), energy_rank(w, energy)
      per.append((rr.mean(), er.mean()))
      rows.append(
        dict(
          num_prompts=c,
          n_tokens=model.num_prefix + c + n_img,
          layer=i,
          rank_rel=float(rr.mean()),
          rank_energy=float(er.mean()),
          prompts=source,
        )
      )
    per = np.asarray(per)
    rows.append(
      dict(
        num_prompts=c,
        n_tokens=model.num_prefix + c + n_img,
        layer="mean",
        rank_rel=float(per[:, 0].mean()),
        rank_energy=float(per[:, 1].mean()),
        prompts=source,
      )
    )
  return rows


def plot_rank(rows: Sequence[Mapping[str, Any]], path: str) -> dict:
  """Plots mean rank vs number of tokens with the log fit; returns fits."""
  plt = _plt()
  mean = [r for r in rows if r["layer"] == "mean"]
  n = [r["n_tokens"] for r in mean]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  fits = {}
  for key in ("rank_rel", "rank_energy"):
    r = [m[key] for m in mean]
    ax.plot(n, r, "o-", label=key)
    if len(set(n)) >= 3:
      f = fit_growth(n, r)
      fits[key] = f
      xs = np.linspace(min(n), max(n), 100)
      ax.plot(
        xs,
        f["log_a"] + f["log_b"] * np.log(xs),
        ":",
        label=f"{key} ~ a+b·log n (R²={f['log_r2']:.2f})",
      )
  ax.plot(n, n, "k--", lw=0.8, label="full rank (n)")
  ax.set_xlabel("tokens n = 1 + prompts + patches")
  ax.set_ylabel("rank of softmax attention")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return fits


# ---------------------------------------------------------------- heatmap


def score_table(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Rows (layer, prompt, score, kept) from a PC run's ``results.json``."""
  if "scores" not in results:
    raise ValueError(
      "results.json has no 'scores': it is not from a condense.keep > 0 run."
    )
  scores, kept = results["scores"], results.get("kept_indices", {})
  rows = []
  for k in prompts_lib.layer_keys(scores):
    layer = int(k.rsplit("_", 1)[1])
    keep = set(kept.get(k, []))
    for j, s in enumerate(scores[k]):
      rows.append(dict(layer=layer, prompt=j, score=s, kept=int(j in keep)))
  return rows


def plot_heatmap(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """Heatmap of scores over (layer, prompt); kept prompts get a dot."""
  plt = _plt()
  layers = 1 + max(r["layer"] for r in rows)
  width = 1 + max(r["prompt"] for r in rows)
  grid = np.full((layers, width), np.nan)
  for r in rows:
    grid[r["layer"], r["prompt"]] = r["score"]
  fig, ax = plt.subplots(figsize=(1 + 0.4 * width, 1 + 0.35 * layers))
  im = ax.imshow(grid, cmap="viridis", aspect="auto")
  ky = [r["layer"] for r in rows if r["kept"]]
  kx = [r["prompt"] for r in rows if r["kept"]]
  ax.scatter(kx, ky, c="red", s=12, label="kept")
  ax.set_xlabel("prompt index")
  ax.set_ylabel("layer")
  ax.set_title("importance score (Taylor)")
  fig.colorbar(im, ax=ax)
  ax.legend(loc="upper right", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------- curve


def accuracy_curve(
  config: ml_collections.ConfigDict,
  counts: Sequence[int],
  seeds: Sequence[int],
  workdir: str,
) -> list[dict[str, Any]]:
  """Trains VPT-Deep per (count, seed) and returns accuracy rows.

  Each run lives in ``<workdir>/p{count}_s{seed}`` (resumable: a finished
  run is read back, not retrained).
  """
  model = build.build_model(config)
  rows = []
  for seed in seeds:
    for c in counts:
      run = os.path.join(workdir, f"p{c}_s{seed}")
      done = os.path.join(run, "results.json")
      if os.path.exists(done):
        with open(done) as f:
          res = json.load(f)
      else:
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.seed = seed
        cfg.prompt.variant = "deep"
        cfg.prompt.num_prompts = c
        cfg.condense.keep = 0.0
        res = train.train_stage(cfg, run, quiet=True)
      rows.append(
        dict(
          method="vpt_deep",
          prompts_per_layer=float(c),
          seed=seed,
          accuracy=res["eval_accuracy"],
          gflops_naive=flops.model_gmacs(model, config.data.image_size, c),
          run=run,
        )
      )
  return rows


def pc_points(pattern: str) -> list[dict[str, Any]]:
  """Rows for the condensed models of PC runs matching a glob pattern."""
  rows = []
  for path in sorted(glob.glob(pattern, recursive=True)):
    with open(path) as f:
      r = json.load(f)
    if "condensed" not in r:
      continue
    c = r["condensed"]
    layers = len(c["prompts_per_layer"])
    rows.append(
      dict(
        method=f"pc_keep{r['keep']}",
        prompts_per_layer=c["prompts_total"] / layers,
        seed=r.get("seed", ""),
        accuracy=c["eval_accuracy"],
        gflops_naive=c["gflops_naive"],
        run=os.path.dirname(path),
      )
    )
  if not rows:
    raise ValueError(f"--pc_runs={pattern!r} matched no PC results.json.")
  return rows


def plot_curve(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """Accuracy (mean ± std over seeds) vs prompts per layer, per method."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for method in dict.fromkeys(r["method"] for r in rows):
    sub = [r for r in rows if r["method"] == method]
    xs = sorted({r["prompts_per_layer"] for r in sub})
    acc = [
      [100 * r["accuracy"] for r in sub if r["prompts_per_layer"] == x]
      for x in xs
    ]
    ax.errorbar(
      xs,
      [np.mean(a) for a in acc],
      yerr=[np.std(a) for a in acc],
      fmt="o-" if method == "vpt_deep" else "s",
      capsize=3,
      label=method,
    )
  ax.set_xscale("symlog", linthresh=1)
  ax.set_xlabel("prompts per layer (mean over layers for PC)")
  ax.set_ylabel("test top-1 (%)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------- CLI


def eval_images(config, num_images: int) -> np.ndarray:
  """The first ``num_images`` normalised images of the eval split."""
  split = pipeline.split_from_config(config, "eval")
  batch = next(
    pipeline.eval_batches(
      split,
      batch_size=min(num_images, len(split)),
      normalization=config.data.normalize,
    )
  )
  return batch["image"]


def _trained_prompts(prompts_dir: str, seed: int) -> dict[int, Any]:
  out = {}
  for path in glob.glob(os.path.join(prompts_dir, f"p*_s{seed}")):
    export = os.path.join(path, "prompts.npz")
    if os.path.exists(export):
      c = int(os.path.basename(path)[1:].split("_s")[0])
      out[c] = prompts_lib.load_prompts(export)[0]
  return out


def run_command(command: str, flag_values: Any) -> dict[str, Any]:
  """Runs one command with parsed flags; returns paths and summary numbers."""
  out = flag_values.out
  os.makedirs(out, exist_ok=True)
  ints = lambda s: [int(v) for v in str(s).split(":") if v != ""]  # noqa: E731
  if command == "heatmap":
    if not flag_values.results or not os.path.exists(flag_values.results):
      raise FileNotFoundError(
        f"--results={flag_values.results!r}: no such results.json."
      )
    with open(flag_values.results) as f:
      rows = score_table(json.load(f))
    write_csv(os.path.join(out, "importance.csv"), rows)
    plot_heatmap(rows, os.path.join(out, "importance.png"))
    return {"csv": os.path.join(out, "importance.csv"), "rows": len(rows)}
  config = flag_values.config
  if config is None:
    raise ValueError(f"'{command}' needs --config.")
  counts = ints(flag_values.counts)
  if not counts or min(counts) < 0:
    raise ValueError(f"--counts={flag_values.counts!r}: need ints >= 0.")
  if command == "rank":
    model = build.build_model(config)
    fam = registry.family_of(model)
    if not fam.GLOBAL_ATTENTION:
      raise ValueError(
        f"'rank' needs a ViT (config.model.name={config.model.name!r} is a "
        f"{fam.DISPLAY}): it reads square attention maps over [cls, "
        "prompts, patches], and a Swin attends within windows."
      )
    backbone, _ = build.load_backbone(config, model)
    trained = (
      _trained_prompts(flag_values.prompts_dir, config.seed)
      if flag_values.prompts_dir
      else None
    )
    rows = rank_table(
      model,
      backbone,
      eval_images(config, flag_values.num_images),
      counts,
      patch_size=model.patch_size,
      seed=config.seed,
      rel_tol=flag_values.rel_tol,
      energy=flag_values.energy,
      trained=trained,
    )
    write_csv(os.path.join(out, "attention_rank.csv"), rows)
    fits = plot_rank(rows, os.path.join(out, "attention_rank.png"))
    with open(os.path.join(out, "attention_rank_fits.json"), "w") as f:
      json.dump(fits, f, indent=2)
    return {"rows": rows, "fits": fits}
  if command == "curve":
    rows = accuracy_curve(
      config, counts, ints(flag_values.seeds), os.path.join(out, "runs")
    )
    if flag_values.pc_runs:
      rows += pc_points(flag_values.pc_runs)
    write_csv(os.path.join(out, "accuracy_vs_prompts.csv"), rows)
    plot_curve(rows, os.path.join(out, "accuracy_vs_prompts.png"))
    return {"rows": rows}
  raise ValueError(f"Unknown command {command!r}; use curve, rank or heatmap.")


def _define_flags():
  """Defines the flags when run as a program (not at import time)."""
  config_flags.DEFINE_config_file("config", None, "Run config (curve, rank).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_string("counts", "0:1:2:5:10:20:50", "Prompt counts, a:b:c.")
  flags.DEFINE_string("seeds", "42", "Seeds for curve, a:b:c.")
  flags.DEFINE_string("pc_runs", "", "curve: glob of PC results.json files.")
  flags.DEFINE_string("prompts_dir", "", "rank: a curve run's runs/ folder.")
  flags.DEFINE_integer("num_images", 16, "rank: images from the eval split.")
  flags.DEFINE_float("rel_tol", 1e-2, "rank: singular value threshold.")
  flags.DEFINE_float("energy", 0.9, "rank: energy threshold.")
  flags.DEFINE_string("results", "", "heatmap: a PC run's results.json.")
  flags.mark_flags_as_required(["out"])


def main(argv):
  """Entry point: ``python -m vptpc.analysis {curve,rank,heatmap} ...``."""
  if len(argv) != 2:
    sys.exit("usage: python -m vptpc.analysis {curve,rank,heatmap} --out=DIR")
  try:
    res = run_command(argv[1], flags.FLAGS)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  if argv[1] == "rank":
    for r in res["rows"]:
      if r["layer"] == "mean":
        print(
          f"prompts {r['num_prompts']:4d}  n {r['n_tokens']:4d}  "
          f"rank_rel {r['rank_rel']:7.2f}  rank_energy {r['rank_energy']:7.2f}"
        )
    for k, f in res["fits"].items():
      print(
        f"{k}: log fit R^2 {f['log_r2']:.3f}, linear fit R^2 "
        f"{f['linear_r2']:.3f}"
      )
  elif argv[1] == "curve":
    for r in res["rows"]:
      print(
        f"{r['method']:>14s}  prompts/layer {r['prompts_per_layer']:5.2f}  "
        f"seed {r['seed']}  acc {100 * r['accuracy']:.2f}"
      )
  print(f"wrote {flags.FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
