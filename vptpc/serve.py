"""Many tasks on one frozen backbone: mixed-task batched inference.

A `TaskBank` holds every task's VPT-Deep prompts as a key/value cache
(the family's, `vptpc.models.registry.build_kv_cache`: a vit_jax or timm
ViT, or a Swin, whose last block keeps its prompt tokens), stacked over
tasks and padded per layer to the largest count with a mask (condensed
tasks have ragged, different counts), plus every task's head padded to the
largest class count. `classify` then runs one forward pass over a batch
whose examples belong to different tasks: each example gathers its task's
keys/values (padded keys get no attention) and its task's head. The result
equals running each task alone (tested); the backbone is shared, not
copied.

  python -m vptpc.serve --task=digits=runs/digits/prompts.npz \\
      --task=count=runs/count/prompts.npz --images=path/to/folder
  printf 'digits a.png\\ncount b.png\\n' | python -m vptpc.serve \\
      --task=digits=... --task=count=...          # "task path" lines

Prints one JSON line per image: path, task, predicted class, its
probability and the top-5. A line that cannot be served (malformed, an
unknown task, a missing or corrupt image) gets one ``error:`` line on
stderr and serving carries on; the exit status is then 2. ``--backbone`` is a
vit_jax ``.npz`` or a timm-named ``.safetensors`` file (default: the
embedded fractal ViT, ``--model=fractal-Ti/4``); ``--model=swin_...`` serves
a Swin (e.g. ``--model=swin_base_patch4_window7_224 --image_size=224
--normalize=imagenet``); a timm name serves that ViT (MAE, CLIP, DINOv2,
registers, average pool; e.g. ``--model=vit_base_patch16_clip_224.openai
--normalize=clip --interpolation=bicubic``, as its run's config says). Each
prompts file must have been trained on that backbone
(`vptpc.prompts.load_prompts` checks); a run's folder stands for its
``prompts.npz`` (`vptpc.prompts.find_prompt_file`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from vptpc import assets, checkpoint
from vptpc import prompts as prompts_lib
from vptpc.data import preprocessing
from vptpc.models import registry, swin, vit


@dataclasses.dataclass
class TaskBank:
  """Stacked, padded per-task key/value caches and heads.

  Attributes:
    names: task names, in stacking order (task id = index).
    cache: ``{"encoderblock_i": {"key", "value": (T, K_i, H, hd), "mask":
      (T, K_i) bool}}``; a Swin's last block is ``{"prompts": (T, K, C),
      "mask"}`` instead.
    kernel: (T, D, C_max) stacked head kernels (zero-padded classes).
    bias: (T, C_max) head biases, -inf on padded classes.
    num_classes: (T,) real class counts.
  """

  names: list[str]
  cache: dict[str, dict[str, jax.Array]]
  kernel: jax.Array
  bias: jax.Array
  num_classes: np.ndarray

  def task_ids(self, names: Sequence[str]) -> np.ndarray:
    """Maps task names to ids; unknown names are an error naming them."""
    index = {n: i for i, n in enumerate(self.names)}
    bad = sorted({n for n in names if n not in index})
    if bad:
      raise KeyError(f"Unknown task(s) {bad}; the bank has {self.names}.")
    return np.asarray([index[n] for n in names], np.int32)


def _pad_stack(arrays: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Stacks (k_t, ...) arrays zero-padded to the largest k, with validity."""
  width = max(a.shape[0] for a in arrays)
  padded = [
    jnp.pad(a, ((0, width - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))
    for a in arrays
  ]
  masks = [jnp.arange(width) < a.shape[0] for a in arrays]
  return jnp.stack(padded), jnp.stack(masks)


def build_bank(
  backbone: Mapping[str, Any],
  tasks: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
  *,
  num_heads: int | None = None,
  dtype: Any = jnp.float32,
  model: vit.VisionTransformer | swin.SwinTransformer | None = None,
) -> TaskBank:
  """Builds a `TaskBank` from ``{name: (deep prompt tree, head params)}``.

  Args:
    backbone: the frozen backbone every task was trained on.
    tasks: per task, its VPT-Deep prompts and head.
    num_heads: a ViT's attention heads (or give ``model``).
    dtype: the keys' and values' dtype with ``num_heads`` (with ``model``:
      the model's).
    model: the backbone's model; needed for a Swin, whose every block but
      the last becomes a key/value cache and whose last block keeps its
      prompt tokens (their outputs enter the average pool), padded with a
      mask.

  Raises:
    ValueError: no task, neither ``num_heads`` nor ``model``, or tasks
      with different numbers of prompt layers.
  """
  if not tasks:
    raise ValueError("A task bank needs at least one task.")
  names = list(tasks)
  if model is not None:
    # The model's family builds its caches (in the model's dtype).
    caches = [
      registry.build_kv_cache(model, backbone, tasks[n][0]) for n in names
    ]
  elif num_heads is None:
    raise ValueError("build_bank needs num_heads or model.")
  else:  # a vit_jax-style ViT given by its head count
    caches = [
      vit.build_kv_cache(backbone, tasks[n][0], num_heads, dtype) for n in names
    ]
  layers = prompts_lib.layer_keys(caches[0])
  for n, c in zip(names, caches, strict=True):
    if prompts_lib.layer_keys(c) != layers:
      raise ValueError(f"Task {n!r} has another number of prompt layers.")
  cache = {}
  for layer in layers:
    if not isinstance(caches[0][layer], Mapping):  # Swin's last block
      tokens, mask = _pad_stack([c[layer] for c in caches])
      cache[layer] = {"prompts": tokens, "mask": mask}
      continue
    keys, mask = _pad_stack([c[layer]["key"] for c in caches])
    values, _ = _pad_stack([c[layer]["value"] for c in caches])
    cache[layer] = {"key": keys, "value": values, "mask": mask}
  heads = [tasks[n][1] for n in names]
  n_cls = np.asarray([h["kernel"].shape[-1] for h in heads])
  c_max = int(n_cls.max())
  kernel = jnp.stack(
    [
      jnp.pad(h["kernel"], ((0, 0), (0, c_max - h["kernel"].shape[-1])))
      for h in heads
    ]
  )
  bias = jnp.stack(
    [
      jnp.concatenate(
        [h["bias"], jnp.full((c_max - h["bias"].shape[-1],), -jnp.inf)]
      )
      for h in heads
    ]
  )
  return TaskBank(names, cache, kernel, bias, n_cls)


@functools.cache
def make_classifier(model: vit.VisionTransformer | swin.SwinTransformer):
  """Returns jitted ``logits(backbone, bank arrays, images, task_ids)``.

  ``model`` must have ``kv_only=True`` (any ``num_classes``: its head is
  not used). Logits are (B, C_max), -inf on classes the task lacks.
  Cached per model, so repeated `classify` calls compile once.
  """
  feat = model.clone(num_classes=None, kv_only=True)

  @jax.jit
  def logits(backbone, cache, kernel, bias, images, task_ids):
    per_example = jax.tree_util.tree_map(lambda a: a[task_ids], cache)
    f = feat.apply({"params": backbone}, images, per_example)
    return jnp.einsum("bd,bdc->bc", f, kernel[task_ids]) + bias[task_ids]

  return logits


def classify(
  model: vit.VisionTransformer | swin.SwinTransformer,
  backbone: Mapping[str, Any],
  bank: TaskBank,
  images: np.ndarray,
  task_ids: np.ndarray,
  classifier=None,
) -> jax.Array:
  """Logits of a mixed-task batch: example i uses task ``task_ids[i]``."""
  fn = classifier or make_classifier(model)
  return fn(
    backbone, bank.cache, bank.kernel, bank.bias, images, jnp.asarray(task_ids)
  )


@dataclasses.dataclass
class Request:
  """One image to classify: where it came from, its task and path.

  ``error`` is set when the request cannot be served (a malformed line, an
  unknown task, an unreadable image); it is reported and skipped.
  """

  where: str  # "stdin line 3" or the file name
  task: str | None
  path: str
  error: str | None = None


def _read_requests(images: str) -> list[Request]:
  """Requests from a folder, or from ``task path`` lines on stdin.

  Raises:
    FileNotFoundError: ``images`` is not a folder, or holds no images.
  """
  if images:
    if not os.path.isdir(images):
      raise FileNotFoundError(f"--images={images!r} is not a folder.")
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
    files = sorted(
      os.path.join(images, f)
      for f in os.listdir(images)
      if f.lower().endswith(exts)
    )
    if not files:
      raise FileNotFoundError(f"No images in {images!r}.")
    return [Request(f, None, f) for f in files]
  out = []
  for n, line in enumerate(sys.stdin, 1):
    if not line.strip():
      continue
    parts = line.split(maxsplit=1)
    if len(parts) != 2:
      out.append(
        Request(
          f"stdin line {n}",
          None,
          "",
          f"expected 'task path', got {line.strip()!r}",
        )
      )
      continue
    out.append(Request(f"stdin line {n}", parts[0], parts[1].strip()))
  return out


def _load_image(
  path: str, size: int, interpolation: str = "bilinear"
) -> np.ndarray:
  """The cached-form image of ``path`` (`preprocessing.preprocess_image`).

  Raises:
    ValueError: the file is missing or not a readable image (named).
  """
  try:
    with Image.open(path) as im:
      arr = np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise ValueError(f"no such file {path!r}") from None
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise ValueError(
      f"cannot read image {path!r} ({type(e).__name__}: {e})"
    ) from None
  return preprocessing.preprocess_image(arr, size, interpolation=interpolation)


def main(argv: Sequence[str] | None = None) -> int:
  """The ``python -m vptpc.serve`` command; returns the exit status.

  A request that cannot be served (a malformed stdin line, an unknown task,
  a missing or corrupt image) is reported on stderr as ``error: <where>:
  <why>`` and the next one is served; the status is then 2, else 0.
  Errors before serving (a bad flag, backbone or prompts file) print one
  ``error:`` line and return 2.
  """
  ap = argparse.ArgumentParser(prog="python -m vptpc.serve")
  ap.add_argument(
    "--task",
    action="append",
    default=[],
    help="name=prompts.npz (repeat per task)",
  )
  ap.add_argument("--images", default="", help="folder (default: stdin)")
  ap.add_argument("--model", default=assets.DEFAULT_MODEL)
  ap.add_argument(
    "--backbone",
    default="",
    help="vit_jax .npz or timm-named .safetensors (ViT or Swin)",
  )
  ap.add_argument("--image_size", type=int, default=32)
  ap.add_argument("--normalize", default="minus1_1")
  ap.add_argument(
    "--interpolation",
    default="bilinear",
    help="resize filter, bilinear | bicubic (as the run's data.interpolation)",
  )
  ap.add_argument("--batch_size", type=int, default=64)
  a = ap.parse_args(argv)
  try:
    if not a.task:
      raise ValueError("Give at least one --task=name=prompts.npz.")
    if a.interpolation not in preprocessing.INTERPOLATIONS:
      raise ValueError(
        f"--interpolation={a.interpolation!r}: expected one of "
        f"{', '.join(preprocessing.INTERPOLATIONS)}."
      )
    specs = []
    for spec in a.task:
      name, sep, path = spec.partition("=")
      if not sep or not name or not path:
        raise ValueError(f"--task={spec!r}: expected name=prompts.npz.")
      path = prompts_lib.find_prompt_file(path)  # a run folder: its file
      prompts_lib.load_prompts(path)  # a bad file fails before any JAX work
      specs.append((name, path))
    # A Swin or a ViT, by `vptpc.models.registry`'s naming rule.
    model_name = registry.canonical_name(a.model)
    # Named with the sizes that fit, before any JAX work.
    bad = registry.image_size_problems({"name": model_name}, a.image_size, {})
    if bad:
      raise ValueError(bad[0].replace("config.data.image_size", "--image_size"))
    model = registry.create_model(model_name, num_classes=None, kv_only=True)
    images = jax.ShapeDtypeStruct(
      (1, a.image_size, a.image_size, 3), jnp.float32
    )
    template = vit.split_head(
      jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    )[0]
    backbone = checkpoint.load_pretrained(a.backbone or assets.path(), template)
    tasks = {}
    for name, path in specs:
      prompts, head, _ = prompts_lib.load_prompts(path, backbone=backbone)
      if head is None:
        raise ValueError(f"{path!r} has no head; serving needs one.")
      tasks[name] = (prompts, head)
    bank = build_bank(backbone, tasks, model=model)
    requests = _read_requests(a.images)
    default = bank.names[0] if len(bank.names) == 1 else None
    if a.images and default is None:
      raise ValueError(
        "Several tasks are loaded: give 'task path' lines on stdin instead "
        "of --images."
      )
  except (ValueError, KeyError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for r in requests:
    r.task = r.task or default
    if r.error is None and r.task not in bank.names:
      r.error = f"unknown task {r.task!r}; loaded: {', '.join(bank.names)}"
  fn = make_classifier(model)
  failed = 0

  def report(r: Request) -> None:
    nonlocal failed
    failed += 1
    print(f"error: {r.where}: {r.error}", file=sys.stderr, flush=True)

  good: list[tuple[Request, np.ndarray]] = []

  def flush_batch() -> None:
    if not good:
      return
    chunk = good[: a.batch_size]
    del good[: a.batch_size]
    x = preprocessing.normalize(np.stack([im for _, im in chunk]), a.normalize)
    # Pad to a fixed batch so the program compiles once.
    pad = a.batch_size - len(chunk)
    x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
    ids = bank.task_ids([r.task for r, _ in chunk])
    tid = np.concatenate([ids, np.zeros(pad, np.int32)])
    probs = np.asarray(
      jax.nn.softmax(classify(model, backbone, bank, x, tid, fn), -1)
    )
    for j, (r, _) in enumerate(chunk):
      p = probs[j][: bank.num_classes[tid[j]]]
      top = np.argsort(-p)[:5]
      print(
        json.dumps(
          {
            "image": r.path,
            "task": bank.names[tid[j]],
            "label": int(top[0]),
            "prob": round(float(p[top[0]]), 4),
            "top5": [[int(c), round(float(p[c]), 4)] for c in top],
          }
        ),
        flush=True,
      )

  for r in requests:
    if r.error is None:
      try:
        good.append((r, _load_image(r.path, a.image_size, a.interpolation)))
      except ValueError as e:
        r.error = str(e)
    if r.error is not None:
      report(r)
    if len(good) >= a.batch_size:
      flush_batch()
  while good:
    flush_batch()
  return 2 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
