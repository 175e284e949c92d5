"""The whole mini-VTAB suite: 4 tasks x 4 methods x 3 seeds.

  python -m vptpc.suite --config=configs/suite.py --workdir=runs/suite
  python -m vptpc.suite --config=configs/suite.py:smoke --workdir=/tmp/s

Writes ``results.md`` / ``results.csv`` (mean ± std per task and method) and
``runs.csv`` (one row per run). Methods: linear probe (head only), VPT-Shallow,
VPT-Deep on the embedded backbone, and the same ViT trained from scratch.
Hyperparameters are fixed here, except VPT-Deep's prompt count, which is
chosen per task on val200 from ``deep_prompts`` (VPT's protocol; one seed,
train800 -> val200, then the final runs use it). VPT runs use
`vptpc.data.minivtab.task_config` (per-step schedule, prompts at 1/100 of
the head's LR; its docstring gives the measurements behind that).
``seeds=42:44``, ``tasks=digits:count`` and ``methods=linear:deep`` narrow a
run; ``deep_prompts=3`` fixes VPT-Deep's count (no selection).
"""

from ml_collections import ConfigDict

from vptpc import config_util
from vptpc.data import minivtab


def get_config(arg=None):
  """Returns the suite config."""
  a = config_util.parse_arg(
    arg,
    epochs=10,
    seeds=(42, 44, 82),
    tasks="",
    methods="",
    deep_prompts=(1, 3, 10),
    workers=2,
    smoke=False,
  )
  c = ConfigDict()
  c.tasks = tuple(a.tasks.split(":")) if a.tasks else tuple(minivtab.TASKS)
  c.seeds = a.seeds
  c.method_order = ("linear", "shallow", "deep", "scratch")
  if a.methods:
    bad = sorted(set(a.methods.split(":")) - set(c.method_order))
    if bad:
      raise ValueError(
        f"Unknown suite method(s) {bad}; known: {c.method_order}."
      )
    c.method_order = tuple(a.methods.split(":"))
  c.batch_size = 64
  c.data_dir = ""
  c.smoke = a.smoke
  # Tasks spread over single-thread worker processes (`vptpc.suite`).
  c.workers = 1 if a.smoke else a.workers
  e = 2 if a.smoke else a.epochs
  c.methods = ConfigDict(
    {
      "linear": dict(epochs=e, lr=1.0, weight_decay=1e-4, num_prompts=0),
      "shallow": dict(epochs=e, lr=1.0, weight_decay=1e-4, num_prompts=10),
      # VPT's protocol picks the prompt length per task on val200.
      "deep": dict(
        epochs=e,
        lr=1.0,
        weight_decay=1e-4,
        num_prompts=10,
        select_prompts=(1, 2) if a.smoke else a.deep_prompts,
      ),
      "scratch": dict(epochs=e, lr=1e-3, weight_decay=0.05),
    }
  )
  if a.smoke:
    c.tasks = ("digits",)
    c.seeds = (42,)
  return c
