"""One task as a portable inference artifact: ONNX or StableHLO.

  python -m vptpc.export --prompts=runs/demo/condensed/prompts.npz \\
      --output=task.onnx                 # jax2onnx, runs with onnxruntime
  python -m vptpc.export --prompts=runs/demo/condensed/prompts.npz \\
      --output=task.stablehlo            # jax.export, reloads with jax alone

The artifact is one file that maps images (B, H, W, 3), uint8 pixels (or
float32 pixels in [0, 255] with ``--input_dtype=float32``), to logits
(B, C); the batch B is dynamic, H = W = the task's image size. Baked into
the graph as constants: the frozen backbone; the task's prompts as its
per-task key/value cache (`vptpc.models.vit.build_kv_cache`: each layer's
prompt keys and values, projected once at export time), or with
``--graph=full`` the prompt tokens themselves on the naive full-token
forward, so both can be measured; the head; and the normalisation
(`vptpc.data.preprocessing.normalize`: ``imagenet`` or ``minus1_1``). Ragged
per-layer prompt counts (condensed tasks) are fine, zero included.

Not exported: resizing (feed images already at the task's size), training,
prompt dropout, the vmapped grid and multi-task serving (`vptpc.serve`).

Formats (``--format``, or the output's suffix):

* ``onnx`` (``.onnx``): converted with jax2onnx, checked with onnxruntime;
  metadata in the model's ``metadata_props``. ``--quantize=int8`` applies
  onnxruntime's dynamic int8 quantization (not exact: its accuracy change
  is measured, not asserted; ``benchmarks/export_latency.py``).
* ``stablehlo`` (``.stablehlo``): a zip holding ``model.jaxexport``
  (`jax.export` serialization) and ``metadata.json``; reload it without
  vptpc::

    import json, zipfile, jax
    with zipfile.ZipFile("task.stablehlo") as z:
      exp = jax.export.deserialize(bytearray(z.read("model.jaxexport")))
      meta = json.loads(z.read("metadata.json"))
    logits = exp.call(images)

Both record the backbone fingerprint, the prompt counts per layer, the
graph, the preprocessing and the vptpc version. Before the file appears,
the artifact is run on random images and its logits compared with vptpc's
JAX logits (``--check``, on by default; fp32 must agree within
``--tolerance``). Model, backbone, image size and normalisation default
to the training run's ``config.json`` beside the prompts file, then to the
embedded backbone. ``--prompts`` may name a run's folder (its own
``prompts.npz``; `vptpc.prompts.find_prompt_file`); a run on a randomly
initialised backbone has no weights to bake in and is refused. Bad inputs
fail with one ``error:`` line (exit status 2) and leave no file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import vptpc
from vptpc import (
  assets,
  checkpoint,
  config_util,
  export_formats,
  hub,
  moved,
  npz_checkpoint,
  records,
)
from vptpc import prompts as prompts_lib
from vptpc.data import preprocessing, sources
from vptpc.export_formats import ExportError
from vptpc.models import registry, vit

GRAPHS = ("kv", "full")
QUANTIZE = ("none", "int8")


def _timm_backbone_flat(
  path: str,
  model_name: str,
  cfg: Any,
  run: Mapping[str, Any],
  image_size: int | None,
) -> dict[str, np.ndarray]:
  """A timm ``.safetensors`` backbone as vit_jax-layout flat arrays.

  Loaded onto the model's template at the run's image size (or the
  checkpoint's own, `vptpc.models.vit_variants.TIMM_WEIGHTS`), so the
  position embedding is resized as the run resized it.
  """
  pre = registry.pretrained(model_name)
  size = int(
    image_size
    or run.get("data", {}).get("image_size")
    or (pre.image_size if pre is not None else 224)
  )
  template = jax.eval_shape(
    lambda: vit.init_params(vit.create_model(cfg), jax.random.key(0), size)
  )
  try:
    return npz_checkpoint.flatten(checkpoint.load_pretrained(path, template))
  except npz_checkpoint.CheckpointError as e:
    raise ExportError(str(e).splitlines()[0]) from e


def normalization(mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns float32 (scale, shift) with ``pixels * scale + shift``.

  `vptpc.data.preprocessing.affine`: the same map, in the same float32
  arithmetic, as the host pipeline, so the in-graph preprocessing is
  bitwise the pipeline's.

  Raises:
    ExportError: an unknown mode.
  """
  try:
    return preprocessing.affine(mode)
  except sources.DataError as e:
    raise ExportError(str(e)) from None


def task_function(
  model_name: str,
  backbone: Mapping[str, Any],
  prompts: Mapping[str, Any] | None,
  head: Mapping[str, Any],
  *,
  graph: str = "kv",
  normalize: str = "minus1_1",
  arch: Mapping[str, int] | None = None,
) -> Callable[[jax.Array], jax.Array]:
  """Returns ``logits(images)`` with backbone, prompts, head baked in.

  Args:
    model_name: a `vptpc.models.vit.model_names` variant (timm's
      checkpoint names included).
    backbone: frozen ViT parameters (no head).
    prompts: the task's prompt tree (deep or shallow; None or empty for a
      head-only task).
    head: ``{"kernel": (D, C), "bias": (C,)}``.
    graph: ``kv``: VPT-Deep prompts as the per-task key/value cache, the
      cheap exact form; ``full``: the naive forward, prompts as tokens
      through every block (VPT-Shallow always runs this one).
    normalize: a `vptpc.data.preprocessing.NORMALIZATIONS` mode, applied
      to 0-255 pixels.
    arch: ``config.model.arch`` sizes of a shrunk model (None: none).

  Returns:
    A function of (B, H, W, 3) uint8 or float pixels, traceable by `jit`,
    `jax.export` and jax2onnx; its constants are numpy arrays.

  Raises:
    ExportError: an unknown graph or normalisation, or ``kv`` with
      shallow prompts.
  """
  if graph not in GRAPHS:
    raise ExportError(
      f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}."
    )
  scale, shift = normalization(normalize)
  variant = vit.prompt_variant(prompts)
  if graph == "kv" and variant == "shallow":
    raise ExportError(
      "VPT-Shallow prompts are carried through every block, so they have "
      "no key/value form; export them with --graph=full."
    )
  num_classes = int(np.shape(head["kernel"])[-1])
  model = vit.create_model(
    model_name,
    num_classes=num_classes,
    kv_only=graph == "kv",
    **dict(arch or {}),
  )
  as_np = lambda t: jax.tree_util.tree_map(  # noqa: E731
    lambda a: np.asarray(a, np.float32), t
  )
  params = as_np(vit.merge_head(backbone, head))
  baked = None
  if variant == "deep" and graph == "kv":
    # Projected once here, so the graph holds only each layer's keys and
    # values: a prompt then costs attention columns, not a token.
    baked = as_np(
      vit.build_kv_cache(
        backbone, prompts, model.num_heads, ln_eps=model.ln_eps
      )
    )
  elif variant != "none":
    baked = as_np(prompts)

  def logits(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32) * scale + shift
    return model.apply({"params": params}, x, baked)

  return logits


