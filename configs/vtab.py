"""VTAB-1k and FGVC with VPT's recipe and protocol (the user's main job).

  # VPT's lr x wd grid on train800 -> val200, then 5 seeds on
  # train800val200 -> test with the winner:
  python -m vptpc.main --config=configs/vtab.py:task=dtd,mode=tune \\
      --workdir=runs/vtab/dtd
  python -m vptpc.main --config=configs/vtab.py:task=dtd,mode=final \\
      --workdir=runs/vtab/dtd
  # one run, with PC on top:
  python -m vptpc.main \\
      --config=configs/vtab.py:task=dtd,mode=single,condense_keep=0.3 \\
      --workdir=runs/vtab/dtd_pc
  python -m vptpc.protocol report runs/vtab --out=runs/vtab/report

  # the same on Swin-B (docs/swin.md; docs/references.md, "VPT: Swin"):
  python -m vptpc.main --config=configs/vtab.py:task=dtd,model=swin_b \\
      --workdir=runs/vtab_swin/dtd

Needs the backbone checkpoint and the task prepared by ``python -m
vptpc.prepare --tasks=<task>``; vptpc never downloads either. ``model``
picks the backbone: ``B/16`` (default; the ViT-B/16 ImageNet-21k VPT used)
or ``swin_b`` (also spelled ``swin_base_patch4_window7_224``: Swin-B,
ImageNet-22k, window 7, 224 px), or any other `vptpc.models.registry`
name. ``checkpoint=PATH`` names the file; left empty (the default) it is
the model's standard file in the working directory (`vptpc.models.registry.standard_checkpoints()`):
``imagenet21k_ViT-B_16.npz`` for ``B/16``,
``swin_base_patch4_window7_224.ms_in22k.safetensors`` (``model.safetensors``
of ``timm/swin_base_patch4_window7_224.ms_in22k``, renamed) for Swin-B;
a timm checkpoint name (``model=vit_base_patch14_dinov2.lvd142m``,
docs/backbones.md) reads the file ``python -m vptpc.prepare
--weights=timm/<name>`` put in the Hugging Face cache; other models need
``checkpoint=``. Swin runs use the same recipe as the ViT
(ImageNet normalisation, 224 px, VPT-Deep with the exact key/value path):
VPT gives no Swin-specific prompt counts or hyperparameters
(docs/references.md, "VPT: Swin"), so the task registry's counts (ViT's)
are used.

Arguments: ``task`` (a `vptpc.data.vtab` key: the 19 VTAB-1k tasks and the
FGVC datasets cub, nabirds, flowers, dogs, cars); ``mode`` single | tune |
final; ``variant`` deep | shallow; ``num_prompts`` (-1: the task's default
from the registry, whose source is noted there — only sun397, eurosat and
dmlab are confirmed by VPT's demo); ``base_lr`` / ``weight_decay`` /
``batch_size`` (single runs, and final runs without a tune.json; -1: VPT's
demo values for dmlab, eurosat and sun397 (`DEMO_HPARAMS`), else 0.25 /
1e-4 / 128); ``tfds_version`` overrides the registry's pinned version
(e.g. ``caltech101`` 3.0.2, the one current TFDS builds; the 1k subset then
holds other images: docs/references.md, "VTAB-1k: splits"); ``normalize``
imagenet (VPT) | minus1_1 | clip ("": the timm checkpoint's own statistics,
else imagenet);
``image_size`` (0: the timm checkpoint's own size, else 224);
``interpolation`` bilinear | bicubic ("": the timm checkpoint's own filter,
else VTAB's bilinear); ``source``
tfds | folder; ``condense_keep`` (0 = off);
``smoke``: a random-init 32-px backbone of the model's family (``tiny32``,
or ``swin-testing`` with a Swin), 1 epoch, two grid points and two seeds on
tiny slices, for tests on mock data.
"""

from vptpc import config_args, config_util
from vptpc.data import vtab
from vptpc.models import registry

