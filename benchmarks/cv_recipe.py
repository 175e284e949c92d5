"""K-fold cross-validation of mini-VTAB training recipes (never the test set).

val200 is 200 images: one run's accuracy on it has a standard error of
about 2.6 points on dsprites_ori, as large as the differences between the
recipes being compared. This script compares recipes on all 1,000 training
images instead: fold k trains on the other 800 and evaluates on
``train[200k:200(k+1)]`` (fold 4 is VTAB's train800 -> val200). The test
split is never read, so the suite's test numbers stay unbiased by recipe
choices made here.

  python benchmarks/cv_recipe.py --task=dsprites_ori --workdir=runs/cv \\
      --recipe='lin_v1={"num_prompts":0,"base_lr":1.0}' \\
      --recipe='d1_z1={"num_prompts":1,"base_lr":1.0,"head_init":"zeros"}'

A recipe is ``name=JSON`` of `vptpc.data.minivtab.task_config` keywords
(10 epochs unless given). Finished folds are read back from
``<workdir>/<name>/f<k>/acc.json``. Prints a Markdown table: per-fold
val accuracy (%), mean and standard error over folds.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

FOLD = 200
TRAIN = 1000


def fold_splits(k: int) -> tuple[str, str]:
  """(train, eval) TFDS split strings of fold ``k``."""
  lo, hi = FOLD * k, FOLD * (k + 1)
  parts = [f"train[{a}:{b}]" for a, b in ((0, lo), (hi, TRAIN)) if b > a]
  return "+".join(parts), f"train[{lo}:{hi}]"


def run_fold(task: str, name: str, kw: dict, k: int, workdir: str) -> float:
  """Val accuracy of one recipe on one fold (read back when finished)."""
  out = os.path.join(workdir, name, f"f{k}", "acc.json")
  if os.path.exists(out):
    with open(out) as f:
      done = json.load(f)
    # A name reused for another recipe or task must not pass off the old
    # result as the new one's.
    if done.get("task") != task or done.get("recipe") != kw:
      raise SystemExit(
        f"{out} holds recipe {name!r} as {done.get('recipe')!r} on "
        f"{done.get('task')!r}, not {kw!r} on {task!r}: pick another name "
        "or another --workdir."
      )
    return done["acc"]
  from vptpc import train
  from vptpc.data import minivtab

  c = minivtab.task_config(task, mode="tune", **{"epochs": 10, **kw})
  c.data.train_split, c.data.eval_split = fold_splits(k)
  c.progress_bar = False
  res = train.train_and_evaluate(c, os.path.dirname(out))
  with open(out, "w") as f:
    json.dump({"acc": res["eval_accuracy"], "task": task, "recipe": kw}, f)
  return res["eval_accuracy"]


def main():
  """Runs every recipe on every fold and prints the table."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--task", required=True)
  ap.add_argument("--recipe", action="append", required=True)
  ap.add_argument("--folds", default="0,1,2,3,4")
  ap.add_argument("--workdir", default="runs/cv")
  a = ap.parse_args()
  folds = [int(x) for x in a.folds.split(",")]
  rows = []
  for spec in a.recipe:
    name, sep, js = spec.partition("=")
    if not sep:
      raise SystemExit(f"--recipe must be name=JSON, got {spec!r}.")
    try:
      kw = json.loads(js)
    except json.JSONDecodeError as e:
      raise SystemExit(f"--recipe {name}: bad JSON {js!r} ({e}).") from e
    acc = [100 * run_fold(a.task, name, kw, k, a.workdir) for k in folds]
    rows.append((name, acc))
  print(f"{a.task}, val accuracy (%) per fold; mean ± s.e. over folds\n")
  print("| recipe | " + " | ".join(f"fold {k}" for k in folds) + " | mean |")
  print("|---|" + "---|" * (len(folds) + 1))
  for name, acc in rows:
    se = np.std(acc, ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else 0.0
    cells = " | ".join(f"{x:.1f}" for x in acc)
    print(f"| {name} | {cells} | {np.mean(acc):.1f} ± {se:.1f} |")


if __name__ == "__main__":
  main()
