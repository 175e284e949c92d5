"""A tiny run on the generated ``vptpc_toy`` dataset: seconds on a CPU.

  python -m vptpc.main --config=configs/tiny.py --workdir=runs/tiny
  python -m vptpc.main --config=configs/tiny.py:epochs=20,num_prompts=8 \
      --workdir=runs/tiny20

The backbone is the random-init ``tiny32`` ViT (width 32, 3 blocks, 32 px),
so this exercises the whole machinery (data, jit/pmap step, Orbax
checkpoints and resume, evaluation, export), not transfer learning.
"""

from vptpc import config_args, config_util


def get_config(arg=None):
  """Returns the config; ``arg`` is ``key=value,...`` over the keys below."""
  a = config_args.parse_arg(
    arg,
    epochs=5,
    num_prompts=4,
    batch_size=64,
    base_lr=1.0,
    seed=42,
    parallel="auto",
    kv_only=True,
    smoke=False,
  )
  c = config_util.base_config()
  c.seed = a.seed
  c.model.name = "tiny32"
  c.model.kv_only = a.kv_only
  c.prompt.num_prompts = a.num_prompts
  c.data.name = "vptpc_toy"
  c.data.train_split = "train[:800]"
  c.data.eval_split = "test"
  c.data.num_classes = 4
  c.data.image_size = 32
  c.batch_size = a.batch_size
  c.eval_batch_size = 64
  c.total_epochs = 1 if a.smoke else a.epochs
  c.warmup_epochs = 0 if a.smoke or c.total_epochs < 2 else 1
  c.base_lr = a.base_lr
  c.parallel = a.parallel
  c.log_every_steps = 5
  c.checkpoint_every_steps = 13  # 13 steps per epoch at batch 64.
  return c
