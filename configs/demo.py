"""The offline demo: VPT-Deep + Prompt Condensation on a mini-VTAB task.

  pip install -e . && python -m vptpc.main --config=configs/demo.py \\
      --workdir=runs/demo

Prepares the task's TFDS data locally (generated, no network), loads the
shipped fractal-pretrained ViT (vptpc/assets) through the vit_jax .npz
loader, prompt-tunes 10 deep prompts per layer and a head on train800val200,
then condenses them (keeps the 30% with the highest Taylor importance across
all layers) and fine-tunes the kept prompts and the head, evaluates both on
the test split and prints a table. ``condense=false`` stops after VPT-Deep;
``smoke`` shrinks it to a few steps (the test suite runs it); ``task=...``
picks another task.
"""

from vptpc import config_args
from vptpc.data import minivtab


def get_config(arg=None):
  """Returns the demo config."""
  a = config_args.parse_arg(
    arg,
    task="dsprites_loc",
    epochs=20,
    base_lr=1.0,
    seed=42,
    condense=True,
    keep=0.3,
    ft_epochs=10,
    smoke=False,
  )
  c = minivtab.task_config(
    a.task,
    variant="deep",
    num_prompts=10,
    mode="final",
    seed=a.seed,
    epochs=a.epochs,
    base_lr=a.base_lr,
    smoke=a.smoke,
  )
  if a.condense:
    c.condense.keep = a.keep
    c.condense.ft_epochs = 1 if a.smoke else a.ft_epochs
  return c
