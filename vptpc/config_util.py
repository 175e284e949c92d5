"""The run config: every key with its default, its checks, and resumes.

`base_config` declares every training key with its default (the files in
``configs/`` override them and parse their argument string with
`vptpc.config_args.parse_arg`); `problems` and `validate` check the values a
config file or an override could get wrong, each list of choices taken from
the module that owns it; `changed_keys` tells which keys may change when a
workdir is run again.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from typing import Any

import ml_collections

from vptpc import (
  condense,
  config_args,
  hub,
  moved,
  parallel,
  prompts,
  protocol_runs,
)
from vptpc.data import device, preprocessing, sources, vtab
from vptpc.models import levers, registry


class ConfigError(ValueError):
  """A config value is invalid; the message names the key."""


# A timm checkpoint's input statistics -> its `config.data.normalize` mode.
_NORMALIZE_OF_MEAN = {
  (0.5, 0.5, 0.5): "minus1_1",
  (0.485, 0.456, 0.406): "imagenet",
  (0.48145466, 0.4578275, 0.40821073): "clip",
}


ARCH_FIELDS = (
  "patch_size",
  "hidden_size",
  "num_layers",
  "num_heads",
  "mlp_dim",
)


def parse_arch(arch: str) -> dict[str, int]:
  """``config.model.arch`` ("hidden_size=16,num_layers=2") as a dict.

  Raises:
    ConfigError: a field outside `ARCH_FIELDS` or a value that is not a
      positive integer, named.
  """
  out = {}
  for item in (x.strip() for x in str(arch).split(",") if x.strip()):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in ARCH_FIELDS:
      raise ConfigError(
        f"config.model.arch: unknown field {key!r} in {arch!r}; known: "
        f"{', '.join(ARCH_FIELDS)}."
      )
    try:
      out[key] = int(value)
    except ValueError:
      out[key] = 0
    if out[key] <= 0:
      raise ConfigError(
        f"config.model.arch: {key}={value.strip()!r} is not a positive integer."
      )
  return out


def pretrained_preprocessing(name: str) -> dict[str, Any]:
  """What a timm checkpoint name says of its input, as config values.

  ``{"image_size", "normalize", "interpolation"}`` from the checkpoint's
  row (`vptpc.models.vit_variants.TIMM_WEIGHTS`, timm's pretrained config),
  or {} for a name without one (vit_jax's variants, Swins).
  """
  pre = registry.pretrained(name)
  if pre is None:
    return {}
  return {
    "image_size": pre.image_size,
    "normalize": _NORMALIZE_OF_MEAN[tuple(pre.mean_std[0])],
    "interpolation": pre.interpolation,
  }


def default_checkpoint(name: str) -> str:
  """Where a run finds a model's weights when no checkpoint is given.

  The model's standard file in the working directory
  (`vptpc.models.registry.standard_checkpoint`), else, for a timm
  checkpoint name, its file in the Hugging Face cache (``hf-hub:timm/...``,
  fetched once by ``python -m vptpc.prepare --weights=timm/<name>``), else
  "".
  """
  std = registry.standard_checkpoint(name)
  if std:
    return std
  if registry.pretrained(name) is not None:
    return hub.hub_ref(registry.canonical_name(name))
  return ""


def base_config() -> ml_collections.ConfigDict:
  """Returns every training key with its default (config files override).

  All keys are declared here so that a locked config rejects typos such as
  ``--config.base_lrr=1``. Defaults follow the official VPT recipe
  (docs/references.md, "VPT: optimiser and schedule", "VPT: protocol");
  comments give the source.
  """
  c = ml_collections.ConfigDict()
  c.seed = 42  # VPT final runs use seeds 42, 44, 82, 100, 800.

  c.model = ml_collections.ConfigDict()
  # A ViT (vit_jax's B/16..., or a timm checkpoint name such as
  # vit_base_patch14_dinov2.lvd142m) or, for names starting with "swin", a
  # Swin (e.g. swin_base_patch4_window7_224); vptpc.models.registry.
  c.model.name = "B/16"
  # A vit_jax .npz or a timm .safetensors (ViT or Swin), or hf-hub:timm/<name>
  # (the file prepare --weights put in the Hugging Face cache); ""
  # initialises the backbone randomly (tests only).
  c.model.checkpoint_path = ""
  # Sizes that shrink the named architecture, "hidden_size=16,num_layers=2"
  # (patch_size, hidden_size, num_layers, num_heads, mlp_dim): a tiny model
  # of the same family and variant, for tests; "" for the named one.
  c.model.arch = ""
  c.model.init_seed = 0  # Seed of a random backbone (checkpoint_path "").
  # Exact and cheaper for VPT-Deep (docs/references.md, "VPT: prompts").
  c.model.kv_only = True
  # With kv_only: project prompt keys/values once per batch and share them
  # (True), or per image (False). Exact either way; prompt dropout forces
  # per-image keys/values while training.
  c.model.kv_shared = True
  c.model.dtype = "float32"  # bfloat16 on TPU/GPU for speed.
  # The speed levers (vptpc.models.levers.Levers; each computes the same
  # function). "": attention per backend (levers.resolve_attention_impl):
  # matmul on CPU, cuDNN flash attention on NVIDIA GPUs in bf16/fp16, XLA's
  # elsewhere. ViT only (a Swin needs "").
  c.model.attention_impl = ""
  # With cuDNN attention, pad query and key lengths to a multiple of this
  # (0: levers.CUDNN_PAD, 8; 1 pads nothing; 1 or 2 may be enough,
  # unverified). Stays 0 until a GPU measures 1 and 2
  # (benchmarks/gpu_ablation.py). ViT only (a Swin needs 0).
  c.model.cudnn_multiple = 0
  # On the shared key/value path, compute every block's prompt keys and
  # values before the blocks in one batched computation (fewer, larger
  # kernels); off until a GPU measures it. ViT only (a Swin needs False).
  c.model.kv_stacked = False
  # Removed levers (docs/performance.md: they measured no faster), accepted
  # so that older configs load: a value other than the default warns and
  # has no effect; drop the key.
  c.model.fuse_qkv = False
  c.model.gelu_vjp = "auto"  # Removed, as model.fuse_qkv.
  c.model.ln_vjp = "auto"  # Removed, as model.fuse_qkv.
  # "vpt": VPT's head init (kaiming normal fan_out, 1%-prior bias);
  # "zeros": kernel and bias zero, as vit_jax and big_vision fine-tune.
  c.model.head_init = "vpt"
  # "standardize": the head reads pre-logits standardised per feature with
  # the frozen backbone's statistics on the first `prelogit_norm_images`
  # training images (no prompts), folded into the final LayerNorm (ViT
  # `encoder_norm`, Swin `norm`); exports fold it back into the head. MAE's
  # linear-probe protocol (a BatchNorm without affine before the head); not
  # VPT's, hence "none" by default.
  c.model.prelogit_norm = "none"
  c.model.prelogit_norm_images = 1000  # images the statistics use

  c.prompt = ml_collections.ConfigDict()
  c.prompt.variant = "deep"  # deep | shallow
  c.prompt.num_prompts = 10  # per layer (deep) or in all (shallow)
  c.prompt.dropout = 0.0  # Official default 0.0; its demo uses 0.1 (Deep).
  # LR multiplier for prompts vs head; 1.0 is the official recipe.
  c.prompt.lr_scale = 1.0
  # "vpt": VPT's uniform init; "tokens": draws of the frozen ViT's own input
  # tokens per layer on `init_images` training images (SPT-style; not VPT).
  c.prompt.init = "vpt"
  c.prompt.init_images = 64  # images of the token pools (init=tokens)

  c.data = ml_collections.ConfigDict()
  c.data.name = "vptpc_toy"  # TFDS name[:version].
  c.data.data_dir = ""  # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.data.train_split = "train[:800]"  # TFDS split string or file stem
  c.data.eval_split = "train[800:1000]"  # evaluated after training
  c.data.num_classes = 4  # head outputs; labels must lie below it
  c.data.image_size = 224  # model input side (position embedding)
  c.data.normalize = "imagenet"  # imagenet (VPT) | minus1_1 (i21k ckpt).
  # A vptpc.data.vtab key: the task's label rule (e.g. dSprites binning).
  c.data.task = ""
  c.data.source = "tfds"  # tfds | folder (extracted VTAB-1k layout)
  c.data.folder = ""  # folder root; "" -> <data_dir>/vptpc_folders/<task>
  # vtab: tf.image.resize-style squash; fgvc: VPT's FGVC crops and flips;
  # crop: shorter side + centre crop (what folder users often do).
  c.data.preprocess = "vtab"
  # The resize filter of every preprocess mode: bilinear (VTAB's, VPT's) or
  # bicubic (what timm's checkpoints state; configs take it from the name).
  c.data.interpolation = "bilinear"
  c.data.cache_max_gb = 4.0  # larger splits are decoded per batch
  # Folder datasets: open every listed image before anything is written, so
  # a corrupt one is named up front, not when a batch decodes it mid-run.
  # header: PIL's verify (headers, PNG checksums; ~0.1 s per 3,000 files);
  # decode: a full decode (~1.4 s per 3,000 256-px JPEGs; also catches
  # truncated JPEG data); off: skip.
  c.data.verify_images = "header"
  # auto: cached splits up to device_max_gb live on the accelerator and
  # batches are gathered, cropped and normalised there (one process, jit
  # mode; vptpc.data.device); never: batches are built on the host.
  c.data.on_device = "auto"
  c.data.device_max_gb = 4.0  # largest split placed on the device

  c.batch_size = 128  # Global; independent of the device count.
  c.eval_batch_size = 128  # global, padded and masked at the end
  c.total_epochs = 100  # VPT: 100
  c.warmup_epochs = 10  # linear warmup, then cosine (VPT: 10)
  # lr = base_lr * batch_size / 256 (docs/references.md, "VPT: optimiser and
  # schedule").
  c.base_lr = 0.25
  c.weight_decay = 1e-4  # Coupled L2, not on the head bias.
  c.momentum = 0.9  # SGD momentum (VPT: 0.9)
  c.per_step_schedule = False  # Official: LR stepped once per epoch.
  c.train_head = True  # False: prompts only, the head stays as given

  # Prompt Condensation (vptpc.condense); keep = 0 switches it off. Every
  # default is an assumption (docs/references.md, "PC: reconstruction").
  c.condense = ml_collections.ConfigDict()
  c.condense.keep = 0.0  # fraction of all prompts kept, e.g. 0.3
  c.condense.score_fn = "taylor"  # taylor | taylor_abs | grad_norm | random
  c.condense.aggregation = "abs_of_sum"  # abs_of_sum | sum_of_abs
  c.condense.scope = "global"  # global | per_layer
  c.condense.reproject = "none"  # none | distill | merge
  c.condense.distill_steps = 50  # Adam steps of reproject=distill
  c.condense.distill_lr = 1e-2  # Adam LR of reproject=distill
  c.condense.ft_epochs = -1  # -1: same as total_epochs
  c.condense.ft_base_lr = -1.0  # -1: same as base_lr
  c.condense.ft_head = True  # fine-tune the head with the kept prompts

  # VTAB-1k protocol (docs/references.md, "VPT: protocol"; vptpc.protocol):
  # single = one run; tune = the lr x wd grid on train800 -> val200; final =
  # seeds on train800val200 -> test with the tuned lr/wd.
  c.protocol = ml_collections.ConfigDict()
  c.protocol.mode = "single"  # single | tune | final
  # tune_vtab.py::get_lrwd_range('prompt'); FGVC drops 0.05.
  c.protocol.lrs = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
  c.protocol.wds = (0.01, 0.001, 0.0001, 0.0)  # tune_vtab.py's WDs
  c.protocol.seeds = (42, 44, 82, 100, 800)  # VPT's final seeds
  c.protocol.tune_splits = ("train[:800]", "train[800:1000]")  # per task
  c.protocol.final_splits = ("train[:1000]", "test")  # per task
  # final: tune.json to take lr/wd from ("" -> <workdir>/tune.json if it
  # exists, else base_lr / weight_decay as given).
  c.protocol.tuned_from = ""
  # tune: train the whole grid as one vmapped job (vptpc.sweep): one compile
  # and one pass over the data; vmap_chunk bounds members per job (0 = all).
  c.protocol.vmap = False
  c.protocol.vmap_chunk = 0  # members per vmapped job; 0: all

  c.parallel = "auto"  # auto | jit | pmap
  # With data on the device, run each epoch's steps as one lax.scan (no
  # host round trip per step); a checkpoint due mid-epoch is then written
  # at the epoch's end. False: one call per step.
  c.scan_steps = True
  c.log_every_steps = 10  # metrics.jsonl / TensorBoard cadence (and step 1)
  c.eval_every_epochs = 0  # 0: evaluate only after the last epoch.
  c.checkpoint_every_steps = 100  # Orbax checkpoint cadence
  c.keep_checkpoints = 3  # newest checkpoints kept
  c.eval_only = False  # Restore the latest checkpoint and evaluate.
  c.progress_bar = True  # tqdm bar while training
  # Start afresh in a workdir that holds a run of another config: the old
  # run is moved aside to a timestamped sibling (vptpc.rundir), not deleted.
  c.overwrite = False
  return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks a protocol config to seconds, in place (``smoke`` arguments).

  A random-init 32-px backbone of the config's family (the ``tiny32`` ViT,
  or the ``swin-testing`` Swin when ``c.model.name`` names a Swin), at most
  2 prompts, batches of 8, one epoch, two grid points and two seeds: the
  whole protocol's plumbing for tests, not a result.
  """
  c.model.name = registry.family_of_name(c.model.name).SMOKE_MODEL
  c.model.checkpoint_path = ""
  c.data.image_size = 32
  c.prompt.num_prompts = min(c.prompt.num_prompts, 2)
  c.batch_size = c.eval_batch_size = 8
  c.total_epochs, c.warmup_epochs = 1, 0
  c.protocol.lrs = (1.0, 0.1)
  c.protocol.wds = (0.0,)
  c.protocol.seeds = (42, 44)
  c.log_every_steps = 1
  c.progress_bar = False


# Each key's allowed values, from the module that acts on them. `vptpc.build`
# imports this module, so its two lists are repeated here and tied to
# `vptpc.build.PRELOGIT_NORMS` / `HEAD_INITS` by tests/test_config_util.py.
_PRELOGIT_NORMS = ("none", "standardize")
_HEAD_INITS = ("vpt", "zeros")
_CHOICES = {
  "prompt.variant": prompts.VARIANTS,
  "prompt.init": prompts.INITS,
  "model.prelogit_norm": _PRELOGIT_NORMS,
  "data.normalize": preprocessing.NORMALIZATIONS,
  "data.source": sources.SOURCES,
  "data.preprocess": preprocessing.PREPROCESS,
  "data.interpolation": preprocessing.INTERPOLATIONS,
  "data.on_device": device.ON_DEVICE,
  "data.verify_images": sources.VERIFY_IMAGES,
  # JAX's names of the compute dtypes (no module dispatches on them).
  "model.dtype": ("float32", "bfloat16", "float16"),
  "model.attention_impl": ("",) + levers.ATTENTION_IMPLS,
  "parallel": parallel.MODES,
  "protocol.mode": protocol_runs.MODES,
  "condense.score_fn": condense.SCORE_FNS,
  "condense.aggregation": condense.AGGREGATIONS,
  "condense.scope": condense.SCOPES,
  "condense.reproject": condense.REPROJECTIONS,
}
_POSITIVE = (
  "batch_size",
  "eval_batch_size",
  "total_epochs",
  "data.image_size",
  "data.num_classes",
  "log_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
)
# Float keys that must not be negative: rates, decays, sizes, multipliers
# (every float key must be finite, `_float_problems`). The keys checked
# against a range of their own (prompt.dropout, condense.keep) and the
# sentinel ones (condense.ft_base_lr) have their own messages.
_NON_NEGATIVE = (
  "base_lr",
  "weight_decay",
  "momentum",
  "prompt.lr_scale",
  "condense.distill_lr",
  "data.cache_max_gb",
  "data.device_max_gb",
  "protocol.lrs",
  "protocol.wds",
)
_OWN_RANGE = ("prompt.dropout", "condense.keep")


def _float_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Non-finite float values (any key), negative ones (`_NON_NEGATIVE`).

  A NaN compares false with everything, so a range check alone lets it
  through to the optimiser, which fails mid-run; each key is named once.
  """
  out = []
  for key, value in sorted(_flatten(config.to_dict()).items()):
    many = isinstance(value, (tuple, list))
    nums = [
      v
      for v in (value if many else (value,))
      if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if key in _OWN_RANGE or not nums:
      continue
    if not all(math.isfinite(v) for v in nums):
      what = "hold finite numbers" if many else "be a finite number"
      out.append(f"config.{key} must {what}, got {value!r}.")
    elif key in _NON_NEGATIVE and min(nums) < 0:
      what = "hold numbers >= 0" if many else "be >= 0"
      out.append(f"config.{key} must {what}, got {value!r}.")
  return out


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every invalid value of a config, one message per key (empty: valid).

  `validate` raises the first; `vptpc.preflight` reports them all at once.
  """

  def get(path):
    node = config
    for part in path.split("."):
      node = node[part]
    return node

  out = []
  for key, allowed in _CHOICES.items():
    if get(key) not in allowed:
      out.append(
        f"config.{key}={get(key)!r} is not one of {', '.join(allowed)}."
      )
  for key in _POSITIVE:
    if not get(key) > 0:
      out.append(f"config.{key} must be > 0, got {get(key)!r}.")
  # A folder's classes are checked against the folder itself, which names
  # the root and the class it found (`vptpc.preflight.data_problems`).
  if config.data.num_classes == 1 and config.data.source != "folder":
    out.append(
      "config.data.num_classes must be >= 2 (a classifier with one class "
      "learns nothing: its loss is 0 from the start), got 1."
    )
  out += _float_problems(config)
  ft_lr = config.condense.ft_base_lr
  if math.isfinite(ft_lr) and ft_lr < 0 and ft_lr != -1:
    out.append(
      "config.condense.ft_base_lr must be >= 0, or -1 for base_lr; got "
      f"{ft_lr!r}."
    )
  if not 0 <= config.prompt.dropout < 1:
    out.append(
      f"config.prompt.dropout must be in [0, 1), got {config.prompt.dropout}."
    )
  if not (
    isinstance(config.model.cudnn_multiple, int)
    and config.model.cudnn_multiple >= 0
  ):
    out.append(
      "config.model.cudnn_multiple must be an int >= 0 (0: the default), "
      f"got {config.model.cudnn_multiple!r}."
    )
  if config.prompt.num_prompts < 0:
    out.append(
      f"config.prompt.num_prompts must be >= 0, got {config.prompt.num_prompts}."
    )
  if config.model.kv_only and config.prompt.variant == "shallow":
    out.append(
      "config.model.kv_only=True is exact only for prompt.variant=deep; set "
      "config.model.kv_only=False for VPT-Shallow."
    )
  if not 0.0 <= config.condense.keep <= 1.0:
    out.append(
      f"config.condense.keep must be in [0, 1] (0 = off), got "
      f"{config.condense.keep}."
    )
  if config.condense.keep > 0 and config.prompt.variant != "deep":
    out.append(
      "config.condense.keep needs prompt.variant=deep (PC condenses VPT-Deep)."
    )
  if config.condense.ft_epochs == 0 or config.condense.ft_epochs < -1:
    out.append(
      "config.condense.ft_epochs must be >= 1, or -1 for total_epochs; got "
      f"{config.condense.ft_epochs}."
    )
  if not 0 <= config.warmup_epochs < config.total_epochs:
    out.append(
      f"config.warmup_epochs={config.warmup_epochs} must be in "
      f"[0, total_epochs={config.total_epochs})."
    )
  if config.model.get("head_init", "vpt") not in _HEAD_INITS:
    out.append(
      f"config.model.head_init={config.model.head_init!r} is not one of "
      f"{', '.join(_HEAD_INITS)}."
    )
  # An unknown model name, or a ViT-only key set for a Swin.
  out += registry.model_problems(config.model)
  try:
    arch = parse_arch(config.model.get("arch", ""))
  except ConfigError as e:
    out.append(str(e))
  else:
    out += registry.image_size_problems(
      config.model, config.data.image_size, arch
    )
  if config.data.task:
    if config.data.task not in vtab.TASKS:
      out.append(
        f"config.data.task={config.data.task!r} is not a known task; known: "
        f"{', '.join(vtab.TASKS)}."
      )
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values a config file or override could get wrong.

  Raises:
    ConfigError: naming each bad key, its value and what is allowed (one
      line per key).
  """
  found = problems(config)
  if found:
    raise ConfigError("\n".join(found))


def finetune_config(
  config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """The config of Prompt Condensation's fine-tuning stage.

  ``condense.ft_epochs`` / ``ft_base_lr`` (when set) replace the training
  length and LR, and ``condense.ft_head`` decides whether the head trains.
  """
  cc = config.condense
  ft = ml_collections.ConfigDict(config.to_dict())
  if cc.ft_epochs > 0:
    ft.total_epochs = cc.ft_epochs
    ft.warmup_epochs = min(config.warmup_epochs, cc.ft_epochs - 1)
  if cc.ft_base_lr > 0:
    ft.base_lr = cc.ft_base_lr
  ft.train_head = cc.ft_head
  return ft


# ---------------------------------------------------------------------------
# Which keys may change when a workdir is run again.
# ---------------------------------------------------------------------------

# A workdir holds one run: its checkpoints, metrics and results come from the
# config stored in its ``config.json``. Running into it again compares that
# config with the new one (`changed_keys`):
#
# * Keys listed here are SAFE to change mid-run: they decide how the run is
#   executed, logged, checkpointed or evaluated, never which prompts it
#   trains (a resume that changes ``parallel`` or ``model.attention_impl``
#   may differ in the last float bits, as another device count would). A
#   change is logged and the run resumes; a finished run is re-evaluated.
# * Every other key is UNSAFE: model and backbone, prompt counts and init,
#   data and training split, seed, LR schedule (base_lr, epochs, warmup,
#   weight decay, momentum), batch size, head training. A change is an error
#   naming each key with both values, unless ``config.overwrite=True`` (the
#   old run is moved aside to a timestamped sibling) or another workdir is
#   used. Keys a stored config lacks (written by an older vptpc) are not
#   compared, nor is ``overwrite`` itself.
# * ``eval_batch_size`` is unsafe with ``model.prelogit_norm=standardize``,
#   whose feature statistics are summed in eval batches.
# * A training stage ignores ``protocol.*`` (the driver's grid and seeds;
#   each of its runs stores its own lr, wd and seed) and ``condense.*`` (read
#   only by the condensation step); a Prompt Condensation run compares
#   ``condense.*`` in its top-level ``config.json``, written when it starts
#   condensing.
SAFE_TO_CHANGE = (
  "eval_only",
  "log_every_steps",
  "eval_every_epochs",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "progress_bar",
  "parallel",
  "scan_steps",
  "eval_batch_size",
  "data.eval_split",
  "data.data_dir",
  "data.on_device",
  "data.device_max_gb",
  "data.cache_max_gb",
  "data.verify_images",
  "model.attention_impl",
  "model.cudnn_multiple",
  "model.kv_stacked",
)
# Subtrees a training stage does not compare (see above).
STAGE_IGNORES = ("protocol", "condense")
# Keys of levers that were removed, with their defaults: still accepted (a
# stored config.json holds them), never compared, and a value other than
# the default warns (`warn_removed_keys`).
REMOVED_MODEL_KEYS = {"fuse_qkv": False, "gelu_vjp": "auto", "ln_vjp": "auto"}


def warn_removed_keys(config: ml_collections.ConfigDict) -> None:
  """A DeprecationWarning for each removed key set to a non-default value."""
  for key, default in REMOVED_MODEL_KEYS.items():
    value = config.model.get(key, default)
    if value != default:
      warnings.warn(
        f"config.model.{key}={value!r}: this lever was removed (it measured "
        "no faster, docs/performance.md) and has no effect; drop the key.",
        DeprecationWarning,
        stacklevel=2,
      )


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _plain(v: Any) -> Any:
  """JSON's view of a value (tuples are lists), as config.json stores it."""
  return json.loads(json.dumps(v, default=str))


def changed_keys(
  stored: dict[str, Any],
  new: dict[str, Any],
  *,
  ignore: tuple[str, ...] = (),
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
  """The keys whose value differs between a stored and a new config.

  Args:
    stored: the workdir's ``config.json``.
    new: ``config.to_dict()`` of the new run.
    ignore: top-level subtrees not compared (`STAGE_IGNORES`).

  Returns:
    ``(unsafe, safe)``: lists of ``(dotted key, stored value, new value)``
    (see `SAFE_TO_CHANGE`; `REMOVED_MODEL_KEYS` are not compared), sorted
    by key.
  """
  a, b = _flatten(_plain(stored)), _flatten(_plain(new))
  standardize = (
    b.get("model.prelogit_norm") == "standardize"
    or a.get("model.prelogit_norm") == "standardize"
  )
  unsafe, safe = [], []
  removed = {f"model.{k}" for k in REMOVED_MODEL_KEYS}
  for key in sorted(set(a) & set(b) - removed):
    if key.split(".")[0] in ignore or key == "overwrite" or a[key] == b[key]:
      continue
    is_safe = key in SAFE_TO_CHANGE
    if key == "eval_batch_size" and standardize:
      is_safe = False
    (safe if is_safe else unsafe).append((key, a[key], b[key]))
  return unsafe, safe


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
  """``config.k: old -> new; ...`` for messages."""
  return "; ".join(f"config.{k}: {old!r} -> {new!r}" for k, old, new in changes)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path.py[:arg]`` as ``--config`` does (notebooks, scripts).

  Args:
    spec: a config file path, optionally with its argument string, e.g.
      ``configs/vtab.py:task=dtd,mode=tune``.

  Returns:
    The (unlocked) config the file's ``get_config(arg)`` returns.

  Raises:
    FileNotFoundError: no such config file (named).
  """
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist.")
  mod_spec = importlib.util.spec_from_file_location("vptpc_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


# Names that moved to the module that owns them: each still answers here,
# with a DeprecationWarning naming its new spelling.
_MOVED = {"parse_arg": config_args}


__getattr__ = moved.forwarder(__name__, _MOVED)
