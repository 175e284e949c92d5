"""Pretraining of the embedded backbone on FractalDB-style images.

  python -m vptpc.pretrain --config=configs/pretrain.py --workdir=runs/pretrain
  python -m vptpc.pretrain --config=configs/pretrain.py:smoke --workdir=/tmp/p

The shipped ``vptpc/assets/fractal_vit_ti4.npz`` was made by the first
command (see its model card, ``vptpc/assets/MODEL_CARD.md``). A second
stage continues from a backbone, optionally with new targets (measured, not
shipped: ``results/pretrain_stage2/``):

  python -m vptpc.pretrain --config=configs/pretrain.py:init_from=vptpc/assets/fractal_vit_ti4.npz,steps=600,lr=3e-4,warmup_steps=50,hog_bins=8 --workdir=runs/pt2

``position_weight=0`` trains on the class labels alone, FractalDB's recipe
(measured, not shipped: ``results/pretrain_class_only/``).
"""

from ml_collections import ConfigDict

from vptpc import config_args


def get_config(arg=None):
  """Returns the pretraining config (``smoke`` shrinks it for CPU tests)."""
  a = config_args.parse_arg(
    arg,
    model="fractal-Ti/4",
    steps=5000,
    num_classes=1000,
    orientation_bins=0,
    init_from="",
    lr=1e-3,
    warmup_steps=300,
    hog_bins=0,
    hog_block=3,
    hog_weight=1.0,
    axis_bins=0,
    rotate_fraction=0.0,
    position_weight=1.0,
    smoke=False,
  )
  c = ConfigDict()
  c.model = a.model
  c.image_size = 32
  c.num_classes = a.num_classes
  c.class_seed = 0
  c.data_seed = 1
  c.seed = 0
  c.per_class = 100  # 100k rendered training images
  c.held_out_per_class = 5
  c.batch_size = 128
  c.steps = a.steps
  c.lr = a.lr
  c.warmup_steps = a.warmup_steps
  c.weight_decay = 0.05
  c.grad_clip = 1.0
  c.max_rotation = 0.0  # degrees; FractalDB uses no rotation
  # Weight of the auxiliary 4 x 4 position cross-entropy; 0 trains on the
  # class labels alone, as FractalDB does.
  c.aux_weight = a.position_weight
  # > 0: rotate over the full circle and predict the rotation in this many
  # bins (an auxiliary head, like position). Off: at 16 bins and this
  # schedule, class accuracy fell to 2.1% and orientation stayed at chance
  # (results/pretrain_orientation/).
  c.orientation_bins = a.orientation_bins
  c.orientation_weight = 1.0
  # A second stage continues from this vit_jax .npz (e.g. the shipped
  # backbone) instead of a random init; "" trains from scratch.
  c.init_from = a.init_from
  # > 0: MaskFeat-style target on patch tokens (vptpc.pretrain.hog_targets):
  # the patch tokens at the input of block ``hog_block`` regress their
  # patch's histogram of gradient orientations, so the tokens VPT-Deep's
  # prompts read carry local orientation. Off (0) for the first stage.
  c.hog_bins = a.hog_bins
  c.hog_block = a.hog_block
  c.hog_weight = a.hog_weight
  # > 0: class-token target, the object's principal-axis angle in this many
  # bins (vptpc.data.fractals.principal_axis_bins).
  c.axis_bins = a.axis_bins
  c.axis_weight = 1.0
  # This fraction of instances is rotated over the full circle and left out
  # of the class loss (pose targets still use them).
  c.rotate_fraction = a.rotate_fraction
  c.normalize = "minus1_1"
  c.log_every = 100
  if a.smoke:
    c.num_classes, c.per_class, c.held_out_per_class = 20, 10, 13
    c.steps, c.warmup_steps, c.log_every = 6, 2, 3
  return c
