"""The offline demo: VPT-Deep on a mini-VTAB task with the embedded backbone.

  pip install -e . && python -m vptpc.main --config=configs/demo.py \\
      --workdir=runs/demo

Prepares the task's TFDS data locally (generated, no network), loads the
shipped fractal-pretrained ViT (vptpc/assets) through the vit_jax .npz
loader, prompt-tunes 10 deep prompts per layer and a head on train800val200,
evaluates on the test split and prints a table. ``smoke`` shrinks it to a
few steps (the test suite runs it); ``task=...`` picks another task.
"""

from vptpc import config_util
from vptpc.data import minivtab


def get_config(arg=None):
  """Returns the demo config."""
  a = config_util.parse_arg(
    arg, task="dsprites_loc", epochs=20, base_lr=1.0, seed=42, smoke=False
  )
  return minivtab.task_config(
    a.task,
    variant="deep",
    num_prompts=10,
    mode="final",
    seed=a.seed,
    epochs=a.epochs,
    base_lr=a.base_lr,
    smoke=a.smoke,
  )