def _versions(fmt: str) -> dict[str, str]:
  pkgs = ["jax", "jaxlib"]
  pkgs += ["jax2onnx", "onnx", "onnxruntime"] if fmt == "onnx" else []
  out = {"vptpc": vptpc.__version__}
  for p in pkgs:
    try:
      out[p] = md.version(p)
    except md.PackageNotFoundError:
      pass
  return out


def _run_config(prompts_path: str) -> dict[str, Any]:
  """The training run's ``config.json`` beside the prompts file, or {}."""
  path = os.path.join(
    os.path.dirname(os.path.abspath(prompts_path)), "config.json"
  )
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}


def _refuse_random_backbone(prompts_path: str, run: Mapping[str, Any]) -> None:
  """Refuses prompts whose run trained on a random-init backbone.

  Such a run (``config.model.checkpoint_path`` empty, as in
  ``configs/tiny.py``) saved no backbone weights, and no file holds them:
  the prompts fit no backbone that could be baked into the graph.

  Raises:
    ExportError: naming the run's config and the fix.
  """
  if run["model"]["checkpoint_path"]:
    return
  config = os.path.join(os.path.dirname(os.path.abspath(prompts_path)), "")
  raise ExportError(
    f"{prompts_path} was trained on a randomly initialised backbone "
    f"({config}config.json: config.model.checkpoint_path is empty), so "
    "there are no backbone weights to export it with: train with a real "
    "checkpoint (config.model.checkpoint_path=PATH, e.g. configs/folder.py's "
    "embedded backbone) and export that run."
  )