# The only per-task VPT-Deep hyperparameters VPT published: its demo.ipynb
# re-run (docs/references.md, "VPT: per-task prompt counts"): task ->
# (base_lr, weight_decay, batch_size). Every other task's lr/wd comes from
# mode=tune (VPT's grid) or the arguments.
DEMO_HPARAMS = {
  "dmlab": (1.0, 1e-3, 64),
  "eurosat": (1.0, 1e-3, 64),
  "sun397": (25.0, 1e-4, 128),
}


def get_config(arg=None):
  """Returns the config for one task; see the module docstring."""
  a = config_args.parse_arg(
    arg,
    task="dtd",
    mode="final",
    variant="deep",
    num_prompts=-1,
    base_lr=-1.0,
    weight_decay=-1.0,
    batch_size=-1,
    tfds_version="",
    epochs=100,
    normalize="",
    image_size=0,
    interpolation="",
    source="tfds",
    data_dir="",
    model="B/16",
    checkpoint="",
    condense_keep=0.0,
    dtype="float32",
    seed=42,
    smoke=False,
  )
  task = vtab.get_task(a.task)
  c = config_util.base_config()
  c.seed = a.seed
  c.model.name = registry.canonical_name(a.model)
  registry.model_family(c.model.name)  # an unknown name fails here, named
  c.model.checkpoint_path = a.checkpoint or config_util.default_checkpoint(
    c.model.name
  )
  # A timm checkpoint's own input (size, mean/std); VPT's otherwise.
  pre = config_util.pretrained_preprocessing(c.model.name)
  if not c.model.checkpoint_path and not a.smoke:
    raise config_util.ConfigError(
      registry.no_checkpoint_message("configs/vtab.py", a.model)
    )
  c.model.kv_only = a.variant == "deep"
  c.model.dtype = a.dtype
  c.prompt.variant = a.variant
  c.prompt.num_prompts = (
    task.num_prompts if a.num_prompts < 0 else a.num_prompts
  )
  c.data.task = task.key
  c.data.name = task.tfds_name or task.key
  if a.tfds_version:  # e.g. a version this TFDS can still build
    c.data.name = f"{c.data.name.split(':')[0]}:{a.tfds_version}"
  c.data.source = "folder" if not task.tfds_name else a.source
  c.data.data_dir = a.data_dir
  c.data.num_classes = task.num_classes
  c.data.image_size = a.image_size or pre.get("image_size", 224)
  c.data.normalize = a.normalize or pre.get("normalize", "imagenet")
  c.data.interpolation = a.interpolation or pre.get("interpolation", "bilinear")
  if task.benchmark == "vtab":
    c.data.preprocess = "vtab"
    tune_splits = (task.splits["train800"], task.splits["val200"])
    final_splits = (task.splits["train800val200"], task.splits["test"])
    if c.data.source == "folder":  # split file stems of the folder layout
      tune_splits, final_splits = (
        ("train800", "val200"),
        (
          "train800val200",
          "test",
        ),
      )
  else:
    c.data.preprocess = "fgvc"
    tune_splits = (task.splits["train"], task.splits["val"])
    final_splits = (task.splits["trainval"], task.splits["test"])
    # tune_fgvc.py's grid has no 0.05.
    c.protocol.lrs = tuple(x for x in c.protocol.lrs if x != 0.05)
  c.protocol.mode = a.mode
  c.protocol.tune_splits = tune_splits
  c.protocol.final_splits = final_splits
  c.data.train_split, c.data.eval_split = final_splits
  lr, wd, bs = DEMO_HPARAMS.get(task.key, (0.25, 1e-4, 128))
  c.batch_size = bs if a.batch_size < 0 else a.batch_size
  c.eval_batch_size = 128
  c.total_epochs = a.epochs
  c.warmup_epochs = min(10, a.epochs - 1)
  c.base_lr = lr if a.base_lr < 0 else a.base_lr
  c.weight_decay = wd if a.weight_decay < 0 else a.weight_decay
  c.condense.keep = a.condense_keep
  if a.smoke:
    config_util.shrink_for_smoke(c)
  return c
