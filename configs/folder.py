"""Your own images as a task: a folder in either common layout.

  # the embedded backbone, offline (32 px): a quick look at a new task
  python -m vptpc.main --config=configs/folder.py:root=/data/my_task \\
      --workdir=runs/my_task
  # ViT-B/16 ImageNet-21k and VPT's protocol: tune the LR x WD grid, then
  # the seeds with the winner
  python -m vptpc.main --config=configs/folder.py:root=/data/my_task,\\
model=B/16,checkpoint=imagenet21k_ViT-B_16.npz,mode=tune --workdir=runs/t
  python -m vptpc.main --config=configs/folder.py:root=/data/my_task,\\
model=B/16,checkpoint=imagenet21k_ViT-B_16.npz,mode=final --workdir=runs/t

``root`` holds split files (``train800.txt`` ... or ``train.txt`` /
``val.txt`` / ``test.txt``, one ``relative/path label`` per line) or class
folders (``train/<class>/*.jpg``, ``test/<class>/*.jpg``, optionally
``val/``); `vptpc.data.folder_layout` reads both. The class count (and,
for class folders, the class names) comes from the folder; the task is
named after it. ``mode``: ``tune`` trains on the tune splits (train800 ->
val200; without a val split, the first 80% of train -> the other 20%) and
runs the grid; ``final`` trains the seeds on the final splits (train800val200
or train -> test); ``single`` is one run on the final splits.

Arguments: ``root``; ``mode`` single | tune | final; ``model`` (default
the embedded ``fractal-Ti/4``; ``B/16``, ``swin_b`` etc. for real weights);
``checkpoint`` (default: the embedded backbone with the embedded model,
whose settings then follow mini-VTAB's recipe for it, else the model's
standard file, `vptpc.models.registry.standard_checkpoints()`:
``imagenet21k_ViT-B_16.npz`` for ``B/16``,
``swin_base_patch4_window7_224.ms_in22k.safetensors`` for ``swin_b``;
for a timm checkpoint name the file ``python -m vptpc.prepare
--weights=timm/<name>`` put in the Hugging Face cache; other models need
``checkpoint=PATH``); ``image_size`` (0: 32 for the embedded model, the
timm checkpoint's own size, else 224); ``preprocess`` vtab | crop | fgvc; ``variant``;
``num_prompts``; ``epochs``; ``base_lr``; ``weight_decay``;
``batch_size``; ``normalize`` ("": minus1_1 for the embedded backbone,
which was pretrained on it, a timm checkpoint's own statistics, else
imagenet as VPT); ``interpolation`` bilinear | bicubic ("": a timm
checkpoint's own filter, else bilinear); ``dtype``; ``condense_keep``; ``seed``;
``smoke`` (a tiny random backbone, one epoch, for tests).
"""

import os

from vptpc import assets, config_args, config_util
from vptpc.data import folder_layout
from vptpc.models import registry


def get_config(arg=None):
  """Returns the config for a folder task; see the module docstring."""
  a = config_args.parse_arg(
    arg,
    root="",
    mode="single",
    model=assets.DEFAULT_MODEL,
    checkpoint="",
    image_size=0,
    preprocess="vtab",
    variant="deep",
    num_prompts=10,
    epochs=100,
    base_lr=0.25,
    weight_decay=1e-4,
    batch_size=64,
    normalize="",
    interpolation="",
    dtype="float32",
    condense_keep=0.0,
    seed=42,
    smoke=False,
  )
  if not a.root:
    raise ValueError(
      "configs/folder.py needs root=PATH: a folder with split files "
      "(train800.txt ...) or class folders (train/<class>/*.jpg)."
    )
  info = folder_layout.describe(os.path.expanduser(a.root))
  embedded = a.model == assets.DEFAULT_MODEL
  c = config_util.base_config()
  c.seed = a.seed
  c.model.name = registry.canonical_name(a.model)
  registry.model_family(c.model.name)  # an unknown name fails here, named
  c.model.checkpoint_path = a.checkpoint or (
    assets.path() if embedded else config_util.default_checkpoint(c.model.name)
  )
  # A timm checkpoint's own input (size, mean/std); VPT's otherwise.
  pre = config_util.pretrained_preprocessing(c.model.name)
  if not c.model.checkpoint_path and not a.smoke:
    raise config_util.ConfigError(
      registry.no_checkpoint_message("configs/folder.py", a.model)
    )
  c.model.kv_only = a.variant == "deep"
  c.model.dtype = a.dtype
  c.prompt.variant = a.variant
  c.prompt.num_prompts = a.num_prompts
  c.data.name = info["name"]
  c.data.source = "folder"
  c.data.folder = os.path.abspath(os.path.expanduser(a.root))
  c.data.num_classes = info["num_classes"]
  c.data.image_size = a.image_size or (
    32 if embedded else pre.get("image_size", 224)
  )
  c.data.preprocess = a.preprocess
  # The embedded backbone was pretrained on [-1, 1]; VPT uses ImageNet's.
  c.data.normalize = a.normalize or (
    "minus1_1" if embedded else pre.get("normalize", "imagenet")
  )
  c.data.interpolation = a.interpolation or pre.get("interpolation", "bilinear")
  c.protocol.mode = a.mode
  c.protocol.tune_splits = info["tune_splits"]
  c.protocol.final_splits = info["final_splits"]
  c.data.train_split, c.data.eval_split = info["final_splits"]
  c.batch_size = a.batch_size
  c.eval_batch_size = 128
  c.total_epochs = a.epochs
  c.warmup_epochs = min(10, a.epochs - 1)
  c.base_lr = a.base_lr
  c.weight_decay = a.weight_decay
  c.condense.keep = a.condense_keep
  if embedded:
    # Mini-VTAB's recipe for this backbone (`vptpc.data.minivtab`): the LR
    # follows the schedule per step, prompts get 1/100 of the LR, and the
    # head starts at zero on standardised pre-logits.
    c.per_step_schedule = True
    c.prompt.lr_scale = assets.PROMPT_LR_SCALE
    c.warmup_epochs = min(2, a.epochs - 1)
    c.model.head_init = assets.HEAD_INIT
    c.model.prelogit_norm = assets.PRELOGIT_NORM
  if a.smoke:
    config_util.shrink_for_smoke(c)
  return c
