"""Prompt Condensation on mini-VTAB: full VPT-Deep vs PC vs the baselines.

  python -m vptpc.suite --config=configs/pc_suite.py --workdir=runs/pc_suite

Per task and seed: ``deep`` (VPT-Deep, 10 prompts per layer), ``pc30`` and
``pc50`` (keep 30% / 50% by Taylor importance, global top-k, fine-tune),
``random30`` (the same with random scores) and ``reduced3`` (VPT-Deep
trained from scratch with 3 prompts per layer, 30% of the count). The PC
methods reuse the ``deep`` run as their full model. Every PC default is a
reconstruction (docs/references.md, "PC: reconstruction"); see
`vptpc.condense`.
"""

from ml_collections import ConfigDict

from vptpc import config_args
from vptpc.data import minivtab


def get_config(arg=None):
  """Returns the PC suite config."""
  a = config_args.parse_arg(
    arg,
    epochs=10,
    ft_epochs=10,
    seeds=(42, 44, 82),
    tasks="",
    workers=2,
    smoke=False,
  )
  c = ConfigDict()
  c.tasks = tuple(a.tasks.split(":")) if a.tasks else tuple(minivtab.TASKS)
  c.seeds = a.seeds
  c.method_order = ("deep", "pc30", "pc50", "random30", "reduced3")
  c.batch_size = 64
  c.data_dir = ""
  c.smoke = a.smoke
  # Tasks spread over single-thread worker processes (`vptpc.suite`).
  c.workers = 1 if a.smoke else a.workers
  e = 2 if a.smoke else a.epochs
  ft = 1 if a.smoke else a.ft_epochs
  common = dict(epochs=e, lr=1.0, weight_decay=1e-4, num_prompts=10)
  pc = dict(common, ft_epochs=ft, share_full="deep")
  c.methods = ConfigDict(
    {
      "deep": common,
      "pc30": dict(pc, keep=0.3),
      "pc50": dict(pc, keep=0.5),
      "random30": dict(pc, keep=0.3, score_fn="random"),
      # Same total epochs as full training + fine-tuning.
      "reduced3": dict(common, num_prompts=3, epochs=e + ft),
    }
  )
  if a.smoke:
    c.tasks = ("digits",)
    c.seeds = (42,)
  return c
