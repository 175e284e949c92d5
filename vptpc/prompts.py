"""The VPT prompt pytree and the utilities users import.

Prompts live in their own pytree, apart from the frozen backbone parameters,
so gradients, optimiser state and checkpoints cover only what trains. A prompt
tree is a plain dict of float arrays of shape (k, D):

* VPT-Shallow: ``{"input": (n, D)}``;
* VPT-Deep: ``{"encoderblock_0": (k_0, D), ..., "encoderblock_{L-1}": ...}``,
  where the counts k_l may differ per layer and may be zero (what Prompt
  Condensation produces). `jit` specialises on the shapes, so ragged counts
  cost one compile and no dynamic shapes.

Typical use::

  from vptpc import prompts
  p = prompts.init_prompts(rng, num_prompts=100, hidden_size=768,
                           patch_size=16, num_layers=12)
  prompts.count_prompts(p)["tokens"]          # 1200
  small = prompts.gather_prompts(p, keep)     # keep: per-layer indices
  prompts.save_prompts("task.npz", small, head, backbone=backbone_params)
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vptpc.checkpoint import read_shapes
from vptpc.models import registry
from vptpc.models.vit import prompt_variant
from vptpc.npz_checkpoint import CheckpointError, flatten, temp_file

Array = jax.Array
PromptTree = dict[str, Array]

FORMAT = "vptpc-prompts"
FORMAT_VERSION = 1
# ``config.prompt.variant``: one prompt set per block (VPT-Deep) or one set
# at the input (VPT-Shallow).
VARIANTS = ("deep", "shallow")
# ``config.prompt.init``: VPT's uniform draw (`init_prompts`, per family
# `vptpc.models.registry.init_prompts`) or the frozen backbone's own tokens
# (`init_prompts_from_tokens`).
INITS = ("vpt", "tokens")
_LAYER_RE = re.compile(r"encoderblock_(\d+)$")


class PromptFileError(ValueError):
  """A prompt file is missing, unreadable, or does not fit the backbone."""


def layer_key(i: int) -> str:
  """Returns the prompt-tree key of block ``i`` (the backbone's block name)."""
  return f"encoderblock_{i}"


def layer_keys(prompts: Mapping[str, Any]) -> list[str]:
  """Returns a tree's keys in layer order (``input`` or blocks 0..L-1)."""
  if prompt_variant(prompts) == "shallow":
    return ["input"]
  return sorted(prompts, key=lambda k: int(_LAYER_RE.match(k).group(1)))


def init_bound(patch_size: int, hidden_size: int) -> float:
  """Returns VPT's uniform init bound ``sqrt(6 / (3 * p * p + D))``.

  The official code calls this "xavier_uniform" over a (3·p·p, D) patch
  projection; for B/16 it is exactly 0.0625 (docs/references.md, "VPT:
  prompt initialisation").
  """
  return math.sqrt(6.0 / (3 * patch_size * patch_size + hidden_size))


def init_prompts(
  rng: Array,
  *,
  num_prompts: int | Sequence[int],
  hidden_size: int,
  patch_size: int,
  num_layers: int | None = None,
  variant: str = "deep",
  dtype: Any = jnp.float32,
) -> PromptTree:
  """Initialises a prompt tree as the official VPT code does.

  Args:
    rng: PRNG key.
    num_prompts: prompts per layer; for ``deep`` also a sequence of
      per-layer counts (zeros allowed).
    hidden_size: token width D.
    patch_size: patch side p (enters the init bound).
    num_layers: number of blocks; required for ``deep``.
    variant: ``"deep"`` (one set per block) or ``"shallow"`` (one input set).
    dtype: parameter dtype.

  Returns:
    The prompt tree, values uniform in ±`init_bound(patch_size, hidden_size)`.

  Raises:
    ValueError: bad variant, counts, or missing num_layers.
  """
  bound = init_bound(patch_size, hidden_size)

  def draw(key, n):
    return jax.random.uniform(key, (n, hidden_size), dtype, -bound, bound)

  if variant == "shallow":
    if not isinstance(num_prompts, int) or num_prompts < 0:
      raise ValueError(
        f"num_prompts for VPT-Shallow must be an int >= 0, got {num_prompts!r}."
      )
    return {"input": draw(rng, num_prompts)}
  if variant not in VARIANTS:
    raise ValueError(
      f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}."
    )
  if num_layers is None:
    raise ValueError("num_layers is required for VPT-Deep prompts.")
  counts = (
    [num_prompts] * num_layers
    if isinstance(num_prompts, int)
    else list(num_prompts)
  )
  if len(counts) != num_layers or any(
    not isinstance(c, (int, np.integer)) or c < 0 for c in counts
  ):
    raise ValueError(
      f"num_prompts must be an int or {num_layers} non-negative ints, "
      f"got {num_prompts!r}."
    )
  keys = jax.random.split(rng, num_layers)
  return {layer_key(i): draw(keys[i], int(c)) for i, c in enumerate(counts)}


