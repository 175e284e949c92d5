"""Mini-VTAB tasks on vptpc's embedded fractal-pretrained ViT (offline).

  python -m vptpc.main --config=configs/minivtab.py:task=digits \\
      --workdir=runs/digits
  python -m vptpc.main \\
      --config=configs/minivtab.py:task=count,variant=shallow,num_prompts=5 \\
      --workdir=runs/count_shallow

Tasks: digits, dsprites_loc, dsprites_ori, count (vptpc.data.minivtab).
``mode=final`` trains on train800val200 and evaluates on test (VTAB-1k's
final protocol); ``mode=tune`` trains on train800 and evaluates on val200.
``num_prompts=0`` trains the head alone: a linear probe with VPT's recipe.
The head reads standardised pre-logits and starts at zero (the embedded
backbone's recipe, `vptpc.data.minivtab.task_config`);
``head_init=vpt,prelogit_norm=none`` is VPT's own.
"""

from vptpc import assets, config_args
from vptpc.data import minivtab


def get_config(arg=None):
  """Returns the config for one mini-VTAB run."""
  a = config_args.parse_arg(
    arg,
    task="digits",
    variant="deep",
    num_prompts=10,
    mode="final",
    seed=42,
    epochs=30,
    base_lr=1.0,
    weight_decay=1e-4,
    batch_size=64,
    prompt_lr_scale=minivtab.PROMPT_LR_SCALE,
    smoke=False,
    backbone="",
    head_init=assets.HEAD_INIT,
    prelogit_norm=assets.PRELOGIT_NORM,
  )
  return minivtab.task_config(**a)