def _native_image_size(flat: Mapping[str, np.ndarray], patch: int) -> int:
  """The image size a backbone file's position embedding was made for."""
  n = int(np.shape(flat[npz_checkpoint.POSEMB_KEY])[1]) - 1
  g = int(round(n**0.5))
  return g * patch


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[str]:
  """Yields a temporary path beside ``path``; renamed to it on success.

  On any failure the temporary file (and a directory made for it) is
  removed, so an interrupted or failed export leaves nothing behind and
  never replaces an existing file.
  """
  d = os.path.dirname(os.path.abspath(path))
  made = []
  head = d
  while not os.path.isdir(head):
    made.append(head)
    head = os.path.dirname(head)
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
  )
  os.close(fd)
  try:
    yield tmp
    # mkstemp makes the file private (0600); an artifact is for sharing.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    for m in made:  # deepest first
      with contextlib.suppress(OSError):
        os.rmdir(m)
    raise


def export_task(
  prompts_path: str | os.PathLike,
  output: str | os.PathLike,
  *,
  fmt: str | None = None,
  graph: str = "kv",
  backbone_path: str | None = None,
  model_name: str | None = None,
  image_size: int | None = None,
  normalize: str | None = None,
  input_dtype: str = "uint8",
  quantize: str = "none",
  platforms: Sequence[str] = ("cpu",),
  check: bool = True,
  tolerance: float = 1e-4,
  check_fingerprint: bool = True,
) -> dict[str, Any]:
  """Writes one task's inference artifact; see the module docstring.

  Args:
    prompts_path: a `vptpc.prompts.save_prompts` file with a head.
    output: the artifact to write (``.onnx`` or ``.stablehlo``).
    fmt: ``onnx`` or ``stablehlo``; None: from ``output``'s suffix.
    graph: ``kv`` (per-task key/value cache) or ``full`` (naive tokens).
    backbone_path: vit_jax ``.npz``; None: the run's config, then the
      embedded backbone.
    model_name: ViT variant; None: the prompts file's record, the run's
      config, then the embedded model.
    image_size: input side; None: the run's config, then the backbone's.
    normalize: ``imagenet`` | ``minus1_1``; None: the run's config, then
      ``minus1_1`` for the embedded backbone (what it was trained on).
    input_dtype: ``uint8`` or ``float32`` (pixels in [0, 255] either way).
    quantize: ``none`` or ``int8`` (ONNX dynamic quantization).
    platforms: StableHLO lowering platforms (e.g. ``("cpu", "cuda")``).
    check: run the artifact on 4 random images against vptpc's JAX logits.
    tolerance: fp32 check bound on ``max |diff| / max(1, max |logit|)``.
    check_fingerprint: refuse prompts trained on other backbone weights.

  Returns:
    The metadata written, plus ``path``, ``bytes`` and ``max_abs_diff``.

  Raises:
    ExportError, vptpc.prompts.PromptFileError,
    vptpc.npz_checkpoint.CheckpointError: a bad request, each naming the
      problem; no file is written then.
    ImportError: the converter packages are missing (``vptpc[export]``).
  """
  prompts_path, output = os.fspath(prompts_path), os.fspath(output)
  fmt = export_formats.format_of(output, fmt)
  if quantize not in QUANTIZE:
    raise ExportError(f"quantize must be one of {QUANTIZE}, got {quantize!r}.")
  if quantize != "none" and fmt != "onnx":
    raise ExportError("--quantize=int8 applies to the onnx format only.")
  if graph not in GRAPHS:
    raise ExportError(
      f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}."
    )
  if input_dtype not in export_formats.INPUT_DTYPES:
    raise ExportError(
      "input_dtype must be one of "
      f"{', '.join(export_formats.INPUT_DTYPES)}, got {input_dtype!r}."
    )
  # The file alone first: a missing or foreign file fails before any work,
  # the converters' imports (about a second) included.
  prompts_path = prompts_lib.find_prompt_file(prompts_path)
  _, _, saved = prompts_lib.load_prompts(prompts_path)
  run = _run_config(prompts_path)
  if backbone_path is None and "checkpoint_path" in run.get("model", {}):
    _refuse_random_backbone(prompts_path, run)
  if fmt == "onnx":
    try:  # optional: the [export] extra, needed here for ONNX
      import jax2onnx  # noqa: F401
      import onnx  # noqa: F401
      import onnxruntime  # noqa: F401
    except ImportError as e:
      raise ImportError(
        f"ONNX export needs jax2onnx, onnx and onnxruntime "
        f"(pip install 'vptpc[export]'): {e}"
      ) from e
  model_name = (
    model_name
    or saved.get("metadata", {}).get("model")
    or run.get("model", {}).get("name")
    or assets.DEFAULT_MODEL
  )
  # The backbone the prompts file records decides the family; a file
  # without that record, the model name.
  arch = (saved.get("backbone") or {}).get("arch")
  try:
    fam = registry.family(arch) if arch else registry.family_of_name(model_name)
  except ValueError as e:
    raise ExportError(str(e)) from e
  if not fam.EXPORTABLE:
    # The exported graphs are the ViT's (`task_function`); other families'
    # tasks are served by `vptpc.serve` (key/value cache per task).
    raise ExportError(
      f"{prompts_path!r} belongs to a {fam.DISPLAY}; vptpc.export writes "
      "ViT graphs only: serve its tasks with python -m vptpc.serve "
      "--model=<name> --backbone=<.safetensors>."
    )
  try:
    arch = config_util.parse_arch(run.get("model", {}).get("arch", ""))
    cfg = vit.get_model_config(model_name, **arch)
  except ValueError as e:
    raise ExportError(str(e)) from e
  backbone_path = (
    backbone_path or run.get("model", {}).get("checkpoint_path") or None
  )
  if backbone_path is not None:
    try:
      backbone_path = hub.local_path(backbone_path)
    except hub.HubError as e:
      raise ExportError(str(e)) from e
  embedded = backbone_path is None
  if str(backbone_path).endswith(".safetensors"):
    flat = _timm_backbone_flat(backbone_path, model_name, cfg, run, image_size)
  else:
    flat = npz_checkpoint.read_npz(backbone_path or assets.path())
  if npz_checkpoint.POSEMB_KEY not in flat:
    raise ExportError(f"{backbone_path!r} has no position embedding.")
  image_size = int(
    image_size
    or run.get("data", {}).get("image_size")
    or _native_image_size(flat, cfg.patch_size)
  )
  # Named with the sizes that fit, before the backbone is restored.
  bad = registry.image_size_problems({"name": model_name}, image_size, arch)
  if bad:
    raise ExportError(bad[0].replace("config.data.image_size", "--image_size"))
  normalize = normalize or run.get("data", {}).get("normalize")
  if normalize is None:
    if not embedded:
      raise ExportError(
        "the prompts file does not record its normalisation and there is "
        "no config.json beside it; pass --normalize=imagenet|minus1_1."
      )
    normalize = "minus1_1"  # what the embedded backbone was trained on
  normalization(normalize)
  template = jax.eval_shape(
    lambda: vit.init_params(
      vit.create_model(cfg), jax.random.key(0), image_size
    )
  )
  backbone = npz_checkpoint.restore_params(
    flat, template, source=repr(backbone_path or assets.path())
  )
  prompts, head, saved = prompts_lib.load_prompts(
    prompts_path, backbone=backbone, check_fingerprint=check_fingerprint
  )
  if head is None:
    raise ExportError(
      f"{prompts_path!r} holds no head; an exported classifier needs one."
    )
  fn = task_function(
    model_name,
    backbone,
    prompts,
    head,
    graph=graph,
    normalize=normalize,
    arch=arch,
  )
  variant = vit.prompt_variant(prompts)
  meta = {
    "producer": "vptpc.export",
    "vptpc_version": _versions(fmt)["vptpc"],
    "vptpc_git": records.git_sha(short=True),
    "versions": _versions(fmt),
    "format": fmt,
    "graph": graph,
    "quantize": quantize,
    "model": model_name,
    "backbone_fingerprint": prompts_lib.backbone_fingerprint(backbone),
    "prompt_variant": variant,
    "prompts_per_layer": list(prompts_lib.prompts_per_layer(prompts))
    if variant != "none"
    else [],
    "num_classes": int(np.shape(head["kernel"])[-1]),
    "image_size": image_size,
    "input": f"{export_formats.INPUT_NAME}: (B, {image_size}, {image_size}, "
    f"3) {input_dtype} pixels in [0, 255], RGB, already resized",
    "input_dtype": input_dtype,
    "normalize": normalize,
    "output": f"{export_formats.OUTPUT_NAME}: (B, num_classes) float32",
    "task": saved.get("metadata", {}),
    "source_prompts": os.path.basename(prompts_path),
  }
  with _atomic_output(output) as tmp:
    if fmt == "onnx":
      import onnx  # optional: the [export] extra

      model = export_formats.to_onnx(
        fn, image_size=image_size, input_dtype=input_dtype, metadata=meta
      )
      onnx.save(model, tmp)
      if quantize == "int8":
        export_formats.quantize_int8(tmp, meta)
    else:
      blob = export_formats.to_stablehlo(
        fn, image_size=image_size, input_dtype=input_dtype, platforms=platforms
      )
      with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        z.writestr(export_formats.STABLEHLO_MODEL, blob)
        z.writestr(export_formats.STABLEHLO_META, json.dumps(meta, indent=1))
    diff = None
    if check:
      diff = _check(tmp, fmt, fn, image_size, input_dtype)
      bound = tolerance * max(1.0, diff["max_abs_logit"])
      if quantize == "none" and not diff["max_abs_diff"] <= bound:
        raise ExportError(
          f"the exported {fmt} logits differ from vptpc's JAX logits by "
          f"{diff['max_abs_diff']:.3g} (> {bound:.3g}); no file written."
        )
    size = os.path.getsize(tmp)
  return dict(meta, path=output, bytes=size, check=diff)