def init_prompts_from_tokens(
  rng: Array,
  tokens: Mapping[str, Array],
  *,
  num_prompts: int | Sequence[int],
  variant: str = "deep",
) -> PromptTree:
  """Initialises prompts as tokens the frozen ViT itself produces.

  Each layer's prompts are distinct tokens drawn at random from that
  layer's input tokens on training images (``tokens["encoderblock_i"]``;
  ``"input"`` for VPT-Shallow), in the spirit of SPT (Wang et al., "Revisiting
  the Power of Prompt for Visual Tuning", ICML 2024, which uses k-means
  prototypes; a random sample is the cheaper variant). Not VPT's recipe,
  and off by default (``config.prompt.init = "tokens"`` selects it). Why try
  it: random prompts are out-of-distribution keys that degraded the
  embedded backbone's features (`vptpc.data.minivtab.task_config`). It did
  not help there: VPT-Deep, dsprites_loc, 10 prompts, 10 epochs, seed 42,
  test top-1 63.2% (prompt LR x0.01) and 64.9% (x0.1), against 64.8% mean
  with VPT's init.

  Args:
    rng: PRNG key.
    tokens: layer key -> (N, D) pool of that layer's input tokens.
    num_prompts: prompts per layer (an int, or per-layer counts for deep).
    variant: ``"deep"`` or ``"shallow"``.

  Returns:
    The prompt tree (float32).

  Raises:
    ValueError: a pool smaller than its prompt count, or a missing layer.
  """
  if variant == "shallow":
    keys = ["input"]
    counts = [num_prompts]
  else:
    keys = sorted(
      (k for k in tokens if k.startswith("encoderblock_")),
      key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    counts = (
      [num_prompts] * len(keys)
      if isinstance(num_prompts, int)
      else list(num_prompts)
    )
    if len(counts) != len(keys):
      raise ValueError(
        f"{len(counts)} prompt counts for {len(keys)} token pools."
      )
  out = {}
  for i, (k, n) in enumerate(zip(keys, counts, strict=True)):
    if k not in tokens:
      raise ValueError(f"No token pool for prompt layer {k!r}.")
    pool = jnp.asarray(tokens[k], jnp.float32)
    if pool.shape[0] < n:
      raise ValueError(
        f"Layer {k!r} needs {n} prompts but its token pool has only "
        f"{pool.shape[0]} tokens."
      )
    idx = jax.random.choice(
      jax.random.fold_in(rng, i), pool.shape[0], (n,), replace=False
    )
    out[k] = pool[idx]
  return out


def prompts_per_layer(prompts: Mapping[str, Any]) -> tuple[int, ...]:
  """Returns the static prompt count of each layer, in layer order."""
  return tuple(int(prompts[k].shape[0]) for k in layer_keys(prompts))


def count_prompts(prompts: Mapping[str, Any]) -> dict[str, Any]:
  """Counts prompts per layer and in total.

  Returns:
    ``{"variant", "per_layer": {key: k}, "tokens": Σk, "params": Σk·D}``.
  """
  per_layer = {k: int(prompts[k].shape[0]) for k in layer_keys(prompts)}
  return {
    "variant": prompt_variant(prompts),
    "per_layer": per_layer,
    "tokens": sum(per_layer.values()),
    "params": int(sum(math.prod(v.shape) for v in prompts.values())),
  }


def gather_prompts(
  prompts: Mapping[str, Array],
  keep: Mapping[str, Sequence[int]] | Sequence[Sequence[int]],
) -> PromptTree:
  """Keeps the given prompts of each layer (counts may differ, zero allowed).

  Indices are host values (lists or numpy arrays), so every output shape is
  static and the result can be used inside `jit`; the prompt arrays themselves
  may be traced.

  Args:
    prompts: a prompt tree.
    keep: per-layer indices, either a mapping from layer key or a sequence in
      layer order (`layer_keys`). Indices are used in the order given; they
      must be unique and in range.

  Returns:
    The gathered tree, same keys.

  Raises:
    ValueError: naming the layer with missing, repeated or out-of-range
      indices.
  """
  keys = layer_keys(prompts)
  if not isinstance(keep, Mapping):
    keep = list(keep)
    if len(keep) != len(keys):
      raise ValueError(
        f"keep has {len(keep)} index lists but the tree has {len(keys)} layers."
      )
    keep = dict(zip(keys, keep, strict=True))
  unknown = sorted(set(keep) - set(keys))
  if unknown or set(keep) != set(keys):
    raise ValueError(
      f"keep must name every layer {keys}; unknown {unknown}, missing "
      f"{sorted(set(keys) - set(keep))}."
    )
  out = {}
  for k in keys:
    idx = np.asarray(keep[k], dtype=np.int64).reshape(-1)
    n = prompts[k].shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      raise ValueError(f"keep[{k!r}] has indices outside [0, {n}): {idx}.")
    if len(set(idx.tolist())) != idx.size:
      raise ValueError(f"keep[{k!r}] repeats indices: {idx}.")
    out[k] = jnp.asarray(prompts[k])[idx]
  return out


def backbone_fingerprint(backbone: Mapping[str, Any]) -> str:
  """Returns a short hash that identifies a backbone's weights.

  It covers every key and shape plus the values of the patch embedding, class
  token, position embedding and final norm: cheap for ViT-B (a few MB hashed)
  yet different for any two distinct pretrained checkpoints.

  Args:
    backbone: params tree (``head`` is ignored).
  """
  flat = {
    k: v for k, v in flatten(backbone).items() if not k.startswith("head/")
  }
  h = hashlib.sha256()
  for k in sorted(flat):
    h.update(f"{k}:{tuple(flat[k].shape)};".encode())
  for k in (
    "embedding/kernel",
    "cls",
    "Transformer/posembed_input/pos_embedding",
    "Transformer/encoder_norm/scale",
    # Swin (vptpc.models.swin); absent from ViT trees.
    "patch_embed/proj/kernel",
    "norm/scale",
  ):
    if k in flat:
      h.update(np.ascontiguousarray(np.asarray(flat[k], np.float32)).tobytes())
  return h.hexdigest()[:16]


def _backbone_meta(
  backbone: Mapping[str, Any], fingerprint: bool = True
) -> dict[str, Any]:
  """What `save_prompts` records of a backbone (shapes alone work too).

  Args:
    backbone: params tree; its leaves may be arrays or, with ``fingerprint``
      False, anything with a shape (`jax.eval_shape` output).
    fingerprint: also hash the weights (`backbone_fingerprint`).
  """
  meta = dict(registry.family_of_tree(backbone).backbone_meta(backbone))
  if fingerprint:
    meta["fingerprint"] = backbone_fingerprint(backbone)
  return meta


def save_prompts(
  path: str | os.PathLike,
  prompts: Mapping[str, Array],
  head: Mapping[str, Array] | None = None,
  *,
  backbone: Mapping[str, Any] | None = None,
  metadata: Mapping[str, Any] | None = None,
) -> None:
  """Saves a prompt tree (+ head) as a small standalone `.npz`, atomically.

  The file records the prompt counts and, when ``backbone`` is given, the
  backbone's width, depth, patch size and fingerprint, so `load_prompts` can
  refuse a backbone the prompts were not trained on. It is written to a
  temporary file and renamed, so an existing file is never left truncated.

  Args:
    path: destination file.
    prompts: the prompt tree.
    head: optional ``{"kernel": (D, C), "bias": (C,)}``.
    backbone: the frozen backbone params the prompts were trained with.
    metadata: extra JSON-serialisable info (task, accuracy, keep indices...).
  """
  path = os.fspath(path)
  arrays = {f"prompts/{k}": np.asarray(v) for k, v in prompts.items()}
  if head is not None:
    arrays.update({f"head/{k}": np.asarray(v) for k, v in head.items()})
  meta = {
    "format": FORMAT,
    "version": FORMAT_VERSION,
    "variant": prompt_variant(prompts),
    "prompts_per_layer": list(prompts_per_layer(prompts)),
    "backbone": None if backbone is None else _backbone_meta(backbone),
    "metadata": dict(metadata or {}),
  }
  arrays["__meta__"] = np.asarray(json.dumps(meta))
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = temp_file(d, ".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class Misfit(NamedTuple):
  """One way a prompt file does not fit a backbone (`fit_problems`)."""

  field: str  # hidden_size | widths | num_layers | head | fingerprint
  in_file: Any  # the prompt file's value
  backbone: Any  # the backbone's value
  text: str  # the phrase `load_prompts` joins into its message


def fit_problems(
  prompt_shapes: Mapping[str, Sequence[int]],
  head_kernel_shape: Sequence[int] | None,
  meta: Mapping[str, Any],
  want: Mapping[str, Any],
  *,
  check_fingerprint: bool = True,
) -> list[Misfit]:
  """How prompts of these shapes do not fit a backbone (shapes suffice).

  Shared by `load_prompts` and the preflight checks (`vptpc.preflight`),
  which pass shapes read from file headers and never load an array.

  Args:
    prompt_shapes: prompt-tree key -> shape, as in the file.
    head_kernel_shape: the head kernel's shape, or None (no head).
    meta: the file's ``__meta__`` record (`save_prompts`).
    want: `_backbone_meta` of the backbone, or the same fields read from a
      checkpoint's headers (`vptpc.checkpoint.backbone_dims`); a missing
      ``fingerprint`` is not compared.
    check_fingerprint: compare the recorded fingerprint with ``want``'s.

  Returns:
    One `Misfit` per mismatch; empty when the prompts fit.
  """
  out = []
  widths = {int(s[-1]) for s in prompt_shapes.values()}
  if "widths" in want:  # Swin: widths follow the stages
    for k, s in prompt_shapes.items():
      m = _LAYER_RE.match(k)
      i = int(m.group(1)) if m else 0
      if i < len(want["widths"]) and s[-1] != want["widths"][i]:
        out.append(
          Misfit(
            f"widths[{i}]",
            int(s[-1]),
            want["widths"][i],
            f"prompt set {k} width {s[-1]} vs block width {want['widths'][i]}",
          )
        )
  elif widths - {want["hidden_size"]}:
    out.append(
      Misfit(
        "hidden_size",
        sorted(widths)[0] if len(widths) == 1 else sorted(widths),
        want["hidden_size"],
        f"prompt width {sorted(widths)} vs backbone width "
        f"{want['hidden_size']}",
      )
    )
  if meta.get("variant") == "deep" and len(prompt_shapes) != want["num_layers"]:
    out.append(
      Misfit(
        "num_layers",
        len(prompt_shapes),
        want["num_layers"],
        f"{len(prompt_shapes)} prompt layers vs {want['num_layers']} backbone "
        "blocks",
      )
    )
  if (
    head_kernel_shape is not None
    and head_kernel_shape[0] != want["hidden_size"]
  ):
    out.append(
      Misfit(
        "head",
        int(head_kernel_shape[0]),
        want["hidden_size"],
        f"head input {head_kernel_shape[0]} vs width {want['hidden_size']}",
      )
    )
  saved = (meta.get("backbone") or {}).get("fingerprint")
  now = want.get("fingerprint")
  if check_fingerprint and saved and now and saved != now:
    out.append(
      Misfit(
        "fingerprint",
        saved,
        now,
        f"backbone fingerprint {now} differs from the one the prompts were "
        f"trained on ({saved}); pass check_fingerprint=False to load them "
        "anyway",
      )
    )
  return out


def read_prompt_file(
  path: str | os.PathLike,
) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...] | None, dict[str, Any]]:
  """A prompt file's prompt shapes, head kernel shape and meta, data unread.

  Reads the zip's array headers and the small ``__meta__`` member only, so
  preflight checks cost milliseconds whatever the prompt count.

  Returns:
    (prompt key -> shape, head kernel shape or None, meta as saved).

  Raises:
    PromptFileError: the file is missing, unreadable or not a prompt file.
  """
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    raise PromptFileError(
      f"Prompt file {path!r} is not a readable .npz (not a zip file: "
      "truncated, corrupt or another format)."
    )
  try:
    shapes = read_shapes(path)
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z["__meta__"])) if "__meta__" in z.files else None
  except (
    CheckpointError,
    zipfile.BadZipFile,
    EOFError,
    OSError,
    ValueError,
  ) as e:
    raise PromptFileError(
      f"Prompt file {path!r} is not a readable .npz (truncated?): "
      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ) from e
  if meta is None or meta.get("format") != FORMAT:
    raise PromptFileError(
      f"{path!r} is not a vptpc prompt file (no {FORMAT} __meta__ record)."
    )
  prompt_shapes = {
    k.removeprefix("prompts/"): s
    for k, s in shapes.items()
    if k.startswith("prompts/")
  }
  return prompt_shapes, shapes.get("head/kernel"), meta


