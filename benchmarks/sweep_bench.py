"""Wall time of a vmapped LR x WD grid vs the same grid run one by one.

On the embedded backbone and a mini-VTAB task (offline). Both sides include
compilation and data passes: that is what the vmapped grid saves::

  python benchmarks/sweep_bench.py --lrs=1,0.5,0.1,0.05 --wds=1e-3,0 \\
      --epochs=3 --task=digits
  python benchmarks/sweep_bench.py --smoke --lrs=1 --wds=0   # seconds

The task's data is generated once into ``--data_dir`` (default: TFDS's).
``--smoke`` is a dry run: a tiny random backbone, 64 images, 2 epochs.
Prints a Markdown table (wall seconds and the winner of each side) and the
vmapped grid's speed-up.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--task", default="digits")
  ap.add_argument("--lrs", default="1,0.5,0.1,0.05")
  ap.add_argument("--wds", default="1e-3,0")
  ap.add_argument("--epochs", type=int, default=3)
  ap.add_argument("--num_prompts", type=int, default=10)
  ap.add_argument("--data_dir", default="", help="TFDS data_dir")
  ap.add_argument("--smoke", action="store_true", help="a tiny run")
  a = ap.parse_args()

  from table import print_rows

  from vptpc import build, sweep, train
  from vptpc.data import minivtab

  def cfg():
    c = minivtab.task_config(
      a.task,
      mode="tune",
      epochs=a.epochs,
      num_prompts=a.num_prompts,
      smoke=a.smoke,
    )
    c.data.data_dir = a.data_dir
    if a.smoke:  # compile-bound: a tiny random backbone of the same family
      c.model.arch = "hidden_size=16,num_layers=2,num_heads=2,mlp_dim=32"
      c.model.checkpoint_path = ""
    c.parallel = "jit"
    c.progress_bar = False
    return c

  members = [
    (float(lr), float(wd)) for lr in a.lrs.split(",") for wd in a.wds.split(",")
  ]
  build.setup(cfg())  # generate the data once, outside both timings
  t = time.perf_counter()
  grid = sweep.train_grid(cfg(), members)
  t_vmap = time.perf_counter() - t
  t = time.perf_counter()
  sep = []
  with tempfile.TemporaryDirectory() as d:
    for i, (lr, wd) in enumerate(members):
      c = cfg()
      c.base_lr, c.weight_decay = lr, wd
      sep.append(train.train_stage(c, f"{d}/{i}", quiet=True)["eval_accuracy"])
  t_sep = time.perf_counter() - t
  best_v = max(range(len(members)), key=lambda i: grid[i]["eval_accuracy"])
  best_s = max(range(len(members)), key=lambda i: sep[i])
  print_rows(
    [
      dict(
        how="vmapped grid (one job)",
        members=len(members),
        epochs=a.epochs,
        wall_s=round(t_vmap, 1),
        best=str(members[best_v]),
        best_val=round(grid[best_v]["eval_accuracy"], 4),
      ),
      dict(
        how="one run per member",
        members=len(members),
        epochs=a.epochs,
        wall_s=round(t_sep, 1),
        best=str(members[best_s]),
        best_val=round(sep[best_s], 4),
      ),
    ]
  )
  print(f"\nspeed-up of the vmapped grid: {t_sep / t_vmap:.2f}x")


if __name__ == "__main__":
  main()