def _check(
  path: str, fmt: str, fn, image_size: int, input_dtype: str
) -> dict[str, float]:
  """Runs the written artifact and vptpc's JAX function on random images."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (4, image_size, image_size, 3), dtype=np.uint8)
  x = x.astype(input_dtype)
  want = np.asarray(jax.jit(fn)(x))
  if fmt == "onnx":
    got = export_formats.onnx_session(path).run(
      None, {export_formats.INPUT_NAME: x}
    )[0]
  else:
    exp, _ = export_formats.load_stablehlo(path)
    got = np.asarray(exp.call(x))
  return {
    "max_abs_diff": float(np.max(np.abs(got - want))),
    "max_abs_logit": float(np.max(np.abs(want))),
  }


def _one_line(e: BaseException, keep: int = 2) -> str:
  """An error as one line; each indented list cut to ``keep`` entries.

  A checkpoint that does not fit the model lists every key it lacks or
  has too many of (hundreds); the line keeps each list's count and first
  entries.
  """
  out: list[str] = []
  items: list[str] = []

  def flush() -> None:
    if items and out:
      more = f" and {len(items) - keep} more" if len(items) > keep else ""
      head = out[-1].rstrip(":")
      out[-1] = f"{head} ({len(items)}): {', '.join(items[:keep])}{more}"
    items.clear()

  for ln in str(e).splitlines():
    if ln[:1].isspace() and ln.strip() and out:
      items.append(ln.strip())
    elif ln.strip():
      flush()
      out.append(ln.strip())
  flush()
  return "; ".join(x.rstrip(":") for x in out) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
  """The ``python -m vptpc.export`` command; returns the exit status."""
  ap = argparse.ArgumentParser(
    prog="python -m vptpc.export",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument(
    "--prompts", required=True, help="the task's prompts.npz (with a head)"
  )
  ap.add_argument(
    "--output", required=True, help="artifact to write: X.onnx or X.stablehlo"
  )
  ap.add_argument(
    "--format",
    default=None,
    help="onnx | stablehlo, any case (default: from --output)",
  )
  ap.add_argument(
    "--graph",
    default="kv",
    help="kv: prompts baked as the per-task key/value cache (default); "
    "full: the naive full-token forward, for measuring it",
  )
  ap.add_argument(
    "--input_dtype", default="uint8", help="uint8 | float32 (0-255 pixels)"
  )
  ap.add_argument("--backbone", default=None, help="vit_jax .npz")
  ap.add_argument("--model", default=None, help="ViT variant, e.g. B/16")
  ap.add_argument("--image_size", type=int, default=None)
  ap.add_argument("--normalize", default=None, help="imagenet | minus1_1")
  ap.add_argument(
    "--quantize", default="none", help="none | int8 (onnx: dynamic int8)"
  )
  ap.add_argument(
    "--platforms", default="cpu", help="stablehlo lowering, e.g. cpu,cuda"
  )
  ap.add_argument(
    "--check",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="compare the artifact with vptpc's JAX logits before writing it",
  )
  ap.add_argument("--tolerance", type=float, default=1e-4)
  ap.add_argument(
    "--no_fingerprint_check",
    action="store_true",
    help="export prompts onto backbone weights they were not trained on",
  )
  a = ap.parse_args(argv)
  try:
    info = export_task(
      a.prompts,
      a.output,
      fmt=a.format,
      graph=a.graph,
      backbone_path=a.backbone,
      model_name=a.model,
      image_size=a.image_size,
      normalize=a.normalize,
      input_dtype=a.input_dtype,
      quantize=a.quantize,
      platforms=[p for p in a.platforms.split(",") if p],
      check=a.check,
      tolerance=a.tolerance,
      check_fingerprint=not a.no_fingerprint_check,
    )
  except (
    ExportError,
    npz_checkpoint.CheckpointError,
    prompts_lib.PromptFileError,
    ImportError,
    OSError,
    ValueError,
  ) as e:
    # load_prompts names its Python keyword; a CLI user needs the flag.
    msg = _one_line(e).replace(
      "pass check_fingerprint=False", "pass --no_fingerprint_check"
    )
    print(f"error: {msg}", file=sys.stderr)
    return 2
  print(json.dumps(info))
  return 0


# Names that moved to `vptpc.export_formats` (and the normalisation
# constants, always `vptpc.data.preprocessing`'s): still importable from
# here, with a DeprecationWarning naming the new home.
_MOVED = {
  "FORMATS": export_formats,
  "SUFFIXES": export_formats,
  "INPUT_DTYPES": export_formats,
  "STABLEHLO_MODEL": export_formats,
  "STABLEHLO_META": export_formats,
  "INPUT_NAME": export_formats,
  "OUTPUT_NAME": export_formats,
  "drop_empty_operands": export_formats,
  "to_onnx": export_formats,
  "to_stablehlo": export_formats,
  "load_stablehlo": export_formats,
  "read_metadata": export_formats,
  "onnx_session": export_formats,
  "IMAGENET_MEAN": preprocessing,
  "IMAGENET_STD": preprocessing,
  "NORMALIZATIONS": preprocessing,
}


__getattr__ = moved.forwarder(__name__, _MOVED)


if __name__ == "__main__":
  sys.exit(main())
