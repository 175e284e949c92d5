"""The artifact formats of `vptpc.export`: ONNX and StableHLO.

* ONNX (``.onnx``): `to_onnx` converts a task function with jax2onnx and
  checks the model with onnx; `onnx_session` runs it with onnxruntime,
  `quantize_int8` applies onnxruntime's dynamic int8 quantization. These
  need the ``export`` extra (``pip install 'vptpc[export]'``), imported only
  when called.
* StableHLO (``.stablehlo``): `to_stablehlo` serializes with `jax.export`
  into a zip of `STABLEHLO_MODEL` and `STABLEHLO_META`; `load_stablehlo`
  reads it back with jax alone.

Both take ``images`` (B, S, S, 3) with a symbolic batch B and give
``logits``; `read_metadata` reads either format's metadata.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

FORMATS = ("onnx", "stablehlo")
SUFFIXES = {".onnx": "onnx", ".stablehlo": "stablehlo"}
INPUT_DTYPES = ("uint8", "float32")
STABLEHLO_MODEL = "model.jaxexport"
STABLEHLO_META = "metadata.json"
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportError(ValueError):
  """An export request that cannot be carried out (the message says why)."""


def _has_empty_dim(aval: Any) -> bool:
  return any(isinstance(d, int) and d == 0 for d in aval.shape)


def drop_empty_operands(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Returns ``fn`` re-traced without zero-size values.

  jax2onnx 0.17.1 mis-converts a broadcast of a zero-size array to a
  symbolic batch (onnxruntime then rejects a Reshape or an Add), which is
  how the naive graph inserts a condensed layer's zero prompts. The wrapper
  evaluates ``fn``'s jaxpr, skips equations whose only output is empty and
  leaves empty operands out of concatenations, which changes no value.
  """

  def wrapped(*args):
    closed = jax.make_jaxpr(fn)(*args)
    env: dict[Any, Any] = {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(closed.jaxpr.constvars, closed.consts, strict=True):
      env[v] = c
    for v, a in zip(closed.jaxpr.invars, args, strict=True):
      env[v] = a
    for eqn in closed.jaxpr.eqns:
      name = eqn.primitive.name
      if name.endswith("concatenate"):
        invars = [v for v in eqn.invars if not _has_empty_dim(v.aval)]
      else:
        invars = list(eqn.invars)
        if not eqn.primitive.multiple_results and _has_empty_dim(
          eqn.outvars[0].aval
        ):
          env[eqn.outvars[0]] = None  # never read but by a concatenation
          continue
      ins = [read(v) for v in invars]
      if any(x is None for x in ins):
        raise ExportError(f"A zero-size value feeds {name}; cannot convert.")
      # jax < 0.7 returns (subfuns, params), later jax the params alone.
      bp = eqn.primitive.get_bind_params(eqn.params)
      subfuns, params = bp if isinstance(bp, tuple) else ((), bp)
      out = eqn.primitive.bind(*subfuns, *ins, **params)
      if eqn.primitive.multiple_results:
        for v, o in zip(eqn.outvars, out, strict=True):
          env[v] = o
      else:
        env[eqn.outvars[0]] = out
    outs = [read(v) for v in closed.jaxpr.outvars]
    return outs[0] if len(outs) == 1 else tuple(outs)

  return wrapped


def _input_spec(image_size: int, input_dtype: str, name: str = "B"):
  """(B, S, S, 3) with a symbolic batch."""
  if input_dtype not in INPUT_DTYPES:
    raise ExportError(
      f"input_dtype must be one of {', '.join(INPUT_DTYPES)}, got "
      f"{input_dtype!r}."
    )
  (b,) = jax.export.symbolic_shape(name)
  return jax.ShapeDtypeStruct(
    (b, image_size, image_size, 3), np.dtype(input_dtype)
  )


def to_onnx(
  fn: Callable[[jax.Array], jax.Array],
  *,
  image_size: int,
  input_dtype: str = "uint8",
  metadata: Mapping[str, Any] | None = None,
):
  """Converts a task function to an `onnx.ModelProto` with jax2onnx.

  Inputs ``images`` (B, S, S, 3) and output ``logits``; ``metadata`` goes
  into ``metadata_props`` (values JSON-encoded unless strings).
  """
  # optional: the [export] extra
  import jax2onnx
  import onnx

  # jax2onnx's IR serializer warns about every shape helper it builds.
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)
  model = jax2onnx.to_onnx(
    drop_empty_operands(fn),
    [_input_spec(image_size, input_dtype)],
    model_name="vptpc_task",
    input_names=[INPUT_NAME],
    output_names=[OUTPUT_NAME],
  )
  if metadata:
    _set_onnx_metadata(model, metadata)
  onnx.checker.check_model(model)
  return model


