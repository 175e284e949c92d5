"""Frozen-feature probe of fractal-Ti/4 backbones on mini-VTAB.

For each backbone ``.npz`` and each task, extracts class-token features of
train800val200 and test, standardises them and fits scikit-learn's logistic
regression: the "what does this pretraining transfer" table of
``vptpc/assets/MODEL_CARD.md``. ``--prompts=0,1,3`` also inserts that many
untrained VPT-Deep prompts (VPT's init) per layer, to show how much random
prompts disturb the features before any training.

  python benchmarks/probe_features.py --backbone=vptpc/assets/fractal_vit_ti4.npz
  python benchmarks/probe_features.py --arrays=minivtab32.npz --backbone=a.npz,b.npz

``--readouts=3,5`` instead asks where in the frozen ViT a task's labels
are linearly readable: the final CLS features, and at the input of each
listed block its CLS token, its mean patch token and all its patch tokens
(standardised, PCA to 256 dimensions), beside raw pixels (PCA 256). What
no readout holds, prompts on a frozen backbone have to compute, not find.

``--export=F`` writes the 32-px uint8 splits to ``F`` (for machines without
TensorFlow Datasets); ``--arrays=F`` reads them back instead of TFDS.
Prints a Markdown table (rows: backbone x prompts; columns: tasks).
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from vptpc import assets, checkpoint
from vptpc import prompts as pr
from vptpc.data import minivtab, pipeline, preprocessing
from vptpc.models import vit


def load_arrays(path: str) -> dict[str, np.ndarray]:
  """Returns ``{task/split/images|labels: array}`` from TFDS or ``path``."""
  if path:
    with np.load(path) as f:
      return dict(f)
  out = {}
  for name, t in minivtab.TASKS.items():
    for split, spec in (("train", "train[:1000]"), ("test", "test")):
      s = pipeline.load_split(t.tfds_name, spec, image_size=32)
      out[f"{name}/{split}/images"] = s.images
      out[f"{name}/{split}/labels"] = s.labels
  return out


def _load(backbone: str):
  """(headless fractal-Ti/4 model, its params from ``backbone``)."""
  model = vit.create_model(assets.DEFAULT_MODEL, num_classes=None)
  tmpl = jax.eval_shape(lambda: vit.init_params(model, jax.random.key(0), 32))
  return model, checkpoint.load_pretrained(backbone, tmpl)


def probe(backbone: str, arrays, num_prompts: int, seed: int = 0) -> dict:
  """Test accuracy (%) per task of a logistic regression on CLS features."""
  model, params = _load(backbone)
  cfg = vit.get_model_config(assets.DEFAULT_MODEL)
  prompts = None
  if num_prompts:
    prompts = pr.init_prompts(
      jax.random.key(seed),
      num_prompts=num_prompts,
      hidden_size=cfg.hidden_size,
      patch_size=cfg.patch_size,
      num_layers=cfg.num_layers,
    )
  fwd = jax.jit(lambda x: model.apply({"params": params}, x, prompts))

  def feats(images):
    x = preprocessing.normalize(images, "minus1_1")
    return np.concatenate(
      [np.asarray(fwd(x[i : i + 250])) for i in range(0, len(x), 250)]
    )

  acc = {}
  for task in minivtab.TASKS:
    acc[task] = _fit(
      feats(arrays[f"{task}/train/images"]),
      arrays[f"{task}/train/labels"],
      feats(arrays[f"{task}/test/images"]),
      arrays[f"{task}/test/labels"],
      max_iter=3000,
    )
  return acc


def _fit(a, ya, b, yb, pca: int = 0, max_iter: int = 2000) -> float:
  """Test accuracy (%) of a logistic regression on standardised features."""
  from sklearn.decomposition import PCA
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler

  sc = StandardScaler().fit(a)
  a, b = sc.transform(a), sc.transform(b)
  if pca:
    p = PCA(pca, random_state=0).fit(a)
    a, b = p.transform(a), p.transform(b)
  return 100 * LogisticRegression(max_iter=max_iter).fit(a, ya).score(b, yb)


def probe_readouts(backbone: str, arrays, blocks) -> dict:
  """Per task, test accuracy (%) of each readout (see the module doc)."""
  model, params = _load(backbone)

  @jax.jit
  def fwd(x):
    f, inter = model.apply(
      {"params": params}, x, None, mutable=["intermediates"]
    )
    t = inter["intermediates"]["Transformer"]
    return f, [t[f"block_input_{i}"][0] for i in blocks]

  def feats(images):
    x = preprocessing.normalize(images, "minus1_1")
    outs = [jax.device_get(fwd(x[i : i + 250])) for i in range(0, len(x), 250)]
    cls = np.concatenate([o[0] for o in outs])
    toks = [np.concatenate([o[1][j] for o in outs]) for j in range(len(blocks))]
    return cls, toks

  out = {}
  for task in minivtab.TASKS:
    ia, ib = (arrays[f"{task}/{s}/images"] for s in ("train", "test"))
    ya, yb = (arrays[f"{task}/{s}/labels"] for s in ("train", "test"))
    (ca, ta), (cb, tb) = feats(ia), feats(ib)
    r = {"final CLS": _fit(ca, ya, cb, yb)}
    for j, i in enumerate(blocks):
      a, b = ta[j], tb[j]
      r[f"block {i} CLS"] = _fit(a[:, 0], ya, b[:, 0], yb)
      r[f"block {i} mean patch"] = _fit(
        a[:, 1:].mean(1), ya, b[:, 1:].mean(1), yb
      )
      r[f"block {i} all patches"] = _fit(
        a[:, 1:].reshape(len(a), -1), ya, b[:, 1:].reshape(len(b), -1), yb, 256
      )
    r["pixels"] = _fit(
      ia.reshape(len(ia), -1).astype(np.float32),
      ya,
      ib.reshape(len(ib), -1).astype(np.float32),
      yb,
      256,
    )
    out[task] = r
  return out


def main():
  """Parses flags, prints the table."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--backbone", default=assets.path())
  ap.add_argument("--prompts", default="0")
  ap.add_argument("--arrays", default="")
  ap.add_argument("--export", default="")
  ap.add_argument("--readouts", default="")
  args = ap.parse_args()
  arrays = load_arrays(args.arrays)
  if args.export:
    np.savez_compressed(args.export, **arrays)
    return
  if args.readouts:
    blocks = [int(v) for v in args.readouts.split(",")]
    res = probe_readouts(args.backbone, arrays, blocks)
    cols = list(next(iter(res.values())))
    print("| task | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for task, r in res.items():
      print(f"| {task} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    return
  tasks = list(minivtab.TASKS)
  print("| backbone | random prompts/layer | " + " | ".join(tasks) + " |")
  print("|---|---|" + "---|" * len(tasks))
  for path in args.backbone.split(","):
    for n in (int(v) for v in args.prompts.split(",")):
      acc = probe(path, arrays, n)
      cells = " | ".join(f"{acc[t]:.1f}" for t in tasks)
      name = os.path.basename(os.path.dirname(path)) or path
      print(f"| {name}/{os.path.basename(path)} | {n} | {cells} |", flush=True)


if __name__ == "__main__":
  main()