# What a training run writes in its workdir (and each stage's workdir).
FILE_NAME = "prompts.npz"


def find_prompt_file(path: str | os.PathLike) -> str:
  """The prompt file ``path`` names: a file, or a run folder's own.

  A folder holding a ``prompts.npz`` gives that file. A folder without one
  is refused, naming the files its sub-folders hold (a Prompt Condensation
  run keeps ``full/prompts.npz`` and ``condensed/prompts.npz``, a protocol
  one per grid point or seed: the choice is the user's), or, if there are
  none, the folder. Anything else is returned as given.

  Raises:
    PromptFileError: a folder without a ``prompts.npz`` of its own.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    return path
  top = os.path.join(path, FILE_NAME)
  if os.path.isfile(top):
    return top
  # Three levels reach a protocol's PC stages (final/seed42/condensed/).
  found = sorted(
    os.path.relpath(f, path)
    for depth in (1, 2, 3)
    for f in glob.glob(os.path.join(path, *["*"] * depth, FILE_NAME))
  )
  if not found:
    raise PromptFileError(
      f"{path!r} is a folder without a {FILE_NAME} (nor do its sub-folders "
      "hold one): pass a finished run's folder or its prompts file."
    )
  more = f" and {len(found) - 4} more" if len(found) > 4 else ""
  raise PromptFileError(
    f"{path!r} is a folder without a {FILE_NAME} of its own; its "
    f"sub-folders hold {len(found)}: {', '.join(found[:4])}{more}; pass "
    f"the one you mean, e.g. {os.path.join(path, found[0])}."
  )


def load_prompts(
  path: str | os.PathLike,
  *,
  backbone: Mapping[str, Any] | None = None,
  check_fingerprint: bool = True,
) -> tuple[PromptTree, dict[str, np.ndarray] | None, dict[str, Any]]:
  """Loads a file written by `save_prompts`, checked against a backbone.

  Args:
    path: the file.
    backbone: the backbone the prompts will run on. Its width and depth must
      match the file's prompts; with ``check_fingerprint`` its weights must be
      the ones recorded at save time.
    check_fingerprint: set False to deliberately transfer prompts to other
      weights of the same shape.

  Returns:
    (prompts, head or None, meta dict as saved).

  Raises:
    PromptFileError: naming the file and what does not match.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise PromptFileError(f"Prompt file {path!r} does not exist.")
  if not zipfile.is_zipfile(path):
    # np.load would try a pickle and advise allow_pickle: wrong advice.
    raise PromptFileError(
      f"Prompt file {path!r} is not a readable .npz (not a zip file: "
      "truncated, corrupt or another format)."
    )
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: np.asarray(z[k]) for k in z.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise PromptFileError(
      f"Prompt file {path!r} is not a readable .npz (truncated?): "
      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ) from e
  if "__meta__" not in arrays:
    raise PromptFileError(
      f"{path!r} is not a vptpc prompt file (no __meta__ record)."
    )
  meta = json.loads(str(arrays.pop("__meta__")))
  if meta.get("format") != FORMAT:
    raise PromptFileError(f"{path!r} has format {meta.get('format')!r}.")
  prompts = {
    k.removeprefix("prompts/"): v
    for k, v in arrays.items()
    if k.startswith("prompts/")
  }
  head = {
    k.removeprefix("head/"): v
    for k, v in arrays.items()
    if k.startswith("head/")
  } or None
  if backbone is not None:
    problems = fit_problems(
      {k: v.shape for k, v in prompts.items()},
      None if head is None else head["kernel"].shape,
      meta,
      _backbone_meta(backbone),
      check_fingerprint=check_fingerprint,
    )
    if problems:
      raise PromptFileError(
        f"Prompt file {path!r} does not fit this backbone: "
        + "; ".join(p.text for p in problems)
        + "."
      )
  return prompts, head, meta


def summary(
  prompts: Mapping[str, Any], head: Mapping[str, Any] | None = None
) -> str:
  """Returns a readable table of prompt counts per layer and totals."""
  c = count_prompts(prompts)
  width = max(len(k) for k in c["per_layer"]) if c["per_layer"] else 5
  d = next(iter(prompts.values())).shape[-1] if prompts else 0
  lines = [f"VPT-{c['variant'].capitalize()} prompts (width {d})"]
  lines += [f"  {k:<{width}}  {n:>5}" for k, n in c["per_layer"].items()]
  lines.append(f"  {'total':<{width}}  {c['tokens']:>5} tokens")
  lines.append(f"  prompt parameters: {c['params']:,}")
  if head is not None:
    hp = int(sum(math.prod(np.shape(v)) for v in head.values()))
    lines.append(f"  head parameters:   {hp:,}")
    lines.append(f"  trainable total:   {c['params'] + hp:,}")
  return "\n".join(lines)