def _set_onnx_metadata(model, metadata: Mapping[str, Any]) -> None:
  """Replaces an ONNX model's ``metadata_props`` (JSON unless strings)."""
  import onnx  # optional: the [export] extra

  del model.metadata_props[:]
  onnx.helper.set_model_props(
    model,
    {
      k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()
    },
  )


def to_stablehlo(
  fn: Callable[[jax.Array], jax.Array],
  *,
  image_size: int,
  input_dtype: str = "uint8",
  platforms: Sequence[str] = ("cpu",),
) -> bytes:
  """Serializes a task function with `jax.export` (StableHLO + calling info).

  The batch dimension is symbolic, so one artifact serves every batch size.
  """
  spec = _input_spec(image_size, input_dtype, "b")
  exp = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
  return bytes(exp.serialize())


def load_stablehlo(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
  """Reads a ``.stablehlo`` artifact: (`jax.export.Exported`, metadata).

  ``exported.call(images)`` returns the logits. Needs jax only; the
  module docstring shows the same three lines without vptpc.
  """
  with zipfile.ZipFile(path) as z:
    exp = jax.export.deserialize(bytearray(z.read(STABLEHLO_MODEL)))
    meta = json.loads(z.read(STABLEHLO_META))
  return exp, meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """Returns an artifact's metadata (either format), values decoded."""
  path = os.fspath(path)
  if path.endswith(".onnx"):
    import onnx  # optional: the [export] extra

    m = onnx.load(path, load_external_data=False)
    out = {}
    for p in m.metadata_props:
      try:
        out[p.key] = json.loads(p.value)
      except json.JSONDecodeError:
        out[p.key] = p.value
    return out
  with zipfile.ZipFile(path) as z:
    return json.loads(z.read(STABLEHLO_META))


def onnx_session(path_or_bytes: str | os.PathLike | bytes, threads: int = 0):
  """An onnxruntime CPU session (warnings only), ``threads`` 0 = default."""
  import onnxruntime as ort  # optional: the [export] extra

  so = ort.SessionOptions()
  so.log_severity_level = 3  # its initializer clean-up notes are noise
  if threads:
    so.intra_op_num_threads = threads
  src = (
    path_or_bytes
    if isinstance(path_or_bytes, bytes)
    else os.fspath(path_or_bytes)
  )
  return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def format_of(output: str, fmt: str | None) -> str:
  """The format to write: ``fmt`` if given, else from ``output``'s suffix.

  Either is read without regard to case (``ONNX``, ``task.StableHLO``).

  Raises:
    ExportError: an unknown format, or a suffix that names none.
  """
  if fmt:
    if fmt.strip().lower() not in FORMATS:
      raise ExportError(
        f"unsupported format {fmt!r}; supported: {', '.join(FORMATS)}."
      )
    return fmt.strip().lower()
  suffix = os.path.splitext(output)[1].lower()
  if suffix not in SUFFIXES:
    raise ExportError(
      f"unsupported format: cannot tell it from {output!r} (suffix "
      f"{suffix or 'none'!r}); name the file .onnx or .stablehlo, or pass "
      f"--format={'|'.join(FORMATS)}."
    )
  return SUFFIXES[suffix]


def quantize_int8(path: str, meta: dict[str, Any]) -> None:
  """Replaces the ONNX file at ``path`` by its dynamic int8 quantization."""
  # optional: the [export] extra
  import onnx
  from onnxruntime.quantization import QuantType, quantize_dynamic

  fd, q = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".int8.tmp")
  os.close(fd)
  try:
    quantize_dynamic(path, q, weight_type=QuantType.QInt8)
    model = onnx.load(q)
    _set_onnx_metadata(model, meta)  # quantize_dynamic drops the props
    onnx.save(model, path)
  finally:
    with contextlib.suppress(OSError):
      os.remove(q)
